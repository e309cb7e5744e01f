"""The async path end to end (issue 16): many tasks on one event loop, sync callers in other
processes beside async callers in this one, event loops one after another and side by side,
every way a task can be cancelled, and a store with only sync
primitives, driven from worker threads. (Re-entering a key from its own async body:
tests/contract/test_calls.py, test_async_reentry_fails_at_once; a cancelled owner's record and
its replay: test_cancelled_async_call_is_recorded_halted_and_replayed_as_halted there.)

The tests wait on conditions, never on time: a test that holds a body running holds it on an
event it sets itself, and a timeout is made to run out by moving its deadline to now.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from idemfn import Halted, Status, Store, idempotent
from idemfn._record import Entry
from idemfn._wakeups import _watchers
from idemfn.testing import StoreContract
from tests.support.concurrency import (
    MIXED,
    WatchSpy,
    append_line,
    docs_store_class,
    finish,
    fresh,
    spec_of,
    start,
)
from tests.support.records import foreign_entry
from tests.support.workers import poll

SHARED = [
    "disk",
    "redis",
    "postgres",
    "postgres-pgbouncer",
]  # the stores that processes share (memory is per process)
SERVERS = ["redis", "postgres", "postgres-pgbouncer"]
needs_timeout = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="asyncio.timeout() is Python 3.11+"
)


async def until(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Until ``condition()`` is true (``timeout`` seconds at most), never blocking the loop."""
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


async def settled_record(store: Store, key: str) -> Entry:
    """``key``'s record once it is no longer ``processing`` (60 s at most)."""
    give_up = time.monotonic() + 60
    while True:
        entry = await store.aget(key)
        assert entry is not None, f"{key!r} has no record"
        if entry.status != Status.PROCESSING.value:
            return entry
        assert time.monotonic() < give_up, f"{key!r} stayed processing"
        await asyncio.sleep(0.005)


async def still_held(store: Store, held: Entry | None) -> bool:
    """Whether the claim ``held`` is still the key's (renewed or not)."""
    assert held is not None and held.status == Status.PROCESSING.value
    entry = await store.aget(held.key)
    return entry is not None and (entry.status, entry.token) == (held.status, held.token)


class Writes:
    """Which task made each write of the engine's, through the awaitable primitives the async
    path calls: ``by(task)`` lists a task's. A claim that found a live record wrote nothing (a
    store that claims first looks that way), nor did a swap, release or delete that was fenced
    out."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made: list[tuple[asyncio.Task[Any] | None, str]] = []
        for name in ("aclaim", "aswap", "arelease", "adelete"):
            monkeypatch.setattr(store, name, self._noting(name, getattr(store, name)))

    def _noting(self, name: str, real: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def noted(*args: Any) -> Any:
            answer = await real(*args)
            if answer is (None if name == "aclaim" else True):
                self.made.append((asyncio.current_task(), name))
            return answer

        return noted

    def by(self, task: asyncio.Task[Any]) -> list[str]:
        return [name for made_by, name in self.made if made_by is task]


def gate_writes(
    store: Store, monkeypatch: pytest.MonkeyPatch, status: str
) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the first ``aswap`` that writes a ``status`` record until the test lets it go:
    returns (writing, let_go), made on the running loop. ``writing`` is set once it is held."""
    writing, let_go = asyncio.Event(), asyncio.Event()
    real = store.aswap

    async def gated(key: str, token: str, entry: Entry) -> bool:
        if entry.status == status and not writing.is_set():
            writing.set()
            await let_go.wait()
        return await real(key, token, entry)

    monkeypatch.setattr(store, "aswap", gated)
    return writing, let_go


# -- many tasks on one loop ------------------------------------------------------------------------


def test_gathered_duplicates_run_the_body_once_and_all_get_its_value(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = WatchSpy(store, monkeypatch)
    runs: list[int] = []

    @idempotent(key="k:{x}", store=store, wait=120, name="t.gather")
    async def fn(x: int) -> dict[str, int]:
        runs.append(x)
        # Done only once the 49 others found the key running and watch it: each of them then
        # waits for this value, rather than replaying a record that was there already.
        await until(lambda: spy.opened >= 49, "49 waiters")
        return {"x": x}

    async def main() -> list[dict[str, int]]:
        return await asyncio.gather(*(fn(1) for _ in range(50)))

    results = asyncio.run(main())
    assert results == [{"x": 1}] * 50
    assert runs == [1]
    assert len({id(result) for result in results}) == 50  # each waiter a copy of its own
    assert spy.closed == spy.opened == 49


def test_gathered_calls_on_distinct_keys_each_run_once(store: Store) -> None:
    runs: list[int] = []

    @idempotent(key="k:{x}", store=store, name="t.distinct")
    async def fn(x: int) -> int:
        runs.append(x)
        await asyncio.sleep(0.001)
        return x * 2

    async def main() -> list[int]:
        return await asyncio.gather(*(fn(x) for x in range(200)))

    assert asyncio.run(main()) == [x * 2 for x in range(200)]
    assert sorted(runs) == list(range(200))
    assert asyncio.run(main()) == [x * 2 for x in range(200)]  # replayed, on a loop of its own
    assert len(runs) == 200


# -- processes and loops ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("store", SHARED, indirect=True)
def test_sync_callers_in_other_processes_and_async_callers_here_run_each_body_once(
    store: Store, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    count = 30
    store.get("warm-up")  # (a PostgresStore creates its table here, before the processes race)
    spec = spec_of(store, request)
    # Two processes call every key from sync code, one from each end; here four tasks do the
    # same on one loop, two from each end. Each body takes 10 ms: callers keep meeting.
    children = [start("calls", spec, tmp_path, order, str(count)) for order in ("up", "down")]
    try:

        def ready() -> bool:
            for child in children:
                if child.poll() is not None:
                    finish(child, tmp_path)  # raises: it exited before it was ready
            return len(list(tmp_path.glob("ready-*"))) == len(children)

        poll(ready, "the caller processes")

        @idempotent(store=store, **MIXED)
        async def mixed(k: int) -> dict[str, Any]:
            append_line(tmp_path / "runs", f"{k} {os.getpid()} async")
            await asyncio.sleep(0.01)
            return {"k": k, "by": f"{os.getpid()} async"}

        async def calls(keys: list[int]) -> list[dict[str, Any]]:
            return [await mixed(k) for k in keys]

        async def main() -> list[list[dict[str, Any]]]:
            (tmp_path / "go").touch()
            up, down = list(range(count)), list(reversed(range(count)))
            return await asyncio.gather(calls(up), calls(down), calls(up), calls(down))

        here = [result for results in asyncio.run(main()) for result in results]
    finally:
        for child in children:
            finish(child, tmp_path)
    runs = [line.split(" ", 1) for line in (tmp_path / "runs").read_text().splitlines()]
    assert sorted(int(k) for k, _ in runs) == list(range(count)), runs  # each body once
    ran_by = {int(k): by for k, by in runs}
    there = [
        result
        for path in tmp_path.glob("results-*.json")
        for result in json.loads(path.read_text()).values()
    ]
    assert len(here) == 4 * count and len(there) == 2 * count
    for result in here + there:  # every caller got the value of the one run
        assert result == {"k": result["k"], "by": ran_by[result["k"]]}


@pytest.mark.parametrize("store", SERVERS, indirect=True)
def test_asyncio_run_twice_replays_across_the_loops(store: Store) -> None:
    # A server store's async client belongs to the loop it was made on: the second loop must
    # get one of its own, not the first loop's (closed with it).
    runs: list[int] = []

    @idempotent(key="k:{x}", store=store, wait=60, name="t.twice")
    async def fn(x: int) -> list[int]:
        runs.append(x)
        await asyncio.sleep(0)
        return [x]

    async def first() -> list[list[int]]:
        return await asyncio.gather(fn(1), fn(1), fn(2))

    async def second() -> list[list[int]]:
        return await asyncio.gather(fn(1), fn(2), fn(3), fn(3))

    assert asyncio.run(first()) == [[1], [1], [2]]
    assert asyncio.run(second()) == [[1], [2], [3], [3]]
    assert asyncio.run(fn(3)) == [3]
    assert sorted(runs) == [1, 2, 3]


@pytest.mark.parametrize("store", SERVERS, indirect=True)
def test_two_event_loops_at_once_share_the_store(store: Store) -> None:
    runs: list[int] = []
    barrier = threading.Barrier(2)

    @idempotent(key="k:{x}", store=store, wait=120, name="t.loops")
    async def fn(x: int) -> int:
        runs.append(x)
        await asyncio.sleep(0.001)
        return x

    results: list[list[int]] = []

    def loop_in_a_thread() -> None:
        async def main() -> list[int]:
            return await asyncio.gather(*(fn(x) for x in range(40)))

        barrier.wait()
        results.append(asyncio.run(main()))

    threads = [threading.Thread(target=loop_in_a_thread) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == [list(range(40))] * 2
    assert sorted(runs) == list(range(40))


# -- cancellation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cancelled", ["waiting", "looking"])
def test_a_cancelled_waiter_writes_nothing_and_leaves_the_owner_alone(
    store: Store, monkeypatch: pytest.MonkeyPatch, cancelled: str
) -> None:
    # Cancelled while it waits on its watch, or while it looks at the key again (a store that
    # claims first looks with a claim, which its interruption undoes: fenced on the waiter's
    # own token, that must not touch the owner's claim).
    spy = WatchSpy(store, monkeypatch)
    writes = Writes(store, monkeypatch)
    looking: list[asyncio.Task[Any] | None] = []
    for name in ("aget", "aclaim"):
        real = getattr(store, name)

        async def looks(*args: Any, _real: Any = real) -> Any:
            answer = await _real(*args)
            if cancelled == "looking" and spy.waits and not looking:  # a look after a wait
                looking.append(asyncio.current_task())
                await asyncio.Event().wait()  # its answer never comes back
            return answer

        monkeypatch.setattr(store, name, looks)
    runs: list[int] = []
    release: list[asyncio.Event] = []

    @idempotent(key="k:{x}", store=store, wait=120, name=fresh("t.cancel-waiter"))
    async def fn(x: int) -> str:
        runs.append(x)
        await release[0].wait()
        return f"v{x}"

    async def main() -> None:
        release.append(asyncio.Event())
        owner = asyncio.create_task(fn(1))
        await until(lambda: runs, "the owner's body")
        held = await store.aget(fn.key_for(1))
        waiter = asyncio.create_task(fn(1))
        await spy.await_a_waiter()
        if cancelled == "looking":
            await until(lambda: looking, "the waiter's next look")
            assert looking == [waiter]
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert writes.by(waiter) == []  # only looked
        assert await still_held(store, held)  # the owner's claim, untouched
        assert spy.closed == spy.opened == 1  # the waiter's watch closed as it left
        release[0].set()
        assert await owner == "v1"  # the owner settles as if nobody had waited
        assert await fn(1) == "v1"

    asyncio.run(main())
    assert runs == [1]
    assert fn.key_for(1) not in _watchers


def test_an_owner_cancelled_again_while_its_halted_record_is_written_still_writes_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[int] = []

    @idempotent(key="k:{x}", store=store, name="t.cancel-twice")
    async def fn(x: int) -> None:
        runs.append(x)
        await asyncio.Event().wait()  # until cancelled

    async def main() -> None:
        writing, let_go = gate_writes(store, monkeypatch, "halted")
        owner = asyncio.create_task(fn(1))
        await until(lambda: runs, "the owner's body")
        owner.cancel()  # a BaseException in the body: the key is halted...
        await until(writing.is_set, "the halted record's write")
        owner.cancel()  # ...even when the task is cancelled again while that is written
        with pytest.raises(asyncio.CancelledError):
            await owner
        let_go.set()
        entry = await settled_record(store, fn.key_for(1))
        assert entry.status == "halted" and "CancelledError" in (entry.exc_type or "")

    asyncio.run(main())
    with pytest.raises(Halted, match="CancelledError"):
        asyncio.run(fn(1))
    assert runs == [1]


def test_an_owner_cancelled_while_its_ok_record_is_written_still_writes_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[int] = []

    @idempotent(key="k:{x}", store=store, name="t.cancel-ok")
    async def fn(x: int) -> str:
        runs.append(x)
        return f"v{x}"

    async def main() -> None:
        writing, let_go = gate_writes(store, monkeypatch, "ok")
        owner = asyncio.create_task(fn(1))
        await until(writing.is_set, "the ok record's write")
        owner.cancel()  # the body ran: its outcome must not be lost with the task
        with pytest.raises(asyncio.CancelledError):
            await owner
        let_go.set()
        entry = await settled_record(store, fn.key_for(1))
        assert entry.status == "ok"
        assert await fn(1) == "v1"

    asyncio.run(main())
    assert runs == [1]


@needs_timeout
def test_a_timeout_that_runs_out_in_the_body_halts_the_key(store: Store) -> None:
    runs: list[int] = []
    scopes: list[Any] = []

    @idempotent(key="k:{x}", store=store, name="t.timeout-owner")
    async def fn(x: int) -> int:
        runs.append(x)
        scopes[0].reschedule(asyncio.get_running_loop().time())  # the caller's time is up
        await asyncio.Event().wait()
        return x

    async def main() -> None:
        async with asyncio.timeout(None) as scope:
            scopes.append(scope)
            await fn(1)

    with pytest.raises(TimeoutError):
        asyncio.run(main())
    record = fn.status(1)
    assert record is not None and record.status is Status.HALTED
    assert "CancelledError" in (record.exc_type or "")
    with pytest.raises(Halted, match="CancelledError"):
        asyncio.run(fn(1))
    assert runs == [1]


@needs_timeout
def test_a_timeout_that_runs_out_while_waiting_writes_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = WatchSpy(store, monkeypatch)
    writes = Writes(store, monkeypatch)
    runs: list[int] = []
    release: list[asyncio.Event] = []
    scopes: list[Any] = []

    @idempotent(key="k:{x}", store=store, wait=120, name=fresh("t.timeout-waiter"))
    async def fn(x: int) -> str:
        runs.append(x)
        await release[0].wait()
        return f"v{x}"

    async def waits() -> None:
        async with asyncio.timeout(None) as scope:
            scopes.append(scope)
            await fn(1)

    async def main() -> None:
        release.append(asyncio.Event())
        owner = asyncio.create_task(fn(1))
        await until(lambda: runs, "the owner's body")
        held = await store.aget(fn.key_for(1))
        waiter = asyncio.create_task(waits())
        await spy.await_a_waiter()
        scopes[0].reschedule(asyncio.get_running_loop().time())
        with pytest.raises(TimeoutError):
            await waiter
        assert writes.by(waiter) == []
        assert await still_held(store, held)
        release[0].set()
        assert await owner == "v1"
        assert await fn(1) == "v1"

    asyncio.run(main())
    assert runs == [1]
    assert fn.key_for(1) not in _watchers


@pytest.mark.parametrize("claim", ["first", "takeover"])
def test_a_task_cancelled_while_its_claim_is_in_flight_undoes_the_claim(
    store: Store, monkeypatch: pytest.MonkeyPatch, claim: str
) -> None:
    # The claim is made, but its answer has not come back when the task is cancelled: nobody
    # would run the body, and the key would stay claimed until its lease ran out. Released.
    runs: list[int] = []

    @idempotent(key="k:{x}", store=store, name="t.cancel-claim", on_abandoned="retry")
    async def fn(x: int) -> int:
        runs.append(x)
        return x

    key = fn.key_for(1)
    if claim == "takeover":  # an abandoned claim (its lease ran out a minute ago), taken over
        assert store.claim(foreign_entry(key, "", lease_until=time.time() - 60)) is None
    name = "aclaim" if claim == "first" else "aswap"
    real = getattr(store, name)
    in_flight: list[Entry] = []

    async def made_then_stuck(*args: Any) -> Any:
        answer = await real(*args)
        if not in_flight:
            in_flight.append(args[-1])
            await asyncio.Event().wait()  # the answer never comes back
        return answer

    monkeypatch.setattr(store, name, made_then_stuck)

    async def main() -> None:
        caller = asyncio.create_task(fn(1))
        await until(lambda: in_flight, "the claim")
        entry = await store.aget(key)
        assert entry is not None and entry.token == in_flight[0].token  # made
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert await store.aget(key) is None  # undone
        assert await fn(1) == 1  # and the next call runs the body

    asyncio.run(main())
    assert runs == [1]


# -- a store with only sync primitives -------------------------------------------------------------


class TestAStoreWithOnlySyncPrimitives(StoreContract):
    """docs/stores/custom.md's ``DictStore``: its awaitable primitives are the ``Store`` base's,
    which run its sync ones in a worker thread; it passes the contract's async path as it is."""

    @pytest.fixture
    def store(self) -> Iterator[Store]:
        store = docs_store_class()()
        yield store
        store.close()


def test_a_sync_store_is_called_off_the_event_loops_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = docs_store_class()()
    threads: list[tuple[str, int]] = []

    def noting(name: str) -> Callable[..., Any]:
        real = getattr(store, name)

        def noted(*args: Any) -> Any:
            threads.append((name, threading.get_ident()))
            return real(*args)

        return noted

    for name in ("claim", "get", "swap", "release"):
        monkeypatch.setattr(store, name, noting(name))

    @idempotent(key="k:{x}", store=store, name="t.offloaded", retry_on=LookupError)
    async def fn(x: int) -> int:
        if x < 0:
            raise LookupError(x)
        return x

    async def main() -> int:
        assert await fn(1) == 1  # claim (get first), swap
        assert await fn(1) == 1  # get
        with pytest.raises(LookupError):
            await fn(-1)  # release
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert {name for name, _ in threads} == {"claim", "get", "swap", "release"}
    assert loop_thread not in {thread for _, thread in threads}


def test_a_sync_store_call_that_blocks_does_not_block_the_event_loop() -> None:
    store = docs_store_class()()
    entered, let_go = threading.Event(), threading.Event()
    in_time: list[bool] = []
    real_claim = store.claim

    def slow_claim(entry: Entry) -> Entry | None:
        entered.set()
        in_time.append(let_go.wait(60))  # a claim on the loop's thread waits here in vain
        return real_claim(entry)

    store.claim = slow_claim  # type: ignore[method-assign]

    @idempotent(key="k:{x}", store=store, name="t.blocking")
    async def fn(x: int) -> int:
        return x

    async def main() -> int:
        call = asyncio.create_task(fn(1))
        # This task runs while the claim blocks, and only then lets it go.
        await until(entered.is_set, "the claim")
        let_go.set()
        return await call

    assert asyncio.run(main()) == 1
    assert in_time == [True]
