"""The events API (``idemfn.events``): subscribing, filtering, the order handlers run in,
unsubscribing, reprs, one function or the whole process, methods, and handlers that raise.

What each decision emits, on every store, is tests/contract/test_events.py's.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import logging
import sys
import threading
import time
from typing import Any

import pytest

import idemfn
from idemfn import Claim, MemoryStore, begin, events, idempotent
from idemfn._heartbeat import heartbeat
from idemfn.events import EVENTS, Event, Subscription

TIMEOUT = 60.0


class Recorder:
    """A handler that keeps the events it gets."""

    def __init__(self, label: str = "") -> None:
        self.label = label
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    @property
    def names(self) -> list[str]:
        with self._lock:
            return [e.name for e in self.events]


def make_fn(name: str = "t.fn", store: Any = None) -> Any:
    @idempotent(key="k:{x}", name=name, store=store or MemoryStore())
    def fn(x: int) -> int:
        return x * 2

    return fn


FIRST = ["call_started", "claimed", "completed", "call_ended"]
REPLAY = ["call_started", "replayed", "call_ended"]


# -- the names and the event -----------------------------------------------------------------------


def test_the_public_names() -> None:
    assert idemfn.subscribe is events.subscribe
    assert idemfn.Event is Event and idemfn.Subscription is Subscription
    assert EVENTS[0] == "call_started" and EVENTS[-1] == "call_ended"
    assert set(events.DECISIONS) == set(EVENTS) - {"call_started", "call_ended"}
    assert len(set(EVENTS)) == len(EVENTS) == 14
    for name in EVENTS:  # each name is a constant of the module, spelled as its value
        assert getattr(events, name.upper()) == name
    # The fields are an API: dashboards and handlers read them by name.
    assert Event._fields == (
        "name",
        "key",
        "function",
        "store",
        "attempt",
        "duration",
        "reason",
        "detail",
        "owner",
        "status",
        "error",
        "at",
    )
    for name in ("subscribe", "Subscription", "Event", "key_hash", "store_kind", "log_fields"):
        assert (getattr(events, name).__doc__ or "").strip(), name
    assert (make_fn().subscribe.__doc__ or "").strip()


def test_key_hash_is_short_stable_and_the_same_in_every_process() -> None:
    key = "shop:charge:order-1"
    # SHA-256, not hash(): the same in every process, whatever its hash seed.
    assert events.key_hash(key) == hashlib.sha256(key.encode()).hexdigest()[:16]
    assert events.key_hash("a") != events.key_hash("b")
    assert len(events.key_hash("\udcff")) == 16  # a lone surrogate: still a hash


def test_store_kind() -> None:
    from idemfn._stores.redis_cluster import RedisClusterStore

    class AcmeStore(MemoryStore):
        pass

    class Acme(MemoryStore):
        pass

    assert events.store_kind(MemoryStore()) == "memory"
    assert events.store_kind(AcmeStore()) == "acme"
    assert events.store_kind(Acme()) == "acme"
    assert events.store_kind.__name__ and RedisClusterStore.__name__ == "RedisClusterStore"
    assert events.store_kind(object.__new__(RedisClusterStore)) == "rediscluster"


def test_log_fields() -> None:
    assert events.log_fields("n:k", "claimed") == {
        "idemfn_key": "n:k",
        "idemfn_key_hash": events.key_hash("n:k"),
        "idemfn_decision": "claimed",
    }


# -- subscribing: what is checked ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["process", "function"])
def test_a_handler_that_is_not_callable_is_refused_naming_the_argument(where: str) -> None:
    subscribe = idemfn.subscribe if where == "process" else make_fn().subscribe
    with pytest.raises(TypeError, match=r"subscribe\(handler=\.\.\.\) must be a callable.*str"):
        subscribe("print")  # type: ignore[arg-type]


@pytest.mark.parametrize("where", ["process", "function"])
def test_bad_events_are_refused_naming_the_argument_and_the_way_out(where: str) -> None:
    subscribe = idemfn.subscribe if where == "process" else make_fn().subscribe
    with pytest.raises(TypeError, match=r"subscribe\(events=\.\.\.\).*events=\['claimed'\]"):
        subscribe(print, events="claimed")
    with pytest.raises(ValueError, match=r"subscribe\(events=\.\.\.\).*'claimd'") as info:
        subscribe(print, events=["claimed", "claimd"])
    assert "call_started" in str(info.value)  # the names it could have been
    assert "'claimed'" not in str(info.value).split(":")[0]  # only the unknown one is named
    with pytest.raises(ValueError, match="3"):
        subscribe(print, events=[3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="positional"):
        idemfn.subscribe(print, ["claimed"])  # type: ignore[call-arg]


def test_a_refused_subscription_subscribes_nothing() -> None:
    fn = make_fn()
    with pytest.raises(ValueError):
        fn.subscribe(print, events=["nope"])
    with pytest.raises(ValueError):
        idemfn.subscribe(print, events=["nope"])
    assert fn(1) == 2  # and nothing was printed
    assert not events.PROCESS.live


# -- what a handler gets ---------------------------------------------------------------------------


def test_events_filter_what_a_handler_gets() -> None:
    fn = make_fn()
    replays, everything = Recorder(), Recorder()
    fn.subscribe(replays, events=["replayed", "completed"])
    fn.subscribe(everything)
    fn(1)
    fn(1)
    assert replays.names == ["completed", "replayed"]
    assert everything.names == FIRST + REPLAY
    assert {e.function for e in everything.events} == {"t.fn"}


def test_a_subscription_to_no_event_costs_nothing() -> None:
    fn = make_fn()
    subscription = fn.subscribe(print, events=[])
    assert subscription.events == frozenset()
    observer = fn.policy.observer
    assert not observer.live  # a call tests one attribute, as with no subscription
    assert fn(1) == 2


def test_the_call_frame_costs_only_when_a_handler_wants_it() -> None:
    fn = make_fn()
    got = Recorder()
    fn.subscribe(got, events=["claimed"])
    assert fn(1) == 2
    assert got.names == ["claimed"]
    assert not fn.policy.observer.wants("call_started")
    assert fn.policy.observer.wants("claimed")


def test_handlers_run_process_wide_first_then_the_functions_own_in_order() -> None:
    fn = make_fn()
    order: list[str] = []

    def handler(label: str) -> Any:
        return lambda event: order.append(f"{label}:{event.name}")

    own1 = fn.subscribe(handler("own1"), events=["claimed"])
    with idemfn.subscribe(handler("process1"), events=["claimed"]):
        own2 = fn.subscribe(handler("own2"), events=["claimed"])
        with idemfn.subscribe(handler("process2"), events=["claimed"]):
            fn(1)
    assert order == ["process1:claimed", "process2:claimed", "own1:claimed", "own2:claimed"]
    own1.close()
    own2.close()


def test_handlers_run_in_the_callers_thread_and_task() -> None:
    store = MemoryStore()
    threads: list[tuple[str, int]] = []
    tasks: list[tuple[str, object]] = []

    @idempotent(key="k:{x}", name="t.where", store=store)
    def sync(x: int) -> int:
        return x

    @idempotent(key="a:{x}", name="t.where", store=store)
    async def asynchronous(x: int) -> int:
        return x

    sync.subscribe(lambda e: threads.append((e.name, threading.get_ident())))
    asynchronous.subscribe(lambda e: tasks.append((e.name, asyncio.current_task())))
    sync(1)
    assert {ident for _, ident in threads} == {threading.get_ident()}

    async def main() -> object:
        await asynchronous(1)
        return asyncio.current_task()

    task = asyncio.run(main())
    assert [name for name, _ in tasks] == FIRST
    assert {t for _, t in tasks} == {task}


# -- one function, or the whole process ------------------------------------------------------------


def test_a_functions_subscription_gets_that_function_only() -> None:
    store = MemoryStore()
    a, b = make_fn("t.a", store), make_fn("t.b", store)
    got = Recorder()
    with a.subscribe(got):
        b(1)
        a(1)
    assert {e.function for e in got.events} == {"t.a"}
    assert got.names == FIRST


def test_a_process_wide_subscription_gets_every_function_and_begin() -> None:
    store = MemoryStore()
    a, b = make_fn("t.a", store), make_fn("t.b", store)
    got = Recorder()
    with idemfn.subscribe(got) as subscription:
        assert isinstance(subscription, Subscription)
        a(1)
        b(1)
        c = make_fn("t.c", store)  # decorated after subscribing: it gets them too
        c(1)
        claim = begin("plain", store=store)
        assert isinstance(claim, Claim)
        with claim:
            claim.complete("v")
    assert [e.function for e in got.events if e.name == "claimed"] == ["t.a", "t.b", "t.c", None]
    assert [e.name for e in got.events if e.function is None] == ["claimed", "completed"]
    a(2)  # closed
    assert len(got.events) == 3 * len(FIRST) + 2


def test_the_function_label_is_the_name_or_module_and_qualname() -> None:
    got = Recorder()

    @idempotent(key="k", store=MemoryStore())
    def unnamed() -> int:
        return 1

    with idemfn.subscribe(got, events=["claimed"]):
        unnamed()
    (event,) = got.events
    assert event.function == f"{__name__}.{unnamed.__qualname__}"
    assert event.key == unnamed.key_for()


# -- methods ---------------------------------------------------------------------------------------


class Mailer:
    store = MemoryStore()

    def __init__(self, name: str) -> None:
        self.name = name

    @idempotent(key="{self.name}:{to}", name="t.mailer", store=store)
    def send(self, to: str) -> str:
        return f"{self.name} -> {to}"

    @classmethod
    @idempotent(key="c:{to}", name="t.mailer_cls", store=store)
    def broadcast(cls, to: str) -> str:
        return f"all -> {to}"


def test_a_method_subscription_gets_every_instances_calls() -> None:
    got = Recorder()
    with Mailer("a").send.subscribe(got, events=["claimed"]):
        Mailer("a").send("x")
        Mailer("b").send("x")
    assert [e.key for e in got.events] == ["t.mailer:a:x", "t.mailer:b:x"]
    assert {e.function for e in got.events} == {"t.mailer"}
    with Mailer.send.subscribe(got, events=["replayed"]):  # on the class: the same
        Mailer("b").send("x")
    assert got.names == ["claimed", "claimed", "replayed"]
    with Mailer.broadcast.subscribe(got, events=["claimed"]):
        Mailer.broadcast("y")  # type: ignore[call-arg, arg-type]  # (mypy: a classmethod over it)
    assert got.events[-1].key == "t.mailer_cls:c:y"


def test_a_bound_method_or_callable_object_as_handler() -> None:
    fn = make_fn()
    recorder = Recorder()
    kept: list[str] = []

    class Counter:
        def on_event(self, event: Event) -> None:
            kept.append(event.name)

    counter = Counter()
    with fn.subscribe(counter.on_event, events=["claimed"]) as subscription:
        fn.subscribe(recorder, events=["claimed"])
        fn(1)
        assert "Counter.on_event" in repr(subscription)
    assert kept == ["claimed"] and recorder.names == ["claimed"]


# -- close, context manager, reprs -----------------------------------------------------------------


def test_close_unsubscribes_once_and_for_all() -> None:
    fn = make_fn()
    got = Recorder()

    def live() -> tuple[bool, bool, bool]:
        """Whether the subscription is active, the function's and begin()'s observers live."""
        return subscription.active, fn.policy.observer.live, events.PROCESS.live

    subscription = fn.subscribe(got)
    assert live() == (True, True, False)
    fn(1)
    subscription.close()
    assert live() == (False, False, False)
    subscription.close()  # again: nothing
    fn(2)
    assert got.names == FIRST

    subscription = idemfn.subscribe(got)
    assert live() == (True, True, True)
    subscription.close()
    subscription.close()
    assert live() == (False, False, False)
    fn(3)
    assert got.names == FIRST


def test_a_subscription_is_a_context_manager_closed_also_on_error() -> None:
    fn = make_fn()
    got = Recorder()

    def fails() -> None:
        with fn.subscribe(got) as subscription:
            held.append(subscription)
            raise RuntimeError

    held: list[Subscription] = []
    with pytest.raises(RuntimeError):
        fails()
    (subscription,) = held
    assert not subscription.active
    fn(1)
    assert got.events == []


def test_reprs() -> None:
    fn = make_fn()

    def on_event(event: Event) -> None:
        pass

    own = fn.subscribe(on_event, events=["claimed", "replayed"])
    assert repr(own) == ("<Subscription test_reprs.<locals>.on_event on 't.fn' (2 events, active)>")
    with idemfn.subscribe(on_event) as process:
        assert repr(process) == (
            f"<Subscription test_reprs.<locals>.on_event on every function ({len(EVENTS)}"
            " events, active)>"
        )
    own.close()
    assert repr(own).endswith("(2 events, closed)>")
    assert repr(fn.policy.observer) == "<Observer 't.fn' live=False>"
    with idemfn.subscribe(functools.partial(print)) as partial:  # (no __qualname__)
        assert repr(partial).startswith("<Subscription functools.partial(<built-in function print>")


def test_subscribing_or_closing_from_inside_a_handler() -> None:
    fn = make_fn()
    got = Recorder()
    late: list[Subscription] = []

    def first(event: Event) -> None:
        if event.name == "claimed":
            late.append(fn.subscribe(got))  # (the lock is re-entrant)
        if event.name == "completed":
            own.close()

    own = fn.subscribe(first)
    fn(1)
    assert got.names == ["completed", "call_ended"]  # from the event after it subscribed
    assert not own.active and late[0].active
    late[0].close()


# -- a handler that raises -------------------------------------------------------------------------


def _failures_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "event handler" in r.getMessage()]


def test_a_raising_handler_never_breaks_a_call_and_is_logged_once_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fn = make_fn()
    after = Recorder()

    def broken(event: Event) -> None:
        raise ZeroDivisionError(f"broken on {event.name}")

    with fn.subscribe(broken), fn.subscribe(after):
        assert fn(1) == 2
        assert fn(1) == 2
    assert after.names == FIRST + REPLAY  # the handlers after it still ran
    record = fn.status(1)
    assert record is not None and record.status is idemfn.Status.OK
    (logged,) = _failures_logged(caplog)  # seven failures, one line
    assert logged.levelno == logging.ERROR
    assert logged.exc_info is not None and logged.exc_info[0] is ZeroDivisionError
    assert "broken on call_started" in str(logged.exc_info[1])
    message = logged.getMessage()
    assert "broken" in message and "'call_started'" in message and "'t.fn:k:1'" in message
    assert logged.idemfn_key == "t.fn:k:1"  # type: ignore[attr-defined]
    assert logged.idemfn_decision == "call_started"  # type: ignore[attr-defined]


def test_a_raising_handler_is_logged_again_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fn = make_fn()

    def broken(event: Event) -> None:
        raise ValueError("broken")

    with fn.subscribe(broken, events=["claimed"]) as subscription:
        fn(1)
        fn(2)
        fn(3)
        assert len(_failures_logged(caplog)) == 1
        # A minute on (the record of when it was logged moved back, not the clock).
        logged_at = subscription._logged_at
        assert logged_at is not None and subscription._failed == 2
        monkeypatch.setattr(subscription, "_logged_at", logged_at - 61)
        fn(4)
    _, again = _failures_logged(caplog)
    assert again.exc_info is None or again.exc_info == (None, None, None)
    assert "raised again (3 times in the last 61 s, now on 'claimed' for key 't.fn:k:4')" in (
        again.getMessage()
    )


def test_each_failing_handler_gets_its_own_first_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fn = make_fn()

    def one(event: Event) -> None:
        raise ValueError("one")

    def two(event: Event) -> None:
        raise KeyError("two")

    with fn.subscribe(one, events=["claimed"]), fn.subscribe(two, events=["claimed"]):
        fn(1)
    logged = _failures_logged(caplog)
    assert [r.exc_info[0] for r in logged if r.exc_info] == [ValueError, KeyError]


class _Broken:
    """A handler object that raises (each instance a new handler)."""

    def __call__(self, event: Event) -> None:
        raise ValueError("broken")


def test_a_handler_subscribed_again_gets_its_first_traceback_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # (Review of issue 21: the rate limit was kept by id(handler), for ever: a handler
    # subscribed again, or a new one given a freed handler's id, never had its traceback
    # logged.) It is the subscription's own now.
    fn = make_fn()
    broken = _Broken()
    with fn.subscribe(broken, events=["claimed"]):
        fn(1)
    with fn.subscribe(broken, events=["claimed"]):
        fn(2)
    with fn.subscribe(_Broken(), events=["claimed"]):
        fn(3)
    assert [r.exc_info[0] for r in _failures_logged(caplog) if r.exc_info] == [ValueError] * 3


def test_a_raising_handler_never_breaks_an_async_call() -> None:
    store = MemoryStore()

    @idempotent(key="k:{x}", name="t.async", store=store)
    async def fn(x: int) -> int:
        await asyncio.sleep(0)
        return x

    def broken(event: Event) -> None:
        raise RuntimeError("broken")

    with fn.subscribe(broken):
        assert asyncio.run(fn(1)) == 1
        assert asyncio.run(fn(1)) == 1
    record = fn.status(1)
    assert record is not None and record.status is idemfn.Status.OK


def test_a_handler_raising_on_a_failed_call_leaves_the_calls_own_exception() -> None:
    fn_store = MemoryStore()

    @idempotent(key="k", name="t.fails", store=fn_store)
    def fails() -> None:
        raise LookupError("the body's")

    def broken(event: Event) -> None:
        raise RuntimeError("the handler's")

    with fails.subscribe(broken), pytest.raises(LookupError, match="the body's") as info:
        fails()
    assert "the handler's" not in "".join(getattr(info.value, "__notes__", []))
    assert info.value.__context__ is None


# (Found by the events tests of issue 21, fixed since.)
def test_an_interrupt_in_a_claimed_handler_does_not_leave_the_key_claimed() -> None:
    fn = make_fn()

    def interrupted(event: Event) -> None:
        raise KeyboardInterrupt

    subscription = fn.subscribe(interrupted, events=["claimed"])
    try:
        with pytest.raises(KeyboardInterrupt):
            fn(1)
    finally:
        subscription.close()
    try:
        assert fn.status(1) is None  # undone: nothing ran
        assert fn(1) == 2
    finally:
        for claim in (ref() for ref, _ in list(heartbeat._claims.values())):
            if isinstance(claim, Claim) and claim.key == fn.key_for(1):
                heartbeat.discard(claim)


def test_an_interrupt_in_a_completed_handler_goes_on_and_the_outcome_stays() -> None:
    fn = make_fn()

    def interrupted(event: Event) -> None:
        raise KeyboardInterrupt

    with fn.subscribe(interrupted, events=["completed"]), pytest.raises(KeyboardInterrupt):
        fn(1)
    record = fn.status(1)
    assert record is not None and record.status is idemfn.Status.OK
    assert fn(1) == 2  # replayed


# -- subscribing and closing while other threads call ----------------------------------------------


def test_subscribe_and_close_while_other_threads_call() -> None:
    store = MemoryStore()
    fns = [make_fn(f"t.race{i}", store) for i in range(3)]
    stop = threading.Event()
    errors: list[BaseException] = []
    calls = [0]

    def caller(n: int) -> None:
        i = 0
        try:
            while not stop.is_set():
                fns[n % 3](n * 1_000_000 + i % 50)  # first calls and replays
                i += 1
                calls[0] += 1
        except BaseException as exc:  # the test fails on it below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    got = Recorder()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # (this thread gets the GIL back from four busy callers soon)
    try:
        for round_ in range(100):
            own = fns[round_ % 3].subscribe(got)
            process = idemfn.subscribe(got, events=["claimed", "replayed"])
            made, give_up = calls[0], time.monotonic() + TIMEOUT
            while calls[0] < made + 3:  # some calls while subscribed
                assert time.monotonic() < give_up, "the callers stopped calling"
                time.sleep(0.0001)
            if round_ % 2:
                own.close()
                process.close()
            else:
                process.close()
                own.close()
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert got.events, "no event reached a handler while it was subscribed"
    assert all(e.name in EVENTS for e in got.events)
    assert not any(fn.policy.observer.live for fn in fns) and not events.PROCESS.live
    before = len(got.events)
    for fn in fns:  # closed: nothing more
        fn(-1)
    assert len(got.events) == before


def test_a_cancelled_async_call_is_halted_interrupted() -> None:
    store = MemoryStore()
    got = Recorder()
    running = asyncio.Event()

    @idempotent(key="k", name="t.cancelled", store=store)
    async def slow() -> None:
        running.set()
        await asyncio.sleep(TIMEOUT)

    async def main() -> None:
        task = asyncio.create_task(slow())
        await running.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with slow.subscribe(got):
        asyncio.run(main())
    assert got.names == ["call_started", "claimed", "halted", "call_ended"]
    halted, ended = got.events[2:]
    assert halted.reason == "interrupted" and isinstance(halted.error, asyncio.CancelledError)
    assert ended.status == "raised" and ended.error is halted.error


def test_a_failed_renewal_is_store_error_renew_on_the_heartbeat() -> None:
    from idemfn import StoreError

    class FailsToRenew(MemoryStore):
        def renew(self, entry: Any, lease: float) -> Any:
            raise StoreError("injected: cannot renew", key=entry.key)

    store = FailsToRenew()
    got = Recorder()
    threads: list[str] = []

    @idempotent(key="k", name="t.renew", store=store)
    def body() -> str:
        mine = [
            c
            for c in (ref() for ref, _ in list(heartbeat._claims.values()))
            if isinstance(c, Claim) and c.key == body.key_for()
        ]
        assert len(mine) == 1
        mine[0].renew_at = 0.0  # due now: the heartbeat renews it
        with heartbeat._cond:
            heartbeat._cond.notify()
        give_up = time.monotonic() + TIMEOUT
        while "store_error" not in got.names:
            assert time.monotonic() < give_up, "the heartbeat did not renew"
            time.sleep(0.005)
        return "done"

    def where(event: Event) -> None:
        threads.append(threading.current_thread().name)

    with body.subscribe(got), body.subscribe(where, events=["store_error"]):
        assert body() == "done"  # the call goes on
    assert got.names == ["call_started", "claimed", "store_error", "completed", "call_ended"]
    failed = got.events[2]
    assert failed.reason == "renew" and failed.attempt == 1
    assert isinstance(failed.error, StoreError) and "cannot renew" in (failed.detail or "")
    assert threads == ["idemfn-renewal"]


# (Found by the events tests of issue 21, fixed since.)
def test_an_interrupt_in_an_async_call_started_handler_leaves_nothing_unawaited() -> None:
    import warnings

    @idempotent(key="k", name="t.astart", store=MemoryStore())
    async def fn() -> int:
        return 1

    def interrupted(event: Event) -> None:
        raise KeyboardInterrupt

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fn.subscribe(interrupted, events=["call_started"]), pytest.raises(KeyboardInterrupt):
            asyncio.run(fn())
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
    assert fn.status() is None  # nothing claimed
