"""The Celery app that ``tests/integrations/test_celery.py`` runs in real worker processes.

The worker imports this module (``celery -A tests.support.celery_tasks worker``), configured by the
environment the test gives it:

- ``IDEMFN_TEST_REDIS``: the unix socket of the suite's redis-server (broker and results);
- ``IDEMFN_TEST_QUEUE``: the queue this worker consumes, one per test worker;
- ``IDEMFN_STORE``: the store the tasks share (a directory, or a Redis URL);
- ``IDEMFN_TEST_EFFECTS``: where bodies append their side effects, one file per name, and where
  every delivery's outcome is logged (``deliveries``, by the ``task_postrun`` signal, in the
  shared queue suite's form: ``tests.support.queues.log_delivery``), and every delivery's start
  (``started``, by ``task_prerun``: the task id).

The shared queue suite's bodies (``tests.support.queues.celery_bodies``) are tasks of this app.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from celery import Celery, Task
from celery.signals import task_postrun, task_prerun

from idemfn import AlreadyRunning, idempotent
from idemfn.celery import idempotent_task, task_id

from .queues import State, log_delivery
from .workers import crash_on_first_run, effect, held

_socket = os.environ.get("IDEMFN_TEST_REDIS", "/nonexistent/redis.sock")
app = Celery(
    "celery_tasks", broker=f"redis+socket://{_socket}", backend=f"redis+socket://{_socket}"
)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=os.environ.get("IDEMFN_TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
    # A worker killed whole leaves its message unacknowledged; the broker hands it to another
    # worker after this many seconds.
    broker_transport_options={
        "visibility_timeout": float(os.environ.get("IDEMFN_TEST_VISIBILITY", "3600")),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
        # A worker killed while it held the restore's mutex (it takes it every second) kept
        # every other worker of the suite's redis-server from restoring anything for kombu's
        # default 300 s: two whole-worker tests after it timed out under load (issue 16).
        "unacked_mutex_expire": 5,
    },
)


@task_prerun.connect
def _log_start(task_id: str, task: Task, **_: Any) -> None:
    if "IDEMFN_TEST_EFFECTS" in os.environ:  # (not for eager tasks in the test process)
        effect("started", task_id)


@task_postrun.connect
def _log_delivery(task_id: str, task: Task, retval: Any, state: str, **_: Any) -> None:
    # (Eager tasks in the test process log nothing: log_delivery needs IDEMFN_TEST_EFFECTS.)
    log_delivery(task_id, _STATES.get(state, "failed"), repr(retval))


# Celery's states of a delivery's end, as the shared queue suite names them.
_STATES: dict[str, State] = {"SUCCESS": "ok", "RETRY": "retry", "FAILURE": "failed"}


# The plain decorator, keyed on a business argument: messages with other ids ship once; a
# duplicate that finds the first one running waits for its outcome (without wait=, it would
# fail with AlreadyRunning).
@app.task
@idempotent(key="ship:{order}", wait=30)
def ship(order: str, hold: bool = False) -> str:
    effect(f"ship-{order}", str(os.getpid()))
    if hold:
        held(f"ship-{order}")
    return f"shipped {order}: {uuid.uuid4().hex}"


@app.task(bind=True)
@idempotent_task(countdown=0.2)
def crash_halt(self: Task, name: str) -> str:
    return crash_on_first_run(name)


@app.task(bind=True)
@idempotent_task(on_abandoned="retry", countdown=0.2)
def crash_retry(self: Task, name: str) -> str:
    return crash_on_first_run(name)


# The plain decorator and self.retry() inside the body: Retry releases the key.
@app.task(bind=True, max_retries=5)
@idempotent(key=task_id)
def flaky_self_retry(self: Task, name: str, failures: int) -> str:
    runs = effect(name, str(self.request.retries))
    if runs <= failures:
        raise self.retry(countdown=0.05)
    return f"ok on run {runs}: {uuid.uuid4().hex}"


# The plain decorator and autoretry_for with no retry_on: released while Celery will retry,
# recorded halted on the last attempt.
@app.task(bind=True, autoretry_for=(ConnectionError,), max_retries=2, default_retry_delay=0.05)
@idempotent(key=task_id)
def flaky_autoretry(self: Task, name: str, failures: int) -> str:
    runs = effect(name, str(self.request.retries))
    if runs <= failures:
        raise ConnectionError(f"run {runs} failed")
    return f"ok on run {runs}"


# A nested idempotent call whose own key is busy: the task's key is not the busy one.
@idempotent(key="inner:{name}", fingerprint=["name"])
def inner(name: str, hold: bool) -> str:
    effect(f"inner-{name}", str(os.getpid()))
    if hold:
        held(f"inner-{name}")
    return "inner done"


@app.task
def hold_inner(name: str) -> str:
    return inner(name, True)


# Retried every 0.2 s while the inner key is busy, for as long as a test may hold it (120 s).
@app.task(bind=True, autoretry_for=(AlreadyRunning,), max_retries=600, default_retry_delay=0.2)
@idempotent_task(countdown=0.2, retry_on=AlreadyRunning)
def outer(self: Task, name: str) -> str:
    effect(f"outer-{name}", str(os.getpid()))
    return inner(name, False)
