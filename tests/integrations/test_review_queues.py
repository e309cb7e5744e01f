"""A hostile review of the queue integrations (issue 20): Dramatiq, Huey, arq.

Each test is an attack: the ones that found a bug (a key left processing by a raising
``retry_when``, Dramatiq 1.x, a ``GenericActor``, a task's function called directly inside another
task, a worker without ``CurrentMessage``) pass since their fix; the others the integrations
withstood. In-process only: a ``dramatiq.Worker``
on a ``StubBroker``, Huey tasks run as its consumer runs them on a ``MemoryHuey``, arq job
functions called with the ``ctx`` a worker passes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import dramatiq.worker
import pytest
from arq.worker import Retry as ArqRetry
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import CurrentMessage, Middleware, Retries
from huey import MemoryHuey
from huey.api import Huey, Task

from idemfn import AlreadyRunning, DiskStore, MemoryStore, Status, Store, idempotent
from idemfn.arq import idempotent_job
from idemfn.dramatiq import idempotent_actor
from idemfn.huey import idempotent_task
from tests.support.workers import poll

# --- Dramatiq: an in-process worker on a StubBroker --------------------------------------------


class _Ends(Middleware):
    """How each delivery ended, after the Retries middleware has decided."""

    def __init__(self) -> None:
        self.ends: list[tuple[str, str, object]] = []

    def after_process_message(
        self, broker: Any, message: Any, *, result: object = None, exception: Any = None
    ) -> None:
        state = "ok" if exception is None else "failed" if message.failed else "retry"
        self.ends.append((message.message_id, state, result if exception is None else exception))


class _Stub:
    def __init__(self, *, current_message: bool = True) -> None:
        self.broker = StubBroker()
        self.log = _Ends()
        self.broker.add_middleware(self.log, before=Retries)
        if current_message:
            self.broker.add_middleware(CurrentMessage())
        self.broker.emit_after("process_boot")
        self.worker = dramatiq.Worker(self.broker, worker_threads=2, worker_timeout=50)
        self.worker.start()

    def actor(self, **options: Any) -> Callable[[Callable[..., Any]], Any]:
        return dramatiq.actor(broker=self.broker, **options)  # type: ignore[no-any-return]

    def ends(self, message: str, count: int = 1) -> list[tuple[str, object]]:
        def ended() -> list[tuple[str, object]] | None:
            found = [(s, v) for m, s, v in list(self.log.ends) if m == message]
            return found if len(found) >= count and found[-1][0] != "retry" else None

        return poll(ended, f"{count} deliveries of {message}, the last final", timeout=30)

    def close(self) -> None:
        self.worker.stop()
        self.broker.emit_after("process_stop")
        self.broker.close()


@pytest.fixture
def stub() -> Iterator[_Stub]:
    running = _Stub()
    try:
        yield running
    finally:
        running.close()


def _record(store: Store, fn: Any, key: str) -> Any:
    entry = store.get(f"{fn.__module__}.{fn.__qualname__}:{key}")
    return None if entry is None else entry.record()


@pytest.mark.parametrize("decorate", ["idempotent_actor", "idempotent"])
def test_dramatiq_without_current_message_a_failure_is_recorded_and_the_worker_says_so(
    decorate: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Without the middleware idemfn cannot see the message, so it cannot tell whether Dramatiq
    # retries: it records the failure (at most once), and says at ERROR how to fix it.
    running = _Stub(current_message=False)
    store = MemoryStore()
    runs: list[int] = []
    once = (idempotent_actor if decorate == "idempotent_actor" else idempotent)(
        key="pay:{order}", store=store
    )
    try:

        @running.actor(max_retries=1, min_backoff=1, max_backoff=10)
        @once
        def pay(order: str) -> str:
            runs.append(1)
            raise ConnectionError("gateway down")

        sent = pay.send("o-1")
        running.ends(sent.message_id, 2)
    finally:
        running.close()
    assert len(runs) == 1
    record = _record(store, pay.fn, "pay:o-1")
    assert record is not None and record.status is Status.HALTED
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("no CurrentMessage middleware" in m and "add_middleware" in m for m in said), said


def test_dramatiq_an_actor_called_directly_inside_another_has_no_message_id(
    stub: _Stub,
) -> None:
    store = MemoryStore()
    notified: list[str] = []

    @stub.actor(max_retries=0)
    @idempotent_actor(store=store)
    def notify(user: str) -> str:
        notified.append(user)
        return user

    @stub.actor(max_retries=0)
    def batch(users: list[str]) -> list[str]:
        found = []
        for user in users:
            try:
                notify(user)  # synchronously: Actor.__call__, no message of its own
            except ValueError as exc:
                found.append(f"ValueError: {exc}")
        return found

    sent = batch.send(["u1", "u2"])
    [(state, value)] = stub.ends(sent.message_id)
    assert state == "ok", value  # today: failed, FingerprintMismatch on u2
    assert isinstance(value, list) and len(value) == 2
    assert all("called directly inside another actor's message" in v for v in value), value


def test_dramatiq_a_retry_when_that_raises_does_not_leave_the_key_processing(
    stub: _Stub,
) -> None:
    store = MemoryStore()

    def on_server_errors(retries: int, exc: BaseException) -> bool:
        return exc.status >= 500  # type: ignore[attr-defined]  # written for HTTP errors

    @stub.actor(retry_when=on_server_errors, min_backoff=1, max_backoff=10)
    @idempotent_actor(key="charge:{order}", store=store, lease=0.5)
    def charge(order: str) -> None:
        raise ConnectionError("down")  # no .status: the predicate raises AttributeError

    sent = charge.send("o-1")
    poll(
        lambda: [e for e in stub.log.ends if e[0] == sent.message_id],
        "the message to be processed",
        timeout=30,
    )
    # Settled before the message's end is logged: recorded (and the predicate's error logged).
    record = _record(store, charge.fn, "charge:o-1")
    assert record is not None and record.status is Status.HALTED, record


def test_dramatiq_a_generic_actor_s_retry_runs_the_body_again(stub: _Stub) -> None:
    store = MemoryStore()
    runs: list[int] = []

    class Pay(dramatiq.GenericActor):  # type: ignore[misc]
        class Meta:
            broker = stub.broker
            max_retries = 1
            min_backoff = 1
            max_backoff = 10

        @idempotent_actor(key="pay:{order}", store=store)
        def perform(self, order: str) -> str:
            runs.append(1)
            if len(runs) == 1:
                raise ConnectionError("gateway down")
            return f"paid {order}"

    sent = Pay.send("o-1")
    ends = stub.ends(sent.message_id, 2)
    assert len(runs) == 2, f"the retry replayed the first failure: {ends}"
    assert ends[-1] == ("ok", "paid o-1")


_DRAMATIQ_1X = (
    "pyproject declares dramatiq[redis]>=1.17, but Dramatiq 1.17 and 1.18 name the worker"
    " thread class dramatiq.worker._WorkerThread (WorkerThread exists from 2.0; checked with"
    " a real Dramatiq 1.18.0): "
)


def test_dramatiq_1x_idemfn_dramatiq_imports() -> None:
    script = (
        "import dramatiq.worker as w\n"
        "del w.WorkerThread  # as in Dramatiq 1.17 and 1.18 (only _WorkerThread)\n"
        "import idemfn.dramatiq\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]


def test_dramatiq_1x_a_failure_under_the_plain_decorator_is_settled(
    stub: _Stub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(dramatiq.worker, "WorkerThread")  # the worker is already running
    store = MemoryStore()

    @stub.actor(max_retries=0)
    @idempotent(key="pay:{order}", store=store, lease=0.5)
    def pay(order: str) -> None:
        raise ConnectionError("down")

    sent = pay.send("o-1")
    poll(
        lambda: [e for e in stub.log.ends if e[0] == sent.message_id],
        "the message to be processed",
        timeout=30,
    )
    record = _record(store, pay.fn, "pay:o-1")
    assert record is not None and record.status is Status.HALTED, record


def test_dramatiq_a_nested_actor_s_failure_is_recorded_though_the_outer_is_retried(
    stub: _Stub,
) -> None:
    """A nested call of another actor's function (the actor's function, not its message) whose
    exception escapes and is retried by Dramatiq: the nested key is not the actor's own, so
    its failure is recorded and its side effect does not run on the outer retry."""
    store = MemoryStore()
    charged: list[int] = []

    @stub.actor(max_retries=0)
    @idempotent(key="charge:{order}", store=store)
    def charge(order: str) -> None:
        charged.append(1)
        raise ConnectionError("declined after charging")

    @stub.actor(max_retries=2, min_backoff=1, max_backoff=10)
    @idempotent_actor(key="checkout:{order}", store=store)
    def checkout(order: str) -> None:
        charge.fn(order)

    sent = checkout.send("o-1")
    assert [s for s, _ in stub.ends(sent.message_id, 3)] == ["retry", "retry", "failed"]
    assert charged == [1]


# --- Huey: tasks run as its consumer runs them ---------------------------------------------------


def _huey() -> MemoryHuey:
    return MemoryHuey(f"h{uuid.uuid4().hex}", results=True)


def _drain(huey: Huey) -> None:
    for _ in range(50):
        task = huey.dequeue()
        if task is None:
            due = huey.read_schedule(huey._get_timestamp().replace(year=9999))
            if not due:
                return
            for scheduled in due:
                scheduled.eta = None
                huey.enqueue(scheduled)
            continue
        huey.execute(task)
    raise AssertionError("the task is retried forever")


def _run(huey: Huey, task: Task) -> Any:
    result = huey.enqueue(task)
    _drain(huey)
    return result.get(preserve=True)


def test_huey_call_local_inside_another_task_has_no_task_id() -> None:
    huey, store = _huey(), MemoryStore()
    notified: list[str] = []

    @huey.task()
    @idempotent_task(store=store)
    def notify(user: str) -> str:
        notified.append(user)
        return user

    @huey.task()
    def batch(users: list[str]) -> list[str]:
        found = []
        for user in users:
            try:
                notify.call_local(user)
            except ValueError as exc:
                found.append(f"ValueError: {exc}")
        return found

    outcome = _run(huey, batch.s(["u1", "u2"], id="t-1"))
    assert len(outcome) == 2 and all("call_local" in v for v in outcome), (outcome, notified)


def test_huey_a_call_local_task_s_failure_inside_a_retried_task_is_recorded() -> None:
    """Task B's function run through call_local() inside task A, which has retries: B's
    failure ends B's own claim, not A's, so it is recorded (and replayed on A's retry), not
    released as A's retry would release A's."""
    huey, store = _huey(), MemoryStore()
    refunds: list[str] = []

    @huey.task(retries=3)
    @idempotent(key="refund:{order}", store=store)
    def refund(order: str) -> None:
        refunds.append(order)
        raise LookupError("refunded, then the receipt failed")

    @huey.task(retries=2)
    @idempotent_task(store=store)
    def settle(order: str) -> str:
        try:
            refund.call_local(order)
        except LookupError:
            pass
        raise ConnectionError("settlement service down")

    with pytest.raises(Exception, match="settlement service down"):
        _run(huey, settle.s("o-1", id="t-1"))
    assert refunds == ["o-1"]


def test_huey_a_nested_call_in_a_thread_of_a_retried_task_is_recorded() -> None:
    """A body's thread has no Huey frame below it: its nested call's failure is recorded,
    never taken for the task's retry."""
    huey, store = _huey(), MemoryStore()
    charged: list[int] = []

    @idempotent(key="charge", store=store)
    def charge() -> None:
        charged.append(1)
        raise ConnectionError("declined after charging")

    @huey.task(retries=2)
    @idempotent_task(store=store)
    def checkout() -> None:
        errors: list[BaseException] = []

        def work() -> None:
            try:
                charge()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        raise errors[0]

    with pytest.raises(Exception, match="declined after charging"):
        _run(huey, checkout.s(id="t-1"))
    assert charged == [1]


# --- arq: job functions called as its worker calls them ------------------------------------------


def test_arq_concurrent_jobs_in_one_loop_each_retry_with_their_own_ctx() -> None:
    """The ContextVar carrying ctx to the busy hook: jobs interleaved on one event loop see
    their own try number, and nothing is left set after a job."""
    store = MemoryStore()
    release = asyncio.Event()
    started = asyncio.Event()

    @idempotent_job(key="k:{order}", store=store, defer=0.5, max_retries=2)
    async def pay(ctx: dict[str, Any], order: str) -> str:
        started.set()
        await release.wait()
        return f"paid {order}"

    async def main() -> list[object]:
        owner = asyncio.create_task(pay({"job_id": "j-0", "job_try": 1}, "o-1"))
        await started.wait()

        async def duplicate(job_try: int) -> object:
            try:
                return await pay({"job_id": f"j-{job_try}", "job_try": job_try}, "o-1")
            except BaseException as exc:
                return exc

        outcomes = await asyncio.gather(duplicate(1), duplicate(3), duplicate(2), duplicate(9))
        release.set()
        outcomes.append(await owner)
        # After the owner: the duplicates replay, and no ctx is left set in this context.
        outcomes.append(await pay({"job_id": "j-10", "job_try": 1}, "o-1"))
        return outcomes

    outcomes = asyncio.run(main())
    assert isinstance(outcomes[0], ArqRetry) and isinstance(outcomes[2], ArqRetry)
    assert isinstance(outcomes[1], AlreadyRunning) and isinstance(outcomes[3], AlreadyRunning)
    assert outcomes[4:] == ["paid o-1", "paid o-1"]


def test_arq_ctx_passed_by_keyword_and_defaults_are_handled() -> None:
    store = MemoryStore()
    runs: list[tuple[str, int]] = []

    @idempotent_job(store=store)
    async def pay(ctx: dict[str, Any], order: str, cents: int = 100, *, note: str = "") -> str:
        runs.append((order, cents))
        return f"{order}:{cents}"

    async def main() -> list[str]:
        return [
            await pay({"job_id": "j-1", "job_try": 1}, "o-1"),
            await pay(ctx={"job_id": "j-1", "job_try": 2}, order="o-1", cents=100),
            await pay({"job_id": "j-1", "job_try": 3}, "o-1", 100, note=""),
        ]

    assert asyncio.run(main()) == ["o-1:100"] * 3
    assert runs == [("o-1", 100)]


def test_arq_a_disk_store_held_by_another_process_does_not_block_the_event_loop(
    tmp_path: Path,
) -> None:
    """Another process holds SQLite's write lock on the DiskStore for a second: a job claiming
    its key must wait off the loop, while the worker's other jobs keep running."""
    store = DiskStore(tmp_path / "store")

    @idempotent_job(store=store)
    async def pay(ctx: dict[str, Any], order: str) -> str:
        return f"paid {order}"

    store.get("warm-up")  # the database exists
    database = tmp_path / "store" / "cache.db"
    locked, unlock = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        connection = sqlite3.connect(database, timeout=10, isolation_level=None)
        connection.execute("BEGIN EXCLUSIVE")
        locked.set()
        unlock.wait(10)
        connection.execute("COMMIT")
        connection.close()

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    locked.wait(10)

    async def main() -> tuple[str, float, float]:
        gaps: list[float] = []
        done = False

        async def ticker() -> None:
            last = time.monotonic()
            while not done:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        asyncio.get_running_loop().call_later(1.0, unlock.set)
        began = time.monotonic()
        value = await pay({"job_id": "j-1", "job_try": 1}, "o-1")
        took = time.monotonic() - began
        done = True
        await ticking
        return value, took, max(gaps)

    try:
        value, took, worst = asyncio.run(main())
    finally:
        unlock.set()
        holder.join()
        store.close()
    assert value == "paid o-1"
    assert took > 0.8, "the claim did not wait for the lock: the test proves nothing"
    assert worst < 0.5, f"the event loop stalled {worst:.2f} s on the store's lock"


def test_arq_a_duplicate_waiting_on_a_disk_store_does_not_block_the_event_loop(
    tmp_path: Path,
) -> None:
    """wait=: a duplicate job waits for the first run's outcome on the loop, without blocking
    it, and wakes when the first run settles (not at the end of its wait)."""
    store = DiskStore(tmp_path / "store")

    @idempotent_job(key="k:{order}", store=store, wait=5)
    async def pay(ctx: dict[str, Any], order: str) -> str:
        await asyncio.sleep(1.0)
        return f"paid {order} in {ctx['job_id']}"

    async def main() -> tuple[list[str], float, float]:
        gaps: list[float] = []
        done = False

        async def ticker() -> None:
            last = time.monotonic()
            while not done:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        owner = asyncio.create_task(pay({"job_id": "j-1", "job_try": 1}, "o-1"))
        await asyncio.sleep(0.1)
        began = time.monotonic()
        duplicate = await pay({"job_id": "j-2", "job_try": 1}, "o-1")
        took = time.monotonic() - began
        done = True
        await ticking
        return [await owner, duplicate], took, max(gaps)

    try:
        values, took, worst = asyncio.run(main())
    finally:
        store.close()
    assert values == ["paid o-1 in j-1"] * 2  # replayed, not run again
    assert took < 2.0, f"the waiter woke {took:.2f} s later, not when the owner settled"
    assert worst < 0.5, f"the event loop stalled {worst:.2f} s"
