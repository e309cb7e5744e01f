#!/usr/bin/env python
"""The figures to size a deployment by (docs/scaling.md): what a record takes, what a call
costs the server, and how prune scales with the store, on each store.

    python benchmarks/bench_sizing.py                 # full run (15 minutes on 2 busy cores)
    python benchmarks/bench_sizing.py --quick         # small sizes (< 30 s), for the tests
    python benchmarks/bench_sizing.py --only bytes,cpu,prune --json PATH

It starts its own redis-server and PostgreSQL 15 (the test suite's starters, on unix sockets,
PostgreSQL with ``fsync=off``: WAL bytes and CPU are the same, commit latency is not).

- ``bytes``: records written by first calls of ``@idempotent`` (a ~100 B result and a 10 kB
  one of random bytes, which no compression shrinks): DiskStore's database growth per record;
  RedisStore's ``used_memory`` growth per record and ``MEMORY USAGE`` of a sample of keys;
  PostgresStore's ``pg_total_relation_size`` (table, indexes, TOAST, lease table) growth per
  record as written (a first call's UPDATE leaves the INSERT's row version dead until vacuum)
  and after ``VACUUM FULL`` (live rows only), and the WAL bytes per first call.
- ``cpu``: one caller, replays then first calls: the server's CPU time per call (``redis-server``'s
  own ``used_cpu``; every PostgreSQL process's ``/proc/<pid>/schedstat``, background writers
  and autovacuum included) and the caller's. A Redis node runs commands on one core: 1 s over
  its CPU per call is the ceiling of its calls/s.
- ``prune``: stores of 1k, 10k, 100k and 1M records (quick: 1k and 3k), 10 % of them expired
  (RedisStore: none, the server drops them at their expiry, so prune only reads), each pruned
  once: its time, per removed record and per record held; at the largest size, a process calls
  meanwhile (replays, first calls, and first calls of expired keys, which take the place of
  records prune is removing) and its latencies are reported. For PostgresStore, the same prune
  as one DELETE (what ``prune`` did before its batches) beside it.

Results are reported, never asserted: the exit code is 0 unless a call returned a wrong value.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository's idemfn, and tests.support
    sys.path.insert(0, str(ROOT))

from idemfn import DiskStore, PostgresStore, RedisStore, Store, idempotent  # noqa: E402
from idemfn._fingerprint import fingerprint_arguments  # noqa: E402
from idemfn._record import Entry  # noqa: E402
from tests.support.servers import PostgresServer, RedisServer  # noqa: E402

KINDS = ("DiskStore", "RedisStore", "PostgresStore")
EXPIRED = 0.1  # the fraction of a prune's store that has expired
FILL_BATCH = 5_000
TTL = 86_400.0


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def small_result(i: int) -> dict[str, Any]:
    """About 100 bytes pickled: a typical small result."""
    return {"id": i, "status": "captured", "amount": 2500, "currency": "EUR", "ref": f"r-{i:08d}"}


def large_result(i: int) -> dict[str, Any]:
    """10 kB of random bytes (incompressible: the worst case for PostgreSQL's TOAST)."""
    return {"id": i, "blob": os.urandom(10_000)}


RESULTS: dict[str, Callable[[int], dict[str, Any]]] = {"100 B": small_result, "10 kB": large_result}


@dataclass
class Servers:
    directory: Path
    redis: RedisServer
    postgres: PostgresServer

    def store(self, kind: str, name: str) -> Store:
        """A fresh store of ``kind``: a directory, a key prefix or a table named ``name``."""
        return open_store(self.spec(kind, name))

    def spec(self, kind: str, name: str) -> tuple[str, str, str]:
        """How another process opens ``store(kind, name)``: (kind, where, name)."""
        where = {
            "DiskStore": str(self.directory),
            "RedisStore": self.redis.url,
            "PostgresStore": self.postgres.dsn,
        }[kind]
        return kind, where, name


def open_store(spec: tuple[str, str, str]) -> Store:
    kind, where, name = spec
    if kind == "DiskStore":
        return DiskStore(Path(where) / name)
    if kind == "RedisStore":
        return RedisStore(where, prefix=f"{name}:")
    return PostgresStore(where, table=name)


@contextmanager
def servers() -> Iterator[Servers]:
    with tempfile.TemporaryDirectory(prefix="idemfn-sizing-") as tmp:
        (Path(tmp) / "redis").mkdir()
        redis_server = RedisServer(Path(tmp) / "redis")
        try:
            postgres = PostgresServer()
            try:
                yield Servers(Path(tmp), redis_server, postgres)
            finally:
                postgres.remove()
        finally:
            redis_server.stop()


def _redis(store: Store) -> Any:
    assert isinstance(store, RedisStore)
    return store.client


def _sql(server: PostgresServer, query: str, params: Any = None) -> Any:
    import psycopg

    with psycopg.connect(server.dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else cur.rowcount


# --------------------------------------------------------------------------------------------
# bytes: what a record takes.


def bytes_section(where: Servers, n: int) -> list[dict[str, Any]]:
    rows = []
    for kind in KINDS:
        for label, result in RESULTS.items():
            name = f"bytes_{kind[:2].lower()}_{label.split()[0]}"
            store = where.store(kind, name)
            try:
                rows.append(_bytes_of(where, kind, store, label, result, n))
            finally:
                store.close()
    print(f"\nbytes per record: {n:,} first calls through @idempotent per row; load {load()}")
    print(
        f"{'store':<15}{'result':<8}{'entry B':>9}{'as written B':>14}{'compact B':>11}"
        f"{'per key B':>11}{'WAL B/call':>12}"
    )
    for r in rows:
        compact = f"{r['compact_bytes']:,.0f}" if r.get("compact_bytes") else "-"
        per_key = f"{r['memory_usage']:,.0f}" if r.get("memory_usage") else "-"
        wal = f"{r['wal_bytes']:,.0f}" if r.get("wal_bytes") else "-"
        print(
            f"{r['store']:<15}{r['result']:<8}{r['entry_bytes']:>9,.0f}{r['bytes']:>14,.0f}"
            f"{compact:>11}{per_key:>11}{wal:>12}"
        )
    print(
        "  as written: growth of the database file (DiskStore), of used_memory (RedisStore), of"
        " table + indexes + TOAST + lease table (PostgresStore), per record; compact: after"
        " VACUUM FULL; per key: MEMORY USAGE (SAMPLES 0), mean of a sample"
    )
    return rows


def _checkpointed_size(store: Store) -> int:
    """The size of a DiskStore's database once its WAL is written back and truncated (the WAL
    file grows to ~4 MB between checkpoints, then is reused: not per record)."""
    assert isinstance(store, DiskStore)
    with contextlib.closing(sqlite3.connect(store.directory / "cache.db")) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return store.bytes_used() or 0


def _bytes_of(
    where: Servers,
    kind: str,
    store: Store,
    label: str,
    result: Callable[[int], dict[str, Any]],
    n: int,
) -> dict[str, Any]:
    fn = idempotent(key="{i}", store=store, name=f"sizing.bytes.{label.split()[0]}")(result)
    fn(-1)  # the table, the file, the connection: made before the measure
    pg = where.postgres
    row: dict[str, Any] = {"store": kind, "result": label, "records": n}
    if kind == "DiskStore":
        before = _checkpointed_size(store)
    elif kind == "RedisStore":
        before = int(_redis(store).info("memory")["used_memory"])
    else:
        assert isinstance(store, PostgresStore)
        before = store.bytes_used() or 0
        ((lsn,),) = _sql(pg, "SELECT pg_current_wal_lsn()")
    for i in range(n):
        fn(i)
    key = fn.key_for(0)
    entry = store.get(key)
    assert entry is not None
    assert entry.status == "ok"
    if kind == "DiskStore":
        row["bytes"] = (_checkpointed_size(store) - before) / n
        assert isinstance(store, DiskStore)
        row["entry_bytes"] = len(store.cache.get(key))
    elif kind == "RedisStore":
        client = _redis(store)
        row["bytes"] = (int(client.info("memory")["used_memory"]) - before) / n
        assert isinstance(store, RedisStore)
        sample = [store.prefix + fn.key_for(i) for i in random.Random(0).sample(range(n), 200)]
        usage = [client.memory_usage(k, samples=0) for k in sample]
        row["memory_usage"] = statistics.mean(usage)
        row["entry_bytes"] = client.hstrlen(store.prefix + key, "e")
    else:
        assert isinstance(store, PostgresStore)
        ((wal,),) = _sql(pg, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn,))
        row["wal_bytes"] = float(wal) / n
        row["bytes"] = ((store.bytes_used() or 0) - before) / n
        ((entry_bytes,),) = _sql(
            pg, f'SELECT avg(octet_length(entry)) FROM "{store.table}" WHERE key <> %s', ("",)
        )
        row["entry_bytes"] = float(entry_bytes)
        _sql(pg, f'VACUUM FULL "{store.table}"')
        row["compact_bytes"] = (store.bytes_used() or 0) / (n + 1)
    return row


# --------------------------------------------------------------------------------------------
# cpu: what a call costs the server.


def _cpu_ns(pids: list[int]) -> int:
    """CPU time of ``pids`` so far, in ns (``/proc/<pid>/schedstat``: ns, not ticks)."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # exited
    return total


def _postgres_pids(server: PostgresServer) -> list[int]:
    """The postmaster and every process it started (backends, writers, autovacuum)."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            pids.append(int(stat.parent.name))
    return pids


def cpu_section(where: Servers, n: int) -> list[dict[str, Any]]:
    rows = []
    for kind in ("RedisStore", "PostgresStore"):
        store = where.store(kind, f"cpu_{kind[:2].lower()}")
        try:
            fn = idempotent(key="{i}", store=store, name="sizing.cpu")(small_result)
            for i in range(200):  # warm: connections, statements, the table
                fn(-1 - i)
            for what, args in (
                ("first call", range(n)),
                ("replay", [i % 1000 for i in range(n)]),
            ):
                if kind == "RedisStore":
                    assert isinstance(store, RedisStore)
                    info = store.client.info("cpu")
                    server_before = info["used_cpu_sys"] + info["used_cpu_user"]
                    commands_before = _commands(store)
                else:
                    pids = _postgres_pids(where.postgres)
                    server_before = _cpu_ns(pids) / 1e9
                client_before, wall_before = time.process_time(), time.perf_counter()
                for i in args:
                    fn(i)
                client = time.process_time() - client_before
                wall = time.perf_counter() - wall_before
                extra: dict[str, float] = {}
                if kind == "RedisStore":
                    info = _redis(store).info("cpu")
                    server = info["used_cpu_sys"] + info["used_cpu_user"] - server_before
                    after = _commands(store)
                    count, usec = after[0] - commands_before[0], after[1] - commands_before[1]
                    extra = {"scripts": count / n, "in_scripts_us": usec / n}
                else:
                    server = _cpu_ns(_postgres_pids(where.postgres)) / 1e9 - server_before
                rows.append(
                    {
                        "store": kind,
                        "call": what,
                        "calls": n,
                        "server_cpu_us": server / n * 1e6,
                        "client_cpu_us": client / n * 1e6,
                        "wall_us": wall / n * 1e6,
                        **extra,
                    }
                )
        finally:
            store.close()
    print(f"\nCPU per call, one caller, {n:,} calls a row; load {load()}")
    print(
        f"{'store':<15}{'call':<12}{'server CPU µs':>15}{'1 core: calls/s':>17}"
        f"{'caller CPU µs':>15}{'wall µs':>9}{'scripts':>9}{'in them µs':>12}"
    )
    for r in rows:
        commands = f"{r['scripts']:>9.2f}{r['in_scripts_us']:>12.1f}" if "scripts" in r else ""
        print(
            f"{r['store']:<15}{r['call']:<12}{r['server_cpu_us']:>15.1f}"
            f"{1e6 / r['server_cpu_us']:>17,.0f}{r['client_cpu_us']:>15.1f}{r['wall_us']:>9.1f}"
            + commands
        )
    print(
        "  RedisStore: Lua scripts per call, and the µs Redis counts in them (INFO"
        " commandstats); the rest of its CPU is its event loop, reading and writing sockets"
    )
    return rows


def _commands(store: Store) -> tuple[int, int]:
    """(scripts run, µs in them) Redis counted so far. (The commands a script calls are
    counted too, and their µs are in the script's.)"""
    stats = _redis(store).info("commandstats")
    kept = [v for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")]
    return sum(v["calls"] for v in kept), sum(v["usec"] for v in kept)


# --------------------------------------------------------------------------------------------
# prune: how it scales, and what calls see meanwhile.


class Filled:
    """A store of ``n`` finished records of one decorated function (``key_of(i)``), those of
    ``i`` 1 to ``expired`` expired an hour ago, the rest live for a day; written through the
    store's API (RedisStore: its claim's fields, pipelined) from a record the decorator wrote."""

    NAME = "sizing.prune"

    def __init__(self, where: Servers, kind: str, table: str, n: int) -> None:
        self.kind, self.table, self.n = kind, table, n
        self.expired = 0 if kind == "RedisStore" else int(n * EXPIRED)
        self.store = where.store(kind, table)
        if isinstance(self.store, RedisStore):
            # prune's SCAN walks the whole database, whatever the prefix: this store's keys only.
            self.store.client.flushdb(asynchronous=True)
        fn = idempotent(key="p:{i}", store=self.store, name=self.NAME, ttl=TTL)(small_result)
        fn(0)
        template = self.store.get(fn.key_for(0))
        assert template is not None
        self.prefix = fn.key_for(0).removesuffix("0")
        now = self.store.time()
        self.expired_entry = template._replace(finished_at=now - 7200, expires_at=now - 3600)
        self.live_entry = template._replace(expires_at=now + TTL)
        started = time.perf_counter()
        getattr(self, f"_fill_{kind[:-5].lower()}")(where)
        self.fill_seconds = time.perf_counter() - started
        self.bytes_per_record = self._bytes_per_record()

    def _bytes_per_record(self) -> float:
        """What a record takes once filled: the database (DiskStore, WAL checkpointed), the
        tables (PostgresStore: no dead row versions, as after vacuum), MEMORY USAGE of a sample
        of keys (RedisStore)."""
        store = self.store
        if isinstance(store, RedisStore):
            sample = random.Random(0).sample(range(self.n), min(self.n, 200))
            client = _redis(store)
            usage: list[int] = [
                client.memory_usage(store.prefix + self.key_of(i), samples=0) for i in sample
            ]
            return statistics.mean(usage)
        if isinstance(store, DiskStore):
            return _checkpointed_size(store) / self.n
        return (store.bytes_used() or 0) / self.n

    def key_of(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def entry(self, i: int) -> Entry:
        base = self.expired_entry if 1 <= i <= self.expired else self.live_entry
        return base._replace(
            key=self.key_of(i),
            fingerprint=fingerprint_arguments(("i",), {"i": i}),
            token=f"fill-{i}",
        )

    def _fill_disk(self, where: Servers) -> None:
        store = self.store
        assert isinstance(store, DiskStore)
        # Claims cull expired rows as they go (100 every 64 claims): not during the fill, or
        # the expired records would be gone before prune.
        store._cull = lambda *args, **kwargs: None  # type: ignore[method-assign]
        try:
            for start in range(0, self.n, FILL_BATCH):
                with store.cache.transact():
                    for i in range(max(1, start), min(start + FILL_BATCH, self.n)):
                        assert store.claim(self.entry(i)) is None
        finally:
            del store._cull

    def _fill_redis(self, where: Servers) -> None:
        store = self.store
        assert isinstance(store, RedisStore)
        for start in range(0, self.n, FILL_BATCH):
            pipe = store.client.pipeline(transaction=False)
            for i in range(max(1, start), min(start + FILL_BATCH, self.n)):
                entry = self.entry(i)
                drop_at, expires = store._expiry(entry)
                name = store.prefix + entry.key
                pipe.hset(
                    name,
                    mapping={"e": store.encode(entry), "t": "", "k": entry.token, "x": expires},
                )
                pipe.pexpireat(name, int(drop_at))
            pipe.execute()

    def _fill_postgres(self, where: Servers) -> None:
        # Rows as the store writes a finished record (drop_at = expires_at). The expired ones
        # each hold their own record (a first call reads the row before it claims it); the
        # live ones the template's bytes (only prune reads them, and not their records).
        import psycopg

        store = self.store
        assert isinstance(store, PostgresStore)
        columns = "key, live, token, expires_at, drop_at, entry"
        at = self.expired_entry.expires_at
        with psycopg.connect(where.postgres.dsn, autocommit=True) as conn:
            with conn.cursor().copy(f'COPY "{self.table}" ({columns}) FROM STDIN') as copy:
                for i in range(1, self.expired + 1):
                    entry = self.entry(i)
                    copy.write_row((entry.key, None, entry.token, at, at, store.encode(entry)))
            at = self.live_entry.expires_at
            conn.execute(
                f"INSERT INTO \"{self.table}\" ({columns}) SELECT %s || g, NULL, 'fill-' || g,"
                " %s, %s, %s FROM generate_series(%s::int, %s::int) g",
                (self.prefix, at, at, store.encode(self.live_entry), self.expired + 1, self.n - 1),
            )
            conn.execute(f'VACUUM ANALYZE "{self.table}"')


def _prober(spec: tuple[str, str, str], prefix: str, expired: int, conn: Connection) -> None:
    """Calls, until told to stop, in turn: a replay of a key of its own, a first call of a new
    key, a first call of an expired key of the filled store (which takes its record's place);
    sends back (kind, started, seconds) of each."""
    store = open_store(spec)
    fn = idempotent(key="p:{i}", store=store, name=Filled.NAME, ttl=TTL)(small_result)
    mine = [-1 - i for i in range(50)]
    for i in mine:
        fn(i)
    fresh = iter(range(10**9, 2 * 10**9))
    stale = random.Random(1).sample(range(1, expired + 1), expired)
    calls: list[tuple[str, float, float]] = []
    conn.send("ready")
    clock = time.monotonic
    k = 0
    while not conn.poll():
        kind_of = k % 3 if stale else k % 2
        k += 1
        if kind_of == 0:
            args, what = mine[k % len(mine)], "replay"
        elif kind_of == 1:
            args, what = next(fresh), "first call"
        else:
            args, what = stale.pop(), "first call of an expired key"
        t0 = clock()
        value = fn(args)
        calls.append((what, t0, clock() - t0))
        if value != small_result(args):
            conn.send(f"wrong value for {args}: {value!r}")
            return
    conn.recv()
    conn.send(calls)
    store.close()


class Probe:
    """A process that calls the store while prune runs (see ``_prober``)."""

    def __init__(self, filled: Filled, spec: tuple[str, str, str]) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, theirs = context.Pipe()
        self.process = context.Process(
            target=_prober, args=(spec, filled.prefix, filled.expired, theirs), daemon=True
        )
        self.process.start()
        answer = self.pipe.recv()
        assert answer == "ready", answer

    def stop(self, start: float, end: float) -> dict[str, Any]:
        """Latencies (ms) of the calls that started during [start, end]."""
        if not self.pipe.poll():  # (else it stopped on a wrong value, and says so)
            self.pipe.send("stop")
        calls = self.pipe.recv()
        self.process.join(30)
        if isinstance(calls, str):
            raise SystemExit(calls)
        out: dict[str, Any] = {}
        for what in sorted({c[0] for c in calls}):
            during = sorted(s for w, t, s in calls if w == what and start <= t <= end)
            if not during:
                continue
            out[what] = {
                "calls": len(during),
                "median_ms": statistics.median(during) * 1e3,
                "p99_ms": during[int(len(during) * 0.99)] * 1e3,
                "max_ms": during[-1] * 1e3,
            }
        return out


def _one_statement_prune(where: Servers, filled: Filled) -> int:
    """PostgresStore's prune before its batches: one DELETE of every expired row (the same
    conditions, on the server's clock read in each row), then the same look at stale rows."""
    store = filled.store
    assert isinstance(store, PostgresStore)
    now = "extract(epoch from clock_timestamp())"
    removed = int(
        store._run(
            "prune",
            store.table,
            f'DELETE FROM "{store.table}" WHERE drop_at IS NOT NULL AND drop_at < {now}'
            f" AND live IS NULL AND drop_at = expires_at AND expires_at < {now}",
            (),
        )
    )
    store._run("prune", store.table, store._sql["stale"], ())
    store._run("prune", store.table, store._sql["prune_leases"], ())
    return removed


def prune_section(where: Servers, sizes: list[int], kinds: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    ways: list[tuple[str, str]] = [(kind, "prune()") for kind in KINDS]
    ways.insert(3, ("PostgresStore", "one DELETE (before)"))
    ways = [(kind, how) for kind, how in ways if kind in kinds]
    for n in sizes:
        for kind, how in ways:
            table = f"prune_{kind[:2].lower()}_{n}_{'one' if 'one' in how else 'b'}"
            filled = Filled(where, kind, table, n)
            try:
                probe = Probe(filled, where.spec(kind, table)) if n == sizes[-1] else None
                start = time.monotonic()
                if how == "prune()":
                    removed = filled.store.prune()
                else:
                    removed = _one_statement_prune(where, filled)
                end = time.monotonic()
                latencies = probe.stop(start, end) if probe is not None else {}
                # (Fewer with a probe: its first calls of expired keys took some first.)
                expected = range(filled.expired + 1) if probe else [filled.expired]
                assert removed in expected, (kind, how, removed, filled.expired)
                seconds = end - start
                rows.append(
                    {
                        "store": kind,
                        "how": how,
                        "records": n,
                        "removed": removed,
                        "fill_seconds": filled.fill_seconds,
                        "bytes_per_record": filled.bytes_per_record,
                        "seconds": seconds,
                        "us_per_removed": seconds / removed * 1e6 if removed else None,
                        "us_per_record": seconds / n * 1e6,
                        "during": latencies,
                        "load": load(),
                    }
                )
                print(
                    f"  {kind} {how} at {n:,} records: {removed:,} removed in {seconds:.2f} s"
                    f" (filled in {filled.fill_seconds:.1f} s); load {load()}"
                )
            finally:
                filled.store.close()
                if kind == "PostgresStore":
                    _sql(where.postgres, f'DROP TABLE "{table}", "{table}_leases"')
                elif kind == "RedisStore":
                    assert isinstance(filled.store, RedisStore)
                    _redis(filled.store).flushdb(asynchronous=True)
    print(f"\nprune: {EXPIRED:.0%} of the records expired (RedisStore: none, see above)")
    print(
        f"{'store':<15}{'how':<21}{'records':>10}{'removed':>9}{'seconds':>9}"
        f"{'µs/removed':>11}{'µs/record':>10}{'B/record':>10}  load"
    )
    for r in rows:
        per_removed = f"{r['us_per_removed']:.1f}" if r["us_per_removed"] else "-"
        print(
            f"{r['store']:<15}{r['how']:<21}{r['records']:>10,}{r['removed']:>9,}"
            f"{r['seconds']:>9.2f}{per_removed:>11}{r['us_per_record']:>10.2f}"
            f"{r['bytes_per_record']:>10,.0f}  {r['load']}"
        )
    print("\ncalls meanwhile, at the largest size: latency of the calls started during prune")
    print(
        f"{'store':<15}{'how':<21}{'call':<30}{'calls':>7}{'median ms':>10}{'p99 ms':>8}"
        f"{'max ms':>8}"
    )
    for r in rows:
        for what, d in r["during"].items():
            print(
                f"{r['store']:<15}{r['how']:<21}{what:<30}{d['calls']:>7}{d['median_ms']:>10.2f}"
                f"{d['p99_ms']:>8.1f}{d['max_ms']:>8.1f}"
            )
    return rows


SECTIONS = ("bytes", "cpu", "prune")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (the test suite's)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="bytes, cpu, prune")
    parser.add_argument("--sizes", help="prune's store sizes (default 1k,10k,100k,1M)")
    parser.add_argument("--stores", default=",".join(KINDS), help="prune's stores (all)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write results here")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := [s for s in chosen if s not in SECTIONS]:
        parser.error(f"--only: unknown section {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    if args.sizes:
        sizes = sorted(int(s.replace("_", "")) for s in args.sizes.split(","))
    else:
        sizes = [1_000, 3_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000]
    print(f"bench_sizing{' --quick' if args.quick else ''}: {os.cpu_count()} CPUs, load {load()}")
    report: dict[str, Any] = {"quick": args.quick, "cpus": os.cpu_count()}
    started = time.perf_counter()
    with servers() as where:
        if "bytes" in chosen:
            report["bytes"] = bytes_section(where, 300 if args.quick else 20_000)
        if "cpu" in chosen:
            report["cpu"] = cpu_section(where, 500 if args.quick else 20_000)
        if "prune" in chosen:
            report["prune"] = prune_section(where, sizes, args.stores.split(","))
    report["seconds"] = time.perf_counter() - started
    print(f"\nbench_sizing done in {report['seconds']:.1f} s; load {load()}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
