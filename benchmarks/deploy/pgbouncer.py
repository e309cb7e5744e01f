"""PostgresStore through PgBouncer in transaction pooling mode, against direct connections to
the same server (issue 19).

One PostgreSQL cluster and one PgBouncer in front of it (``tests/support``'s starters: unix
sockets, ``pool_mode = transaction``, ``default_pool_size`` 8, as many server connections as the
most processes measured). Three systems, each on its own table (or keys):

- ``direct``: ``PostgresStore(dsn)``, straight to the server;
- ``pgbouncer``: ``PostgresStore(bouncer_dsn, transaction_pooling=True)``;
- ``raw pgbouncer``: psycopg through PgBouncer (``prepare_threshold=None``, autocommit), the
  statements a replay and a first call need at least: one ``SELECT`` by key; an ``INSERT``
  then an ``UPDATE`` (``benchmarks/bench_stores.py``'s floor, on the store's own bytes).

Latency: µs per sync call, median and best of rounds of each row in a rotating order (on a
shared machine the best round is the one least disturbed by other processes). Throughput: calls/s
summed over 1, 2, 4 and 8 processes on distinct keys, started together. Nothing is asserted on
time; the figures are ratios measured in the same run, with the load printed beside them.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from multiprocessing.connection import Connection
from typing import Any

from benchmarks.bench_stores import PG_INSERT, PG_SELECT, PG_UPDATE, per_call, serve, spread
from benchmarks.deploy import load

SYSTEMS = ("direct", "pgbouncer", "raw pgbouncer")
WHATS = ("replay", "first call")
POOL_SIZE = 8


def small(i: object) -> dict[str, object]:
    """The decorated body: a small dict, as a typical result (bench_stores.py's)."""
    return {"i": i, "ok": True, "n": 3}


@dataclass
class Where:
    dsn: str  # the server, directly
    bouncer_dsn: str  # through PgBouncer
    direct_table: str
    bounced_table: str
    raw_table: str
    row: tuple[Any, ...]  # a finished record's row (live, token, expires_at, drop_at, entry)


class Calls:
    """One process's callables: (system, what) -> a call; ``prefix`` keeps its keys apart."""

    def __init__(self, where: Where, prefix: str) -> None:
        import psycopg

        from idemfn import PostgresStore, idempotent

        self.stores = [
            PostgresStore(where.dsn, table=where.direct_table),
            PostgresStore(where.bouncer_dsn, table=where.bounced_table, transaction_pooling=True),
        ]
        self.raw = psycopg.connect(where.bouncer_dsn, autocommit=True, prepare_threshold=None)
        self.calls: dict[tuple[str, str], Callable[[], object]] = {}
        for system, store in zip(SYSTEMS, self.stores, strict=False):
            fn = idempotent(key="{i}", store=store, name="bench")(small)
            fn(prefix)  # the replays' record
            keys = (f"{prefix}:{i}" for i in count())
            self.calls[system, "replay"] = lambda fn=fn: fn(prefix)
            self.calls[system, "first call"] = lambda fn=fn, keys=keys: fn(next(keys))
        raw, table = self.raw, where.raw_table
        select, insert = PG_SELECT.replace("raw", table), PG_INSERT.replace("raw", table)
        update = PG_UPDATE.replace("raw", table)
        live, token, expires_at, drop_at, entry = where.row
        raw.execute(insert, (prefix, *where.row))
        raw_keys = (f"{prefix}:{i}" for i in count())

        def raw_first() -> object:
            k = next(raw_keys)
            raw.execute(insert, (k, token, token, expires_at, expires_at, entry))
            return raw.execute(update, (live, token, expires_at, drop_at, entry, k))

        self.calls["raw pgbouncer", "replay"] = lambda: raw.execute(select, (prefix,)).fetchone()
        self.calls["raw pgbouncer", "first call"] = raw_first
        for call in self.calls.values():
            call()  # connections opened

    def close(self) -> None:
        for store in self.stores:
            store.close()
        self.raw.close()


def _worker(where: Where, prefix: str, pipe: Connection) -> None:
    """A throughput process: runs each ((system, what), start, seconds) it is sent from
    ``start`` (``time.monotonic``, one clock for every process) and sends back its calls/s."""
    try:
        calls = Calls(where, prefix)
    except BaseException as exc:
        pipe.send(f"failed: {exc!r}")
        raise
    pipe.send("ready")
    serve(pipe, calls.calls)
    calls.close()


def _setup(dsn: str) -> Where:
    """The three tables, and a finished record's row for the raw floor."""
    import psycopg

    from idemfn import PostgresStore, idempotent

    tables = [f"bench_{uuid.uuid4().hex[:12]}" for _ in range(3)]
    store = PostgresStore(dsn, table=tables[0])
    idempotent(key="{i}", store=store, name="setup")(small)("row")
    store.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            f'SELECT live, token, expires_at, drop_at, entry FROM "{tables[0]}"'
        ).fetchone()
        assert row is not None
        conn.execute(f'CREATE TABLE "{tables[2]}" (LIKE "{tables[0]}" INCLUDING ALL)')
        conn.execute(f'DELETE FROM "{tables[0]}"')
    return Where(dsn, "", tables[0], tables[1], tables[2], tuple(row))


def _latency(where: Where, rounds: int, seconds: float) -> dict[tuple[str, str], list[float]]:
    calls = Calls(where, "lat")
    points = [(s, w) for w in WHATS for s in SYSTEMS]
    times: dict[tuple[str, str], list[float]] = {p: [] for p in points}
    for point in points:  # warm-up
        per_call(calls.calls[point], seconds / 5)
    for r in range(rounds):
        shift = r % len(points)
        for point in points[shift:] + points[:shift]:
            times[point].append(per_call(calls.calls[point], seconds))
    calls.close()
    return times


def _throughput(
    where: Where, counts: list[int], rounds: int, seconds: float
) -> dict[tuple[str, str, int], list[float]]:
    context = multiprocessing.get_context("spawn")  # nothing of this process's connections
    pipes, procs = [], []
    for wid in range(max(counts)):
        ours, theirs = context.Pipe()
        proc = context.Process(target=_worker, args=(where, f"w{wid}", theirs), daemon=True)
        proc.start()
        pipes.append(ours)
        procs.append(proc)
    try:
        for pipe in pipes:
            answer = pipe.recv()
            if answer != "ready":
                raise RuntimeError(f"a throughput process could not start: {answer}")
        rates: dict[tuple[str, str, int], list[float]] = {}
        points = [(s, w, n) for n in counts for w in WHATS for s in SYSTEMS]
        for r in range(rounds):
            shift = r % len(points)
            for system, what, n in points[shift:] + points[:shift]:
                start = time.monotonic() + 0.05
                for pipe in pipes[:n]:
                    pipe.send(((system, what), start, seconds))
                rates.setdefault((system, what, n), []).append(
                    sum(pipe.recv() for pipe in pipes[:n])
                )
        return rates
    finally:
        for pipe in pipes:
            pipe.send(None)
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


def run(quick: bool) -> list[str]:
    """Measure, print the tables, and return their rows."""
    from tests.support.deployments.pgbouncer import PgBouncer
    from tests.support.servers import PostgresServer

    rounds, seconds = (3, 0.04) if quick else (11, 0.25)
    t_rounds, t_seconds = (1, 0.05) if quick else (3, 0.5)
    counts = [1, 2, 4, 8]
    server = PostgresServer()
    try:
        bouncer = PgBouncer(server, pool_size=POOL_SIZE)
        try:
            where = _setup(server.dsn)
            where.bouncer_dsn = bouncer.dsn
            before = load()
            started = time.monotonic()
            latency = _latency(where, rounds, seconds)
            out = [
                f"latency, µs per sync call: median of {rounds} rounds of ~{seconds} s, rows"
                f" interleaved; load {before} before, {load()} after"
                f" ({time.monotonic() - started:.0f} s)",
                f"{'call':<12}{'system':<16}{'µs':>8}{'spread':>11}{'x direct':>10}"
                f"{'x raw pgbouncer':>17}{'best µs':>9}{'x direct':>10}{'x raw':>7}",
            ]
            for what in WHATS:
                direct = statistics.median(latency["direct", what])
                raw = statistics.median(latency["raw pgbouncer", what])
                best_direct = min(latency["direct", what])
                best_raw = min(latency["raw pgbouncer", what])
                for system in SYSTEMS:
                    m, best = statistics.median(latency[system, what]), min(latency[system, what])
                    out.append(
                        f"{what:<12}{system:<16}{m:>8.1f}{spread(latency[system, what]):>11}"
                        f"{m / direct:>10.2f}{m / raw:>17.2f}{best:>9.1f}"
                        f"{best / best_direct:>10.2f}{best / best_raw:>7.2f}"
                    )
            before = load()
            started = time.monotonic()
            rates = _throughput(where, counts, t_rounds, t_seconds)
            out += [
                "",
                f"throughput, calls/s summed over processes on distinct keys: median of"
                f" {t_rounds} rounds of {t_seconds} s, points interleaved; PgBouncer's"
                f" default_pool_size {POOL_SIZE}; load {before} before, {load()} after"
                f" ({time.monotonic() - started:.0f} s)",
                f"{'call':<12}{'procs':>6}"
                + "".join(f"{s + '/s':>18}" for s in SYSTEMS)
                + f"{'pgb/direct':>12}{'pgb/raw':>9}",
            ]
            for what in WHATS:
                for n in counts:
                    m = {s: statistics.median(rates[s, what, n]) for s in SYSTEMS}
                    out.append(
                        f"{what:<12}{n:>6}"
                        + "".join(f"{m[s]:>18,.0f}" for s in SYSTEMS)
                        + f"{m['pgbouncer'] / m['direct']:>12.2f}"
                        f"{m['pgbouncer'] / m['raw pgbouncer']:>9.2f}"
                    )
        finally:
            bouncer.remove()
    finally:
        server.remove()
    for line in out:
        print(line, flush=True)
    return out
