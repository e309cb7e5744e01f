"""Every event in the situation that causes it, on every store, through sync and async callers.

Each test makes the situation for real (a second process holding the key, a process SIGKILLed
while it holds the claim, a takeover, a store that fails) and checks the exact sequence of
events the call emits, then their fields: key, function, store kind, attempt, durations,
reasons and errors. With nothing subscribed, no event is made at all.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import idemfn
from idemfn import (
    AlreadyRunning,
    Claim,
    DeadlineExceeded,
    FingerprintMismatch,
    Halted,
    MemoryStore,
    OwnershipLost,
    Policy,
    Store,
    StoreError,
    _lease,
    begin,
    events,
    idempotent,
)
from idemfn._heartbeat import heartbeat
from idemfn._stores.postgres import PostgresStore
from idemfn.events import Event
from tests.support.concurrency import HELD, HeldElsewhere, WatchSpy, spec_of, start
from tests.support.records import foreign_entry
from tests.support.stores import Make, Runner
from tests.support.workers import poll, process_alive

KINDS = {"MemoryStore": "memory", "DiskStore": "disk", "RedisStore": "redis"}
KINDS["PostgresStore"] = "postgres"
TIMEOUT = 60.0
FIRST = ["call_started", "claimed", "completed", "call_ended"]
# Real processes cost a second or two each on a loaded machine: the tests that start them run
# on a few pairs of a store another process can open and a caller, which cover both callers.
PROCESS_PAIRS = [("disk", "sync"), ("redis", "async"), ("postgres", "sync")]
PROCESS_PAIRS_IDS = [f"{store}-{mode}" for store, mode in PROCESS_PAIRS]


class Boom(Exception):
    pass


class Transient(Exception):
    pass


class Recorder:
    """A handler that keeps every event it gets (from any thread)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    @property
    def names(self) -> list[str]:
        with self._lock:
            return [e.name for e in self.events]

    def one(self, name: str) -> Event:
        found = [e for e in self.events if e.name == name]
        assert len(found) == 1, (name, self.names)
        return found[0]

    def clear(self) -> None:
        with self._lock:
            self.events.clear()


def kind_of(store: Store) -> str:
    return KINDS[type(store).__name__]


def check_fields(rec: Recorder, key: str, function: str | None, store: Store) -> None:
    """What every event of one call must carry: its key, function and store kind, a time of
    now, and durations that are >= 0 and plausible."""
    now = time.time()
    for event in rec.events:
        assert event.key == key, event
        assert event.function == function, event
        assert event.store == kind_of(store), event
        assert now - 120 < event.at <= now + 1, event
        if event.duration is not None:
            assert 0 <= event.duration < 120, event
    durations = {
        events.COMPLETED,
        events.HALTED,
        events.RELEASED,
        events.WAITED,
        events.CALL_ENDED,
        events.OWNERSHIP_LOST,
    }
    for event in rec.events:
        if event.name in durations and not (
            event.name == events.RELEASED and event.reason == "undone"
        ):
            if event.name == events.HALTED and event.reason == "abandoned":
                continue  # (no body ran here: nothing to time)
            assert event.duration is not None, event
    starts = [e.at for e in rec.events]
    assert starts == sorted(starts), rec.events


def run(fn: Runner, *args: Any) -> Any:
    """``fn(*args)``, and what it raised instead (an exception is returned, not raised)."""
    try:
        return fn(*args)
    except BaseException as exc:  # the test compares it with the events'
        return exc


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


# -- a first call, a replay ------------------------------------------------------------------------


def test_first_call_then_replay(make: Make, counter: Any, store: Store, rec: Recorder) -> None:
    fn = make(counter, key="k:{x}")
    fn.subscribe(rec)
    assert fn(1) == {"x": 1, "y": None}
    assert rec.names == ["call_started", "claimed", "completed", "call_ended"]
    check_fields(rec, fn.key_for(1), "test.body", store)
    claimed, completed, ended = rec.events[1:]
    assert claimed.attempt == completed.attempt == 1
    assert rec.events[0].attempt is None and ended.attempt is None
    assert ended.status == "ok" and ended.error is None
    assert completed.duration is not None and ended.duration is not None
    assert completed.duration <= ended.duration
    assert completed.reason is None and completed.error is None

    rec.clear()
    assert fn(1) == {"x": 1, "y": None}
    assert rec.names == ["call_started", "replayed", "call_ended"]
    check_fields(rec, fn.key_for(1), "test.body", store)
    replayed = rec.one("replayed")
    assert replayed.status == "ok" and replayed.attempt == 1
    assert counter.runs == 1


# -- halted: raised, unstorable, interrupted, incomplete -------------------------------------------


def test_a_body_that_raises_is_halted_raised(make: Make, store: Store, rec: Recorder) -> None:
    def body(x: int) -> None:
        raise Boom(f"no {x}")

    fn = make(body, key="k:{x}")
    fn.subscribe(rec)
    raised = run(fn, 1)
    assert isinstance(raised, Boom)
    assert rec.names == ["call_started", "claimed", "halted", "call_ended"]
    check_fields(rec, fn.key_for(1), "test.body", store)
    halted, ended = rec.events[2:]
    assert halted.reason == "raised" and halted.attempt == 1
    assert halted.error is raised
    assert halted.detail is not None and "Boom" in halted.detail
    assert ended.status == "raised" and ended.error is raised

    rec.clear()
    again = run(fn, 1)
    assert isinstance(again, Boom)
    assert rec.names == ["call_started", "replayed", "call_ended"]
    assert rec.events[1].status == "halted"
    assert rec.events[2].status == "raised" and rec.events[2].error is again


def test_an_unstorable_value_is_halted_unstorable(make: Make, store: Store, rec: Recorder) -> None:
    def body(x: int) -> Any:
        return threading.Lock()  # pickles to nothing

    fn = make(body, key="k:{x}")
    fn.subscribe(rec)
    raised = run(fn, 1)
    assert isinstance(raised, Halted)
    assert rec.names == ["call_started", "claimed", "halted", "call_ended"]
    check_fields(rec, fn.key_for(1), "test.body", store)
    halted = rec.one("halted")
    assert halted.reason == "unstorable"
    assert halted.detail is not None and "could not be stored" in halted.detail
    assert isinstance(halted.error, TypeError)  # pickling's own error
    assert rec.events[-1].error is raised


class _WritesOnly:
    """A serializer whose ``loads`` cannot read what its ``dumps`` wrote."""

    def dumps(self, value: object) -> bytes:
        return repr(value).encode()

    def loads(self, data: bytes) -> object:
        raise ValueError("cannot read")


def test_a_value_that_does_not_load_back_is_halted_unstorable_and_returned(
    make: Make, store: Store, rec: Recorder
) -> None:
    def body(x: int) -> int:
        return x

    fn = make(body, key="k:{x}", serializer=_WritesOnly())
    fn.subscribe(rec)
    assert fn(1) == 1  # the body ran: its value is returned
    assert rec.names == ["call_started", "claimed", "halted", "call_ended"]
    check_fields(rec, fn.key_for(1), "test.body", store)
    halted = rec.one("halted")
    assert halted.reason == "unstorable" and halted.attempt == 1
    assert rec.events[-1].status == "ok" and rec.events[-1].error is None


def test_an_interrupted_body_is_halted_interrupted(store: Store, rec: Recorder) -> None:
    @idempotent(key="k", name="ev.interrupted", store=store)
    def body() -> None:
        raise KeyboardInterrupt

    body.subscribe(rec)
    with pytest.raises(KeyboardInterrupt):
        body()
    assert rec.names == ["call_started", "claimed", "halted", "call_ended"]
    check_fields(rec, body.key_for(), "ev.interrupted", store)
    halted = rec.one("halted")
    assert halted.reason == "interrupted", halted
    assert isinstance(halted.error, KeyboardInterrupt)
    assert isinstance(rec.events[-1].error, KeyboardInterrupt)


# (Found by the events tests of issue 21, fixed since.)
def test_a_claim_block_left_without_complete_is_halted_incomplete(
    store: Store, rec: Recorder
) -> None:
    with idemfn.subscribe(rec):
        claim = begin("ev-incomplete", store=store)
        assert isinstance(claim, Claim)
        with claim:
            pass
    assert rec.names == ["claimed", "halted"]
    check_fields(rec, "ev-incomplete", None, store)
    halted = rec.one("halted")
    assert halted.reason == "incomplete", halted
    assert halted.attempt == 1


# -- released: retry_on, a retry request, undone ---------------------------------------------------


def test_retry_on_releases_the_key(make: Make, store: Store, rec: Recorder) -> None:
    def body(x: int) -> None:
        raise Transient("later")

    fn = make(body, key="k:{x}", retry_on=Transient)
    fn.subscribe(rec)
    raised = run(fn, 1)
    assert isinstance(raised, Transient)
    assert rec.names == ["call_started", "claimed", "released", "call_ended"]
    check_fields(rec, fn.key_for(1), "test.body", store)
    released = rec.one("released")
    assert released.reason == "retry_on" and released.error is raised
    assert released.attempt == 1 and released.duration is not None
    assert fn.status(1) is None


def test_a_retry_request_releases_the_key(make: Make, store: Store, rec: Recorder) -> None:
    import rq.job

    def body(x: int) -> Any:
        return rq.job.Retry(max=3)

    fn = make(body, key="k:{x}")
    fn.subscribe(rec)
    assert isinstance(fn(1), rq.job.Retry)
    assert rec.names == ["call_started", "claimed", "released", "call_ended"]
    check_fields(rec, fn.key_for(1), "test.body", store)
    released = rec.one("released")
    assert released.reason == "retry_request" and released.error is None
    assert rec.events[-1].status == "ok"
    assert fn.status(1) is None


def test_a_queues_retry_releases_the_key_queue_retry(rec: Recorder) -> None:
    from celery import Celery

    app = Celery("ev-queue", broker="memory://", backend="cache+memory://", set_as_current=False)
    store = MemoryStore()

    @app.task(bind=True, max_retries=3)  # type: ignore[untyped-decorator]
    @idempotent(key=lambda self: "t-9", name="ev.flaky", store=store)
    def flaky(self: Any) -> str:
        if self.request.retries < 1:
            raise self.retry(countdown=0)
        return "ok"

    flaky.run.subscribe(rec)
    assert flaky.apply(task_id="t-9").get() == "ok"
    # The first delivery released its key for the retry; the retry ran and completed.
    assert rec.names == ["call_started", "claimed", "released", "call_ended", *FIRST]
    check_fields(rec, "ev.flaky:t-9", "ev.flaky", store)
    released = rec.one("released")
    assert released.reason == "queue_retry" and released.attempt == 1
    assert type(released.error).__name__ == "Retry"
    assert rec.events[3].status == "raised" and rec.events[3].error is released.error


def _key_of(args: tuple[Any, ...]) -> str:
    return args[0] if isinstance(args[0], str) else str(args[0].key)


def _fail_after(store: Store, monkeypatch: pytest.MonkeyPatch, name: str, *, land: bool) -> None:
    """Make ``store``'s ``name`` primitive (and its async twin) raise ``StoreError``, after
    doing its work (``land``: as a timeout that came after the write) or instead of it."""
    for attr in (name, "a" + name):
        real = getattr(store, attr)
        if attr.startswith("a"):

            async def failing(*args: Any, _real: Any = real) -> Any:
                if land:
                    await _real(*args)
                raise StoreError("injected: the server went away", key=_key_of(args))

        else:

            def failing(*args: Any, _real: Any = real) -> Any:  # type: ignore[misc]
                if land:
                    _real(*args)
                raise StoreError("injected: the server went away", key=_key_of(args))

        monkeypatch.setattr(store, attr, failing)


def test_a_claim_whose_answer_is_lost_is_undone(
    make: Make, counter: Any, store: Store, rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    fn = make(counter, key="k:{x}")
    fn.subscribe(rec)
    _fail_after(store, monkeypatch, "claim", land=True)
    raised = run(fn, 1)
    assert isinstance(raised, StoreError)
    assert rec.names == ["call_started", "released", "store_error", "call_ended"]
    check_fields(rec, fn.key_for(1), "test.body", store)
    released, failed = rec.events[1:3]
    assert released.reason == "undone" and released.attempt == 1
    assert failed.reason == "decide" and failed.error is raised
    assert counter.runs == 0 and fn.status(1) is None


# (Found by the events tests of issue 21, fixed since.)
def test_a_claim_that_failed_before_landing_is_not_reported_released(
    make: Make, counter: Any, store: Store, rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    fn = make(counter, key="k:{x}")
    fn.subscribe(rec)
    _fail_after(store, monkeypatch, "claim", land=False)
    raised = run(fn, 1)
    assert isinstance(raised, StoreError)
    assert rec.names == ["call_started", "store_error", "call_ended"]


# -- store errors: deciding, settling --------------------------------------------------------------


def test_a_store_failing_to_decide_is_store_error_decide(
    make: Make,
    counter: Any,
    store: Store,
    rec: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    fn = make(counter, key="k:{x}")
    fn.subscribe(rec)

    def down(*args: Any) -> Any:
        raise StoreError("injected: the server is down", key=str(args[0]))

    async def adown(*args: Any) -> Any:
        down(*args)

    for name in ("get", "claim"):
        monkeypatch.setattr(store, name, down)
        monkeypatch.setattr(store, "a" + name, adown)
    raised = run(fn, 1)
    assert isinstance(raised, StoreError)
    assert rec.names == ["call_started", "store_error", "call_ended"]
    check_fields(rec, fn.key_for(1), "test.body", store)
    failed = rec.one("store_error")
    assert failed.reason == "decide" and failed.error is raised
    assert failed.detail is not None and "injected" in failed.detail
    assert counter.runs == 0


def test_a_store_failing_to_record_is_store_error_settle(
    make: Make, counter: Any, store: Store, rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    fn = make(counter, key="k:{x}")
    fn.subscribe(rec)
    _fail_after(store, monkeypatch, "swap", land=False)
    assert fn(1) == {"x": 1, "y": None}  # the body ran: its value is returned
    assert rec.names == ["call_started", "claimed", "store_error", "call_ended"]
    check_fields(rec, fn.key_for(1), "test.body", store)
    failed = rec.one("store_error")
    assert failed.reason == "settle" and failed.attempt == 1
    assert isinstance(failed.error, StoreError)
    assert rec.events[-1].status == "ok"


def test_a_store_failing_to_record_an_exception_is_store_error_settle(
    make: Make, store: Store, rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def body(x: int) -> None:
        raise Boom("the body's own")

    fn = make(body, key="k:{x}")
    fn.subscribe(rec)
    _fail_after(store, monkeypatch, "swap", land=False)
    raised = run(fn, 1)
    assert isinstance(raised, Boom)  # the body's, not the store's
    assert rec.names == ["call_started", "claimed", "store_error", "call_ended"]
    assert rec.one("store_error").reason == "settle"
    assert rec.events[-1].error is raised


# -- refused: busy, mismatch, deadline -------------------------------------------------------------


def test_a_live_owner_is_busy_live_owner(
    make: Make, counter: Any, store: Store, rec: Recorder
) -> None:
    fn = make(counter, key="k:{x}")
    fn.subscribe(rec)
    key = fn.key_for(1)
    assert store.claim(foreign_entry(key, "", lease_until=store.time() + 3600)) is None
    raised = run(fn, 1)
    assert isinstance(raised, AlreadyRunning)
    assert rec.names == ["call_started", "busy", "call_ended"]
    check_fields(rec, key, "test.body", store)
    busy = rec.one("busy")
    assert busy.reason == "live_owner" and busy.error is raised
    assert busy.owner == "elsewhere/0badc0de/4242/77"
    assert counter.runs == 0


def test_a_wait_that_runs_out_is_waited_gave_up_then_busy(
    make: Make, counter: Any, store: Store, rec: Recorder
) -> None:
    fn = make(counter, key="k:{x}", wait=0.05)  # (it must run out: the owner never lets go)
    fn.subscribe(rec)
    key = fn.key_for(1)
    assert store.claim(foreign_entry(key, "", lease_until=store.time() + 3600)) is None
    raised = run(fn, 1)
    assert isinstance(raised, AlreadyRunning)
    assert rec.names == ["call_started", "waited", "busy", "call_ended"]
    check_fields(rec, key, "test.body", store)
    waited = rec.one("waited")
    assert waited.status == "gave_up"
    assert waited.duration is not None and waited.duration >= 0.05
    assert rec.one("busy").reason == "live_owner" and rec.one("busy").error is raised


def test_a_call_reentering_its_key_is_busy_reentered(
    store: Store, mode: str, rec: Recorder
) -> None:
    if mode == "sync":

        @idempotent(key="k", name="ev.reenter", store=store)
        def again() -> None:
            again()

        call: Callable[[], Any] = again
    else:

        @idempotent(key="k", name="ev.reenter", store=store)
        async def aagain() -> None:
            await aagain()

        call = lambda: asyncio.run(aagain())  # noqa: E731
        again = aagain  # type: ignore[assignment]
    again.subscribe(rec)
    with pytest.raises(AlreadyRunning) as info:
        call()
    names = ["call_started", "claimed", "call_started", "busy", "call_ended"]
    assert rec.names == [*names, "halted", "call_ended"]
    check_fields(rec, again.key_for(), "ev.reenter", store)
    busy = rec.one("busy")
    assert busy.reason == "reentered" and busy.error is info.value
    assert rec.events[5].reason == "raised" and rec.events[5].error is info.value


def test_other_arguments_are_mismatch(
    make: Make, counter: Any, store: Store, rec: Recorder
) -> None:
    fn = make(counter, key="k:{x}")
    fn(1, 1)
    fn.subscribe(rec)
    raised = run(fn, 1, 2)
    assert isinstance(raised, FingerprintMismatch)
    assert rec.names == ["call_started", "mismatch", "call_ended"]
    check_fields(rec, fn.key_for(1), "test.body", store)
    mismatch = rec.one("mismatch")
    assert mismatch.error is raised and mismatch.detail == str(raised)


def test_a_past_deadline_is_deadline_exceeded(
    make: Make, counter: Any, store: Store, rec: Recorder
) -> None:
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    fn = make(counter, key="k:{x}", deadline=past)
    fn.subscribe(rec)
    raised = run(fn, 1)
    assert isinstance(raised, DeadlineExceeded)
    assert rec.names == ["call_started", "deadline_exceeded", "call_ended"]
    check_fields(rec, fn.key_for(1), "test.body", store)
    assert rec.one("deadline_exceeded").error is raised
    assert counter.runs == 0


# -- waited: a real second process holds the key, then completes -----------------------------------


@pytest.mark.parametrize(("store", "mode"), PROCESS_PAIRS, ids=PROCESS_PAIRS_IDS, indirect=True)
def test_a_caller_waits_for_another_process_then_replays(
    store: Store,
    mode: str,
    rec: Recorder,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = spec_of(store, request)
    spy = WatchSpy(store, monkeypatch)
    options = {**HELD, "wait": TIMEOUT, "store": store}
    if mode == "sync":

        @idempotent(**options)
        def held(k: int) -> str:
            raise AssertionError("the holder's call runs, not this one")

        call: Callable[[], Any] = lambda: held(7)  # noqa: E731
        fn: Any = held
    else:

        @idempotent(**options)
        async def aheld(k: int) -> str:
            raise AssertionError("the holder's call runs, not this one")

        call = lambda: asyncio.run(aheld(7))  # noqa: E731
        fn = aheld
    fn.subscribe(rec)
    with HeldElsewhere(spec, tmp_path, 7) as holder:
        done: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: done.update(value=call()), daemon=True)
        thread.start()
        spy.wait_for_a_waiter()  # it found the key held, and waits
        waiting_since = time.monotonic()
        poll(lambda: spy.waits >= 2, "the waiter to look again", TIMEOUT)
        assert rec.names == ["call_started"]
        let_go_at = time.monotonic()
        holder.let_go()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert done["value"] == "held:7"
    assert sorted(rec.names) == sorted(["call_started", "waited", "replayed", "call_ended"])
    check_fields(rec, fn.key_for(7), "concurrency.held", store)
    waited = rec.one("waited")
    assert waited.status == "replayed"
    assert waited.duration is not None
    assert 0 < waited.duration <= rec.events[-1].duration  # type: ignore[operator]
    assert waited.duration >= let_go_at - waiting_since  # it waited all along
    assert rec.one("replayed").status == "ok"


def _waits_then_claims(store: Store, rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller waits for a key another thread holds, which the holder then releases
    (retry_on): the waiter claims it and runs the body. ``rec`` gets the waiter's events (and
    the holder's release: the holder's call began before ``rec`` was subscribed)."""
    running, release = threading.Event(), threading.Event()

    @idempotent(key="k", name="ev.waits", store=store, wait=TIMEOUT, retry_on=Transient)
    def body() -> str:
        if not running.is_set():
            running.set()
            release.wait(TIMEOUT)
            raise Transient("let the waiter claim")
        return "second"

    first = threading.Thread(target=lambda: run(body), daemon=True)  # type: ignore[arg-type]
    first.start()
    assert running.wait(TIMEOUT)  # its body runs: its claimed was emitted, to no handler
    body.subscribe(rec)
    spy = WatchSpy(store, monkeypatch)
    done: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: done.update(value=body()), daemon=True)
    waiter.start()
    spy.wait_for_a_waiter()
    release.set()
    first.join(TIMEOUT)
    waiter.join(TIMEOUT)
    assert done["value"] == "second"
    held = rec.one("released")
    assert held.reason == "retry_on" and held.attempt == 1
    rec.events.remove(held)


def test_a_caller_that_waits_for_a_released_key_claims_it(
    store: Store, rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    _waits_then_claims(store, rec, monkeypatch)
    assert sorted(rec.names) == sorted([*FIRST, "waited"]), rec.names
    check_fields(rec, "ev.waits:k", "ev.waits", store)
    waited = rec.one("waited")
    assert waited.status == "claimed" and waited.duration is not None and waited.duration > 0
    assert rec.one("claimed").attempt == 1


# (Found by the events tests of issue 21, fixed since.)
def test_waited_comes_before_the_decision_it_ended_in(
    store: Store, rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    _waits_then_claims(store, rec, monkeypatch)
    assert rec.names == ["call_started", "waited", "claimed", "completed", "call_ended"]


# -- abandoned: a real process SIGKILLed while it holds the claim ----------------------------------


def killed_holders(
    store: Store, tmp_path: Path, request: pytest.FixtureRequest, keys: list[int]
) -> dict[int, tuple[str, int]]:
    """Real processes (started together), each of which claimed ``HELD``'s key ``k`` and was
    SIGKILLed in its body: for each key, (the claim's owner, the dead pid)."""
    spec = spec_of(store, request)
    processes = {k: start("hold", spec, tmp_path, str(k)) for k in keys}
    try:
        for k, process in processes.items():
            poll(
                lambda k=k, p=process: (  # type: ignore[misc]
                    (tmp_path / f"holding-{k}").exists() or p.poll() is not None
                ),
                "the holder's claim",
                TIMEOUT,
            )
            assert process.poll() is None, [p.read_text() for p in tmp_path.glob("*.log")]
        holders = {}
        for k, process in processes.items():
            os.kill(process.pid, signal.SIGKILL)
            process.wait(TIMEOUT)
            assert not process_alive(process.pid)
            entry = store.get(f"{HELD['name']}:{k}")
            assert entry is not None and entry.status == "processing"
            assert f"/{process.pid}/" in entry.owner
            holders[k] = entry.owner, process.pid
        return holders
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(TIMEOUT)


def _held(store: Store, mode: str, **options: Any) -> tuple[Any, Callable[[int], Any]]:
    """``HELD``'s function here (wait=0: the dead owner must be seen dead at the first look),
    and a call of it that returns what it raised instead of raising it."""
    options = {**HELD, "store": store, **options}
    if mode == "sync":

        @idempotent(**options)
        def held(k: int) -> str:
            return f"again:{k}"

        return held, lambda k: run(held, k)  # type: ignore[arg-type]

    @idempotent(**options)
    async def aheld(k: int) -> str:
        await asyncio.sleep(0)
        return f"again:{k}"

    return aheld, lambda k: run(lambda k: asyncio.run(aheld(k)), k)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize(("store", "mode"), PROCESS_PAIRS, ids=PROCESS_PAIRS_IDS, indirect=True)
def test_a_killed_owner_is_abandoned_then_halted_or_taken_over(
    store: Store, mode: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    holders = killed_holders(store, tmp_path, request, [3, 4])

    # on_abandoned="halt": abandoned (halted), then halted (abandoned)
    owner, pid = holders[3]
    rec = Recorder()
    fn, call = _held(store, mode, on_abandoned="halt")
    fn.subscribe(rec)
    raised = call(3)
    assert isinstance(raised, Halted), raised
    assert rec.names == ["call_started", "abandoned", "halted", "call_ended"]
    check_fields(rec, fn.key_for(3), HELD["name"], store)
    abandoned, halted, ended = rec.events[1:]
    assert abandoned.reason == "owner_died" and abandoned.status == "halted"
    assert abandoned.owner == owner and abandoned.attempt == 1
    assert abandoned.detail is not None and str(pid) in abandoned.detail
    assert halted.reason == "abandoned" and halted.attempt == 1 and halted.owner == owner
    assert halted.detail is not None and halted.detail.startswith("abandoned")
    assert ended.status == "raised" and ended.error is raised

    # on_abandoned="retry": abandoned (taken over), then the next attempt claimed and run
    owner, pid = holders[4]
    rec = Recorder()
    fn, call = _held(store, mode, on_abandoned="retry")
    fn.subscribe(rec)
    assert call(4) == "again:4"
    assert rec.names == ["call_started", "abandoned", "claimed", "completed", "call_ended"]
    check_fields(rec, fn.key_for(4), HELD["name"], store)
    abandoned, claimed, completed, ended = rec.events[1:]
    assert abandoned.reason == "owner_died" and abandoned.status == "taken_over"
    assert abandoned.owner == owner and abandoned.attempt == 1
    assert abandoned.detail is not None and str(pid) in abandoned.detail
    assert claimed.attempt == completed.attempt == 2
    assert ended.status == "ok"


def test_a_lease_that_ran_out_is_abandoned_lease_expired(
    make: Make, counter: Any, store: Store, rec: Recorder
) -> None:
    fn = make(counter, key="k:{x}", on_abandoned="retry")
    fn.subscribe(rec)
    key = fn.key_for(1)
    assert store.claim(foreign_entry(key, "", lease_until=store.time() - 60)) is None
    assert fn(1) == {"x": 1, "y": None}
    assert rec.names == ["call_started", "abandoned", "claimed", "completed", "call_ended"]
    check_fields(rec, key, "test.body", store)
    abandoned = rec.one("abandoned")
    assert abandoned.reason == "lease_expired" and abandoned.status == "taken_over"
    assert abandoned.owner == "elsewhere/0badc0de/4242/77"
    assert rec.one("claimed").attempt == 2


# -- ownership lost: the first owner's claim taken over while its body runs ------------------------


def test_a_claim_taken_over_is_ownership_lost_on_renew_and_settle(
    store: Store, rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first owner's lease is made to look run out (the clocks move an hour on), another
    caller takes the key over and completes it, then the first owner's heartbeat renews and
    its body returns: both find the claim taken."""
    taker: dict[str, Any] = {}

    @idempotent(key="k", name="ev.lost", store=store, on_abandoned="retry")
    def body() -> str:
        if taker:
            return "second"
        taker["started"] = True
        real_clock, real_time = _lease.clock, store.time
        monkeypatch.setattr(_lease, "clock", lambda: real_clock() + 3600)
        monkeypatch.setattr(store, "time", lambda: real_time() + 3600)
        other = threading.Thread(target=lambda: taker.update(value=body()), daemon=True)
        other.start()  # (a thread of its own: not a re-entry of this call's key)
        other.join(TIMEOUT)
        assert taker.get("value") == "second"
        # The heartbeat renews now: it finds the claim taken.
        mine = [
            c
            for c in (ref() for ref, _ in list(heartbeat._claims.values()))
            if isinstance(c, Claim) and c.key == body.key_for() and c.attempt == 1
        ]
        assert len(mine) == 1
        mine[0].renew_at = 0.0
        with heartbeat._cond:
            heartbeat._cond.notify()
        poll(lambda: "ownership_lost" in rec.names, "the heartbeat's renewal", TIMEOUT)
        return "first"

    body.subscribe(rec)
    with pytest.raises(OwnershipLost) as info:
        body()
    first = [e for e in rec.events if e.attempt != 2 and e.name != "abandoned"]
    second = [e for e in rec.events if e not in first]
    assert [e.name for e in second] == ["abandoned", "claimed", "completed"]
    assert rec.one("abandoned").reason == "lease_expired"
    assert [e.name for e in first] == [
        "call_started",
        "claimed",
        "call_started",  # (the taker's)
        "call_ended",
        "ownership_lost",
        "ownership_lost",
        "call_ended",
    ]
    check_fields(rec, body.key_for(), "ev.lost", store)
    renewed, settled = [e for e in rec.events if e.name == "ownership_lost"]
    assert renewed.reason == "renew" and renewed.attempt == 1
    assert renewed.owner is not None and renewed.duration is not None
    assert settled.reason == "settle" and settled.attempt == 1
    assert settled.error is info.value
    assert rec.events[-1].error is info.value


# -- the transactional path: completed after COMMIT ------------------------------------------------


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_a_transactional_body_is_completed_after_its_commit(
    store: Store, mode: str, rec: Recorder, request: pytest.FixtureRequest
) -> None:
    assert isinstance(store, PostgresStore)
    seen: list[list[str]] = []
    if mode == "sync":

        @idempotent(key="k", name="ev.tx", store=store, transactional=True)
        def tx() -> str:
            idemfn.current_connection().execute("SELECT 1")
            seen.append(rec.names)
            return "done"

        call: Callable[[], Any] = tx
        fn: Any = tx
    else:

        @idempotent(key="k", name="ev.tx", store=store, transactional=True)
        async def atx() -> str:
            await idemfn.current_async_connection().execute("SELECT 1")
            seen.append(rec.names)
            return "done"

        call = lambda: asyncio.run(atx())  # noqa: E731
        fn = atx
    committed: list[bool] = []

    def completed(event: Event) -> None:
        # The ok record is visible to another connection: it committed.
        if event.name == "completed":
            dsn = request.getfixturevalue("postgres_server").dsn
            with PostgresStore(dsn, table=store.table) as other:
                entry = other.get(event.key)
            committed.append(entry is not None and entry.status == "ok")

    fn.subscribe(rec)
    fn.subscribe(completed, events=["completed"])
    assert call() == "done"
    assert seen == [["call_started", "claimed"]]
    assert rec.names == ["call_started", "claimed", "completed", "call_ended"]
    check_fields(rec, fn.key_for(), "ev.tx", store)
    assert committed == [True]


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_a_transactional_body_that_raises_is_halted_after_its_rollback(
    store: Store, mode: str, rec: Recorder
) -> None:
    if mode == "sync":

        @idempotent(key="k", name="ev.txfail", store=store, transactional=True)
        def tx() -> str:
            raise Boom("rolled back")

        call: Callable[[], Any] = tx
        fn: Any = tx
    else:

        @idempotent(key="k", name="ev.txfail", store=store, transactional=True)
        async def atx() -> str:
            raise Boom("rolled back")

        call = lambda: asyncio.run(atx())  # noqa: E731
        fn = atx
    fn.subscribe(rec)
    raised = run(call)  # type: ignore[arg-type]
    assert isinstance(raised, Boom)
    assert rec.names == ["call_started", "claimed", "halted", "call_ended"]
    check_fields(rec, fn.key_for(), "ev.txfail", store)
    assert rec.one("halted").reason == "raised" and rec.one("halted").error is raised


# (Found by the events tests of issue 21, fixed since.)
@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_a_commit_whose_answer_is_lost_but_that_committed_is_completed_only(
    store: Store, rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib

    import psycopg

    assert isinstance(store, PostgresStore)
    real_transaction = store.transaction

    @contextlib.contextmanager
    def answer_lost(key: str) -> Iterator[Any]:
        with real_transaction(key) as conn:
            yield conn
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(store, "transaction", answer_lost)

    @idempotent(key="k", name="ev.txlost", store=store, transactional=True)
    def tx() -> str:
        return "done"

    tx.subscribe(rec)
    assert tx() == "done"
    record = tx.status()
    assert record is not None and record.status is idemfn.Status.OK
    assert rec.names == ["call_started", "claimed", "completed", "call_ended"]


# -- the HTTP middleware and idemfn run ------------------------------------------------------------


def test_the_http_middleware_labels_its_events_http(rec: Recorder) -> None:
    from idemfn.wsgi import IdempotencyMiddleware

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("201 Created", [("content-type", "text/plain")])
        return [b"made"]

    store = MemoryStore()
    middleware = IdempotencyMiddleware(app, store=store)
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/orders",
        "QUERY_STRING": "",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "testserver",
        "HTTP_IDEMPOTENCY_KEY": "ev-http-1",
        "CONTENT_LENGTH": "0",
        "wsgi.input": __import__("io").BytesIO(b""),
        "wsgi.url_scheme": "http",
    }
    with idemfn.subscribe(rec):
        for _ in range(2):
            body = middleware(dict(environ), lambda *args: None)  # type: ignore[arg-type]
            assert b"".join(body) == b"made"
            getattr(body, "close", lambda: None)()
    assert rec.names == ["claimed", "completed", "replayed"]
    assert {e.function for e in rec.events} == {"http"}
    assert {e.store for e in rec.events} == {"memory"}
    assert len({e.key for e in rec.events}) == 1 and "ev-http-1" in rec.events[0].key


def _idemfn_run_twice(rec: Recorder, tmp_path: Path) -> None:
    """``idemfn run`` in this process, twice with one key: it runs, then replays."""
    from idemfn._cli import main

    argv = ["run", "--store", str(tmp_path / "store"), "--key", "ev-run", "--", "true"]
    with idemfn.subscribe(rec):
        assert main(argv) == 0
        assert main(argv) == 0


def test_idemfn_run_labels_its_events_idemfn_run(rec: Recorder, tmp_path: Path) -> None:
    _idemfn_run_twice(rec, tmp_path)
    assert rec.names == ["claimed", "completed", "replayed"]
    assert {e.function for e in rec.events} == {"idemfn run"}
    assert {e.key for e in rec.events} == {"ev-run"}
    assert rec.one("completed").attempt == 1 and rec.one("completed").store == "disk"


# (Found by the events tests of issue 21, fixed since.)
def test_idemfn_runs_events_name_its_store(rec: Recorder, tmp_path: Path) -> None:
    _idemfn_run_twice(rec, tmp_path)
    assert [e.store for e in rec.events] == ["disk", "disk", "disk"]


# -- nothing subscribed: nothing made --------------------------------------------------------------


@pytest.fixture
def no_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any event is made or any observer asked to emit one."""

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"an event was made with nothing subscribed: {args}")

    monkeypatch.setattr(events.Observer, "emit", refused)
    monkeypatch.setattr(events, "Event", refused)
    monkeypatch.setattr(events.Observer, "wants", refused)


def test_nothing_is_emitted_when_nothing_is_subscribed(
    make: Make, store: Store, no_events: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every kind of decision, each with nothing subscribed: not one event is made.
    def body(x: int, y: Any = None) -> Any:
        if y == "boom":
            raise Boom
        if y == "transient":
            raise Transient
        if y == "unstorable":
            return threading.Lock()
        if y == "taken":  # taken over while the body runs: its settle finds it gone
            entry = store.get(fn.key_for(x))
            assert entry is not None
            assert store.swap(entry.key, entry.token, entry._replace(token="someone-else"))
        return x

    fn = make(body, key="k:{x}", retry_on=Transient)
    assert fn(1) == 1
    assert fn(1) == 1  # replayed
    assert isinstance(run(fn, 1, 2), FingerprintMismatch)
    assert isinstance(run(fn, 2, "boom"), Boom)  # halted
    assert isinstance(run(fn, 2, "boom"), Boom)  # replayed halted
    assert isinstance(run(fn, 3, "transient"), Transient)  # released
    assert isinstance(run(fn, 8, "unstorable"), Halted)  # halted, unstorable
    assert isinstance(run(fn, 9, "taken"), OwnershipLost)  # ownership lost, settling
    key = fn.key_for(4)
    assert store.claim(foreign_entry(key, "", lease_until=store.time() + 3600)) is None
    assert isinstance(run(fn, 4), AlreadyRunning)  # busy
    waits = make(body, key="k:{x}", wait=0.01, name="test.waits")
    assert store.claim(foreign_entry(waits.key_for(4), "", lease_until=store.time() + 3600)) is None
    assert isinstance(run(waits, 4), AlreadyRunning)  # waited, gave up, busy
    retried = make(body, key="k:{x}", on_abandoned="retry", name="test.retried")
    key = retried.key_for(5)
    assert store.claim(foreign_entry(key, "", lease_until=store.time() - 60)) is None
    assert retried(5) == 5  # abandoned, taken over
    halts = make(body, key="k:{x}", name="test.halts")
    key = halts.key_for(5)
    assert store.claim(foreign_entry(key, "", lease_until=store.time() - 60)) is None
    assert isinstance(run(halts, 5), Halted)  # abandoned, halted
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    late = make(body, key="k:{x}", deadline=past, name="test.late")
    assert isinstance(run(late, 6), DeadlineExceeded)
    claim = begin("no-events", store=store, policy=Policy())
    assert isinstance(claim, Claim)
    with claim:
        pass  # halted, incomplete
    lost = begin("no-events-lost", store=store, policy=Policy())
    assert isinstance(lost, Claim)
    heartbeat.discard(lost)  # (renewed here, by hand)
    with monkeypatch.context() as patched:

        def down(*args: Any) -> Any:
            raise StoreError("injected: the server is down", key=lost.key)

        patched.setattr(store, "renew", down)
        assert lost.renew() is True  # store error, renewing: tried again soon
    entry = store.get(lost.key)
    assert entry is not None
    assert store.swap(lost.key, entry.token, entry._replace(token="someone-else"))
    assert lost.renew() is False  # ownership lost, renewing
    with monkeypatch.context() as patched:
        _fail_after(store, patched, "claim", land=True)
        assert isinstance(run(fn, 10), StoreError)  # released (undone), store error
    with monkeypatch.context() as patched:
        _fail_after(store, patched, "swap", land=False)
        assert fn(7) == 7  # store error, settling
    # The trap is armed: with a handler, the first event fails the call.
    armed = idempotent(key="k", name="test.armed", store=store)(lambda: 1)
    with armed.subscribe(print), pytest.raises(AssertionError, match="an event was made"):
        armed()


def test_a_subscription_on_one_function_gets_nothing_of_another(
    make: Make, counter: Any, rec: Recorder
) -> None:
    a = make(counter, key="a:{x}", name="test.a")
    b = make(counter, key="b:{x}", name="test.b")
    a.subscribe(rec)
    b(1)
    b(1)
    assert rec.names == []
    a(1)
    assert {e.function for e in rec.events} == {"test.a"}


# -- a queue's retry that waits for its previous attempt ------------------------------------------


# (Found by the events tests of issue 21, fixed since.)
def test_a_queue_retry_that_waits_for_its_previous_attempt_is_not_busy(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery import Celery

    app = Celery("ev-retry", broker="memory://", backend="cache+memory://", set_as_current=False)
    store = MemoryStore()

    @app.task(bind=True, max_retries=3)  # type: ignore[untyped-decorator]
    @idempotent(key=lambda self, to: "t-1", name="ev.send", store=store)
    def send(self: Any, to: str) -> str:
        return f"sent to {to}"

    previous = begin("ev.send:t-1", store=store)  # the previous attempt, not released yet
    assert isinstance(previous, Claim)
    spy = WatchSpy(store, monkeypatch)
    send.run.subscribe(rec)
    results: list[Any] = []
    retry = threading.Thread(
        target=lambda: results.append(send.apply(("bob",), task_id="t-1", retries=1)),
        daemon=True,
    )
    retry.start()
    spy.wait_for_a_waiter()
    previous.release()
    retry.join(TIMEOUT)
    assert results[0].get() == "sent to bob"
    assert "busy" not in rec.names, rec.names
    assert sorted(rec.names) == sorted([*FIRST, "waited"])
