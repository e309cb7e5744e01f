#!/usr/bin/env python
"""Replay and first-call latency of every store, side by side, against each backend's floor.

    python benchmarks/bench_stores.py            # starts its own redis-server and PostgreSQL
    python benchmarks/bench_stores.py --quick    # a short run
    python benchmarks/bench_stores.py --clock cpu --rounds 11   # this thread's CPU time

Each line is the median over rounds of microseconds per call; rounds of a store and of its
floor alternate, so machine noise hits both. Floors: a raw ``diskcache.Cache.get``/``add`` for
DiskStore, a raw redis-py ``GET``/``SET NX`` on the same server for RedisStore. RedisStore talks
to the server over a unix socket.

The async path's rows (event-loop lag, a stalled server, waiter wake-up) are in
``bench_async.py``, which starts these same servers.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import count
from pathlib import Path

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


def per_call(fn: Callable[[], object], seconds: float) -> float:
    """Microseconds per call of ``fn`` over about ``seconds`` (of ``clock``)."""
    n = 0
    gc.disable()
    start = clock()
    while True:
        for _ in range(50):
            fn()
        n += 50
        elapsed = clock() - start
        if elapsed >= seconds:
            gc.enable()
            return elapsed / n * 1e6


def measure(
    pairs: dict[str, tuple[Callable[[], object], Callable[[], object]]], rounds: int, seconds: float
) -> None:
    print(f"{'measure':<34}{'idemfn µs':>11}{'floor µs':>10}{'ratio':>8}")
    for name, (ours, floor) in pairs.items():
        a: list[float] = []
        b: list[float] = []
        ours(), floor()  # warm up
        for r in range(rounds):
            first, second = (ours, floor) if r % 2 == 0 else (floor, ours)
            x, y = per_call(first, seconds), per_call(second, seconds)
            a.append(x if r % 2 == 0 else y)
            b.append(y if r % 2 == 0 else x)
        ma, mb = statistics.median(a), statistics.median(b)
        floor_text = f"{mb:>10.1f}{ma / mb:>8.2f}" if mb > 0.05 else f"{'-':>10}{'-':>8}"
        print(f"{name:<34}{ma:>11.1f}{floor_text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--rounds", type=int, help="rounds per measure (default 7; --quick: 3)")
    args = parser.parse_args()
    rounds, seconds = (3, 0.05) if args.quick else (7, 0.3)
    rounds = args.rounds or rounds
    global clock
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    import psycopg
    import redis

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
        pg = psycopg.connect(dsn, autocommit=True)
        pg.execute("CREATE TABLE raw (key text PRIMARY KEY, value bytea)")
        pg.execute("INSERT INTO raw VALUES ('k', %s)", (b"x" * 64,))
        cache = diskcache.Cache(str(Path(tmp) / "raw"), eviction_policy="none")
        client = redis.Redis(unix_socket_path=url.removeprefix("unix://"))
        cache.set("k", b"x" * 64)
        client.set("k", b"x" * 64)
        fresh = count()
        floors_replay = {
            "MemoryStore": lambda: None,
            "DiskStore": lambda: cache.get("k"),
            "RedisStore": lambda: client.get("k"),
            "PostgresStore": lambda: pg.execute("SELECT value FROM raw WHERE key = 'k'").fetchone(),
        }
        floors_first = {
            "MemoryStore": lambda: None,
            "DiskStore": lambda: cache.add(f"f{next(fresh)}", b"x" * 64),
            "RedisStore": lambda: client.set(f"f{next(fresh)}", b"x" * 64, nx=True),
            "PostgresStore": lambda: pg.execute(
                "INSERT INTO raw VALUES (%s, %s) ON CONFLICT DO NOTHING", (f"f{next(fresh)}", b"x")
            ),
        }
        pairs: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {}
        for name, store in stores.items():
            fn = idempotent(key="{i}", store=store, name=f"bench.{name}")(lambda i: {"i": i})
            fn(0)
            keys = count(1)
            pairs[f"{name} replay"] = (lambda fn=fn: fn(0), floors_replay[name])
            pairs[f"{name} first call"] = (lambda fn=fn, k=keys: fn(next(k)), floors_first[name])
        measure(pairs, rounds, seconds)
        for store in stores.values():
            store.close()
        cache.close()
        pg.close()


if __name__ == "__main__":
    main()
