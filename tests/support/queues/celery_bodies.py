"""The shared queue suite's bodies (see ``tests/support/queues/__init__.py``) as Celery tasks.

They are tasks of ``tests.support.celery_tasks``'s app (its broker, backend, acks_late and
reject-on-worker-lost settings, and its ``task_postrun`` hook that logs every delivery); a
worker runs them with ``celery -A tests.support.queues.celery_bodies worker``.
"""

from __future__ import annotations

import os
import uuid

from idemfn.celery import idempotent_task
from tests.support.celery_tasks import app
from tests.support.workers import crash_on_first_run, effect, held

__all__ = ["app", "crash_halt", "crash_retry", "flaky", "once", "shared"]


def _run(name: str, hold: bool) -> str:
    effect(name, str(os.getpid()))
    if hold:
        held(name)
    return f"{name}: {uuid.uuid4().hex}"


@app.task
@idempotent_task(countdown=0.2)
def once(name: str, hold: bool) -> str:
    return _run(name, hold)


@app.task
@idempotent_task(key="shared:{name}", countdown=0.2)
def shared(name: str, hold: bool) -> str:
    return _run(name, hold)


@app.task
@idempotent_task(countdown=0.2)
def crash_halt(name: str) -> str:
    return crash_on_first_run(name)


@app.task
@idempotent_task(on_abandoned="retry", countdown=0.2)
def crash_retry(name: str) -> str:
    return crash_on_first_run(name)


@app.task(autoretry_for=(ConnectionError,), max_retries=5, default_retry_delay=0.05)
@idempotent_task()
def flaky(name: str, failures: int) -> str:
    runs = effect(name, str(os.getpid()))
    if runs <= failures:
        raise ConnectionError(f"run {runs} failed")
    return f"ok on run {runs}"
