"""The shared queue suite's bodies (see ``tests/support/queues/__init__.py``) as RQ job
functions. RQ's retries are set where a job is enqueued: the adapter enqueues every message with
``Retry(max=5)``; a job whose key is busy returns ``Retry`` (1 s apart: RQ's intervals are whole
seconds, and the worker's scheduler runs them)."""

from __future__ import annotations

import os
import uuid

from idemfn.rq import idempotent_job
from tests.support.workers import crash_on_first_run, effect, held

__all__ = ["crash_halt", "crash_retry", "flaky", "once", "shared"]


def _run(name: str, hold: bool) -> str:
    effect(name, str(os.getpid()))
    if hold:
        held(name)
    return f"{name}: {uuid.uuid4().hex}"


@idempotent_job(interval=1, max_retries=60)
def once(name: str, hold: bool) -> str:
    return _run(name, hold)


@idempotent_job(key="shared:{name}", interval=1, max_retries=60)
def shared(name: str, hold: bool) -> str:
    return _run(name, hold)


@idempotent_job(interval=1)
def crash_halt(name: str) -> str:
    return crash_on_first_run(name)


@idempotent_job(on_abandoned="retry", interval=1)
def crash_retry(name: str) -> str:
    return crash_on_first_run(name)


@idempotent_job()
def flaky(name: str, failures: int) -> str:
    runs = effect(name, str(os.getpid()))
    if runs <= failures:
        raise ConnectionError(f"run {runs} failed")
    return f"ok on run {runs}"
