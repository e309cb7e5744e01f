#!/usr/bin/env python
"""Every store against the floor of its protocol, one call at a time and under concurrency.

    python benchmarks/bench_stores.py            # starts its own redis-server and PostgreSQL
    python benchmarks/bench_stores.py --quick    # a short run (the test suite's)
    python benchmarks/bench_stores.py --only latency --rounds 11 --clock cpu
    python benchmarks/bench_stores.py --only throughput --procs 1,8

latency: a replay needs one read of the record and a first call two writes (the claim and the
outcome), so each store is timed against those raw operations on the same server, over the same
connection kind (unix sockets): replay against one ``GET`` (Redis), one ``SELECT`` by primary key
on a table like the store's (PostgreSQL), one ``Cache.get`` (diskcache); first call against
``SET NX`` then ``SET``, an autocommitted ``INSERT`` then ``UPDATE``, ``Cache.add`` then
``Cache.set``. The floors read and write the bytes the store itself holds. The sync path and the
async path (floors: ``redis.asyncio``, psycopg's ``AsyncConnection``, diskcache called inline in
a coroutine), each ratio printed beside issue 18's target. Every round times every row, in an
order that rotates, idemfn and floor alternating (A B, B A), so a load that drifts hits all.

throughput: 1, 2, 4 and 8 processes on distinct keys, calls/s of idemfn's first call and replay
against the same floors' calls/s, per store; the target is at 8 processes.

Targets are printed, never asserted (exit code 0).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import diskcache

from idemfn import DiskStore, MemoryStore, PostgresStore, RedisStore, Store, idempotent


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    sock = directory / "redis.sock"
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # bench_async stops it (SIGSTOP); in the caller's process group, the kernel would
        # continue it when another member's exit orphans the group.
        start_new_session=True,
    )
    try:
        import redis

        for _ in range(2000):
            try:
                if sock.exists() and redis.Redis(unix_socket_path=str(sock)).ping():
                    break
            except redis.RedisError:
                pass
            time.sleep(0.005)
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster (as user postgres when run as root); yields its DSN."""
    import os
    import shutil as sh

    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    initdb = sh.which("initdb") or (str(bins[0] / "initdb") if bins else None)
    pg_ctl = sh.which("pg_ctl") or (str(bins[0] / "pg_ctl") if bins else None)
    if initdb is None or pg_ctl is None:
        sys.exit("PostgreSQL's initdb/pg_ctl are not installed")
    top = Path(tempfile.mkdtemp(prefix="idemfn-bench-pg-"))
    (top / "sock").mkdir()
    runas: list[str] = []
    if os.geteuid() == 0:
        os.chmod(top, 0o755)
        sh.chown(top, "postgres")
        sh.chown(top / "sock", "postgres")
        runas = ["runuser", "-u", "postgres", "--"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": True}
    subprocess.run(
        [*runas, initdb, "-D", str(top / "data"), "-A", "trust", "-U", "postgres", "--no-sync"],
        **quiet,
    )  # type: ignore[call-overload]
    options = f"-k {top / 'sock'} -c listen_addresses='' -c fsync=off"
    subprocess.run(
        [
            *runas,
            pg_ctl,
            "-D",
            str(top / "data"),
            "-o",
            options,
            "-l",
            str(top / "log"),
            "-w",
            "start",
        ],
        **quiet,
    )  # type: ignore[call-overload]
    try:
        yield f"host={top / 'sock'} user=postgres dbname=postgres"
    finally:
        subprocess.run(
            [*runas, pg_ctl, "-D", str(top / "data"), "-m", "immediate", "stop"], **quiet
        )  # type: ignore[call-overload]
        sh.rmtree(top, ignore_errors=True)


# What rounds are timed with: wall time, or with --clock cpu this thread's CPU time, which leaves
# out the time other processes hold the CPU (on a shared machine) and the servers' own time.
clock = time.perf_counter

# diskcache opened as DiskStore opens its own (idemfn/_stores/disk.py).
CACHE_SETTINGS: dict[str, Any] = {
    "eviction_policy": "none",
    "statistics": False,
    "timeout": 60.0,
    "disk_min_file_size": 2**62,
}
TTL = 86400.0  # @idempotent's default ttl: the floors' rows expire as the records do

# Issue 18's targets: (replay, first call), ratios to the floor.
TARGETS = {"DiskStore": (1.3, 1.2), "RedisStore": (1.2, 1.3), "PostgresStore": (1.2, 1.3)}
THROUGHPUT_TARGET = 0.8  # at 8 processes, idemfn's calls/s over the floor's
FLOOR_NAMES = {
    ("DiskStore", "replay"): "Cache.get",
    ("DiskStore", "first call"): "add + set",
    ("RedisStore", "replay"): "GET",
    ("RedisStore", "first call"): "SET NX + SET",
    ("PostgresStore", "replay"): "SELECT",
    ("PostgresStore", "first call"): "INSERT + UPDATE",
}


def per_call(fn: Callable[[], object], seconds: float) -> float:
    """Microseconds per call of ``fn`` over about ``seconds`` (of ``clock``)."""
    n = 0
    gc.disable()
    try:
        start = clock()
        while True:
            for _ in range(50):
                fn()
            n += 50
            elapsed = clock() - start
            if elapsed >= seconds:
                return elapsed / n * 1e6
    finally:
        gc.enable()


async def aper_call(fn: Callable[[], Awaitable[object]], seconds: float) -> float:
    """``per_call`` of a coroutine function, each call awaited before the next."""
    n = 0
    gc.disable()
    try:
        start = clock()
        while True:
            for _ in range(50):
                await fn()
            n += 50
            elapsed = clock() - start
            if elapsed >= seconds:
                return elapsed / n * 1e6
    finally:
        gc.enable()


def spread(values: list[float]) -> str:
    """The rounds' range around their median, in percent."""
    m = statistics.median(values)
    return f"-{(m - min(values)) / m:.0%}/+{(max(values) - m) / m:.0%}"


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


@dataclass
class Row:
    """One latency row: idemfn's call and its floor, each a ``seconds -> µs per call``."""

    store: str
    what: str  # "replay" | "first call"
    path: str  # "sync" | "async"
    ours: Callable[[float], float]
    floor: Callable[[float], float] | None
    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return (
            f"{self.store} {self.what}"
            if self.path == "sync"
            else f"{self.store} async {self.what}"
        )

    def target(self) -> float | None:
        limits = TARGETS.get(self.store)
        return None if limits is None else limits[self.what == "first call"]


def timed_rounds(rows: list[Row], rounds: int, seconds: float) -> None:
    """Every row in each round, the order rotating; idemfn and floor alternate (A B, B A)."""
    for row in rows:  # warm-up: connections opened, statements prepared, caches filled
        row.ours(seconds / 5)
        if row.floor is not None:
            row.floor(seconds / 5)
    for r in range(rounds):
        shift = r % len(rows)
        for row in rows[shift:] + rows[:shift]:
            if row.floor is None:
                row.a.append(row.ours(seconds))
            elif r % 2 == 0:
                row.a.append(row.ours(seconds))
                row.b.append(row.floor(seconds))
            else:
                row.b.append(row.floor(seconds))
                row.a.append(row.ours(seconds))


def latency_table(rows: list[Row]) -> list[tuple[str, float, float, float | None]]:
    """Prints the rows; returns (name, idemfn µs, floor µs, target) of those with a floor."""
    print(
        f"{'measure':<32}{'idemfn µs':>10}{'spread':>11}  {'floor':<16}{'floor µs':>9}"
        f"{'spread':>11}{'ratio':>7}  target"
    )
    out = []
    for row in rows:
        ma = statistics.median(row.a)
        if row.floor is None:
            print(f"{row.name:<32}{ma:>10.1f}{spread(row.a):>11}  {'-':<16}")
            continue
        mb = statistics.median(row.b)
        limit = row.target()
        verdict = "" if limit is None else f"<= {limit}x {'met' if ma / mb <= limit else 'MISSED'}"
        floor_name = FLOOR_NAMES[row.store, row.what]
        print(
            f"{row.name:<32}{ma:>10.1f}{spread(row.a):>11}  {floor_name:<16}{mb:>9.1f}"
            f"{spread(row.b):>11}{ma / mb:>7.2f}  {verdict}"
        )
        out.append((row.name, ma, mb, limit))
    return out


# --------------------------------------------------------------------------------------------
# The floors: the raw operations a replay and a first call need, on the store's own bytes.


@dataclass
class Records:
    """What each store holds for one finished call (a small dict), for the floors to read and
    write the same bytes: DiskStore's row value, RedisStore's hash fields, PostgresStore's row."""

    disk: bytes
    redis: dict[bytes, bytes]
    postgres: tuple[Any, ...]  # (live, token, expires_at, drop_at, entry)

    @staticmethod
    def read(stores: dict[str, Store], url: str, dsn: str) -> Records:
        import psycopg
        import redis

        disk = stores["DiskStore"]
        assert isinstance(disk, DiskStore)
        keys = list(disk.cache.iterkeys())
        assert len(keys) == 1, keys
        client = redis.Redis(unix_socket_path=url.removeprefix("unix://"))
        hashes = [k for k in client.scan_iter("idemfn:*") if client.type(k) == b"hash"]
        assert len(hashes) == 1, hashes
        pg = stores["PostgresStore"]
        assert isinstance(pg, PostgresStore)
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                f'SELECT live, token, expires_at, drop_at, entry FROM "{pg.table}"'
            ).fetchone()
        assert row is not None
        records = Records(disk.cache.get(keys[0]), client.hgetall(hashes[0]), tuple(row))
        client.close()
        return records

    def sizes(self) -> str:
        return (
            f"DiskStore {len(self.disk)} B, RedisStore {sum(map(len, self.redis.values()))} B in"
            f" {len(self.redis)} hash fields, PostgresStore entry {len(self.postgres[4])} B"
        )


PG_INSERT = (
    "INSERT INTO raw (key, live, token, expires_at, drop_at, entry) VALUES (%s, %s, %s, %s, %s, %s)"
)
PG_UPDATE = (
    "UPDATE raw SET live = %s, token = %s, expires_at = %s, drop_at = %s, entry = %s WHERE key = %s"
)
PG_SELECT = "SELECT entry FROM raw WHERE key = %s"


def prepare_floors(dsn: str, table: str) -> None:
    """The raw side's PostgreSQL table: ``LIKE`` the store's (same columns, key, index)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE raw (LIKE "{table}" INCLUDING ALL)')


class SyncFloors:
    """The raw sync operations, on one connection of each kind."""

    def __init__(self, dsn: str, url: str, raw_disk: Path, records: Records) -> None:
        import psycopg
        import redis

        self.pg = psycopg.connect(dsn, autocommit=True)
        self.redis = redis.Redis(unix_socket_path=url.removeprefix("unix://"))
        self.cache = diskcache.Cache(str(raw_disk), **CACHE_SETTINGS)
        self.records = records
        self.value = b"".join(records.redis.values())
        self.px = int(TTL * 1000)

    def record(self, key: str) -> None:
        """The replays' record, in every backend under ``key``."""
        self.pg.execute(PG_INSERT, (key, *self.records.postgres))
        self.redis.set(key, self.value, px=self.px)
        self.cache.set(key, self.records.disk, expire=TTL)

    def replay(self, store: str, key: str = "k") -> Callable[[], object]:
        pg, client, cache = self.pg, self.redis, self.cache
        return {
            "DiskStore": lambda: cache.get(key),
            "RedisStore": lambda: client.get(key),
            "PostgresStore": lambda: pg.execute(PG_SELECT, (key,)).fetchone(),
        }[store]

    def first(self, store: str, prefix: str) -> Callable[[], object]:
        """A first call's two writes on a key never written; ``prefix`` keeps callers apart."""
        keys = (f"{prefix}{i}" for i in count())
        pg, client, cache, value, px = self.pg, self.redis, self.cache, self.value, self.px
        live, token, expires_at, drop_at, entry = self.records.postgres
        disk = self.records.disk

        def disk_first() -> object:
            k = next(keys)
            cache.add(k, disk, expire=TTL)
            return cache.set(k, disk, expire=TTL)

        def redis_first() -> object:
            k = next(keys)
            client.set(k, value, nx=True, px=px)
            return client.set(k, value, px=px)

        def pg_first() -> object:
            k = next(keys)
            pg.execute(PG_INSERT, (k, token, token, expires_at, expires_at, entry))
            return pg.execute(PG_UPDATE, (live, token, expires_at, drop_at, entry, k))

        return {"DiskStore": disk_first, "RedisStore": redis_first, "PostgresStore": pg_first}[
            store
        ]

    def close(self) -> None:
        self.pg.close()
        self.redis.close()
        self.cache.close()


class AsyncFloors:
    """The raw async operations: ``redis.asyncio``, psycopg's ``AsyncConnection`` (autocommit),
    and diskcache (which has no async API) called inline in a coroutine, as DiskStore's async
    primitives run theirs."""

    def __init__(self, sync: SyncFloors) -> None:
        self.sync = sync

    async def open(self, dsn: str, url: str) -> None:
        import psycopg
        import redis.asyncio

        self.pg = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        self.redis = redis.asyncio.Redis(unix_socket_path=url.removeprefix("unix://"))

    def replay(self, store: str) -> Callable[[], Awaitable[object]]:
        pg, client, cache = self.pg, self.redis, self.sync.cache

        async def disk() -> object:
            return cache.get("k")

        async def redis_get() -> object:
            return await client.get("k")

        async def pg_select() -> object:
            cur = await pg.execute(PG_SELECT, ("k",))
            return await cur.fetchone()

        return {"DiskStore": disk, "RedisStore": redis_get, "PostgresStore": pg_select}[store]

    def first(self, store: str, prefix: str) -> Callable[[], Awaitable[object]]:
        keys = (f"{prefix}{i}" for i in count())
        pg, client, cache = self.pg, self.redis, self.sync.cache
        value, px, disk_bytes = self.sync.value, self.sync.px, self.sync.records.disk
        live, token, expires_at, drop_at, entry = self.sync.records.postgres

        async def disk() -> object:
            k = next(keys)
            cache.add(k, disk_bytes, expire=TTL)
            return cache.set(k, disk_bytes, expire=TTL)

        async def redis_first() -> object:
            k = next(keys)
            await client.set(k, value, nx=True, px=px)
            return await client.set(k, value, px=px)

        async def pg_first() -> object:
            k = next(keys)
            await pg.execute(PG_INSERT, (k, token, token, expires_at, expires_at, entry))
            return await pg.execute(PG_UPDATE, (live, token, expires_at, drop_at, entry, k))

        return {"DiskStore": disk, "RedisStore": redis_first, "PostgresStore": pg_first}[store]

    async def close(self) -> None:
        await self.pg.close()
        await self.redis.aclose()


def small(i: object) -> dict[str, object]:
    """The decorated body: a small dict, as a typical result."""
    return {"i": i, "ok": True, "n": 3}


async def asmall(i: object) -> dict[str, object]:
    return {"i": i, "ok": True, "n": 3}


def latency_part(
    stores: dict[str, Store], floors: SyncFloors, url: str, dsn: str, rounds: int, seconds: float
) -> list[tuple[str, float, float, float | None]]:
    rows: list[Row] = []
    runner = asyncio.Runner()
    afloors = AsyncFloors(floors)
    runner.run(afloors.open(dsn, url))

    def sync_timer(fn: Callable[[], object]) -> Callable[[float], float]:
        return lambda s: per_call(fn, s)

    def async_timer(fn: Callable[[], Awaitable[object]]) -> Callable[[float], float]:
        return lambda s: runner.run(aper_call(fn, s))

    for name, store in stores.items():
        has_floor = name != "MemoryStore"
        fn = idempotent(key="{i}", store=store, name=f"bench.{name}")(small)
        fn(0)  # recorded by Records.read before: this replays
        keys = count(1)
        rows.append(
            Row(
                name,
                "replay",
                "sync",
                sync_timer(lambda fn=fn: fn(0)),
                sync_timer(floors.replay(name)) if has_floor else None,
            )
        )
        rows.append(
            Row(
                name,
                "first call",
                "sync",
                sync_timer(lambda fn=fn, k=keys: fn(next(k))),
                sync_timer(floors.first(name, "f")) if has_floor else None,
            )
        )
    for name, store in stores.items():
        has_floor = name != "MemoryStore"
        afn = idempotent(key="{i}", store=store, name=f"bench.async.{name}")(asmall)
        runner.run(afn(0))
        akeys = count(1)
        rows.append(
            Row(
                name,
                "replay",
                "async",
                async_timer(lambda afn=afn: afn(0)),
                async_timer(afloors.replay(name)) if has_floor else None,
            )
        )
        rows.append(
            Row(
                name,
                "first call",
                "async",
                async_timer(lambda afn=afn, k=akeys: afn(next(k))),
                async_timer(afloors.first(name, "af")) if has_floor else None,
            )
        )
    before = load()
    started = time.monotonic()
    timed_rounds(rows, rounds, seconds)
    print(
        f"\nlatency, µs per call: median of {rounds} rounds of ~{seconds} s each, rows interleaved;"
        f" load average {before} before, {load()} after ({time.monotonic() - started:.0f} s)"
    )
    result = latency_table(rows)
    runner.run(afloors.close())
    runner.close()
    return result


# --------------------------------------------------------------------------------------------
# throughput: worker processes (spawned once), each on keys of its own, started together.


@dataclass
class Where:
    url: str
    dsn: str
    disk: str  # DiskStore's directory
    raw_disk: str  # the raw floor's diskcache
    records: Records


def serve(conn: Connection, runs: dict[Any, Callable[[], object]]) -> None:
    """A throughput worker's loop: for each ``(system, start, seconds)`` that ``conn`` sends
    (until None), run ``runs[system]`` from ``start`` (monotonic) for ``seconds``, with the
    garbage collector off, and send back its calls/s."""
    while (command := conn.recv()) is not None:
        system, start, seconds = command
        run = runs[system]
        end = start + seconds
        n = 0
        while time.monotonic() < start:
            time.sleep(max(0.0, min(0.001, start - time.monotonic())))
        gc.disable()
        while time.monotonic() < end:
            run()
            n += 1
        finished = time.monotonic()
        gc.enable()
        conn.send(n / (finished - start))


def _worker(wid: int, where: Where, conn: Connection) -> None:
    """A throughput process: opens every store and floor, records its replay key, then runs
    each (system, start, seconds) it receives from ``start`` until ``start + seconds``
    (``time.monotonic`` is one clock for every process) and sends back its calls/s."""
    try:
        stores: dict[str, Store] = {
            "DiskStore": DiskStore(where.disk),
            "RedisStore": RedisStore(where.url),
            "PostgresStore": PostgresStore(where.dsn),
        }
        floors = SyncFloors(where.dsn, where.url, Path(where.raw_disk), where.records)
        runs: dict[tuple[str, str, str], Callable[[], object]] = {}
        mine = f"w{wid}"
        floors.record(mine)
        for name, store in stores.items():
            fn = idempotent(key="{i}", store=store, name=f"tput.{name}")(small)
            fn(mine)
            keys = (f"{mine}:{i}" for i in count())
            runs[name, "replay", "idemfn"] = lambda fn=fn: fn(mine)
            runs[name, "first call", "idemfn"] = lambda fn=fn, k=keys: fn(next(k))
            runs[name, "replay", "floor"] = floors.replay(name, mine)
            runs[name, "first call", "floor"] = floors.first(name, f"t{mine}:")
            for run in runs.values():
                run()  # connections opened
        conn.send("ready")
    except BaseException as exc:
        conn.send(f"failed: {exc!r}")
        raise
    serve(conn, runs)
    for store in stores.values():
        store.close()
    floors.close()


class Workers:
    def __init__(self, n: int, where: Where) -> None:
        context = multiprocessing.get_context("spawn")  # nothing of this process's connections
        self.pipes: list[Connection] = []
        self.procs = []
        for wid in range(n):
            ours, theirs = context.Pipe()
            proc = context.Process(target=_worker, args=(wid, where, theirs), daemon=True)
            proc.start()
            self.pipes.append(ours)
            self.procs.append(proc)
        for pipe in self.pipes:
            answer = pipe.recv()
            if answer != "ready":
                sys.exit(f"a throughput process could not start: {answer}")

    def rate(self, system: tuple[str, str, str], procs: int, seconds: float) -> float:
        """Total calls/s of ``procs`` processes running ``system`` at once."""
        start = time.monotonic() + 0.05
        for pipe in self.pipes[:procs]:
            pipe.send((system, start, seconds))
        return sum(pipe.recv() for pipe in self.pipes[:procs])

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for proc in self.procs:
            proc.join(30)


def throughput_part(
    where: Where, counts: list[int], rounds: int, seconds: float
) -> list[tuple[str, str, int, float, float]]:
    workers = Workers(max(counts), where)
    before = load()
    started = time.monotonic()
    results: dict[tuple[str, str, int], tuple[list[float], list[float]]] = {}
    points = [(s, w, n) for n in counts for s in TARGETS for w in ("replay", "first call")]
    for r in range(rounds):
        for store, what, n in points[r % len(points) :] + points[: r % len(points)]:
            ours, floor = results.setdefault((store, what, n), ([], []))
            sides = [(ours, "idemfn"), (floor, "floor")]
            for into, side in sides if r % 2 == 0 else sides[::-1]:
                into.append(workers.rate((store, what, side), n, seconds))
    workers.close()
    print(
        f"\nthroughput, calls/s summed over processes on distinct keys: median of {rounds} rounds"
        f" of {seconds} s per point, points interleaved; load average {before} before,"
        f" {load()} after ({time.monotonic() - started:.0f} s); {os.cpu_count()} CPUs, shared"
        " with the servers"
    )
    print(
        f"{'store':<15}{'call':<12}{'procs':>6}{'idemfn/s':>10}{'floor':>18}{'floor/s':>10}"
        f"{'ratio':>7}{'x 1 proc':>10}  target"
    )
    out = []
    for store in TARGETS:
        for what in ("replay", "first call"):
            one = None
            for n in counts:
                ours, floor = results[store, what, n]
                ma, mb = statistics.median(ours), statistics.median(floor)
                one = one or ma
                verdict = (
                    f">= {THROUGHPUT_TARGET}x {'met' if ma / mb >= THROUGHPUT_TARGET else 'MISSED'}"
                    if n == 8
                    else ""
                )
                print(
                    f"{store:<15}{what:<12}{n:>6}{ma:>10,.0f}{FLOOR_NAMES[store, what]:>18}"
                    f"{mb:>10,.0f}{ma / mb:>7.2f}{ma / one:>10.2f}  {verdict}"
                )
                out.append((store, what, n, ma, mb))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="latency only")
    parser.add_argument("--rounds", type=int, help="latency rounds (default 7; --quick: 3)")
    parser.add_argument("--only", default="latency,throughput", help="latency, throughput")
    parser.add_argument("--procs", default="1,2,4,8", help="throughput process counts")
    args = parser.parse_args()
    rounds, seconds = (3, 0.04) if args.quick else (7, 0.25)
    rounds = args.rounds or rounds
    t_rounds, t_seconds = (1, 0.1) if args.quick else (3, 0.5)
    parts = set(args.only.split(","))
    global clock
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    print(f"bench_stores: load average {load()}, {os.cpu_count()} CPUs")

    with (
        tempfile.TemporaryDirectory() as tmp,
        redis_server(Path(tmp)) as url,
        postgres_server() as dsn,
    ):
        stores: dict[str, Store] = {
            "MemoryStore": MemoryStore(),
            "DiskStore": DiskStore(Path(tmp) / "disk"),
            "RedisStore": RedisStore(url),
            "PostgresStore": PostgresStore(dsn),
        }
        # One recorded call on each store, whose bytes the floors then read and write.
        for name, store in stores.items():
            idempotent(key="{i}", store=store, name=f"bench.{name}")(small)(0)
        records = Records.read(stores, url, dsn)
        pg = stores["PostgresStore"]
        assert isinstance(pg, PostgresStore)
        prepare_floors(dsn, pg.table)
        floors = SyncFloors(dsn, url, Path(tmp) / "raw", records)
        floors.record("k")
        print(f"records of a small dict: {records.sizes()}")
        if "latency" in parts:
            latency_part(stores, floors, url, dsn, rounds, seconds)
        floors.close()
        if "throughput" in parts:
            where = Where(url, dsn, str(Path(tmp) / "disk"), str(Path(tmp) / "raw"), records)
            counts = [int(n) for n in args.procs.split(",")]
            throughput_part(where, counts, t_rounds, t_seconds)
        for store in stores.values():
            store.close()


if __name__ == "__main__":
    main()
