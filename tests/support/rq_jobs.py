"""The RQ job functions that ``tests/integrations/test_rq.py`` enqueues for real ``rq worker``
processes.

Configured by the environment the test gives the worker: ``IDEMFN_STORE`` (the store the jobs
share) and ``IDEMFN_TEST_EFFECTS`` (where bodies append their side effects).
"""

from __future__ import annotations

import os
import uuid

from idemfn import MemoryStore, idempotent
from idemfn.rq import idempotent_job

from .workers import crash_on_first_run, effect, held


# Two jobs for one order pay once; a duplicate that finds the first running comes back later.
# With ``hold``, the body runs until the test releases "pay-<order>".
@idempotent_job(key="pay:{order}", interval=1)
def pay(order: str, hold: bool = False) -> str:
    effect(f"pay-{order}", str(os.getpid()))
    if hold:
        held(f"pay-{order}")
    return f"paid {order}: {uuid.uuid4().hex}"  # differs per run: replays must match


# The plain decorator is enough when duplicates don't overlap (or with wait=).
@idempotent(key="refund:{order}")
def refund(order: str) -> str:
    effect(f"refund-{order}", str(os.getpid()))
    return f"refunded {order}: {uuid.uuid4().hex}"


@idempotent_job(interval=1)  # keyed on the job's id
def crash_halt(name: str) -> str:
    return crash_on_first_run(name)


@idempotent_job(on_abandoned="retry", interval=1)
def crash_retry(name: str) -> str:
    return crash_on_first_run(name)


# The plain decorator in a job enqueued with retry=Retry(max=2): failures release the key while
# RQ will run the job again; the last one is recorded.
@idempotent(key=lambda name, failures: f"flaky:{name}")
def flaky(name: str, failures: int) -> str:
    runs = effect(name, str(os.getpid()))
    if runs <= failures:
        raise ConnectionError(f"run {runs} failed")
    return f"ok on run {runs}"


class Declined(Exception):
    """A payment provider's refusal, which the job handles."""


@idempotent(key="charge:{order}")
def charge(order: str) -> None:
    effect(f"charge-{order}", str(os.getpid()))
    raise Declined(order)


def checkout(order: str) -> str:
    """A job (enqueued with retries) that catches its nested call's failure."""
    try:
        charge(order)
    except Declined:
        return "declined"
    return "charged"


# In the test process only (a SimpleWorker burst): another job's function called directly.
_here = MemoryStore()


@idempotent_job(store=_here)  # keyed on the job's id
def notify(user: str) -> str:
    return user


def notify_all(users: list[str]) -> list[str]:
    """A job calling ``notify``'s function directly for each user: what each call said."""
    said = []
    for user in users:
        try:
            said.append(notify(user))  # type: ignore[arg-type]
        except ValueError as exc:
            said.append(f"ValueError: {exc}")
    return said
