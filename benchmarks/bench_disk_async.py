#!/usr/bin/env python
"""DiskStore's async primitives: what running them inline on the event loop costs and saves.

    python benchmarks/bench_disk_async.py            # about half a minute
    python benchmarks/bench_disk_async.py --quick    # a short run

Four measurements, each against the alternatives in the same run:

1. Per call: a read (``aget``) and a first call's writes (``aclaim`` + ``aswap``), against the
   sync primitive called on the loop and against the sync primitive in a worker thread
   (``asyncio.to_thread``: the ``Store`` default, and DiskStore's before issue 16). Median
   over interleaved rounds, microseconds per call.
2. A stream of first calls on one loop (one task that yields after every write): calls/s, and
   how long the loop was held at once, seen by a ticker task whose 1 ms sleeps wake late by
   that much. A run that only yields is the machine's own noise.
3. Another process holds SQLite's write lock (``BEGIN IMMEDIATE``) for a while: how late the
   ticker wakes at worst while a write waits, and when the write completes; a read meanwhile.
4. The same past the store's ``timeout``: the write fails with ``StoreError``, the loop ticking.

Exit code 0: figures are reported, not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from itertools import count
from pathlib import Path

from idemfn import DiskStore, StoreError
from idemfn._record import Entry
from idemfn._stores.base import offload

# Holds the write lock of the database argv[1] until a line on stdin (or for argv[2] seconds).
HOLDER = """
import sqlite3, sys, select
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN IMMEDIATE")
print("held", flush=True)
select.select([sys.stdin], [], [], float(sys.argv[2]))
con.execute("COMMIT")
"""


def claim_of(key: str) -> Entry:
    now = time.time()
    return Entry(key, "processing", "fp", "me/m/1/1", "t1", 1, now, lease_until=now + 30, ttl=60.0)


def finished(entry: Entry) -> Entry:
    now = time.time()
    return entry._replace(status="ok", finished_at=now, expires_at=now + 3600, payload=b"v" * 64)


class Ticker:
    """A task that sleeps 1 ms again and again, recording how late each sleep wakes."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._running = True
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._running:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lags.append(time.perf_counter() - start - 0.001)

    async def stop(self) -> list[float]:
        """The lags, sorted, once the sleep under way has woken (and been counted)."""
        self._running = False
        await self._task
        return sorted(self.lags)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f}"


async def per_call(store: DiskStore, rounds: int, calls: int) -> None:
    keys = [f"r{i}" for i in range(64)]
    for key in keys:
        store.claim(finished(claim_of(key)))
    fresh = count()

    async def read_sync() -> None:
        for i in range(calls):
            store.get(keys[i % 64])

    async def read_async() -> None:
        for i in range(calls):
            await store.aget(keys[i % 64])

    async def read_thread() -> None:
        for i in range(calls):
            await offload(store.get, keys[i % 64])

    async def first_sync() -> None:
        for _ in range(calls // 4):
            e = claim_of(f"f{next(fresh)}")
            store.claim(e)
            store.swap(e.key, e.token, finished(e))

    async def first_async() -> None:
        for _ in range(calls // 4):
            e = claim_of(f"f{next(fresh)}")
            await store.aclaim(e)
            await store.aswap(e.key, e.token, finished(e))

    async def first_thread() -> None:
        for _ in range(calls // 4):
            e = claim_of(f"f{next(fresh)}")
            await offload(store.claim, e)
            await offload(store.swap, e.key, e.token, finished(e))

    sides: dict[str, tuple[Callable[[], Awaitable[None]], int]] = {
        "read: get on the loop": (read_sync, calls),
        "read: aget": (read_async, calls),
        "read: get in to_thread": (read_thread, calls),
        "first call: claim+swap on the loop": (first_sync, calls // 4),
        "first call: aclaim+aswap": (first_async, calls // 4),
        "first call: claim+swap in to_thread": (first_thread, calls // 4),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for run in range(rounds + 1):  # the first round warms up
        for name in order if run % 2 else order[::-1]:
            fn, n = sides[name]
            gc.disable()
            start = time.perf_counter()
            await fn()
            took = time.perf_counter() - start
            gc.enable()
            if run:
                times[name].append(took / n * 1e6)
    print(f"1. Per call, median of {rounds} interleaved rounds (us)")
    med = {name: statistics.median(values) for name, values in times.items()}
    for name in order:
        print(f"   {name:40} {med[name]:9.1f}")
    for what, inline, thread in (
        ("read", "read: aget", "read: get in to_thread"),
        ("first call", "first call: aclaim+aswap", "first call: claim+swap in to_thread"),
    ):
        print(f"   {what}: to_thread / async primitives = {med[thread] / med[inline]:.1f}x")
    print()


async def stream(store: DiskStore, calls: int) -> None:
    print(f"2. {calls} first calls in a row on one loop (the task yields after each write)")
    print(f"   {'':28} {'calls/s':>8} {'tick lag ms: p50':>17} {'p99':>8} {'max':>8}")
    fresh = count()

    async def nothing(e: Entry) -> None:
        await asyncio.sleep(0.0002)  # about as long as a first call

    async def on_loop(e: Entry) -> None:
        store.claim(e)
        await asyncio.sleep(0)
        store.swap(e.key, e.token, finished(e))
        await asyncio.sleep(0)

    async def primitives(e: Entry) -> None:
        await store.aclaim(e)
        await asyncio.sleep(0)
        await store.aswap(e.key, e.token, finished(e))
        await asyncio.sleep(0)

    async def thread(e: Entry) -> None:
        await offload(store.claim, e)
        await offload(store.swap, e.key, e.token, finished(e))

    for name, call in (
        ("only yields (noise)", nothing),
        ("claim+swap on the loop", on_loop),
        ("aclaim+aswap", primitives),
        ("claim+swap in to_thread", thread),
    ):
        ticker = Ticker()
        start = time.perf_counter()
        for _ in range(calls):
            await call(claim_of(f"s{next(fresh)}"))
        took = time.perf_counter() - start
        lags = await ticker.stop()
        p99 = lags[int(len(lags) * 0.99)]
        print(
            f"   {name:28} {calls / took:8.0f} {ms(lags[len(lags) // 2]):>17} {ms(p99)} "
            f"{ms(lags[-1])}"
        )
    print()


async def held(store: DiskStore, hold: float) -> None:
    database = str(Path(store.directory) / "cache.db")
    print(f"3. Another process holds the write lock for {hold:.1f} s")
    print(f"   {'':28} {'done after ms':>14} {'worst tick lag ms':>18}")
    fresh = count()
    store.claim(finished(claim_of("there")))

    async def write_on_loop() -> object:
        return store.claim(claim_of(f"h{next(fresh)}"))

    async def write_thread() -> object:
        return await offload(store.claim, claim_of(f"h{next(fresh)}"))

    async def write_async() -> object:
        return await store.aclaim(claim_of(f"h{next(fresh)}"))

    async def read_async() -> object:
        return await store.aget("there")

    for name, op in (
        ("claim on the loop", write_on_loop),
        ("claim in to_thread", write_thread),
        ("aclaim", write_async),
        ("aget", read_async),
    ):
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, database, str(hold)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        ticker = Ticker()
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        await op()
        took = time.perf_counter() - start
        lags = await ticker.stop()
        holder.communicate("")
        print(f"   {name:28} {took * 1e3:14.1f} {ms(lags[-1]):>18}")
    print()


async def past_timeout(directory: Path, hold: float) -> None:
    store = DiskStore(directory, timeout=hold / 3)
    store.get("warm")
    database = str(directory / "cache.db")
    print(f"4. The lock held {hold:.1f} s, past the store's timeout of {store.timeout:.1f} s")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, database, str(hold)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "held"
    ticker = Ticker()
    start = time.perf_counter()
    try:
        await store.aclaim(claim_of("late"))
        outcome = "claimed (the lock was let go early)"
    except StoreError as exc:
        outcome = f"StoreError: {exc}"
    took = time.perf_counter() - start
    lags = await ticker.stop()
    holder.communicate("")
    print(f"   aclaim ended after {took * 1e3:.0f} ms, worst tick lag {ms(lags[-1]).strip()} ms")
    print(f"   {outcome}")
    store.close()


async def main(quick: bool) -> None:
    rounds, calls, streamed, hold = (5, 400, 1000, 1.0) if quick else (11, 2000, 5000, 1.5)
    with tempfile.TemporaryDirectory() as tmp:
        store = DiskStore(Path(tmp) / "store")
        store.get("warm")  # opened: the first open runs in a worker thread, once
        await store.aget("warm")
        await per_call(store, rounds, calls)
        await stream(store, streamed)
        await held(store, hold)
        store.close()
        await past_timeout(Path(tmp) / "timeout", hold)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args()
    print(f"DiskStore async primitives, python {sys.version.split()[0]}")
    print()
    asyncio.run(main(args.quick))
