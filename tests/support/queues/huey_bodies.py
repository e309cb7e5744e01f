"""The Huey tasks the shared queue suite's consumers run (see ``tests.support.queues``).

``huey`` is a ``RedisHuey`` on the queue ``IDEMFN_TEST_QUEUE`` of the redis-server at the Unix
socket ``IDEMFN_TEST_REDIS``; records go to the store ``IDEMFN_STORE``. A post-execute hook logs
how each execution ended (``log_delivery``). The test process imports this module too, to
serialise the tasks it enqueues (without those variables: it never runs the tasks there).
"""

from __future__ import annotations

import os
import uuid

from huey import RedisHuey
from huey.api import Task

from idemfn.huey import idempotent_task
from tests.support.queues import log_delivery
from tests.support.workers import crash_on_first_run, effect, held

huey = RedisHuey(
    os.environ.get("IDEMFN_TEST_QUEUE", "idemfn-test"),
    url=f"unix://{os.environ.get('IDEMFN_TEST_REDIS', '/nonexistent')}",
)


@huey.on_startup()
def announce() -> None:
    """The line the test waits for: a worker (thread or process) is taking tasks."""
    print(f"idemfn-test: huey worker ready, pid {os.getpid()}", flush=True)


@huey.post_execute()
def log_end(task: Task, value: object, exception: BaseException | None) -> None:
    """Log how an execution ended: Huey runs the task again while its retries are left (a
    RetryTask adds one first)."""
    if exception is None:
        log_delivery(task.id, "ok", repr(value))
    else:
        log_delivery(task.id, "retry" if task.retries else "failed", repr(exception))


# -- the shared bodies --------------------------------------------------------------------------


def _once(name: str, hold: bool) -> str:
    effect(name, str(os.getpid()))
    if hold:
        held(name)
    return f"{name}: {uuid.uuid4().hex}"


@huey.task()
@idempotent_task(delay=0)  # keyed on the task's id
def once(name: str, hold: bool = False) -> str:
    return _once(name, hold)


@huey.task()
@idempotent_task(key="shared:{name}", delay=0)
def shared(name: str, hold: bool = False) -> str:
    return _once(name, hold)


@huey.task()
@idempotent_task(delay=0)
def crash_halt(name: str) -> str:
    return crash_on_first_run(name)


@huey.task()
@idempotent_task(on_abandoned="retry", delay=0)
def crash_retry(name: str) -> str:
    return crash_on_first_run(name)


@huey.task(retries=5, retry_delay=0)  # no delay: re-enqueued at once
@idempotent_task(delay=0)
def flaky(name: str, failures: int) -> str:
    runs = effect(name, str(os.getpid()))
    if runs <= failures:
        raise ConnectionError(f"run {runs} failed")
    return f"ok on run {runs}"
