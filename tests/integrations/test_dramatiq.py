"""What is Dramatiq's own: misuse refused, the default key outside a worker, and how Dramatiq's
Retries middleware and idemfn meet (which retry releases the key, which failure is recorded,
what a busy retry costs). Real workers on the suite's redis-server run the scenarios every
queue shares (tests/integrations/test_queues.py, through tests/support/queues/dramatiq.py);
here an in-process ``dramatiq.Worker`` (its real worker threads, middleware and retries) on a
``StubBroker`` of each test's own is enough, and fast.
"""

from __future__ import annotations

import inspect
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dramatiq
import dramatiq.broker
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AsyncIO, CurrentMessage, Middleware, Retries

import idemfn.dramatiq
from idemfn import AlreadyRunning, MemoryStore, Status, Store, idempotent, open_store
from idemfn.dramatiq import idempotent_actor, message_id
from tests.support.queues.dramatiq import HEARTBEAT_TIMEOUT, DramatiqQueue
from tests.support.servers import RedisServer
from tests.support.workers import poll


class _Ends(Middleware):
    """Records how each delivery ended, after the Retries middleware has decided (it is
    placed before Retries: Dramatiq runs ``after_`` hooks in reverse order)."""

    def __init__(self) -> None:
        self.ends: list[tuple[str, str, object]] = []

    def after_process_message(
        self, broker: Any, message: Any, *, result: object = None, exception: Any = None
    ) -> None:
        state = "ok" if exception is None else "failed" if message.failed else "retry"
        self.ends.append((message.message_id, state, result if exception is None else exception))


class Stub:
    """A StubBroker with ``CurrentMessage`` (unless told not to) and a running worker."""

    def __init__(self, *, current_message: bool = True, asyncio: bool = False) -> None:
        self.broker = StubBroker()
        self.log = _Ends()
        self.broker.add_middleware(self.log, before=Retries)
        if current_message:
            self.broker.add_middleware(CurrentMessage())
        if asyncio:
            self.broker.add_middleware(AsyncIO())
        self.broker.emit_after("process_boot")
        self.worker = dramatiq.Worker(self.broker, worker_threads=2, worker_timeout=50)
        self.worker.start()

    def actor(self, **options: Any) -> Callable[[Callable[..., Any]], dramatiq.Actor[Any, Any]]:
        return dramatiq.actor(broker=self.broker, **options)  # type: ignore[no-any-return]

    def ends(self, message: str, count: int = 1) -> list[tuple[str, object]]:
        """How ``message``'s deliveries ended (state, value or exception), once it has
        ``count`` ends and the last is final."""

        def ended() -> list[tuple[str, object]] | None:
            found = [(s, v) for m, s, v in list(self.log.ends) if m == message]
            return found if len(found) >= count and found[-1][0] != "retry" else None

        return poll(ended, f"{count} deliveries of {message}, the last final", timeout=60)

    def close(self) -> None:
        self.worker.stop()
        self.broker.emit_after("process_stop")
        self.broker.close()


def _record(store: Store, actor: Any, key: str) -> Any:
    entry = store.get(f"{actor.fn.__module__}.{actor.fn.__qualname__}:{key}")
    return None if entry is None else entry.record()


@pytest.fixture
def stub() -> Iterator[Stub]:
    running = Stub()
    try:
        yield running
    finally:
        running.close()


# --- misuse --------------------------------------------------------------------------------


def test_idempotent_over_an_actor_is_refused_with_the_way_out() -> None:
    broker = StubBroker()

    with pytest.raises(TypeError, match=r"must go under @dramatiq\.actor, not over it"):

        @idempotent(key="x", store=MemoryStore())
        @dramatiq.actor(broker=broker)
        def charge() -> None: ...

    with pytest.raises(TypeError, match=r"not Actor; put it directly above the def, under @dra"):

        @idempotent_actor(store=MemoryStore())
        @dramatiq.actor(broker=broker, actor_name="charge2")
        def charge2() -> None: ...


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"on_running": "wait"}, "on_running must be 'retry' or 'raise'"),
        ({"delay": -1}, "delay must be >= 0 seconds"),
        ({"delay": "5"}, "delay must be a number of seconds or a timedelta"),
        ({"lease": 0}, "lease must be > 0"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, Any], error: str) -> None:
    with pytest.raises((TypeError, ValueError), match=error):
        idempotent_actor(store=MemoryStore(), **options)


def test_the_module_exports_what_it_defines() -> None:
    assert idemfn.dramatiq.__all__ == ["idempotent_actor", "message_id"]


# --- the default key -----------------------------------------------------------------------


def test_message_id_outside_a_worker_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dramatiq.broker, "global_broker", None)
    with pytest.raises(ValueError, match=r"no Dramatiq message is running here.*pass key="):
        message_id()

    # A global broker without CurrentMessage: the way out is to add it.
    monkeypatch.setattr(dramatiq.broker, "global_broker", StubBroker())
    with pytest.raises(ValueError, match=r"running here.*no CurrentMessage middleware.*add_mid"):
        message_id()


def test_a_worker_without_current_message_fails_the_message_saying_to_add_it() -> None:
    stub = Stub(current_message=False)
    store = MemoryStore()
    try:

        @stub.actor(max_retries=0)
        @idempotent_actor(store=store)
        def pay() -> str:
            return "paid"

        sent = pay.send()
        [(state, error)] = stub.ends(sent.message_id)
    finally:
        stub.close()
    assert state == "failed"
    assert isinstance(error, ValueError)
    assert "this Dramatiq worker's broker has no CurrentMessage middleware" in str(error)
    assert "broker.add_middleware(dramatiq.middleware.CurrentMessage())" in str(error)
    assert not list(store.scan())  # the body never ran, nothing was stored


def test_the_key_is_the_message_id_which_a_message_sent_again_keeps(
    stub: Stub,
) -> None:
    store = MemoryStore()
    runs: list[str] = []

    @stub.actor()
    @idempotent_actor(store=store)
    def pay(order: str) -> str:
        runs.append(order)
        return f"paid {order} ({len(runs)})"

    first = pay.send("A-1")
    assert stub.ends(first.message_id) == [("ok", "paid A-1 (1)")]
    stub.broker.enqueue(first)  # the same message (same id) enqueued again
    assert stub.ends(first.message_id, 2) == [("ok", "paid A-1 (1)")] * 2
    assert runs == ["A-1"]
    assert _record(store, pay, first.message_id).status is Status.OK


# --- Dramatiq's retries --------------------------------------------------------------------


def test_a_retried_failure_runs_again_and_only_the_last_is_recorded(stub: Stub) -> None:
    store = MemoryStore()
    runs: list[int] = []

    @stub.actor(max_retries=2, min_backoff=1, max_backoff=10)
    @idempotent_actor(store=store)
    def flaky() -> str:
        runs.append(1)
        raise ConnectionError(f"run {len(runs)} failed")

    sent = flaky.send()
    ends = stub.ends(sent.message_id, 3)
    assert [state for state, _ in ends] == ["retry", "retry", "failed"]
    assert len(runs) == 3  # the key was free on each of Dramatiq's retries
    record = _record(store, flaky, sent.message_id)
    assert record.status is Status.HALTED and record.attempt == 1

    stub.broker.enqueue(sent.copy(options={"retries": 0}))  # a duplicate replays the failure
    replay = stub.ends(sent.message_id, 6)[3]
    assert replay[0] == "retry" and "run 3 failed" in str(replay[1])
    assert len(runs) == 3


@pytest.mark.parametrize(
    "options",
    [
        {"max_retries": 0},
        {"throws": (ConnectionError,)},
        {"retry_when": lambda retries, exc: False},
    ],
    ids=["max_retries=0", "throws", "retry_when"],
)
def test_a_failure_dramatiq_will_not_retry_is_recorded(stub: Stub, options: dict[str, Any]) -> None:
    store = MemoryStore()

    @stub.actor(**options)
    @idempotent_actor(store=store)
    def once() -> None:
        raise ConnectionError("down")

    sent = once.send()
    [(state, _)] = stub.ends(sent.message_id)
    assert state == "failed"
    assert _record(store, once, sent.message_id).status is Status.HALTED


def test_the_message_s_own_max_retries_counts(stub: Stub) -> None:
    store = MemoryStore()
    runs: list[int] = []

    @stub.actor(max_retries=5, min_backoff=1, max_backoff=10)
    @idempotent_actor(store=store)
    def flaky() -> None:
        runs.append(1)
        raise ConnectionError("down")

    sent = flaky.send_with_options(max_retries=1)  # the message's option wins over the actor's
    assert [s for s, _ in stub.ends(sent.message_id, 2)] == ["retry", "failed"]
    assert len(runs) == 2
    assert _record(store, flaky, sent.message_id).status is Status.HALTED


def test_a_nested_call_records_its_failure_though_the_actor_is_retried(stub: Stub) -> None:
    store = MemoryStore()
    charged: list[int] = []

    @idempotent(key="charge", store=store)
    def charge() -> None:
        charged.append(1)
        raise ConnectionError("declined after charging")

    @stub.actor(max_retries=2, min_backoff=1, max_backoff=10)
    @idempotent_actor(store=store)
    def checkout() -> None:
        charge()

    sent = checkout.send()
    assert [s for s, _ in stub.ends(sent.message_id, 3)] == ["retry", "retry", "failed"]
    assert charged == [1]  # the nested side effect ran once: its failure was replayed


def test_dramatiq_retry_raised_by_the_body_releases_the_key_even_on_the_last_attempt(
    stub: Stub,
) -> None:
    store = MemoryStore()
    runs: list[int] = []

    @stub.actor(max_retries=1)
    @idempotent_actor(store=store)
    def later() -> None:
        runs.append(1)
        raise dramatiq.Retry("not yet", delay=1)

    sent = later.send()
    assert [s for s, _ in stub.ends(sent.message_id, 2)] == ["retry", "failed"]
    assert len(runs) == 2
    # The body asked to be run again: nothing is recorded, a later message runs it.
    assert _record(store, later, sent.message_id) is None


# --- busy keys -----------------------------------------------------------------------------


def test_a_busy_message_is_retried_by_dramatiq_and_then_replays(stub: Stub) -> None:
    store = MemoryStore()
    started, go = threading.Event(), threading.Event()
    runs: list[int] = []

    @stub.actor(max_retries=1000)
    @idempotent_actor(key="pay:{order}", store=store, delay=0.01)
    def pay(order: str) -> str:
        runs.append(1)
        started.set()
        go.wait(60)
        return f"paid {order}"

    first = pay.send("A-1")
    assert started.wait(60)
    second = pay.send("A-1")  # the worker's second thread finds the key running
    poll(lambda: [m for m, s, _ in stub.log.ends if m == second.message_id], "a busy retry")
    go.set()

    assert stub.ends(first.message_id) == [("ok", "paid A-1")]
    ends = stub.ends(second.message_id, 2)
    assert {s for s, _ in ends[:-1]} == {"retry"} and ends[-1] == ("ok", "paid A-1")
    assert all(isinstance(e, dramatiq.Retry) for _, e in ends[:-1])
    assert runs == [1]


def test_busy_retries_count_in_max_retries_and_the_last_fails_as_already_running(
    stub: Stub,
) -> None:
    store = MemoryStore()
    started, go = threading.Event(), threading.Event()

    @stub.actor(max_retries=2)
    @idempotent_actor(key="pay:{order}", store=store, delay=0)
    def pay(order: str) -> None:
        started.set()
        go.wait(60)

    pay.send("A-1")
    assert started.wait(60)
    try:
        second = pay.send("A-1")
        ends = stub.ends(second.message_id, 3)
    finally:
        go.set()
    assert [s for s, _ in ends] == ["retry", "retry", "failed"]
    assert isinstance(ends[-1][1], AlreadyRunning)  # the cause, not a bare Retry


def test_on_running_raise_fails_a_busy_message_with_already_running(stub: Stub) -> None:
    store = MemoryStore()
    started, go = threading.Event(), threading.Event()

    @stub.actor(max_retries=0)
    @idempotent_actor(key="pay:{order}", store=store, on_running="raise")
    def pay(order: str) -> None:
        started.set()
        go.wait(60)

    pay.send("A-1")
    assert started.wait(60)
    try:
        second = pay.send("A-1")
        [(state, error)] = stub.ends(second.message_id)
    finally:
        go.set()
    assert state == "failed" and isinstance(error, AlreadyRunning)


def test_a_direct_call_that_finds_its_key_running_raises() -> None:
    store = MemoryStore()

    @idempotent_actor(key="k", name="same", store=store)
    def inner() -> None:
        outer()

    @idempotent_actor(key="k", name="same", store=store)
    def outer() -> None: ...

    with pytest.raises(AlreadyRunning):  # outside a worker there is nothing to retry it
        inner()


def test_an_async_actor_is_keyed_on_its_message() -> None:
    stub = Stub(asyncio=True)
    store = MemoryStore()
    runs: list[int] = []
    try:

        @stub.actor()
        @idempotent_actor(store=store)
        async def pay(order: str) -> str:
            runs.append(1)
            return f"paid {order}"

        sent = pay.send("A-1")
        assert stub.ends(sent.message_id) == [("ok", "paid A-1")]
        stub.broker.enqueue(sent)
        assert stub.ends(sent.message_id, 2)[-1] == ("ok", "paid A-1")
    finally:
        stub.close()
    assert runs == [1]
    assert _record(store, pay, sent.message_id).status is Status.OK


def test_a_body_reentering_its_own_key_fails_as_already_running_not_retried_as_busy(
    stub: Stub,
) -> None:
    store = MemoryStore()

    @stub.actor(max_retries=0)
    @idempotent_actor(store=store, delay=0)
    def loop() -> None:
        loop()  # a bug: a busy retry would never end

    sent = loop.send()
    [(state, error)] = stub.ends(sent.message_id)
    assert state == "failed" and type(error) is AlreadyRunning
    assert "re-entered its own key" in str(error)


# --- the helper is idempotent with a default key -------------------------------------------


def test_the_helper_keeps_key_for_status_forget_and_store() -> None:
    store = MemoryStore()

    @idempotent_actor(key="k:{x}", store=store)
    def body(x: int) -> int:
        return x * 2

    assert body(2) == 4  # called directly: the key is the business key
    assert body.store is store
    assert body.key_for(2).endswith("k:2")
    assert body.status(2).status is Status.OK  # type: ignore[union-attr]
    assert body.forget(2) is True and body.status(2) is None


def test_the_helper_forwards_every_option_of_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    given: dict[str, Any] = {}

    def spy(**options: Any) -> Any:
        options.pop("on_busy")
        given.update(options)
        return lambda fn: fn

    monkeypatch.setattr(idemfn.dramatiq, "decorator", spy)
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
    idempotent_actor(**options)
    assert given == options


def test_an_async_actor_s_retried_failure_runs_again(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = Stub(asyncio=True)
    # Its body runs on Dramatiq's event loop thread, where the broker is the global one.
    monkeypatch.setattr(dramatiq.broker, "global_broker", stub.broker)
    store = MemoryStore()
    runs: list[int] = []
    try:

        @stub.actor(max_retries=2, min_backoff=1, max_backoff=10)
        @idempotent_actor(store=store)
        async def flaky() -> str:
            runs.append(1)
            if len(runs) < 3:
                raise ConnectionError(f"run {len(runs)} failed")
            return "ok on run 3"

        sent = flaky.send()
        ends = stub.ends(sent.message_id, 3)
    finally:
        stub.close()
    assert [s for s, _ in ends] == ["retry", "retry", "ok"]
    assert _record(store, flaky, sent.message_id).status is Status.OK


# --- a real worker: the Redis broker's own maintenance ---------------------------------------


@pytest.mark.slow
def test_the_broker_requeues_a_killed_worker_s_message_once_its_heartbeat_expires(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # What the shared suite's kill_mid_body makes happen at once, here on Dramatiq's own timer
    # (short: a single live worker, whose own commands renew its heartbeat, cannot be taken
    # for dead).
    location = str(tmp_path / "store")
    queue = DramatiqQueue(tmp_path, redis_server.socket, open_store(location), location)
    queue.env[HEARTBEAT_TIMEOUT] = "3000"
    try:
        queue.start_worker()
        name = f"crash-{uuid.uuid4().hex}"
        message = queue.send("crash_retry", name)
        pid = queue.kill_mid_body(name, expire_heartbeat=False)

        assert "finished on run 2" in queue.wait(message, "ok")[0]
        # The maintenance that requeued the message forgot the dead worker.
        assert queue.redis.zscore(queue.heartbeats, queue.broker_id(pid)) is None
        runs = queue.runs(name)
        assert len(runs) == 2 and runs[0] == str(pid)
        record = queue.record("crash_retry", message)
        assert record is not None and record.status is Status.OK and record.attempt == 2
    finally:
        queue.close()
        queue.store.close()
