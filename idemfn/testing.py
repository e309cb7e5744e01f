"""The store conformance suite: what every ``Store`` must do, as pytest tests (needs pytest).

idemfn runs it on ``MemoryStore``, ``DiskStore``, ``RedisStore`` and ``PostgresStore``. To
hold your own store to it, subclass ``StoreContract`` in a test module and give it a ``store``
fixture that yields a fresh, empty store (``StoreContract``'s docstring shows one).

The tests cover the primitives (atomic claim, fenced swap and release, delete on a token,
expiry counting as absence, scan, prune), each through the sync primitives and again through
their awaitable counterparts (``aclaim``, ``aget``, ...: the ``Store`` base runs a store's sync
ones in a worker thread, so a store with only those passes both), and the contract's behaviours
through
``@idempotent`` on top of them (replay of fresh copies and falsy values, halted and
``retry_on`` outcomes, mismatches, abandoned owners halted or retried exactly once, fencing
with ``OwnershipLost``, ttl, deadlines, racing threads, coroutines).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, TypeVar

import pytest

from . import (
    DeadlineExceeded,
    FingerprintMismatch,
    Halted,
    OwnershipLost,
    Status,
    Store,
    idempotent,
)
from ._record import Entry

__all__ = ["StoreContract"]

# An owner on another machine: only its lease says whether it still runs.
_REMOTE_OWNER = "elsewhere/0000000000000000.0/1/1"

T = TypeVar("T")


class _Primitives(Protocol):
    """The primitives a contract test calls: a ``Store`` itself (the sync path), or
    ``_Awaited`` (the same calls through the store's awaitable primitives)."""

    def claim(self, entry: Entry) -> Entry | None: ...
    def get(self, key: str) -> Entry | None: ...
    def swap(self, key: str, token: str, entry: Entry) -> bool: ...
    def release(self, key: str, token: str) -> bool: ...
    def delete(self, key: str, token: str | None = None) -> bool: ...
    def time(self) -> float: ...


class _Awaited:
    """A store's awaitable primitives, called like its sync ones: each call is awaited on one
    event loop, which runs in a thread of its own for the test (so that calls from several
    threads at once are concurrent tasks on that loop), and is shut down as ``asyncio.run``
    ends a loop, which closes what the store opened for it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        started = threading.Event()

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            started.set()
            await self._stop.wait()

        self._thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
        self._thread.start()
        if not started.wait(60):
            raise RuntimeError("the contract's event loop did not start")

    def _await(self, call: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        # Generous: a store call that hangs fails its test instead of hanging the suite.
        return asyncio.run_coroutine_threadsafe(call, self._loop).result(120)

    def claim(self, entry: Entry) -> Entry | None:
        return self._await(self.store.aclaim(entry))

    def get(self, key: str) -> Entry | None:
        return self._await(self.store.aget(key))

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        return self._await(self.store.aswap(key, token, entry))

    def release(self, key: str, token: str) -> bool:
        return self._await(self.store.arelease(key, token))

    def delete(self, key: str, token: str | None = None) -> bool:
        return self._await(self.store.adelete(key, token))

    def time(self) -> float:
        return self._await(self.store.atime())

    def close(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(120)


def _processing(store: Store, key: str, token: str, *, lease: float = 30.0) -> Entry:
    now = store.time()
    return Entry(
        key, "processing", "", _REMOTE_OWNER, token, 1, now, lease_until=now + lease, ttl=60.0
    )


def _finished(store: Store, key: str, token: str, *, expires_in: float | None = 60.0) -> Entry:
    """A finished entry (ttl 60 s) that expires in ``expires_in`` seconds: with a negative
    ``expires_in``, one that expired that long ago; with None, one kept forever."""
    now = store.time()
    if expires_in is None:
        ttl, finished_at, expires_at = None, now, None
    else:
        ttl, expires_at = 60.0, now + expires_in
        finished_at = expires_at - ttl
    return Entry(
        key,
        "ok",
        "",
        _REMOTE_OWNER,
        token,
        1,
        finished_at - 60,
        ttl=ttl,
        finished_at=finished_at,
        expires_at=expires_at,
        payload=b"v",
    )


def _age(store: Store, key: str, seconds: float) -> Entry:
    """Rewrite ``key``'s live record as it will stand ``seconds`` from now: every time in it
    moved back by ``seconds``, as if the clocks had moved on. Returns the rewritten entry.

    The tests' way to let time pass without waiting for it (a server store's clock is the
    server's, which no test can move). It goes through the store's own primitives, so the store
    applies its expiry its own way: Redis drops a record that is now expired at once.
    """
    entry = store.get(key)
    assert entry is not None, f"{key!r} has no live record to age"

    def back(at: float | None) -> float | None:
        return None if at is None else at - seconds

    aged = entry._replace(
        started_at=entry.started_at - seconds,
        lease_until=back(entry.lease_until),
        finished_at=back(entry.finished_at),
        expires_at=back(entry.expires_at),
        lease_mono=back(entry.lease_mono),
    )
    if entry.status == "processing":
        assert store.swap(key, entry.token, aged)
    else:  # a finished record is never replaced: written again
        assert store.delete(key, entry.token)
        assert store.claim(aged) is None
    return aged


class StoreContract:
    """What every ``Store`` must do, as pytest tests: subclass it to run them on a store.

    The subclass gives a ``store`` fixture that yields a fresh, empty store for each test
    (and closes it after); pytest collects the subclass as usual (name it ``Test...``), and
    runs every one of its tests on that store. The first tests hold the primitives to
    ``Store``'s docstrings, each twice: through the sync primitives (``claim``, ``get``, ...),
    then through the awaitable ones (``aclaim``, ``aget``, ...) on an event loop (the
    ``primitives`` fixture, ``[sync]`` and ``[async]`` in the tests' ids); the rest run
    ``@idempotent`` on the store. No test waits for a
    clock: expiry and abandoned claims are made by writing records already past them, so the
    store's clock need not be movable (a server's is not).

    Examples:
        ```python
        import pytest
        from idemfn.testing import StoreContract


        class TestMyStore(StoreContract):
            @pytest.fixture
            def store(self):
                store = MyStore(...)
                yield store
                store.close()
        ```
    """

    # -- the primitives ----------------------------------------------------------------------

    @pytest.fixture(params=["sync", "async"])
    def primitives(self, request: pytest.FixtureRequest, store: Store) -> Iterator[_Primitives]:
        """The primitives the test calls: the store's sync ones, or its awaitable ones."""
        if request.param == "sync":
            yield store
            return
        awaited = _Awaited(store)
        try:
            yield awaited
        finally:
            awaited.close()

    def test_claim_inserts_once_and_returns_the_live_entry(
        self, store: Store, primitives: _Primitives
    ) -> None:
        first = _processing(store, "k", "a")
        assert primitives.claim(first) is None
        assert primitives.claim(_processing(store, "k", "b")) == first
        assert primitives.get("k") == first

    def test_an_expired_entry_counts_as_absent_and_is_replaced(
        self, store: Store, primitives: _Primitives
    ) -> None:
        # Expired a minute ago: no test waits for a clock (a busy machine makes any wait short).
        primitives.claim(_finished(store, "k", "old", expires_in=-60))
        assert primitives.get("k") is None
        assert primitives.claim(_processing(store, "k", "new")) is None
        entry = primitives.get("k")
        assert entry is not None and entry.token == "new"

    def test_claims_racing_in_threads_have_one_winner(
        self, store: Store, primitives: _Primitives
    ) -> None:
        # [async]: the threads' claims are concurrent tasks on one event loop.
        barrier = threading.Barrier(12)
        wins: list[str] = []

        def racer(i: int) -> None:
            barrier.wait()
            if primitives.claim(_processing(store, "race", f"t{i}")) is None:
                wins.append(f"t{i}")

        threads = [threading.Thread(target=racer, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(wins) == 1
        entry = primitives.get("race")
        assert entry is not None and entry.token == wins[0]

    def test_swap_and_release_are_fenced_on_the_live_claim(
        self, store: Store, primitives: _Primitives
    ) -> None:
        p = primitives
        p.claim(_processing(store, "k", "a"))
        assert p.swap("k", "wrong", _finished(store, "k", "x")) is False
        assert p.release("k", "wrong") is False
        assert p.swap("k", "a", _finished(store, "k", "a")) is True
        # Finished: neither its own token nor any other may write it again.
        assert p.swap("k", "a", _processing(store, "k", "a")) is False
        assert p.release("k", "a") is False
        entry = p.get("k")
        assert entry is not None and entry.status == "ok"
        # (A claim just made: a store may tell a record lost by a restarted server, for a
        # claim older than the server, from one never there; see RedisStore.)
        assert p.swap("ghost", "a", _processing(store, "ghost", "a")) is False
        assert p.release("ghost", "a") is False
        assert p.get("ghost") is None
        p.claim(_processing(store, "r", "b"))
        assert p.release("r", "b") is True
        assert p.get("r") is None

    def test_delete_with_and_without_a_token(self, store: Store, primitives: _Primitives) -> None:
        p = primitives
        p.claim(_processing(store, "k", "a"))
        assert p.delete("k", "b") is False
        assert p.get("k") is not None
        assert p.delete("k", "a") is True
        assert p.delete("k") is False
        p.claim(_finished(store, "k", "c", expires_in=None))
        assert p.delete("k") is True
        assert p.get("k") is None

    def test_the_sync_and_async_primitives_share_the_records(self, store: Store) -> None:
        # Each path could pass the tests above alone while writing somewhere of its own (another
        # database, prefix or table): what one writes, the other must read and fence on.
        awaited = _Awaited(store)
        try:
            claimed = _processing(store, "k", "a")
            assert awaited.claim(claimed) is None
            assert store.get("k") == claimed
            assert store.claim(_processing(store, "k", "b")) == claimed
            assert store.swap("k", "a", _finished(store, "k", "a")) is True
            entry = awaited.get("k")
            assert entry is not None and entry.status == "ok"
            assert awaited.swap("k", "a", _processing(store, "k", "a")) is False
            store.claim(_processing(store, "r", "c"))
            assert awaited.release("r", "c") is True
            assert store.get("r") is None
            assert awaited.claim(_processing(store, "r", "d")) is None
            assert store.release("r", "d") is True
            assert awaited.get("r") is None
            assert awaited.delete("k") is True
            assert store.get("k") is None
            assert abs(awaited.time() - store.time()) < 60
        finally:
            awaited.close()

    def test_scan_by_prefix_and_entries_round_trip(self, store: Store) -> None:
        entries = [_finished(store, key, "t") for key in ("app.a:1", "app.a:2", "app.b:1")]
        for entry in entries:
            store.claim(entry)
        assert sorted(e.key for e in store.scan("app.a:")) == ["app.a:1", "app.a:2"]
        assert sorted(store.scan(), key=lambda e: e.key) == entries
        # `corrupt=` receives the records that cannot be decoded (here: none).
        reported: list[str] = []
        scanned = store.scan("app.b:", corrupt=lambda key, error: reported.append(key))
        assert [e.key for e in scanned] == ["app.b:1"] and reported == []

    def test_time_is_unix_seconds(self, primitives: _Primitives) -> None:
        assert abs(primitives.time() - time.time()) < 60

    def test_prune_removes_what_is_expired_and_keeps_the_rest(self, store: Store) -> None:
        store.claim(_finished(store, "gone", "a", expires_in=-60))
        store.claim(_finished(store, "kept", "b", expires_in=None))
        store.claim(_processing(store, "running", "c"))
        store.prune()
        assert sorted(e.key for e in store.scan()) == ["kept", "running"]

    def test_renew_extends_the_live_claim_for_every_reader_and_is_fenced(
        self, store: Store
    ) -> None:
        # The heartbeat's renewal (Store.renew, a store's own where it overrides it): whoever
        # judges the claim next, by any read, sees its new lease; only the live claim renews.
        claimed = _processing(store, "k", "a", lease=30)
        assert store.claim(claimed) is None
        renewed = store.renew(claimed, 600)
        assert renewed is not None and (renewed.key, renewed.token) == ("k", "a")
        assert renewed.lease_until is not None and claimed.lease_until is not None
        assert renewed.lease_until > claimed.lease_until + 500
        seen = [store.get("k"), store.claim(_processing(store, "k", "b")), *store.scan("k")]
        for entry in seen:
            assert entry is not None and entry.token == "a"
            assert entry.lease_until == renewed.lease_until
        assert store.renew(claimed._replace(token="b"), 600) is None
        assert store.swap("k", "a", _finished(store, "k", "a"))
        assert store.renew(claimed, 600) is None  # finished: no longer a claim to renew
        entry = store.get("k")
        assert entry is not None and entry.status == "ok"

    # -- the behaviours, through @idempotent -------------------------------------------------

    def test_the_body_runs_once_and_later_calls_replay_fresh_copies(self, store: Store) -> None:
        runs: list[object] = []

        @idempotent(key="v:{x}", store=store, name="contract.once")
        def fn(x: object) -> object:
            runs.append(x)
            return x

        values: list[object] = [None, 0, "", [], False, {"a": [1]}]
        for value in values:
            first = fn(value)
            again = fn(value)
            assert again == value and type(again) is type(value)
            if isinstance(value, (list, dict)):
                assert again is not first  # a fresh copy
        assert len(runs) == 6

    def test_exceptions_halt_or_release_and_arguments_are_fingerprinted(self, store: Store) -> None:
        runs: list[str] = []

        @idempotent(
            key="{what}",
            store=store,
            name="contract.fail",
            retry_on=TimeoutError,
            fingerprint=["what"],
        )
        def fn(what: str, error: Any = ValueError) -> None:
            runs.append(what)
            raise error(what)

        for _ in range(2):
            with pytest.raises(ValueError, match="bad"):
                fn("bad")
        record = fn.status("bad")
        assert record is not None and record.status is Status.HALTED
        for _ in range(2):
            with pytest.raises(TimeoutError):
                fn("slow", TimeoutError)
        assert fn.status("slow", TimeoutError) is None
        assert runs == ["bad", "slow", "slow"]

        @idempotent(key="k", store=store, name="contract.fp")
        def same_key(x: int) -> int:
            return x

        same_key(1)
        with pytest.raises(FingerprintMismatch):
            same_key(2)

    @pytest.mark.parametrize("on_abandoned", ["halt", "retry"])
    def test_an_abandoned_claim_is_halted_or_taken_over_once(
        self, store: Store, on_abandoned: str
    ) -> None:
        runs: list[int] = []

        @idempotent(
            key="{x}",
            store=store,
            name="contract.abandoned",
            wait=60,
            on_abandoned=on_abandoned,  # type: ignore[arg-type]
        )
        def fn(x: int) -> int:
            runs.append(x)
            return x

        key = fn.key_for(1)
        # A claim whose owner (on another machine) stopped renewing its lease.
        store.claim(_processing(store, key, "dead", lease=-10.0))
        if on_abandoned == "halt":
            with pytest.raises(Halted, match="lease"):
                fn(1)
            with pytest.raises(Halted):
                fn(1)
            assert runs == []
            return
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(fn(1))) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [1] * 6
        assert runs == [1]
        record = fn.status(1)
        assert record is not None and (record.status, record.attempt) == (Status.OK, 2)

    def test_a_claim_lost_while_running_writes_nothing(self, store: Store) -> None:
        @idempotent(key="{x}", store=store, name="contract.lost")
        def fn(x: int) -> int:
            assert store.delete(fn.key_for(x))  # forgotten (by an operator) meanwhile
            return x

        with pytest.raises(OwnershipLost):
            fn(1)
        assert fn.status(1) is None

    def test_ttl_and_deadline(self, store: Store) -> None:
        runs: list[int] = []

        @idempotent(key="{x}", store=store, name="contract.ttl", ttl=60)
        def fn(x: int) -> int:
            runs.append(x)
            return x

        fn(1)
        fn(1)
        record = fn.status(1)
        assert record is not None and record.expires_at is not None
        assert record.finished_at is not None
        ttl = (record.expires_at - record.finished_at).total_seconds()
        assert abs(ttl - 60) < 0.001
        _age(store, fn.key_for(1), 120)  # its ttl ran out a minute ago
        assert fn.status(1) is None
        fn(1)  # expired: absent, so it runs again
        assert runs == [1, 1]
        past = datetime.now(timezone.utc) - timedelta(hours=1)

        @idempotent(key="{x}", store=store, name="contract.deadline", deadline=past)
        def late(x: int) -> int:
            runs.append(x)
            return x

        with pytest.raises(DeadlineExceeded):
            late(2)
        assert late.status(2) is None
        assert runs == [1, 1]

    def test_racing_threads_run_each_body_once(self, store: Store) -> None:
        runs: list[int] = []

        @idempotent(key="{x}", store=store, name="contract.race", wait=30)
        def fn(x: int) -> int:
            runs.append(x)
            time.sleep(0.01)
            return x

        barrier = threading.Barrier(8)

        def caller() -> None:
            barrier.wait()
            for x in range(20):
                assert fn(x) == x

        threads = [threading.Thread(target=caller) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(runs) == list(range(20))

    def test_coroutines_behave_the_same(self, store: Store) -> None:
        runs: list[int] = []

        @idempotent(key="{x}", store=store, name="contract.async")
        async def fn(x: int) -> int:
            runs.append(x)
            await asyncio.sleep(0)
            return x

        async def main() -> list[int]:
            return [await fn(1), await fn(1)]

        assert asyncio.run(main()) == [1, 1]
        assert runs == [1]
