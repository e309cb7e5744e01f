"""DiskStore's async primitives (issue 16): the sync primitives' code, run inline on the event
loop on a connection that never waits for SQLite's lock. While another process holds the lock,
a write waits in asyncio sleeps, never blocking the loop, up to the store's ``timeout``.

The other process is real: a child holding ``BEGIN IMMEDIATE`` on the store's database until
the test lets go. Waits are on conditions (ticks counted, a task done), never on sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from idemfn import DiskStore, StoreError
from idemfn._stores import disk
from idemfn._stores.base import offload
from tests.support.forks import fork_and_wait
from tests.support.records import finished, processing
from tests.support.stores import overwrite

# Takes the write lock of the database argv[1], says so, and keeps it until a line on stdin
# (or two minutes, should the test die without letting go).
HOLDER = """
import select, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN IMMEDIATE")
print("held", flush=True)
select.select([sys.stdin], [], [], 120)
con.execute("COMMIT")
"""


@contextmanager
def lock_held(store: DiskStore) -> Iterator[Callable[[], None]]:
    """Another process holds ``store``'s write lock until the function yielded is called (or
    the block ends)."""
    store.get("open")  # the database exists
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store.directory / disk.DBNAME)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def release() -> None:
        if holder.returncode is None:
            holder.communicate("\n", timeout=60)

    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield release
    finally:
        try:
            release()
        finally:
            if holder.returncode is None:
                holder.kill()
                holder.wait()


class Ticker:
    """A task on the running loop that sleeps 1 ms again and again: how many times it woke,
    and how late it woke at worst (how long the loop was kept from it)."""

    def __init__(self) -> None:
        self.ticks = 0
        self.worst = 0.0
        self._running = True
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._running:
            start = time.monotonic()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, time.monotonic() - start - 0.001)
            self.ticks += 1

    async def until(self, ticks: int) -> None:
        """Wait until it has ticked ``ticks`` more times."""
        target = self.ticks + ticks
        while self.ticks < target:
            await asyncio.sleep(0.001)

    async def stop(self) -> float:
        """Stop it once its sleep under way has woken; the worst lag."""
        self._running = False
        await self._task
        return self.worst


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DiskStore]:
    s = DiskStore(tmp_path / "store", timeout=30.0)
    yield s
    s.close()


def test_async_and_sync_primitives_read_each_others_records(store: DiskStore) -> None:
    a, b = processing("a"), processing("b")
    done = finished("a")

    async def main() -> None:
        assert await store.aclaim(a) is None
        assert store.get("a") == a and await store.aget("a") == a
        assert await store.aclaim(processing("a", "t2")) == a  # live: found, not replaced
        assert store.claim(b) is None
        assert await store.aget("b") == b
        assert await store.aswap("a", "other", done) is False  # fenced on the claim's token
        assert await store.aswap("a", "t1", done) is True
        assert store.get("a") == done
        assert await store.aswap("a", "t1", processing("a")) is False  # finished: kept
        assert await store.arelease("b", "other") is False
        assert await store.arelease("b", "t1") is True and store.get("b") is None
        assert await store.adelete("a", "other") is False
        assert await store.adelete("a", "t1") is True and store.get("a") is None
        assert await store.aget("a") is None and await store.adelete("a") is False
        store.claim(finished("gone", expires_in=-1.0))  # expired: counts as absent
        assert await store.aget("gone") is None
        assert await store.adelete("gone") is False
        assert await store.aclaim(processing("gone")) is None
        assert await store.adelete("gone") is True

    asyncio.run(main())


def test_a_corrupt_record_is_the_same_store_error_from_either_path(store: DiskStore) -> None:
    store.claim(finished("bad"))
    overwrite(store, "bad", b"\x00not a record\xff")
    with pytest.raises(StoreError) as sync_error:
        store.get("bad")
    with pytest.raises(StoreError) as async_error:
        asyncio.run(store.aget("bad"))
    assert str(async_error.value) == str(sync_error.value)
    assert async_error.value.key == "bad"
    assert asyncio.run(store.adelete("bad")) is True  # forgotten all the same


OPS: dict[str, Callable[[DiskStore], Awaitable[object]]] = {
    "claim": lambda s: s.aclaim(processing("new")),
    "swap": lambda s: s.aswap("k", "t1", finished("k")),
    "release": lambda s: s.arelease("k", "t1"),
    "delete": lambda s: s.adelete("k"),
}
ANSWERS = {"claim": None, "swap": True, "release": True, "delete": True}


@pytest.mark.parametrize("op", list(OPS))
def test_a_write_waits_for_another_processs_lock_without_blocking_the_loop(
    store: DiskStore, op: str
) -> None:
    claim = processing("k")
    store.claim(claim)

    async def main(release: Callable[[], None]) -> tuple[object, float]:
        ticker = Ticker()
        write = asyncio.ensure_future(OPS[op](store))
        await ticker.until(200)  # the loop runs on while the write waits for the lock
        assert not write.done()
        assert await store.aget("k") == claim  # and a read does not wait
        await offload(release)
        answer = await asyncio.wait_for(write, 60)
        return answer, await ticker.stop()

    with lock_held(store) as release:
        answer, worst_lag = asyncio.run(main(release))
    assert answer == ANSWERS[op]
    assert worst_lag < 0.5
    expected = {
        "claim": ("new", "processing"),
        "swap": ("k", "ok"),
        "release": ("k", None),
        "delete": ("k", None),
    }[op]
    found = store.get(expected[0])
    assert (found and found.status) == expected[1]


def test_a_write_held_up_past_the_timeout_fails_as_the_sync_one_does(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "store", timeout=1.0)

    async def main() -> tuple[StoreError, int]:
        ticker = Ticker()
        with pytest.raises(StoreError) as failed:
            await store.aclaim(processing("late"))
        await ticker.stop()
        return failed.value, ticker.ticks

    with lock_held(store):
        async_error, ticks = asyncio.run(main())
        with pytest.raises(StoreError) as sync_error:
            store.claim(processing("late"))
    assert str(async_error) == str(sync_error.value)
    assert "could not claim 'late'" in str(async_error) and "locked" in str(async_error)
    assert async_error.key == "late"
    assert ticks > 10  # the loop ran on while the write waited (blocked, it ticks once, late)
    assert store.get("late") is None  # no attempt wrote anything
    store.close()


def test_a_cancelled_write_writes_nothing(store: DiskStore) -> None:
    async def main(release: Callable[[], None]) -> None:
        ticker = Ticker()
        write = asyncio.ensure_future(store.aclaim(processing("k")))
        await ticker.until(50)
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        await offload(release)
        await ticker.stop()
        # asyncio.run now waits for the loop's worker threads: one still claiming would.

    with lock_held(store) as release:
        asyncio.run(main(release))
    assert store.get("k") is None


def test_asyncio_run_twice_and_the_write_ahead_log_stays_bounded(store: DiskStore) -> None:
    calls = 1500  # ~45 MB of log if nothing copied it back into the database

    async def first_calls(run: int) -> None:
        for i in range(calls // 2):
            claim = processing(f"{run}-{i}")
            assert await store.aclaim(claim) is None
            assert await store.aswap(claim.key, "t1", finished(claim.key)) is True
            assert await store.aget(claim.key) is not None

    asyncio.run(first_calls(1))
    asyncio.run(first_calls(2))  # a new loop: nothing of the first one's is used
    assert store.get(f"1-{calls // 2 - 1}") is not None
    log = store.directory / f"{disk.DBNAME}-wal"
    assert log.stat().st_size < 16 * 2**20


def test_a_busy_cull_inline_neither_fails_nor_warns(
    store: DiskStore, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        await store.aget("open")  # this thread's connection that does not wait
        with lock_held(store), caplog.at_level(logging.WARNING, logger="idemfn"):
            store._cull(time.time(), inline=True)  # at once: the claim it follows was won

    asyncio.run(main())
    assert not caplog.records


def test_a_fork_waiting_for_another_threads_operation_does_not_block_the_loop(
    store: DiskStore,
) -> None:
    """``fork()`` waits for every thread's store operation; one that waits for another
    process's lock kept the fork waiting, and the loop's next inline attempt with it."""
    store.claim(finished("k"))
    forked: list[int] = []

    def sync_write() -> None:
        store.claim(processing("sync"))  # waits for the lock, inside the fork gate

    def fork() -> None:
        forked.append(fork_and_wait(lambda: 0))

    async def until_done(thread: threading.Thread) -> None:
        # Not through the loop's executor: while a fork is pending, submitting to it waits
        # for the fork (concurrent.futures holds a lock across it).
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.001)

    async def main(release: Callable[[], None]) -> None:
        writer = threading.Thread(target=sync_write)
        writer.start()
        while writer.ident not in disk._gate._busy:
            await asyncio.sleep(0.001)
        forker = threading.Thread(target=fork)
        forker.start()
        while not disk._gate._forking:
            await asyncio.sleep(0.001)
        ticker = Ticker()
        read = asyncio.ensure_future(store.aget("k"))
        await ticker.until(100)  # the fork still waits; the loop runs on
        assert not read.done()
        assert disk._gate._forking
        await until_done(threading.Thread(target=release))
        assert await asyncio.wait_for(read, 60) is not None
        await ticker.stop()
        await until_done(threading.Thread(target=writer.join))
        await until_done(threading.Thread(target=forker.join))

    with lock_held(store) as release:
        asyncio.run(main(release))
    assert forked == [0]
    assert store.get("sync") is not None
