#!/usr/bin/env python
"""idemfn against its peers, measured side by side in one run on one machine.

    python benchmarks/compare.py                    # full run, a few minutes
    python benchmarks/compare.py --quick            # short run (the test suite runs it)
    python benchmarks/compare.py --out /tmp/cmp    # elsewhere than benchmarks/figures/

Installs nothing: every peer that imports is measured, the others are listed as missing
(``pip install 'idemfn[bench]'`` installs them all). It starts its own ``redis-server`` and
PostgreSQL cluster, as ``bench_stores.py`` does, and skips those groups when they are absent.

- **Latency**: replay (a recorded small dict) and first call (a no-op body, a new key each
  call) of idemfn's ``DiskStore`` against ``Cache.memoize``, ``joblib.Memory``, ``cachier``
  (pickle core) and ``functools.lru_cache``; idemfn's ``RedisStore`` against AWS Lambda
  Powertools' ``idempotent_function`` with its Redis persistence layer on the same server; and
  each store against the floor of its protocol, as in ``bench_stores.py`` (issue 18): a replay
  is one raw read of the bytes the store holds (``Cache.get``, ``GET``, a ``SELECT`` by primary
  key), a first call two raw writes (``Cache.add`` + ``Cache.set``, ``SET NX`` + ``SET``, an
  autocommit ``INSERT`` + ``UPDATE`` on a table like the store's). Each group is measured in
  interleaved rounds (the order rotates every round, so machine noise hits every system),
  after a calibration and a warm-up round; the table gives medians and ratios to the floor.
- **Concurrency**: 1, 2, 4 and 8 processes calling distinct keys, then the same hot keys (a
  body of 5 ms, so calls overlap): calls per second, and *duplicate executions*: bodies run
  for a key that had already been run (by any process). Peers without in-flight deduplication
  show them; idemfn must show none.
- **Scaling**: idemfn's replay with 1k, 100k and 1M records in the store (``--quick``: 1k,
  10k), and with results of 100 B, 100 kB and 10 MB, against ``Cache.get`` (see
  ``bench_scale.py``, whose code this reuses).

Writes ``compare.md`` (the tables), ``compare.csv`` (one row per figure) and ``compare.png``
(matplotlib, when it imports) to ``--out``. Targets are checked and printed, never asserted.
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.util
import multiprocessing
import os
import queue
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diskcache

from idemfn import DiskStore, idempotent

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core  # the timing harness: calibrate, timed_round, machine_info
import bench_scale  # a store grown to a million records
from bench_stores import (  # the floors' settings and statements, and the servers
    CACHE_SETTINGS,
    PG_INSERT,
    PG_SELECT,
    PG_UPDATE,
    TARGETS,
    TTL,
    load,
    postgres_server,
    prepare_floors,
    redis_server,
)

SMALL = {"a": 1, "b": 2, "c": 3}
POOL = 64  # replays cycle over this many recorded arguments, the same for every system
Runner = Callable[[int], int]  # runs n calls, returns the nanoseconds they took


def _loop(fn: Callable[[Any], Any], args: list[Any]) -> int:
    t0 = time.perf_counter_ns()
    for a in args:
        fn(a)
    return time.perf_counter_ns() - t0


def _cycled(n: int) -> list[int]:
    return [i % POOL for i in range(n)]


_fresh = iter(range(10**12))


def _fresh_args(n: int) -> list[int]:
    """Arguments never used before: every call with them is a first call."""
    return [POOL + next(_fresh) for _ in range(n)]


#: The floors' names: a replay's one raw read / a first call's two raw writes.
DISK_FLOOR = "raw diskcache get / add+set"
REDIS_FLOOR = "raw redis GET / SET NX+SET"
PG_FLOOR = "raw SELECT / INSERT+UPDATE"


@dataclass
class System:
    """One system's replay and first call in a group; ``floor`` marks the group's baseline."""

    name: str
    replay: Runner
    first: Runner
    floor: bool = False
    rounds: dict[str, list[float]] = field(default_factory=lambda: {"replay": [], "first": []})

    def us(self, what: str) -> float:
        return statistics.median(self.rounds[what]) / 1000


def measure_group(systems: list[System], rounds: int, round_ns: float) -> None:
    """Interleaved rounds: each round times every system once, in an order that rotates."""
    for what in ("replay", "first"):
        runs = [(s, getattr(s, what)) for s in systems]
        sizes = [bench_core.calibrate(run, round_ns) for _, run in runs]
        for (_, run), n in zip(runs, sizes, strict=True):
            bench_core.timed_round(run, n)  # warm-up
        for r in range(rounds):
            k = r % len(runs)
            for (system, run), n in zip(runs[k:] + runs[:k], sizes[k:] + sizes[:k], strict=True):
                system.rounds[what].append(bench_core.timed_round(run, n))


# --------------------------------------------------------------------------------------------
# The systems. Each recorded body counts its runs: a replay that runs the body is an error.


def _counted(counter: Counter[str], name: str, value: Any = None) -> Callable[[int], Any]:
    def body(i: int) -> Any:
        counter[name] += 1
        return dict(SMALL) if value is None else value

    body.__name__ = body.__qualname__ = f"body_{name.replace(' ', '_').replace('.', '_')}"
    return body


def _pair(
    name: str,
    replay_fn: Callable[[int], Any],
    first_fn: Callable[[int], Any],
    counter: Counter[str],
    key: str,
) -> System:
    for i in range(POOL):  # record the replayed arguments
        replay_fn(i)
    runs = counter[key]

    def replay(n: int) -> int:
        elapsed = _loop(replay_fn, _cycled(n))
        if counter[key] != runs:
            raise AssertionError(f"{name}: a replay ran the body")
        return elapsed

    return System(name, replay, lambda n: _loop(first_fn, _fresh_args(n)))


def local_systems(root: Path, missing: list[str]) -> list[System]:
    counter: Counter[str] = Counter()
    settings = {"eviction_policy": "none", "statistics": False, "timeout": 60.0}
    raw = diskcache.Cache(str(root / "raw"), **CACHE_SETTINGS)
    store = DiskStore(root / "idemfn")
    systems: list[System] = []

    replayed = idempotent(key="r:{i}", store=store, name="cmp.replay")(_counted(counter, "idemfn"))
    first = idempotent(key="f:{i}", store=store, name="cmp.first")(lambda i: None)
    idemfn_disk = _pair("idemfn DiskStore", replayed, first, counter, "idemfn")
    # The floor: the same stored bytes, got raw; a first call's two writes of a record's bytes.
    keys = [replayed.key_for(i) for i in range(POOL)]
    for key in keys:
        raw.set(key, store.cache.get(key), expire=TTL)
    record = store.cache.get(keys[0])

    def raw_first(n: int) -> int:
        names = [f"raw:{i}" for i in _fresh_args(n)]
        t0 = time.perf_counter_ns()
        for k in names:
            raw.add(k, record, expire=TTL)
            raw.set(k, record, expire=TTL)
        return time.perf_counter_ns() - t0

    systems.append(
        System(
            DISK_FLOOR,
            lambda n: _loop(raw.get, [keys[i] for i in _cycled(n)]),
            raw_first,
            floor=True,
        )
    )
    systems.append(idemfn_disk)

    memo = diskcache.Cache(str(root / "memoize"), **settings)
    systems.append(
        _pair(
            "diskcache memoize",
            memo.memoize()(_counted(counter, "memoize")),
            memo.memoize()(lambda i: None),
            counter,
            "memoize",
        )
    )
    if importlib.util.find_spec("joblib"):
        import joblib

        memory = joblib.Memory(str(root / "joblib"), verbose=0)
        systems.append(
            _pair(
                "joblib.Memory",
                memory.cache(_counted(counter, "joblib")),
                memory.cache(_noop_joblib),
                counter,
                "joblib",
            )
        )
    else:
        missing.append("joblib")
    if importlib.util.find_spec("cachier"):
        from cachier import cachier

        cached = cachier(backend="pickle", cache_dir=str(root / "cachier"), separate_files=True)
        systems.append(
            _pair(
                "cachier (pickle)",
                cached(_counted(counter, "cachier")),
                cached(_noop_cachier),
                counter,
                "cachier",
            )
        )
    else:
        missing.append("cachier")
    systems.append(
        _pair(
            "functools.lru_cache",
            functools.lru_cache(maxsize=None)(_counted(counter, "lru")),
            functools.lru_cache(maxsize=None)(lambda i: None),
            counter,
            "lru",
        )
    )
    return systems


def _noop_joblib(i: int) -> None:
    return None


def _noop_cachier(i: int) -> None:
    return None


def redis_systems(url: str, missing: list[str]) -> list[System]:
    import redis

    from idemfn import RedisStore

    counter: Counter[str] = Counter()
    client = redis.Redis.from_url(url)
    prefix = f"cmp:{uuid.uuid4().hex}:"
    store = RedisStore(client, prefix=prefix)
    replayed = idempotent(key="r:{i}", store=store, name="cmp.replay")(_counted(counter, "idemfn"))
    first = idempotent(key="f:{i}", store=store, name="cmp.first")(lambda i: None)
    ours = _pair("idemfn RedisStore", replayed, first, counter, "idemfn")
    # The floor reads and writes as many bytes as the store holds for one record (its hash's
    # fields, as one string), with the record's expiry.
    held = prefix + replayed.key_for(0)
    stored: Any = (
        client.hgetall(held).values() if client.type(held) == b"hash" else [client.get(held)]
    )
    value = b"".join(stored)
    assert value, f"no record under {held!r}"
    px = int(TTL * 1000)
    raw_keys = [f"{prefix}raw:{i}".encode() for i in range(POOL)]
    for key in raw_keys:
        client.set(key, value, px=px)

    def raw_first(n: int) -> int:
        names = [f"{prefix}rawf:{i}" for i in _fresh_args(n)]
        t0 = time.perf_counter_ns()
        for k in names:
            client.set(k, value, nx=True, px=px)
            client.set(k, value, px=px)
        return time.perf_counter_ns() - t0

    systems = [
        System(
            REDIS_FLOOR,
            lambda n: _loop(client.get, [raw_keys[i] for i in _cycled(n)]),
            raw_first,
            floor=True,
        ),
        ours,
    ]
    powertools = powertools_functions(client, counter)
    if powertools is None:
        missing.append("aws-lambda-powertools")
    else:
        replay_pt, first_pt = powertools
        systems.append(_pair("Powertools (Redis)", replay_pt, first_pt, counter, "powertools"))
    return systems


def powertools_functions(client: Any, counter: Counter[str]) -> tuple[Any, Any] | None:
    try:
        import warnings

        warnings.filterwarnings("ignore", module="aws_lambda_powertools")
        from aws_lambda_powertools.utilities.idempotency import (
            IdempotencyConfig,
            idempotent_function,
        )
        from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
            RedisCachePersistenceLayer,
        )
    except ImportError:
        return None
    layer = RedisCachePersistenceLayer(client=client)
    config = IdempotencyConfig(expires_after_seconds=86400)

    @idempotent_function(data_keyword_argument="order", persistence_store=layer, config=config)
    def replayed(order: dict[str, int]) -> dict[str, int]:
        counter["powertools"] += 1
        return dict(SMALL)

    @idempotent_function(data_keyword_argument="order", persistence_store=layer, config=config)
    def first(order: dict[str, int]) -> None:
        return None

    run_id = random.getrandbits(48)  # keys of earlier runs on a kept server stay apart
    return (
        lambda i: replayed(order={"run": run_id, "id": i}),
        lambda i: first(order={"run": run_id, "id": i}),
    )


#: Rows each PostgreSQL table holds before timing (the store's, the floor's), then ANALYZEd.
#: Without them autovacuum analyzes both tables a minute after they were made, while they hold
#: the 64 replayed rows (during the local and Redis groups): the planner then caches generic
#: plans that scan the whole table for a key (one page: cheaper than the index), and keeps
#: them as the first calls grow the table to thousands of rows, every lookup slower
#: than the last. A store in use holds more than 64 records and is analyzed as such.
PG_FILL = 10_000


def postgres_systems(dsn: str) -> list[System]:
    import psycopg

    from idemfn import PostgresStore

    counter: Counter[str] = Counter()
    store = PostgresStore(dsn, table=f"cmp_idemfn_{uuid.uuid4().hex}")
    replayed = idempotent(key="r:{i}", store=store, name="cmp.replay")(_counted(counter, "idemfn"))
    first = idempotent(key="f:{i}", store=store, name="cmp.first")(lambda i: None)
    ours = _pair("idemfn PostgresStore", replayed, first, counter, "idemfn")
    # The floor: a table LIKE the store's (bench_stores.py's "raw"), holding the store's own
    # row of a recorded call; one connection in autocommit.
    prepare_floors(dsn, store.table)
    conn = psycopg.connect(dsn, autocommit=True)
    row = conn.execute(
        f'SELECT live, token, expires_at, drop_at, entry FROM "{store.table}" WHERE key = %s',
        (replayed.key_for(0),),
    ).fetchone()
    assert row is not None, "the store holds no record of the replayed call"
    live, token, expires_at, drop_at, entry = row
    for i in range(POOL):
        conn.execute(PG_INSERT, (f"raw:{i}", *row))
    for table in (store.table, "raw"):
        conn.execute(
            f'INSERT INTO "{table}" (key, live, token, expires_at, drop_at, entry)'
            " SELECT 'fill:' || g, %s, %s, %s, %s, %s FROM generate_series(1, %s) g",
            (*row, PG_FILL),
        )
        conn.execute(f'ANALYZE "{table}"')

    def raw_replay(n: int) -> int:
        return _loop(
            lambda k: conn.execute(PG_SELECT, (k,)).fetchone(), [f"raw:{i}" for i in _cycled(n)]
        )

    def raw_first(n: int) -> int:
        names = [f"rawf:{i}" for i in _fresh_args(n)]
        t0 = time.perf_counter_ns()
        for k in names:  # a claim's row (live, drop_at = expires_at), then the outcome's
            conn.execute(PG_INSERT, (k, token, token, expires_at, expires_at, entry))
            conn.execute(PG_UPDATE, (live, token, expires_at, drop_at, entry, k))
        return time.perf_counter_ns() - t0

    return [System(PG_FLOOR, raw_replay, raw_first, floor=True), ours]


# --------------------------------------------------------------------------------------------
# Concurrency: processes calling keys at once, counting every body that runs.

CONCURRENT_KEYS = 16
STALL_SECONDS = 60.0
BODY_SECONDS = 0.005


def _concurrent_function(
    system: str, where: dict[str, str], runs_file: str
) -> Callable[[str], Any]:
    """The decorated function a worker process calls (built in the worker, after fork)."""

    def body(key: str) -> dict[str, int]:
        fd = os.open(runs_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{key}\n".encode())
        finally:
            os.close(fd)
        time.sleep(BODY_SECONDS)
        return dict(SMALL)

    if system == "idemfn DiskStore":
        return idempotent(key="{key}", store=DiskStore(where["disk"]), wait=30)(body)
    if system == "idemfn RedisStore":
        from idemfn import RedisStore

        return idempotent(
            key="{key}", store=RedisStore(where["redis"], prefix=where["prefix"]), wait=30
        )(body)
    if system == "diskcache memoize":
        return diskcache.Cache(where["memoize"]).memoize()(body)
    if system == "joblib.Memory":
        import joblib

        return joblib.Memory(where["joblib"], verbose=0).cache(body)
    if system == "cachier (pickle)":
        from cachier import cachier

        # Its waiters wait for a calculation in flight; without a timeout they can wait forever.
        return cachier(
            backend="pickle",
            cache_dir=where["cachier"],
            separate_files=True,
            wait_for_calc_timeout=10,
        )(body)
    if system == "functools.lru_cache":
        return functools.lru_cache(maxsize=None)(body)
    if system == "Powertools (Redis)":
        import redis

        client = redis.Redis.from_url(where["redis"])
        made = powertools_functions(client, Counter())
        assert made is not None
        from aws_lambda_powertools.utilities.idempotency import (
            IdempotencyConfig,
            idempotent_function,
        )
        from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
            RedisCachePersistenceLayer,
        )

        decorated = idempotent_function(
            data_keyword_argument="order",
            persistence_store=RedisCachePersistenceLayer(client=client),
            config=IdempotencyConfig(expires_after_seconds=86400),
        )(lambda order: body(order["key"]))
        return lambda key: decorated(order={"key": key})
    raise AssertionError(system)


def _worker(
    system: str,
    where: dict[str, str],
    runs_file: str,
    keys: list[str],
    start_at: float,
    results: Any,
) -> None:
    fn = _concurrent_function(system, where, runs_file)
    calls = errors = 0
    time.sleep(max(0.0, start_at - time.time()))
    for key in keys:
        try:
            fn(key)
        except Exception:  # Powertools' IdempotencyAlreadyInProgressError, for one
            errors += 1
        calls += 1
    results.put((calls, errors))


@dataclass
class Concurrent:
    system: str
    processes: int
    mode: str  # "distinct" or "hot"
    calls_per_second: float
    duplicates: int
    errors: int
    stalled: bool = False  # processes still had not finished after STALL_SECONDS


def concurrency(
    systems: list[str], where: dict[str, str], root: Path, counts: list[int], calls_per_process: int
) -> list[Concurrent]:
    context = multiprocessing.get_context("fork")
    out = []
    for system in systems:
        for mode in ("distinct", "hot"):
            for processes in counts:
                run = uuid.uuid4().hex[:8]
                runs_file = str(root / f"runs-{run}")
                results = context.Queue()
                if mode == "hot":  # every process calls the same keys, in its own order
                    plans = [
                        random.Random(w).sample(
                            [f"{run}:hot:{k}" for k in range(CONCURRENT_KEYS)], CONCURRENT_KEYS
                        )
                        for w in range(processes)
                    ]
                    plans = [
                        (p * (calls_per_process // CONCURRENT_KEYS + 1))[:calls_per_process]
                        for p in plans
                    ]
                else:  # each process its own keys, each called twice (a first call, a replay)
                    plans = [
                        [f"{run}:{w}:{i // 2}" for i in range(calls_per_process)]
                        for w in range(processes)
                    ]
                start_at = time.time() + 0.5
                procs = [
                    context.Process(
                        target=_worker, args=(system, where, runs_file, plan, start_at, results)
                    )
                    for plan in plans
                ]
                for p in procs:
                    p.start()
                got = []
                give_up = start_at + STALL_SECONDS
                with suppress(queue.Empty):
                    for _ in procs:
                        got.append(results.get(timeout=max(0.1, give_up - time.time())))
                elapsed = time.time() - start_at
                for p in procs:  # a system that deadlocks is reported, not waited for
                    p.join(0.1 if len(got) < len(procs) else 30)
                    if p.is_alive():
                        p.kill()
                        p.join()
                stalled = len(got) < len(procs)
                executed = (
                    Counter(Path(runs_file).read_text().split())
                    if Path(runs_file).exists()
                    else Counter()
                )
                out.append(
                    Concurrent(
                        system,
                        processes,
                        mode,
                        sum(c for c, _ in got) / elapsed,
                        sum(n - 1 for n in executed.values()),
                        sum(e for _, e in got),
                        stalled,
                    )
                )
                print(
                    f"  {system:<40} {mode:<8} {processes} processes:"
                    f" {out[-1].calls_per_second:9.0f} calls/s, duplicates {out[-1].duplicates},"
                    f" errors {out[-1].errors}" + (" STALLED" if stalled else ""),
                    flush=True,
                )
    return out


# --------------------------------------------------------------------------------------------
# Scaling, the targets, and the output


def scaling(
    root: Path, sizes: tuple[int, ...], rounds: int, round_ns: float
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    scale = bench_scale.ScaleStore(root)
    try:
        for n in sizes:
            scale.fill(n)
            pair = bench_scale.scale_pairs(scale, n, seed=n)[0]  # hot keys, spread over all
            pair.measure(rounds, round_ns)
            rows.append(
                {
                    "what": "records",
                    "x": n,
                    "idemfn_us": pair.idemfn_us,
                    "baseline_us": pair.baseline_us,
                }
            )
            print(
                f"  {n:>9,} records: idemfn {pair.idemfn_us:7.1f} us, Cache.get"
                f" {pair.baseline_us:7.1f} us",
                flush=True,
            )
    finally:
        scale.store.close()
    store, pairs = bench_scale.result_size_pairs(root)
    try:
        for size, pair in pairs:
            pair.measure(max(3, rounds // 2), round_ns)
            rows.append(
                {
                    "what": "result bytes",
                    "x": size,
                    "idemfn_us": pair.idemfn_us,
                    "baseline_us": pair.baseline_us,
                }
            )
            print(
                f"  {size:>9,} B result: idemfn {pair.idemfn_us:9.1f} us, Cache.get"
                f" {pair.baseline_us:9.1f} us",
                flush=True,
            )
    finally:
        store.close()
    return rows


def _find(groups: list[list[System]], name: str) -> System | None:
    return next((s for g in groups for s in g if s.name == name), None)


def targets(
    groups: list[list[System]], concurrent: list[Concurrent]
) -> list[tuple[str, float, str, bool]]:
    """(what, measured ratio, target, met) for every target whose systems were measured."""
    checks: list[tuple[str, float, str, bool]] = []

    def ratio(a: str, b: str, what: str, limit: float, label: str) -> None:
        x, y = _find(groups, a), _find(groups, b)
        if x is not None and y is not None:
            value = x.us(what) / y.us(what)
            checks.append((label, value, f"<= {limit}x", value <= limit))

    # Each store against the floor of its protocol: issue 18's targets (bench_stores.py's).
    floors = {
        "DiskStore": (DISK_FLOOR, "raw Cache.get", "raw add+set"),
        "RedisStore": (REDIS_FLOOR, "raw GET", "raw SET NX+SET"),
        "PostgresStore": (PG_FLOOR, "raw SELECT", "raw INSERT+UPDATE"),
    }
    for store, (floor, read, writes) in floors.items():
        replay_limit, first_limit = TARGETS[store]
        ratio(f"idemfn {store}", floor, "replay", replay_limit, f"{store} replay / {read}")
        ratio(f"idemfn {store}", floor, "first", first_limit, f"{store} first call / {writes}")
    ratio(
        "idemfn RedisStore",
        "Powertools (Redis)",
        "replay",
        0.4,
        "RedisStore replay / Powertools replay",
    )
    ratio(
        "idemfn RedisStore",
        "Powertools (Redis)",
        "first",
        0.8,
        "RedisStore first call / Powertools first call",
    )
    ratio(
        "idemfn DiskStore",
        "diskcache memoize",
        "replay",
        0.6,
        "DiskStore replay / diskcache memoize hit",
    )
    ratio("idemfn DiskStore", "joblib.Memory", "replay", 0.2, "DiskStore replay / joblib hit")
    ratio("idemfn DiskStore", "cachier (pickle)", "replay", 0.2, "DiskStore replay / cachier hit")
    ours = [c for c in concurrent if c.system.startswith("idemfn")]
    if ours:
        worst = max(c.duplicates for c in ours)
        checks.append(
            ("idemfn duplicate executions, any concurrency", float(worst), "== 0", worst == 0)
        )
    return checks


def latency_table(groups: list[list[System]]) -> list[str]:
    lines = [
        "| system | replay µs | x floor | first call µs | x floor |",
        "|---|---:|---:|---:|---:|",
    ]
    for group in groups:
        floor = next(s for s in group if s.floor)
        for s in group:
            lines.append(
                f"| {s.name} | {s.us('replay'):,.1f} | {s.us('replay') / floor.us('replay'):.2f}x"
                f" | {s.us('first'):,.1f} | {s.us('first') / floor.us('first'):.2f}x |"
            )
    return lines


def concurrency_table(concurrent: list[Concurrent], counts: list[int]) -> list[str]:
    head = " | ".join(f"{p} proc" for p in counts)
    lines = [f"| system | keys | {head} |", "|---|---|" + "---:|" * len(counts)]
    by = {(c.system, c.mode, c.processes): c for c in concurrent}
    for system in dict.fromkeys(c.system for c in concurrent):
        for mode in ("distinct", "hot"):
            cells = []
            for p in counts:
                c = by[(system, mode, p)]
                if c.stalled:
                    cells.append(f"**stalled** after {STALL_SECONDS:.0f} s")
                    continue
                dup = f", **{c.duplicates} dup**" if c.duplicates else ""
                err = f", {c.errors} err" if c.errors else ""
                cells.append(f"{c.calls_per_second:,.0f}/s{dup}{err}")
            lines.append(f"| {system} | {mode} | " + " | ".join(cells) + " |")
    return lines


def write_csv(
    path: Path,
    groups: list[list[System]],
    concurrent: list[Concurrent],
    scale: list[dict[str, Any]],
) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["section", "system", "measure", "x", "value", "unit", "floor_value"])
        for group in groups:
            floor = next(s for s in group if s.floor)
            for s in group:
                for what in ("replay", "first"):
                    out.writerow(
                        [
                            "latency",
                            s.name,
                            what,
                            "",
                            f"{s.us(what):.3f}",
                            "us",
                            f"{floor.us(what):.3f}",
                        ]
                    )
        for c in concurrent:
            out.writerow(
                [
                    "concurrency",
                    c.system,
                    f"{c.mode} calls/s",
                    c.processes,
                    f"{c.calls_per_second:.1f}",
                    "calls/s",
                    "",
                ]
            )
            out.writerow(
                [
                    "concurrency",
                    c.system,
                    f"{c.mode} duplicates",
                    c.processes,
                    c.duplicates,
                    "bodies",
                    "",
                ]
            )
        for row in scale:
            out.writerow(
                [
                    "scaling",
                    "idemfn DiskStore",
                    f"replay by {row['what']}",
                    row["x"],
                    f"{row['idemfn_us']:.3f}",
                    "us",
                    f"{row['baseline_us']:.3f}",
                ]
            )


def plot(
    path: Path,
    groups: list[list[System]],
    concurrent: list[Concurrent],
    scale: list[dict[str, Any]],
    title: str,
) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(18, 6.5))
    systems = [s for g in groups for s in g]
    names = [s.name for s in systems]
    y = range(len(systems))
    ax = axes[0]
    ax.barh([i + 0.2 for i in y], [s.us("replay") for s in systems], 0.4, label="replay")
    ax.barh([i - 0.2 for i in y], [s.us("first") for s in systems], 0.4, label="first call")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("µs per call (log scale, lower is better)")
    ax.set_title("Latency")
    ax.legend()
    ax = axes[1]
    for system in dict.fromkeys(c.system for c in concurrent):
        hot = sorted(
            (c for c in concurrent if c.system == system and c.mode == "hot"),
            key=lambda c: c.processes,
        )
        label = system + (
            f" ({max(c.duplicates for c in hot)} dup)" if any(c.duplicates for c in hot) else ""
        )
        ax.plot(
            [c.processes for c in hot], [c.calls_per_second for c in hot], marker="o", label=label
        )
    ax.set_xlabel("processes calling the same hot keys")
    ax.set_ylabel("calls per second")
    ax.set_yscale("log")
    ax.set_title("Concurrency (duplicate executions in the legend)")
    ax.legend(fontsize=7)
    ax = axes[2]
    records = [r for r in scale if r["what"] == "records"]
    if records:
        ax.plot(
            [r["x"] for r in records],
            [r["idemfn_us"] for r in records],
            marker="o",
            label="idemfn DiskStore replay",
        )
        ax.plot(
            [r["x"] for r in records],
            [r["baseline_us"] for r in records],
            marker="o",
            label="raw Cache.get",
        )
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
    ax.set_xlabel("records in the store")
    ax.set_ylabel("µs per replay")
    ax.set_title("Scaling")
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


@contextmanager
def _servers(root: Path, skip: set[str]) -> Iterator[dict[str, str | None]]:
    urls: dict[str, str | None] = {"redis": None, "postgres": None}
    with ExitStack() as stack:
        if "redis" not in skip and importlib.util.find_spec("redis"):
            with suppress(SystemExit):
                urls["redis"] = stack.enter_context(redis_server(root))
        if "postgres" not in skip and importlib.util.find_spec("psycopg"):
            with suppress(SystemExit):
                urls["postgres"] = stack.enter_context(postgres_server())
        yield urls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (the test suite)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "figures",
        help="where compare.md, compare.csv and compare.png go",
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated: redis,postgres,concurrency,scaling"
    )
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    rounds = 5 if args.quick else 11
    round_ns = 1e9 * (0.02 if args.quick else 0.2)
    counts = [1, 2] if args.quick else [1, 2, 4, 8]
    calls_per_process = 40 if args.quick else 400
    sizes = (1_000, 10_000) if args.quick else (1_000, 100_000, 1_000_000)
    bench_scale.RESULT_SIZES = (100, 100_000) if args.quick else (100, 100_000, 10_000_000)
    info = bench_core.machine_info()
    versions = {
        name: _version(name)
        for name in ("diskcache", "joblib", "cachier", "aws-lambda-powertools", "redis", "psycopg")
    }
    print("idemfn against its peers" + (" (--quick)" if args.quick else ""))
    print("  " + ", ".join(f"{k} {v}" for k, v in {**info, **versions}.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    missing: list[str] = []
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="idemfn-compare-") as tmp,
        _servers(Path(tmp), skip) as urls,
    ):
        root = Path(tmp)
        groups = [local_systems(root, missing)]
        if urls["redis"]:
            groups.append(redis_systems(urls["redis"], missing))
        else:
            missing.append("redis-server")
        if urls["postgres"]:
            groups.append(postgres_systems(urls["postgres"]))
        else:
            missing.append("PostgreSQL")
        print("\nLatency (interleaved rounds)...", flush=True)
        latency_load = f"load average {load()} before"
        for group in groups:
            measure_group(group, rounds, round_ns)
            print(f"  {group[0].name}'s group: load average {load()}", flush=True)
        latency_load += f", {load()} after"
        concurrent: list[Concurrent] = []
        if "concurrency" not in skip:
            print("\nConcurrency...", flush=True)
            where = {
                "disk": str(root / "c-disk"),
                "memoize": str(root / "c-memoize"),
                "joblib": str(root / "c-joblib"),
                "cachier": str(root / "c-cachier"),
                "redis": urls["redis"] or "",
                "prefix": f"c:{uuid.uuid4().hex}:",
            }
            names = [s.name for s in groups[0] if not s.floor]
            if urls["redis"]:
                names += [s.name for s in groups[1] if not s.floor]
            concurrent = concurrency(names, where, root, counts, calls_per_process)
        scale: list[dict[str, Any]] = []
        if "scaling" not in skip:
            print("\nScaling...", flush=True)
            scale = scaling(root, sizes, rounds, round_ns)

    cores, python = info.get("cpu_count", "?"), info.get("python", "?")
    stamp = f"{time.strftime('%Y-%m-%d')}, {cores} cores, Python {python}"
    lines = [
        f"Measured {stamp}; " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
        "",
        f"Latency: µs per call, medians of {rounds} interleaved rounds ({latency_load});"
        " each group's first system is its floor (a replay: one raw read of the store's bytes;"
        " a first call: two raw writes).",
        "",
        *latency_table(groups),
        "",
    ]
    if concurrent:
        lines += [
            f"Concurrency: calls per second with a {BODY_SECONDS * 1000:.0f} ms body, and"
            " duplicate executions (**dup**: bodies run again for a key already run).",
            "",
            *concurrency_table(concurrent, counts),
            "",
        ]
    if scale:
        lines += [
            "| replay of idemfn DiskStore | x | idemfn µs | Cache.get µs |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| by {r['what']} | {r['x']:,} | {r['idemfn_us']:,.1f} | {r['baseline_us']:,.1f} |"
            for r in scale
        ]
        lines.append("")
    checks = targets(groups, concurrent)
    lines += ["| target | measured | target | met |", "|---|---:|---|---|"]
    lines += [
        f"| {what} | {value:.2f} | {limit} | {'yes' if ok else '**no**'} |"
        for what, value, limit, ok in checks
    ]
    if missing:
        lines += ["", "Not measured (not installed): " + ", ".join(missing) + "."]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    (args.out / "compare.md").write_text(table)
    write_csv(args.out / "compare.csv", groups, concurrent, scale)
    drawn = plot(
        args.out / "compare.png", groups, concurrent, scale, f"idemfn and its peers ({stamp})"
    )
    print(
        f"wrote {args.out / 'compare.md'}, {args.out / 'compare.csv'}"
        + (f", {args.out / 'compare.png'}" if drawn else " (no plot: matplotlib is missing)")
    )
    met = sum(ok for *_, ok in checks)
    print(f"targets met: {met}/{len(checks)}; done in {time.perf_counter() - started:.0f} s")
    return 0


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
