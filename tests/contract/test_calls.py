"""What a call does (docs/outcomes.md), on every store, through sync and async wrappers."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from idemfn import (
    AlreadyRunning,
    DeadlineExceeded,
    FingerprintMismatch,
    Finished,
    Halted,
    OwnershipLost,
    Status,
    Store,
    begin,
    idempotent,
)
from idemfn._record import Entry
from idemfn._stores.base import prunable
from idemfn._stores.redis import RedisStore
from tests.support.records import foreign_entry
from tests.support.stores import Make, StoreClock, age


class Boom(Exception):
    pass


class Transient(Exception):
    pass


class NeedsArgs(OSError):
    """Pickles, but cannot be rebuilt: OSError's own pickling calls __init__, which takes two
    arguments it does not pass on. (A plain Exception's is rebuilt without __init__.)"""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


# -- first call and replay ---------------------------------------------------------------------


def test_first_call_runs_and_records_ok(make: Make, counter: Any) -> None:
    fn = make(counter, key="k:{x}")
    assert fn(1) == {"x": 1, "y": None}
    assert counter.runs == 1
    record = fn.status(1)
    assert record is not None
    assert record.status is Status.OK
    assert record.key == "test.body:k:1"
    assert record.attempt == 1
    assert record.finished_at is not None and record.expires_at is not None
    assert record.started_at <= record.finished_at
    assert record.started_at.tzinfo is timezone.utc


def test_replay_does_not_run_the_body(make: Make, counter: Any) -> None:
    fn = make(counter, key="k:{x}")
    first = fn(1)
    for _ in range(3):
        assert fn(1) == first
    assert counter.runs == 1


def test_replay_returns_a_fresh_copy(make: Make) -> None:
    fn = make(lambda x: {"items": [x]}, key="k:{x}")
    a = fn(1)
    a["items"].append("mutated")
    b = fn(1)
    c = fn(1)
    assert b == {"items": [1]}
    assert b is not c and b["items"] is not c["items"]


@pytest.mark.parametrize("falsy", [None, 0, "", [], False, {}, 0.0, b""])
def test_falsy_results_are_replayed_not_rerun(make: Make, falsy: object) -> None:
    runs = []

    def body(x: int) -> object:
        runs.append(x)
        return falsy

    fn = make(body, key="k:{x}")
    assert fn(1) == falsy
    result = fn(1)
    assert result == falsy and type(result) is type(falsy)
    assert runs == [1]


def test_distinct_keys_run_separately(make: Make, counter: Any) -> None:
    fn = make(counter, key="k:{x}")
    fn(1)
    fn(2)
    fn(1)
    assert counter.runs == 2


# -- fingerprints ---------------------------------------------------------------------------------


def test_same_key_other_arguments_is_a_mismatch(make: Make, counter: Any) -> None:
    fn = make(counter, key="k:{x}")
    fn(1, y="a")
    with pytest.raises(FingerprintMismatch) as info:
        fn(1, y="b")
    assert info.value.key == "test.body:k:1"
    assert info.value.stored != info.value.given
    assert len(info.value.stored) == 64
    assert counter.runs == 1


def test_how_arguments_are_passed_does_not_matter(make: Make) -> None:
    def body(a: int, b: int = 2) -> int:
        return a + b

    fn = make(body, key="k:{a}")
    assert fn(1, b=2) == 3
    assert fn(1, 2) == 3
    assert fn(b=2, a=1) == 3
    assert fn(1) == 3  # the default is applied before fingerprinting


def test_mismatch_is_reported_while_the_first_call_still_runs(make: Make, store: Store) -> None:
    fn = make(lambda x, y=None: x, key="k:{x}")
    store.claim(foreign_entry(fn.key_for(1, "a"), "f" * 64, lease_until=time.time() + 60))
    with pytest.raises(FingerprintMismatch):
        fn(1, "b")


def test_fingerprint_false_turns_the_check_off(make: Make, counter: Any) -> None:
    fn = make(counter, key="k:{x}", fingerprint=False)
    fn(1, "a")
    assert fn(1, "b") == {"x": 1, "y": "a"}
    assert counter.runs == 1


def test_fingerprint_names_compare_only_those(make: Make, counter: Any) -> None:
    fn = make(counter, key="k:{x}", fingerprint=["x"])
    fn(1, "a")
    assert fn(1, "b") == {"x": 1, "y": "a"}
    assert counter.runs == 1


def test_fingerprint_callable(make: Make, counter: Any) -> None:
    fn = make(counter, key="k:{x}", fingerprint=lambda x, y=None: str(y).lower())
    fn(1, "A")
    assert fn(1, "a") == {"x": 1, "y": "A"}
    with pytest.raises(FingerprintMismatch):
        fn(1, "b")


# -- exceptions -----------------------------------------------------------------------------------


def test_exception_is_recorded_and_reraised_as_itself(make: Make) -> None:
    runs = []

    def body(x: int) -> None:
        runs.append(x)
        raise Boom(f"bad {x}")

    fn = make(body, key="k:{x}")
    with pytest.raises(Boom, match="bad 1") as first:
        fn(1)
    assert not getattr(first.value, "__notes__", [])
    with pytest.raises(Boom, match="bad 1") as replay:
        fn(1)
    notes = replay.value.__notes__
    assert any("replayed" in n and "test.body:k:1" in n for n in notes)
    assert runs == [1]
    record = fn.status(1)
    assert record is not None and record.status is Status.HALTED
    assert record.exc_type is not None and record.exc_type.endswith("Boom")
    assert record.traceback is not None and "bad 1" in record.traceback


def test_each_replay_raises_a_fresh_exception(make: Make) -> None:
    def body(x: int) -> None:
        raise Boom("again")

    fn = make(body, key="k:{x}")
    errors = []
    for _ in range(3):
        with pytest.raises(Boom) as info:
            fn(1)
        errors.append(info.value)
    assert errors[1] is not errors[2]
    assert len(errors[2].__notes__) == 1  # notes don't pile up across replays


# The replay note says which key and when
def test_replay_note_names_the_key_and_the_time(make: Make) -> None:
    def body(x: int) -> None:
        raise ValueError("bad")

    fn = make(body, key="k:{x}")
    with pytest.raises(ValueError):
        fn(1)
    with pytest.raises(ValueError) as info:
        fn(1)
    record = fn.status(1)
    assert record is not None and record.finished_at is not None
    (note,) = info.value.__notes__
    assert fn.key_for(1) in note
    assert record.finished_at.isoformat(timespec="seconds") in note


def test_exception_that_cannot_be_rebuilt_replays_as_halted(make: Make) -> None:
    def body(x: int) -> None:
        raise NeedsArgs(7, "nope")

    fn = make(body, key="k:{x}")
    with pytest.raises(NeedsArgs):
        fn(1)  # the owner sees its own exception
    with pytest.raises(Halted) as info:
        fn(1)
    assert info.value.exc_type is not None and info.value.exc_type.endswith("NeedsArgs")
    assert "7: nope" in str(info.value)
    assert "could not be stored" in info.value.reason
    assert info.value.traceback is not None and "NeedsArgs" in info.value.traceback


def test_unpicklable_exception_replays_as_halted(make: Make) -> None:
    class Local(Exception):  # cloudpickle can store it; its lock attribute cannot be
        def __init__(self) -> None:
            super().__init__("has a lock")
            self.lock = threading.Lock()

    def body(x: int) -> None:
        raise Local()

    fn = make(body, key="k:{x}")
    with pytest.raises(Local):
        fn(1)
    with pytest.raises(Halted, match="has a lock"):
        fn(1)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_base_exception_is_recorded_and_replayed_as_halted(
    make: Make, interrupt: type[BaseException]
) -> None:
    def body(x: int) -> None:
        raise interrupt()

    fn = make(body, key="k:{x}")
    with pytest.raises(interrupt):
        fn(1)
    try:
        with pytest.raises(Halted) as info:
            fn(1)  # never KeyboardInterrupt on replay
    except (KeyboardInterrupt, SystemExit) as escaped:  # a regression must fail, not end pytest
        raise AssertionError(f"the replay raised {type(escaped).__name__}") from None
    assert info.value.exc_type == interrupt.__name__
    assert "interrupted" in info.value.reason


# CancelledError is a BaseException: recorded halted, replayed as Halted
def test_cancelled_async_call_is_recorded_halted_and_replayed_as_halted(store: Store) -> None:
    runs: list[int] = []

    @idempotent(key="k:{x}", store=store, name="t.cancel")
    async def fn(x: int) -> None:
        runs.append(x)
        await asyncio.sleep(30)

    async def main() -> None:
        task = asyncio.create_task(fn(1))
        while not runs:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    record = fn.status(1)
    assert record is not None and record.status is Status.HALTED
    assert record.exc_type is not None and "CancelledError" in record.exc_type
    with pytest.raises(Halted, match="CancelledError"):
        asyncio.run(fn(1))
    assert runs == [1]


# Defence in depth: even a stored interrupt payload (older writer, tampering) never raises
def test_a_stored_interrupt_payload_is_replayed_as_halted(store: Store) -> None:
    now = time.time()
    store.claim(
        Entry(
            "t:k",
            "halted",
            "",
            "h/m/1/1",
            "tok",
            1,
            now,
            ttl=None,
            finished_at=now,
            payload=pickle.dumps(KeyboardInterrupt("stop")),
            exc_type="KeyboardInterrupt",
            message="stop",
            reason="the call was interrupted by KeyboardInterrupt",
        )
    )
    outcome = begin("t:k", store=store)
    assert isinstance(outcome, Finished)
    try:
        with pytest.raises(Halted) as info:
            outcome.replay()
    except KeyboardInterrupt:
        raise AssertionError("a replay raised KeyboardInterrupt") from None
    assert info.value.exc_type == "KeyboardInterrupt"


def test_retry_on_releases_the_key(make: Make) -> None:
    attempts = []

    def body(x: int) -> str:
        attempts.append(x)
        if len(attempts) < 3:
            raise Transient("try again")
        return "done"

    fn = make(body, key="k:{x}", retry_on=Transient)
    for _ in range(2):
        with pytest.raises(Transient):
            fn(1)
        assert fn.status(1) is None  # released: nothing recorded
    assert fn(1) == "done"
    assert fn(1) == "done"
    assert len(attempts) == 3


def test_retry_on_takes_a_tuple_and_other_exceptions_still_halt(make: Make) -> None:
    def body(x: int) -> None:
        raise Boom("permanent")

    fn = make(body, key="k:{x}", retry_on=(Transient, KeyError))
    with pytest.raises(Boom):
        fn(1)
    record = fn.status(1)
    assert record is not None and record.status is Status.HALTED


class SubTransient(Transient):
    pass


# retry_on is isinstance-based
def test_retry_on_releases_subclasses_too(make: Make) -> None:
    runs: list[int] = []

    def body(x: int) -> str:
        runs.append(x)
        if len(runs) == 1:
            raise SubTransient("again")
        return "done"

    fn = make(body, key="k:{x}", retry_on=Transient)
    with pytest.raises(SubTransient):
        fn(1)
    assert fn.status(1) is None
    assert fn(1) == "done"
    assert runs == [1, 1]


def test_unserialisable_result_halts_with_a_clear_error(make: Make) -> None:
    runs = []

    def body(x: int) -> object:
        runs.append(x)
        return threading.Lock()

    fn = make(body, key="k:{x}")
    with pytest.raises(Halted, match="could not be stored") as first:
        fn(1)
    assert isinstance(first.value.__cause__, Exception)
    record = fn.status(1)
    assert record is not None and record.status is Status.HALTED  # never left processing
    with pytest.raises(Halted, match="could not be stored"):
        fn(1)
    assert runs == [1]


# -- in-flight calls ------------------------------------------------------------------------------


def test_live_remote_owner_means_already_running(make: Make, store: Store, counter: Any) -> None:
    fn = make(counter, key="k:{x}", fingerprint=False)
    store.claim(foreign_entry(fn.key_for(1), "", lease_until=time.time() + 60))
    with pytest.raises(AlreadyRunning) as info:
        fn(1)
    assert info.value.owner == "elsewhere/0badc0de/4242/77"
    assert info.value.started_at is not None
    assert "wait=" in str(info.value)
    assert counter.runs == 0


def test_remote_owner_with_expired_lease_is_abandoned_and_halted(
    make: Make, store: Store, counter: Any
) -> None:
    fn = make(counter, key="k:{x}", fingerprint=False)
    store.claim(foreign_entry(fn.key_for(1), "", lease_until=time.time() - 60))
    with pytest.raises(Halted) as info:
        fn(1)
    assert "lease" in info.value.reason and "elsewhere" in info.value.reason
    assert counter.runs == 0
    record = fn.status(1)
    assert record is not None and record.status is Status.HALTED
    with pytest.raises(Halted):
        fn(1)  # and it stays halted: a terminal record never changes


def test_remote_owner_with_expired_lease_is_retried(make: Make, store: Store, counter: Any) -> None:
    fn = make(counter, key="k:{x}", fingerprint=False, on_abandoned="retry")
    store.claim(foreign_entry(fn.key_for(1), "", lease_until=time.time() - 60))
    assert fn(1) == {"x": 1, "y": None}
    assert counter.runs == 1
    record = fn.status(1)
    assert record is not None and record.status is Status.OK and record.attempt == 2


def test_remote_owner_becomes_abandoned_when_its_lease_runs_out(
    make: Make, store: Store, store_clock: StoreClock, counter: Any
) -> None:
    fn = make(counter, key="k:{x}", fingerprint=False)
    store.claim(foreign_entry(fn.key_for(1), "", lease_until=store.time() + 60))
    with pytest.raises(AlreadyRunning):
        fn(1)
    store_clock.advance(61)  # a remote owner's lease is timed on the store's clock
    with pytest.raises(Halted):
        fn(1)
    assert counter.runs == 0


def _seen_busy(store: Store, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An event set once a caller has read a key in flight (and so is waiting for it)."""
    seen = threading.Event()

    def watch(read: Callable[..., Entry | None]) -> Callable[..., Entry | None]:
        def watched(*args: Any) -> Entry | None:
            entry = read(*args)
            if entry is not None and entry.status == "processing":
                seen.set()
            return entry

        return watched

    def awatch(read: Callable[..., Any]) -> Callable[..., Any]:
        async def watched(*args: Any) -> Entry | None:
            entry: Entry | None = await read(*args)
            if entry is not None and entry.status == "processing":
                seen.set()
            return entry

        return watched

    monkeypatch.setattr(store, "get", watch(store.get))
    monkeypatch.setattr(store, "claim", watch(store.claim))  # (claims_first stores read so)
    # Async callers read through the async primitives (a store's own, e.g. RedisStore's).
    monkeypatch.setattr(store, "aget", awatch(store.aget))
    monkeypatch.setattr(store, "aclaim", awatch(store.aclaim))
    return seen


def test_wait_replays_the_outcome_of_a_call_in_flight(
    make: Make, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = threading.Event()
    release = threading.Event()
    runs = []

    def body(x: int) -> str:
        runs.append(x)
        started.set()
        assert release.wait(60)
        return f"v{x}"

    fn = make(body, key="k:{x}", wait=120)
    results: list[object] = []
    owner = threading.Thread(target=lambda: results.append(fn(1)))
    owner.start()
    assert started.wait(60)
    busy = _seen_busy(store, monkeypatch)
    # The owner finishes only once this caller has found it running: it really waits.
    threading.Thread(target=lambda: busy.wait(60) and release.set(), daemon=True).start()
    t0 = time.monotonic()
    assert fn(1) == "v1"
    # Polled, not left sleeping until its wait= ran out (120 s: far past any slow machine).
    assert time.monotonic() - t0 < 60
    owner.join(60)
    assert busy.is_set() and results == ["v1"] and runs == [1]


def test_wait_gives_up_with_already_running(make: Make) -> None:
    started = threading.Event()
    release = threading.Event()

    def body(x: int) -> str:
        started.set()
        release.wait(120)  # running until this test has seen the waiter give up
        return "late"

    fn = make(body, key="k:{x}", wait=0.3)
    owner = threading.Thread(target=lambda: fn(1))
    owner.start()
    try:
        assert started.wait(60)
        t0 = time.monotonic()
        with pytest.raises(AlreadyRunning):
            fn(1)
        waited = time.monotonic() - t0
        assert waited >= 0.3  # (an upper bound would time this machine, not the wait)
    finally:
        release.set()
        owner.join(60)


# An async caller waiting for a busy key must not block the event loop
def test_async_wait_does_not_block_the_event_loop(store: Store) -> None:
    runs: list[int] = []

    # A waiter that blocked the loop would never let the owner finish: it would give up after
    # its wait= (60 s, far past any slow machine) with AlreadyRunning.
    @idempotent(key="k:{x}", store=store, wait=60, name="t.await")
    async def fn(x: int) -> str:
        runs.append(x)
        await asyncio.sleep(0.2)  # needs the loop: a blocked loop never finishes it
        return f"v{x}"

    async def main() -> tuple[str, str, float]:
        owner = asyncio.create_task(fn(1))
        while not runs:
            await asyncio.sleep(0.001)
        t0 = time.monotonic()
        replayed = await fn(1)
        return await owner, replayed, time.monotonic() - t0

    first, replayed, took = asyncio.run(main())
    assert first == replayed == "v1"
    assert runs == [1]
    assert took < 30  # replayed when the owner finished, not when the wait ran out


def test_reentering_its_own_key_fails_at_once(make: Make, mode: str) -> None:
    if mode == "async":
        pytest.skip("a sync body cannot await; see test_async_reentry_fails_at_once")
    holder: dict[str, Callable[[int], Any]] = {}
    seen: list[BaseException] = []

    def body(x: int) -> str:
        try:
            holder["fn"](x)
        except AlreadyRunning as exc:
            seen.append(exc)
        return "outer"

    fn = make(body, key="k:{x}", wait=120)
    holder["fn"] = fn
    t0 = time.monotonic()
    assert fn(1) == "outer"
    assert time.monotonic() - t0 < 60  # no waiting on itself despite wait=120
    assert len(seen) == 1 and "re-entered" in str(seen[0])


# -- fencing ------------------------------------------------------------------------------------


def test_late_owner_gets_ownership_lost_and_writes_nothing(make: Make, store: Store) -> None:
    def body(x: int) -> str:
        # Another caller takes the claim over while this body runs.
        key = holder["fn"].key_for(x)
        current = store.get(key)
        assert current is not None and current.status == "processing"
        takeover = Entry(
            key,
            "ok",
            current.fingerprint,
            "someone/else/1/1",
            "their-token",
            2,
            current.started_at,
            finished_at=time.time(),
            expires_at=time.time() + 60,
            payload=b"\x80\x05\x95\x07\x00\x00\x00\x00\x00\x00\x00\x8c\x03won\x94.",
        )
        assert store.swap(key, current.token, takeover)
        return "mine"

    holder: dict[str, Any] = {}
    fn = make(body, key="k:{x}")
    holder["fn"] = fn
    with pytest.raises(OwnershipLost):
        fn(1)
    record = fn.status(1)
    assert record is not None and record.token == "their-token" and record.attempt == 2
    assert fn(1) == "won"


def test_late_owner_that_raised_gets_ownership_lost(make: Make, store: Store) -> None:
    def body(x: int) -> str:
        store.delete(holder["fn"].key_for(x))  # e.g. an operator forgot the key meanwhile
        raise Boom("lost anyway")

    holder: dict[str, Any] = {}
    fn = make(body, key="k:{x}")
    holder["fn"] = fn
    with pytest.raises(OwnershipLost) as info:
        fn(1)
    assert isinstance(info.value.__cause__, Boom)
    assert fn.status(1) is None


# -- ttl, forget, prune, deadline ---------------------------------------------------------------


def test_ttl_expired_record_counts_as_absent(make: Make, store: Store, counter: Any) -> None:
    fn = make(counter, key="k:{x}", ttl=60)
    fn(1)
    fn(1)
    assert counter.runs == 1
    record = fn.status(1)
    assert record is not None and record.finished_at is not None
    assert record.expires_at is not None
    ttl = record.expires_at - record.finished_at
    assert abs(ttl - timedelta(seconds=60)) < timedelta(milliseconds=1)
    age(store, fn.key_for(1), 120)  # its ttl ran out a minute ago
    assert fn.status(1) is None
    fn(1)
    assert counter.runs == 2


def test_expired_record_does_not_cause_a_mismatch(make: Make, store: Store, counter: Any) -> None:
    fn = make(counter, key="k:{x}", ttl=timedelta(minutes=1))
    fn(1, "a")
    age(store, fn.key_for(1), 120)
    assert fn(1, "b") == {"x": 1, "y": "b"}


def test_ttl_none_keeps_the_record_forever(make: Make, counter: Any) -> None:
    fn = make(counter, key="k:{x}", ttl=None)
    fn(1)
    record = fn.status(1)
    assert record is not None and record.expires_at is None


# ttl counts from the finish, for ok and abandoned-halted
def test_ttl_counts_from_the_finish(make: Make, store: Store, store_clock: StoreClock) -> None:
    def body(x: int) -> int:
        store_clock.advance(10)  # the body takes 10 s
        return x

    fn = make(body, key="k:{x}", ttl=60)
    fn(1)
    record = fn.status(1)
    assert record is not None and record.finished_at is not None and record.expires_at is not None
    assert record.finished_at - record.started_at >= timedelta(seconds=10)
    assert abs((record.expires_at - record.finished_at) - timedelta(seconds=60)) < timedelta(
        milliseconds=5
    )
    halt = make(lambda x: x, key="h:{x}", fingerprint=False, name="test.halt")
    store.claim(foreign_entry(halt.key_for(1), "", lease_until=time.time() - 60))  # ttl=3600
    with pytest.raises(Halted):
        halt(1)
    halted = halt.status(1)
    assert halted is not None and halted.finished_at is not None
    assert halted.expires_at is not None
    assert abs((halted.expires_at - halted.finished_at) - timedelta(hours=1)) < timedelta(
        milliseconds=5
    )


def test_forget_allows_another_run(make: Make, counter: Any) -> None:
    fn = make(counter, key="k:{x}")
    fn(1)
    assert fn.forget(1) is True
    assert fn.forget(1) is False
    fn(1)
    assert counter.runs == 2


def test_prune_removes_expired_records_and_stale_claims(store: Store, make: Make) -> None:
    fn = make(lambda x: x, key="k:{x}", ttl=60)
    keep = make(lambda x: x, key="keep:{x}", ttl=None, name="test.keep")
    for i in range(3):
        fn(i)
        age(store, fn.key_for(i), 120)  # expired a minute ago
    keep(1)
    # A claim whose lease ran out more than its ttl ago, and one still fresh.
    now = store.time()
    stale = foreign_entry("stale", "", lease_until=now - 100)._replace(ttl=10.0)
    fresh = foreign_entry("fresh", "", lease_until=now - 100)
    store.claim(stale)
    store.claim(fresh)
    # Redis drops expired records by itself (PEXPIREAT): prune counts what is left of them.
    left = sum(prunable(e, store.time()) for e in store.scan())
    assert left == (0 if isinstance(store, RedisStore) else 4)
    assert store.prune() == left
    assert {e.key for e in store.scan()} == {keep.key_for(1), "fresh"}


def test_deadline_passed_does_not_start_the_body(make: Make, counter: Any) -> None:
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    fn = make(counter, key="k:{x}", deadline=past)
    with pytest.raises(DeadlineExceeded) as info:
        fn(1)
    assert info.value.key == fn.key_for(1)
    assert counter.runs == 0
    assert fn.status(1) is None  # nothing claimed


def test_deadline_still_replays_a_finished_record(
    make: Make, store_clock: StoreClock, counter: Any
) -> None:
    soon = datetime.now(timezone.utc) + timedelta(hours=1)
    fn = make(counter, key="k:{x}", deadline=soon)
    fn(1)
    store_clock.advance(2 * 3600)  # the deadline is judged on the store's clock
    assert fn(1) == {"x": 1, "y": None}
    with pytest.raises(DeadlineExceeded):
        fn(2)
    assert counter.runs == 1


def test_deadline_callable_gets_the_arguments(make: Make, counter: Any) -> None:
    now = datetime.now(timezone.utc)
    fn = make(
        counter,
        key="k:{x}",
        deadline=lambda x, y=None: now + timedelta(hours=1 if x > 0 else -1),
    )
    assert fn(1)["x"] == 1
    with pytest.raises(DeadlineExceeded):
        fn(-1)


def test_async_reentry_fails_at_once(store: Store) -> None:
    from idemfn import idempotent

    seen: list[BaseException] = []

    @idempotent(key="k:{x}", store=store, wait=120)
    async def fn(x: int) -> str:
        try:
            await fn(x)
        except AlreadyRunning as exc:
            seen.append(exc)
        return "outer"

    async def other_task_waits() -> tuple[str, str]:
        # A concurrent task (another context) must wait and replay, not fail.
        first = asyncio.create_task(fn(1))
        await asyncio.sleep(0)
        second = asyncio.create_task(fn(1))
        return await first, await second

    t0 = time.monotonic()
    assert asyncio.run(other_task_waits()) == ("outer", "outer")
    assert time.monotonic() - t0 < 60  # no waiting on itself despite wait=120
    assert len(seen) == 1


# -- found in review (2026-11-22) ---------------------------------------------------------------


def test_exception_with_a_broken_str_is_still_recorded(make: Make) -> None:
    class Opaque(Exception):
        def __str__(self) -> str:
            raise RuntimeError("__str__ failed")

    def body(x: int) -> None:
        raise Opaque()

    fn = make(body, key="k:{x}")
    with pytest.raises(Opaque):
        fn(1)  # the caller sees its own exception, not the failure to describe it
    record = fn.status(1)
    assert record is not None and record.status is Status.HALTED


def test_interrupt_while_storing_the_result_still_settles_the_record(make: Make) -> None:
    class Slow:
        def __reduce__(self) -> Any:
            raise KeyboardInterrupt  # Ctrl-C while a large result is being stored

    fn = make(lambda x: Slow(), key="k:{x}")
    with pytest.raises(KeyboardInterrupt):
        fn(1)
    record = fn.status(1)
    assert record is not None and record.status is Status.HALTED
    assert record.reason is not None and "interrupted" in record.reason
    with pytest.raises(Halted):
        fn(1)


def test_deadline_callable_is_not_called_on_replay(make: Make) -> None:
    calls = []

    def deadline(x: int) -> datetime:
        calls.append(x)
        return datetime.now(timezone.utc) + timedelta(hours=1)

    fn = make(lambda x: x, key="k:{x}", deadline=deadline)
    fn(1)
    for _ in range(5):
        fn(1)
    assert calls == [1]


def test_forget_of_an_expired_record_is_false_on_every_store(make: Make, store: Store) -> None:
    fn = make(lambda x: x, key="k:{x}", ttl=60)
    fn(1)
    age(store, fn.key_for(1), 120)
    assert fn.forget(1) is False
