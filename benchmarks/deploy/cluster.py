"""``cluster``: a RedisStore on a three-primary Redis Cluster, against raw redis-py cluster calls.

The cluster is the test suite's (``tests/support/deployments/redis_cluster.py``), on this
machine: its three ``redis-server`` processes share the cores with the clients, so the figures
are ratios against floors measured in the same run, with the load printed beside them.

- latency, one process (timed on the wall clock, and in a full run on this thread's CPU time
  too: the client's own cost, steadier on a shared machine): a replay against one ``GET`` of
  the record's bytes, a first call against ``SET NX`` + ``SET`` of them, through a
  ``redis.cluster.RedisCluster`` (sync) and a ``redis.asyncio.cluster.RedisCluster`` (async)
  whose routing the store's commands take too.
  ``bench_stores.py``'s method: rounds that rotate, idemfn and floor alternating (A B, B A),
  medians.
- throughput: 1, 2, 4 and 8 processes at once, each on keys of its own, calls/s summed; every
  process's keys spread over the three nodes (each first call's key is new, and lands on any
  node), and each floor key lives in the slot of the idemfn record it stands for (a hash tag).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import count
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import bench_stores
from benchmarks.bench_stores import (
    Row,
    aper_call,
    asmall,
    per_call,
    serve,
    small,
    spread,
    timed_rounds,
)
from benchmarks.deploy import load
from idemfn import RedisStore, idempotent

if TYPE_CHECKING:
    from tests.support.deployments.redis_cluster import RedisClusterServers

PROCESSES = [1, 2, 4, 8]
TTL_MS = int(bench_stores.TTL * 1000)  # the floors' keys expire as the records do


def _tag(key: str) -> str:
    """A stored key whose Redis key lives in the slot of ``key`` (a hash tag)."""
    return f"{{{key}}}"


@dataclass
class Floors:
    """The raw cluster operations, on the bytes a finished record holds (its hash fields)."""

    value: bytes

    def replay(self, client: Any, key: str) -> Callable[[], object]:
        return lambda: client.get(key)

    def first(self, client: Any, prefix: str) -> Callable[[], object]:
        keys = (f"raw:{_tag(f'{prefix}{i}')}" for i in count())
        value = self.value

        def first() -> object:
            k = next(keys)
            client.set(k, value, nx=True, px=TTL_MS)
            return client.set(k, value, px=TTL_MS)

        return first

    def areplay(self, client: Any, key: str) -> Callable[[], Awaitable[object]]:
        async def get() -> object:
            return await client.get(key)

        return get

    def afirst(self, client: Any, prefix: str) -> Callable[[], Awaitable[object]]:
        keys = (f"raw:{_tag(f'{prefix}{i}')}" for i in count())
        value = self.value

        async def first() -> object:
            k = next(keys)
            await client.set(k, value, nx=True, px=TTL_MS)
            return await client.set(k, value, px=TTL_MS)

        return first


def _recorded(url: str, client: Any) -> Floors:
    """One recorded call's bytes (what a floor reads and writes)."""
    store = RedisStore(url, prefix="bench:")
    try:
        idempotent(key="{i}", store=store, name="bench.probe")(small)(_tag("probe"))
        fields = client.hgetall(f"bench:bench.probe:{_tag('probe')}")
        return Floors(b"".join(fields.values()))
    finally:
        store.close()


def _latency(
    url: str, servers: RedisClusterServers, rounds: int, seconds: float, clock: str
) -> list[str]:
    """The latency table, timed with ``clock``: "wall" (``perf_counter``), or "cpu" (this
    thread's CPU time: the client's own cost, which leaves out the nodes' time and the other
    processes of a shared machine)."""
    bench_stores.clock = time.thread_time if clock == "cpu" else time.perf_counter
    client = servers.client()
    floors = _recorded(url, client)
    store = RedisStore(url, prefix="bench:")
    runner = asyncio.Runner()
    aclient = servers.async_client()
    try:
        # Names and keys of this table's own: every first call's key is new.
        fn = idempotent(key="{i}", store=store, name=f"bench.sync.{clock}")(small)
        afn = idempotent(key="{i}", store=store, name=f"bench.async.{clock}")(asmall)
        fn(_tag("r"))
        runner.run(afn(_tag("r")))
        client.set(f"raw:{_tag('r')}", floors.value, px=TTL_MS)
        keys, akeys = count(), count()

        def timer(call: Callable[[], object]) -> Callable[[float], float]:
            return lambda s: per_call(call, s)

        def atimer(call: Callable[[], Awaitable[object]]) -> Callable[[float], float]:
            return lambda s: runner.run(aper_call(call, s))

        replay_key = f"raw:{_tag('r')}"
        rows = [
            Row(
                "cluster",
                "replay",
                "sync",
                timer(lambda: fn(_tag("r"))),
                timer(floors.replay(client, replay_key)),
            ),
            Row(
                "cluster",
                "first call",
                "sync",
                timer(lambda: fn(_tag(f"f{next(keys)}"))),
                timer(floors.first(client, f"rf.{clock}")),
            ),
            Row(
                "cluster",
                "replay",
                "async",
                atimer(lambda: afn(_tag("r"))),
                atimer(floors.areplay(aclient, replay_key)),
            ),
            Row(
                "cluster",
                "first call",
                "async",
                atimer(lambda: afn(_tag(f"f{next(akeys)}"))),
                atimer(floors.afirst(aclient, f"raf.{clock}")),
            ),
        ]
        before = load()
        started = time.monotonic()
        timed_rounds(rows, rounds, seconds)
        unit = "client CPU µs" if clock == "cpu" else "µs"
        lines = [
            f"latency, {unit} per call, one process: median of {rounds} rounds of ~{seconds} s"
            f" each, rows interleaved; load {before} before, {load()} after"
            f" ({time.monotonic() - started:.0f} s)",
            f"{'measure':<28}{'idemfn µs':>10}{'spread':>11}  {'floor (RedisCluster)':<22}"
            f"{'floor µs':>9}{'spread':>11}{'ratio':>7}",
        ]
        floor_names = {"replay": "GET", "first call": "SET NX + SET"}
        for row in rows:
            ours, floor = statistics.median(row.a), statistics.median(row.b)
            lines.append(
                f"{row.name:<28}{ours:>10.1f}{spread(row.a):>11}  {floor_names[row.what]:<22}"
                f"{floor:>9.1f}{spread(row.b):>11}{ours / floor:>7.2f}"
            )
        for line in lines:
            print(line, flush=True)
        return lines
    finally:
        bench_stores.clock = time.perf_counter
        runner.run(aclient.aclose())
        runner.close()
        store.close()
        client.close()


# -- throughput: worker processes (spawned once), each on keys of its own ------------------------


def _worker(wid: int, url: str, value: bytes, ports: list[int], conn: Connection) -> None:
    """A throughput process: runs each (system, start, seconds) it receives from ``start``
    until ``start + seconds`` (``time.monotonic``: one clock for every process) and sends
    back its calls/s."""
    try:
        from redis.cluster import ClusterNode, RedisCluster

        store = RedisStore(url, prefix="bench:")
        client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", port) for port in ports])
        floors = Floors(value)
        mine = f"w{wid}"
        fn = idempotent(key="{i}", store=store, name="tput")(small)
        fn(_tag(mine))
        client.set(f"raw:{_tag(mine)}", value, px=TTL_MS)
        keys = (_tag(f"{mine}:{i}") for i in count())
        runs: dict[tuple[str, str], Callable[[], object]] = {
            ("replay", "idemfn"): lambda: fn(_tag(mine)),
            ("first call", "idemfn"): lambda: fn(next(keys)),
            ("replay", "floor"): floors.replay(client, f"raw:{_tag(mine)}"),
            ("first call", "floor"): floors.first(client, f"t{mine}:"),
        }
        for run in runs.values():
            run()  # connections opened to every node a run reaches
        conn.send("ready")
    except BaseException as exc:
        conn.send(f"failed: {exc!r}")
        raise
    serve(conn, runs)
    store.close()
    client.close()


class _Workers:
    def __init__(self, n: int, url: str, value: bytes, ports: list[int]) -> None:
        # Forked (spawned where there is no fork): a spawned process imports idemfn and redis-py
        # again, 8 of them took 9 s on a busy 2-core machine. A worker opens its own store and
        # client after the fork, and uses nothing of this process's connections.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for wid in range(n):
            ours, theirs = context.Pipe()
            proc = context.Process(
                target=_worker, args=(wid, url, value, ports, theirs), daemon=True
            )
            proc.start()
            self.pipes.append(ours)
            self.procs.append(proc)
        for pipe in self.pipes:
            answer = pipe.recv()
            if answer != "ready":
                self.close()
                sys.exit(f"a throughput process could not start: {answer}")

    def rate(self, system: tuple[str, str], procs: int, seconds: float) -> float:
        """Total calls/s of ``procs`` processes running ``system`` at once."""
        start = time.monotonic() + 0.05
        for pipe in self.pipes[:procs]:
            pipe.send((system, start, seconds))
        return sum(pipe.recv() for pipe in self.pipes[:procs])

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except OSError:  # (a worker that failed)
                pass
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


def _throughput(url: str, servers: RedisClusterServers, rounds: int, seconds: float) -> list[str]:
    client = servers.client()
    try:
        value = _recorded(url, client).value
    finally:
        client.close()
    spawned = time.monotonic()
    workers = _Workers(max(PROCESSES), url, value, [node.port for node in servers.nodes])
    spawned = time.monotonic() - spawned
    before = load()
    started = time.monotonic()
    results: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    points = [(what, n) for n in PROCESSES for what in ("replay", "first call")]
    try:
        for r in range(rounds):
            for what, n in points[r % len(points) :] + points[: r % len(points)]:
                ours, floor = results.setdefault((what, n), ([], []))
                sides = [(ours, "idemfn"), (floor, "floor")]
                for into, side in sides if r % 2 == 0 else sides[::-1]:
                    into.append(workers.rate((what, side), n, seconds))
    finally:
        workers.close()
    lines = [
        f"throughput, calls/s summed over processes on keys of their own (spread over the 3"
        f" nodes): median of {rounds} rounds of {seconds} s per point, points interleaved; load"
        f" {before} before, {load()} after ({time.monotonic() - started:.0f} s, after"
        f" {spawned:.0f} s to start the processes); 3 redis-server nodes on the same cores",
        f"{'call':<12}{'procs':>6}{'idemfn/s':>10}{'floor':>16}{'floor/s':>10}{'ratio':>7}"
        f"{'x 1 proc':>10}",
    ]
    for what in ("replay", "first call"):
        one = None
        for n in PROCESSES:
            ours, floor = results[what, n]
            ma, mb = statistics.median(ours), statistics.median(floor)
            one = one or ma
            floor_name = "GET" if what == "replay" else "SET NX + SET"
            lines.append(
                f"{what:<12}{n:>6}{ma:>10,.0f}{floor_name:>16}{mb:>10,.0f}{ma / mb:>7.2f}"
                f"{ma / one:>10.2f}"
            )
    for line in lines:
        print(line, flush=True)
    return lines


def run(quick: bool) -> list[str]:
    """Start a cluster, measure, stop it; print the tables and return their lines."""
    rounds, seconds = (3, 0.04) if quick else (7, 0.25)
    t_rounds, t_seconds = (1, 0.1) if quick else (3, 0.5)
    # (Imported here: the throughput processes, which import this module, need no pytest.)
    from tests.support.deployments.redis_cluster import RedisClusterServers

    with tempfile.TemporaryDirectory(prefix="idemfn-bench-cluster-") as tmp:
        started = time.monotonic()
        servers = RedisClusterServers(Path(tmp))
        try:
            print(
                f"a Redis Cluster of 3 primaries, formed in {time.monotonic() - started:.1f} s:"
                f" {servers.url}",
                flush=True,
            )
            lines = _latency(servers.url, servers, rounds, seconds, "wall")
            if not quick:
                lines += _latency(servers.url, servers, rounds, seconds, "cpu")
            lines += _throughput(servers.url, servers, t_rounds, t_seconds)
            return lines
        finally:
            servers.stop()
