"""What is Huey's own in ``idemfn.huey``; the scenarios every queue shares (duplicates, retries,
races, killed workers) run on Huey in ``test_queues.py``, through ``tests.support.queues.huey``.

In-process tests run tasks as a consumer's worker does (``huey.execute(task)`` on a
``MemoryHuey``, then the tasks it enqueued or scheduled), or in immediate mode; the ``slow`` ones
start real ``huey_consumer`` processes on the suite's redis-server.
"""

from __future__ import annotations

import inspect
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import pytest
from huey import MemoryHuey, crontab
from huey.api import Huey, Task
from huey.exceptions import CancelExecution, RateLimitExceeded, RetryTask, TaskException

import idemfn.huey
from idemfn import MemoryStore, Status, idempotent, open_store
from idemfn.huey import idempotent_task, task_id
from tests.support.queues.huey import HueyQueue
from tests.support.servers import RedisServer
from tests.support.workers import poll


def _huey() -> MemoryHuey:
    return MemoryHuey(f"h{uuid.uuid4().hex}", results=True)


def _drain(huey: Huey) -> int:
    """Run every task ``huey`` has enqueued or scheduled (its retries), as its consumer would,
    until none is left; return how many ran."""
    ran = 0
    while True:
        assert ran < 50, "the task is retried forever"
        task = huey.dequeue()
        if task is None:
            due = huey.read_schedule(huey._get_timestamp().replace(year=9999))
            if not due:
                return ran
            for scheduled in due:
                scheduled.eta = None
                huey.enqueue(scheduled)
            continue
        huey.execute(task)
        ran += 1


def _run(huey: Huey, task: Task) -> Any:
    """Enqueue ``task`` and run it (and its retries) as a worker would; return its result."""
    result = huey.enqueue(task)
    _drain(huey)
    return result.get(preserve=True)


def test_idemfn_huey_exports_what_it_defines_and_idemfn_imports_no_huey() -> None:
    import subprocess
    import sys

    import idemfn
    import idemfn.huey

    assert idemfn.huey.__all__ == ["idempotent_task", "task_id"]
    assert "huey" not in idemfn.__all__
    code = "import sys, idemfn; print(sorted(m for m in sys.modules if m.startswith('huey')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- misuse -----------------------------------------------------------------------------------


def test_idempotent_over_huey_task_is_refused_with_the_way_out() -> None:
    huey = _huey()

    def charge(order: str) -> str:
        return order

    for task in (huey.task()(charge), huey.periodic_task(crontab(minute="0"), name="p")(charge)):
        with pytest.raises(TypeError, match=r"@idempotent must go under @huey\.task, not over"):
            idempotent(key="k", store=MemoryStore())(task)
        with pytest.raises(TypeError, match=r"idemfn\.huey\.idempotent_task"):
            idempotent(key="k", store=MemoryStore())(task)


def test_idempotent_task_over_huey_task_and_coroutines_are_refused() -> None:
    huey = _huey()

    @huey.task()
    def charge(order: str) -> str:
        return order

    with pytest.raises(TypeError, match=r"not TaskWrapper; put it .*under @huey\.task"):
        idempotent_task(store=MemoryStore())(charge)  # type: ignore[arg-type]

    async def refund(order: str) -> str:
        return order

    with pytest.raises(TypeError, match="Huey calls task bodies synchronously"):
        idempotent_task(store=MemoryStore())(refund)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"on_running": "wait"}, "on_running must be 'retry' or 'raise'"),
        ({"delay": -1}, "delay must be >= 0 seconds"),
        ({"delay": "5"}, "delay must be a number of seconds or a timedelta"),
        ({"delay": float("nan")}, "delay must be a finite number"),
        ({"lease": 0}, "lease must be > 0"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, Any], error: str) -> None:
    with pytest.raises((TypeError, ValueError), match=error):
        idempotent_task(store=MemoryStore(), **options)


def test_task_id_outside_a_task_says_what_to_do() -> None:
    huey = _huey()

    @huey.task()
    @idempotent_task(store=MemoryStore())
    def charge(order: str) -> str:
        return order

    with pytest.raises(ValueError, match=r"no Huey task is running here.*pass key="):
        task_id()
    with pytest.raises(ValueError, match=r"no Huey task is running here"):
        charge.call_local("o-1")  # the function itself: no task, no id


# --- the key: the running task's id, found without context=True --------------------------------


def test_the_default_key_is_the_running_tasks_id_and_a_second_enqueue_replays() -> None:
    huey, store, runs = _huey(), MemoryStore(), []

    @huey.task()
    @idempotent_task(store=store)
    def charge(order: str) -> str:
        runs.append(task_id())
        return f"{order}: {uuid.uuid4().hex}"

    first = _run(huey, charge.s("o-1", id="t-1"))
    assert runs == ["t-1"]
    assert _run(huey, charge.s("o-1", id="t-1")) == first  # the same id again: replayed
    assert runs == ["t-1"]
    assert _run(huey, charge.s("o-1", id="t-2")) != first  # another task: another key


def test_task_id_finds_the_task_through_a_wrapped_huey_execute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Sentry's Huey integration (on by default when huey is installed) wraps Huey._execute.
    original = Huey._execute

    def _traced_execute(self: Huey, *args: Any, **kwargs: Any) -> Any:
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Huey, "_execute", _traced_execute)
    huey, seen = _huey(), []

    @huey.task()
    def charge() -> None:
        seen.append(task_id())

    _run(huey, charge.s(id="t-9"))
    assert seen == ["t-9"]


def test_immediate_mode_runs_the_body_once_per_task_id() -> None:
    huey, store, runs = _huey(), MemoryStore(), []
    huey.immediate = True

    @huey.task()
    @idempotent_task(store=store)
    def charge(order: str) -> str:
        runs.append(order)
        return f"charged {order}"

    assert charge.s("o-1", id="t-1") and huey.enqueue(charge.s("o-1", id="t-1"))() == "charged o-1"
    assert huey.enqueue(charge.s("o-1", id="t-1"))() == "charged o-1"
    assert runs == ["o-1"]


def test_with_context_name_the_arguments_to_fingerprint_as_task_cannot_be() -> None:
    huey, store = _huey(), MemoryStore()

    @huey.task(context=True)
    @idempotent_task(store=store, fingerprint=["order"])
    def charge(order: str, task: Task | None = None) -> str:
        assert task is not None
        return f"{order} by {task.id}"

    assert _run(huey, charge.s("o-1", id="t-1")) == "o-1 by t-1"

    @huey.task(context=True)
    @idempotent_task(store=store)
    def refund(order: str, task: Task | None = None) -> str:
        return order

    with pytest.raises(TaskException, match=r"cannot fingerprint argument 'task'.*fingerprint="):
        _run(huey, refund.s("o-1", id="t-2"))


# --- a busy key: Huey's RetryTask, which needs no retries left ----------------------------------


@contextmanager
def held_by_another_worker(huey: Huey, task: Task) -> Iterator[None]:
    """Run ``task`` in a thread, as another worker would; its body waits on the task's first
    argument (a threading.Event pair) until the block ends."""
    gate, started = task.args[1]
    thread = threading.Thread(target=huey.execute, args=(task,))
    thread.start()
    assert started.wait(10)
    try:
        yield
    finally:
        gate.set()
        thread.join(10)


def _busy_task(huey: Huey, store: MemoryStore, **options: Any) -> Any:
    """A task keyed on its order whose run waits on a gate when given one."""

    @huey.task()
    @idempotent_task(key="charge:{order}", store=store, fingerprint=["order"], **options)
    def charge(order: str, gates: Any = None) -> str:
        if gates is not None:
            gate, started = gates
            started.set()
            gate.wait(10)
        return f"charged {order}: {uuid.uuid4().hex}"

    return charge


def test_a_busy_key_raises_retry_task_whose_retry_replays_the_outcome() -> None:
    huey, store = _huey(), MemoryStore()
    charge = _busy_task(huey, store, delay=0.25)
    first = charge.s("o-1", (threading.Event(), threading.Event()), id="first")
    second = charge.s("o-1", id="second")  # retries=0: a RetryTask needs none left

    with held_by_another_worker(huey, first):
        huey.execute(second)
        (retry,) = huey.scheduled()  # Huey's own retry of the same task, 0.25 s later
        assert (retry.id, retry.retries) == ("second", 0)
        assert huey.result("second", preserve=True) is None  # not failed
    _drain(huey)
    assert huey.result("second") == huey.result("first")


def test_on_running_raise_fails_the_task() -> None:
    huey, store = _huey(), MemoryStore()
    charge = _busy_task(huey, store, on_running="raise")
    first = charge.s("o-1", (threading.Event(), threading.Event()), id="first")

    with held_by_another_worker(huey, first):
        huey.execute(charge.s("o-1", id="second"))
    assert not huey.scheduled() and not huey.pending()
    with pytest.raises(TaskException, match="AlreadyRunning"):
        huey.result("second")


def test_in_immediate_mode_a_busy_key_fails_instead_of_retrying_recursively() -> None:
    huey, store = _huey(), MemoryStore()
    charge = _busy_task(huey, store)
    first = charge.s("o-1", (threading.Event(), threading.Event()), id="first")

    with held_by_another_worker(huey, first):
        huey.immediate = True
        result = huey.enqueue(charge.s("o-1", id="second"))
    with pytest.raises(TaskException, match="AlreadyRunning"):
        result()


def test_a_body_reentering_its_own_key_fails_as_already_running_not_retried_as_busy() -> None:
    huey = _huey()

    @huey.task()
    @idempotent_task(store=MemoryStore(), delay=0)
    def loop() -> None:
        loop.call_local()  # type: ignore[attr-defined]  # a bug: a busy retry would never end

    huey.execute(loop.s(id="t-1"))
    assert not huey.scheduled() and not huey.pending()
    with pytest.raises(TaskException, match=r"AlreadyRunning.*re-entered its own key"):
        huey.result("t-1")


def test_the_helper_forwards_every_option_of_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    given: dict[str, Any] = {}

    def spy(**options: Any) -> Any:
        options.pop("on_busy")
        given.update(options)
        return lambda fn: fn

    monkeypatch.setattr(idemfn.huey, "decorator", spy)
    options = {
        "key": "k:{x}",
        "name": "custom.name",
        "store": MemoryStore(),
        "ttl": 12.0,
        "fingerprint": ["x"],
        "wait": 3.0,
        "lease": 9.0,
        "on_abandoned": "retry",
        "retry_on": KeyError,
        "deadline": datetime(2100, 1, 1, tzinfo=timezone.utc),
        "transactional": False,
        "signing_key": "s" * 32,
        "serializer": "json",
    }
    core = set(inspect.signature(idempotent).parameters) - {"_misuse"}
    assert set(options) == core  # this test lists every option of idempotent
    idempotent_task(**options)
    assert given == options


# --- Huey's own retries release the key; the last attempt's failure is recorded -----------------


@pytest.mark.parametrize("decorate", ["idempotent_task", "idempotent"])
def test_retries_release_the_key_until_the_last_attempt_which_is_recorded(decorate: str) -> None:
    huey, store, runs = _huey(), MemoryStore(), []
    once = idempotent_task(store=store) if decorate == "idempotent_task" else None
    once = once or idempotent(key=task_id, store=store)

    @huey.task(retries=2)
    @once
    def pay(order: str) -> str:
        runs.append(order)
        raise ConnectionError(f"run {len(runs)} failed")

    with pytest.raises(TaskException, match="run 3 failed"):
        _run(huey, pay.s("o-1", id="t-1"))
    assert len(runs) == 3  # Huey ran it three times: the key was free each time
    record = store.get(f"{__name__}.{pay.func.__qualname__}:t-1")
    assert record is not None and record.record().status is Status.HALTED

    with pytest.raises(TaskException, match="run 3 failed"):  # the same id again: replayed
        _run(huey, pay.s("o-1", id="t-1", retries=0))
    assert len(runs) == 3


@pytest.mark.parametrize(
    ("raised", "retries", "runs_again"),
    [
        (RetryTask(delay=0), 0, True),  # retried whatever the retries left
        (CancelExecution(retry=True), 0, True),
        (RateLimitExceeded("api", 0.0, retry=True), 0, True),
        (CancelExecution(retry=False), 1, False),  # never retried: Huey drops its retries
        (CancelExecution(), 1, True),  # retried while retries are left, as any exception
    ],
    ids=[
        "RetryTask",
        "CancelExecution-retry",
        "RateLimitExceeded-retry",
        "CancelExecution-no-retry",
        "CancelExecution",
    ],
)
def test_huey_retry_requests_release_the_key(
    raised: Exception, retries: int, runs_again: bool
) -> None:
    huey, store, runs = _huey(), MemoryStore(), []

    @huey.task(retries=retries)
    @idempotent_task(store=store)
    def pay() -> str:
        runs.append(1)
        if len(runs) == 1:
            raise raised
        return "paid"

    outcome = huey.enqueue(pay.s(id="t-1"))
    _drain(huey)
    assert len(runs) == (2 if runs_again else 1)
    if runs_again:
        assert outcome.get(preserve=True) == "paid"
    else:
        key = f"{__name__}.{pay.func.__qualname__}:t-1"
        assert store.get(key).record().status is Status.HALTED  # type: ignore[union-attr]


def test_a_nested_call_whose_failure_the_task_catches_is_recorded() -> None:
    huey, store, inner_runs, task_runs = _huey(), MemoryStore(), [], []

    @idempotent(key="refund:{order}", store=store)
    def refund(order: str) -> None:
        inner_runs.append(order)
        raise LookupError("no such payment")

    @huey.task(retries=2)
    @idempotent_task(store=store)
    def settle(order: str) -> str:
        task_runs.append(order)
        try:
            refund(order)
        except LookupError:
            pass
        if len(task_runs) == 1:
            raise ConnectionError("settlement service down")  # the task's own: retried
        return "settled"

    assert _run(huey, settle.s("o-1", id="t-1")) == "settled"
    assert len(task_runs) == 2
    assert inner_runs == ["o-1"], "the nested call ran again on the task's retry"
    assert refund.status("o-1").status is Status.HALTED  # type: ignore[union-attr]


def test_a_periodic_tasks_runs_are_keyed_on_each_runs_id() -> None:
    huey, store, runs = _huey(), MemoryStore(), []

    @huey.periodic_task(crontab(minute="*"))
    @idempotent_task(store=store)
    def nightly() -> None:
        runs.append(task_id())

    tick, again = nightly.s(), nightly.s()
    huey.execute(tick)
    huey.execute(tick)  # a run of the same tick (same id) replays
    huey.execute(again)  # each tick is a task of its own id
    assert runs == [tick.id, again.id]


# --- real consumers --------------------------------------------------------------------------


@dataclass
class ThreadHueyQueue(HueyQueue):
    """Consumers whose workers are threads: a task runs in the consumer's own process."""

    worker_type: ClassVar[str] = "thread"


def _queue(kind: type[HueyQueue], tmp_path: Path, redis_server: RedisServer) -> HueyQueue:
    location = str(tmp_path / "store")
    return kind(tmp_path, redis_server.socket, open_store(location), location)


@pytest.fixture
def consumer(tmp_path: Path, redis_server: RedisServer) -> Iterator[HueyQueue]:
    queue = _queue(HueyQueue, tmp_path, redis_server)
    try:
        queue.start_worker()
        yield queue
    finally:
        queue.close()


@pytest.mark.slow
def test_a_killed_consumer_of_thread_workers_halts_the_reenqueued_task(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    queue = _queue(ThreadHueyQueue, tmp_path, redis_server)
    try:
        queue.start_worker()
        name = f"crash-{uuid.uuid4().hex}"
        message = queue.send("crash_halt", name)
        pid = queue.kill_mid_body(name)  # the consumer itself: a new one takes the task again

        (failure,) = queue.wait(message, "failed")
        assert failure.startswith("Halted(") and f"/{pid}/" in failure
        assert queue.runs(name) == [str(pid)]
        assert queue.record("crash_halt", message).status is Status.HALTED  # type: ignore[union-attr]
    finally:
        queue.close()


@pytest.mark.slow
def test_a_duplicate_of_a_running_task_id_is_retried_by_huey_then_replays(
    consumer: HueyQueue,
) -> None:
    name = f"dup-{uuid.uuid4().hex}"
    message = consumer.send("once", name, True)
    poll(lambda: consumer.runs(name), "the first run to start")
    consumer.send("once", name, True, message_id=message)  # the same id, enqueued again

    consumer.wait(message, "retry")  # RetryTask: the task has no retries, and needs none
    consumer.release(name)
    first, second = consumer.wait(message, "ok", 2)
    assert first == second and len(consumer.runs(name)) == 1


@pytest.mark.slow
def test_retries_run_out_under_a_consumer_and_the_last_failure_is_replayed(
    consumer: HueyQueue,
) -> None:
    name = f"doomed-{uuid.uuid4().hex}"
    message = consumer.send("flaky", name, 10)  # fails more often than its 5 retries

    (failure,) = consumer.wait(message, "failed")
    assert failure == "ConnectionError('run 6 failed')"
    assert len(consumer.runs(name)) == 6
    assert consumer.record("flaky", message).status is Status.HALTED  # type: ignore[union-attr]

    consumer.send("flaky", name, 10, message_id=message)  # enqueued again: replayed
    assert consumer.wait(message, "failed", 2)[1] == failure
    assert len(consumer.runs(name)) == 6


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "status"),
    [(signal.SIGINT, Status.OK), (signal.SIGTERM, Status.HALTED)],
    ids=["SIGINT-graceful", "SIGTERM-interrupts"],
)
def test_a_consumer_stopped_mid_body_and_its_task_enqueued_again(
    consumer: HueyQueue, signum: int, status: Status
) -> None:
    name = f"stop-{uuid.uuid4().hex}"
    message = consumer.send("once", name, True)
    poll(lambda: consumer.runs(name), "the body to start")
    (stopped,) = consumer.workers
    os.kill(stopped.pid, signum)
    if signum == signal.SIGINT:  # graceful: the running body finishes first
        stopped.wait_for_log("Shutting down gracefully")
        consumer.release(name)
    assert stopped.process.wait(60) == 0
    record = consumer.record("once", message)
    assert record is not None and record.status is status
    if status is Status.HALTED:  # a process worker's body got KeyboardInterrupt
        assert record.exc_type == "KeyboardInterrupt"

    # Huey's recipe for interrupted tasks (SIGNAL_INTERRUPTED) enqueues them again.
    consumer.start_worker()
    consumer.send("once", name, True, message_id=message)
    if status is Status.OK:
        first, replayed = consumer.wait(message, "ok", 2)
        assert replayed == first
    else:
        (failure,) = consumer.wait(message, "failed")
        assert failure.startswith("Halted(") and "KeyboardInterrupt" in failure
    assert len(consumer.runs(name)) == 1
