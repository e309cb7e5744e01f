#!/usr/bin/env python
"""The async path (issue 16), every figure against its target in one run.

    python benchmarks/bench_async.py                   # full run (under two minutes)
    python benchmarks/bench_async.py --quick           # a short run (about 40 s)
    python benchmarks/bench_async.py --only lag,wake   # some parts: lag, stall, latency, wake
    python benchmarks/bench_async.py --json out.json   # also keep every round and sample

Starts its own ``redis-server`` and PostgreSQL cluster (``bench_stores.py``'s, over unix
sockets), then measures:

- **lag**: one event loop, 200 concurrent first calls on distinct keys (the body awaits 1 ms),
  with a ticker task that records how late its 1 ms sleeps wake; the calls per second of the
  same run. Against the same store with *blocking* async primitives (the sync primitive called
  inline: what the async wrapper did before issue 16), and the raw async client doing the same
  writes (SET NX, body, SET; INSERT, body, UPDATE). DiskStore: the same, and async against the
  sync path with bodies that cost nothing (a no-op), first calls and replays.
- **stall**: the server is sent SIGSTOP for 2 s while calls are made; the ticker's worst lag
  meanwhile, and how the calls end (completed after SIGCONT, or StoreError).
- **latency**: one awaited call at a time, replay and first call, against raw ``redis.asyncio``
  GET / SET NX + SET and psycopg async SELECT / INSERT + UPDATE on the same server.
- **wake**: the time from an owner's settling write to a waiter's (``wait=``) return, on every
  store, the waiter a thread or a task, in this process or another one.

Targets are printed beside each figure, never asserted (exit code 0). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stores import postgres_server, redis_server  # the servers the sync rows use

import idemfn
from idemfn import DiskStore, MemoryStore, PostgresStore, RedisStore, Store, StoreError, idempotent

TICK = 0.001  # the ticker's sleep, and every lag body's await
BURST = 200  # concurrent calls per lag round
Run = Callable[[list[str]], Awaitable[object]]  # runs the calls of a round, one key each


@dataclass
class Settings:
    rounds: int  # lag rounds per system (after one warm-up round)
    stall_calls: int
    stall_seconds: float
    latency_rounds: int
    round_seconds: float  # latency: each round's length
    wake_samples: int  # per wake row (after one warm-up sample)
    wake_delay: tuple[float, float]  # how long the waiter waits before the owner returns
    rtt_rounds: int
    rtt_delays: tuple[float, ...]  # seconds the proxy holds each chunk, each way


# The proxy's delays: none (its own hop, like a network within a data centre), and 0.25 ms,
# which asyncio's whole-millisecond timers make about 1 ms each way.
FULL = Settings(9, 50, 2.0, 7, 0.2, 11, (0.03, 0.2), 3, (0.0, 0.00025))
QUICK = Settings(3, 20, 2.0, 3, 0.05, 5, (0.03, 0.08), 2, (0.00025,))


@dataclass
class Figure:
    """One measured figure; ``target`` None: shown for reference."""

    part: str
    name: str
    value: float
    unit: str
    target: tuple[str, float] | None = None  # ("<=", 5.0) or (">=", 3.0)
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        op, limit = self.target
        return self.value <= limit if op == "<=" else self.value >= limit


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        print(f"  {_line(figure)}", flush=True)


def _line(f: Figure) -> str:
    target = "" if f.target is None else f"{f.target[0]} {f.target[1]:g}"
    met = {None: "", True: "met", False: "MISSED"}[f.met]
    return f"{f.name:<58}{f.value:>10.2f} {f.unit:<7}{target:>9} {met:<7}{f.detail}"


def _spread(values: list[float]) -> str:
    """min..max of a row's rounds, as a share of their median."""
    m = statistics.median(values)
    if m == 0:
        return ""
    return f"spread -{(m - min(values)) / m:.0%}/+{(max(values) - m) / m:.0%}"


# --------------------------------------------------------------------------------------------
# Stores: the native ones, and the same with blocking async primitives (before issue 16).


class _Inline:
    """Async primitives that call the sync ones inline, blocking the loop for every round trip:
    what ``@idempotent`` on an ``async def`` did before issue 16 (it called ``begin`` and
    ``complete`` synchronously). Mixed in before a store class."""

    async def aclaim(self, entry: Any) -> Any:
        return self.claim(entry)  # type: ignore[attr-defined]

    async def aget(self, key: str) -> Any:
        return self.get(key)  # type: ignore[attr-defined]

    async def aswap(self, key: str, token: str, entry: Any) -> bool:
        return self.swap(key, token, entry)  # type: ignore[attr-defined,no-any-return]

    async def arelease(self, key: str, token: str) -> bool:
        return self.release(key, token)  # type: ignore[attr-defined,no-any-return]

    async def adelete(self, key: str, token: str | None = None) -> bool:
        return self.delete(key, token)  # type: ignore[attr-defined,no-any-return]

    async def atime(self) -> float:
        return self.time()  # type: ignore[attr-defined,no-any-return]


def blocking(cls: type[Store]) -> type[Store]:
    """``cls`` with ``_Inline``'s blocking async primitives."""
    return type(f"Blocking{cls.__name__}", (_Inline, cls), {})


class _Stamped:
    """Notes when each write that settles a key (a finished record) returns: the owner's
    completion, for the wake-up rows. Mixed in before a store class."""

    settled_at: dict[str, float]

    def swap(self, key: str, token: str, entry: Any) -> bool:
        done: bool = super().swap(key, token, entry)  # type: ignore[misc]
        if entry.status != "processing":
            self.settled_at.setdefault(key, time.monotonic())
        return done

    async def aswap(self, key: str, token: str, entry: Any) -> bool:
        done: bool = await super().aswap(key, token, entry)  # type: ignore[misc]
        if entry.status != "processing":
            # (first stamp kept: a default aswap runs swap in a thread, which stamped it)
            self.settled_at.setdefault(key, time.monotonic())
        return done


def stamped(cls: type[Store]) -> type[Store]:
    """``cls`` with ``_Stamped``'s notes of when settling writes return."""
    return type(f"Stamped{cls.__name__}", (_Stamped, cls), {"settled_at": {}})


def open_store(spec: tuple[str, str], *, blocks: bool = False, stamps: bool = False) -> Store:
    """A store from a picklable spec (the wake-up children open theirs from it)."""
    kind, where = spec
    classes: dict[str, type[Store]] = {
        "memory": MemoryStore,
        "disk": DiskStore,
        "redis": RedisStore,
        "postgres": PostgresStore,
    }
    cls = blocking(classes[kind]) if blocks else classes[kind]
    cls = stamped(cls) if stamps else cls
    return cls() if kind == "memory" else cls(where)  # type: ignore[call-arg]


# --------------------------------------------------------------------------------------------
# The ticker: how late the loop runs a task that sleeps 1 ms again and again.


class Ticker:
    """A task sleeping ``TICK`` again and again; ``ticks`` holds (start, lateness) of each."""

    def __init__(self) -> None:
        self.ticks: list[tuple[float, float]] = []
        self._since = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        clock = time.perf_counter
        while True:
            self._since = start = clock()
            await asyncio.sleep(TICK)
            self.ticks.append((start, clock() - start - TICK))

    def lags(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        """Lateness (s) of the ticks under way at some time between ``since`` and ``until``."""
        return [lag for start, lag in self.ticks if start <= until and start + TICK + lag >= since]

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0.003)  # running: only ticks from here on count
        self.ticks.clear()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The tick under way counts too: a loop blocked until now made it late already.
        late = time.perf_counter() - self._since - TICK
        if late > 0:
            self.ticks.append((self._since, late))
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# --------------------------------------------------------------------------------------------
# lag: 200 concurrent first calls per round, every system in each round (order rotating).


async def _lag_body(k: str) -> dict[str, str]:
    await asyncio.sleep(TICK)
    return {"k": k}


async def _noop_body(k: str) -> dict[str, str]:
    return {"k": k}


def _sync_noop_body(k: str) -> dict[str, str]:
    return {"k": k}


def _concurrently(fn: Callable[[str], Awaitable[object]]) -> Run:
    async def run(keys: list[str]) -> None:
        await asyncio.gather(*(fn(k) for k in keys))

    return run


def _awaited_in_a_loop(fn: Callable[[str], Awaitable[object]]) -> Run:
    async def run(keys: list[str]) -> None:
        for k in keys:
            await fn(k)

    return run


def _in_a_loop(fn: Callable[[str], object]) -> Run:
    async def run(keys: list[str]) -> None:
        for k in keys:
            fn(k)

    return run


@dataclass
class LagSystem:
    name: str
    run: Run
    keys: Callable[[int], list[str]]  # the keys of round r (fresh ones for first calls)
    seconds: list[float] = field(default_factory=list)
    worst: list[float] = field(default_factory=list)  # each round's worst lag (s)
    lags: list[float] = field(default_factory=list)

    def calls_per_s(self) -> float:
        return BURST / statistics.median(self.seconds)

    def rates(self) -> list[float]:
        return [BURST / s for s in self.seconds]


def _fresh_keys(tag: str) -> Callable[[int], list[str]]:
    def keys(r: int) -> list[str]:
        return [f"{tag}:{r}:{i}" for i in range(BURST)]

    return keys


def _decorated(store: Store, name: str, body: Callable[[str], Any]) -> Any:
    return idempotent(key="{k}", store=store, name=name)(body)


async def _raw_redis_run(url: str) -> tuple[Run, Callable[[], Awaitable[None]]]:
    import redis.asyncio

    # redis.asyncio's default pool refuses a 101st concurrent command (MaxConnectionsError);
    # a blocking pool of that size makes the rest wait for a connection instead.
    pool = redis.asyncio.BlockingConnectionPool(
        connection_class=redis.asyncio.UnixDomainSocketConnection,
        path=url.removeprefix("unix://"),
        max_connections=100,
    )
    client = redis.asyncio.Redis(connection_pool=pool)

    async def one(k: str) -> None:
        await client.set(f"raw:{k}", b"x" * 64, nx=True)
        await asyncio.sleep(TICK)
        await client.set(f"raw:{k}", b"y" * 64)

    return _concurrently(one), client.aclose


async def _raw_postgres_run(dsn: str) -> tuple[Run, Callable[[], Awaitable[None]]]:
    import psycopg_pool

    # As many connections as PostgresStore's pool may open (16): the same concurrency.
    pool = psycopg_pool.AsyncConnectionPool(
        dsn, min_size=1, max_size=16, kwargs={"autocommit": True}, open=False
    )
    await pool.open(wait=True)
    async with pool.connection() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS raw_lag (key text PRIMARY KEY, value bytea)")

    async def one(k: str) -> None:
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO raw_lag VALUES (%s, %s) ON CONFLICT DO NOTHING", (k, b"x" * 64)
            )
        await asyncio.sleep(TICK)
        async with pool.connection() as conn:
            await conn.execute("UPDATE raw_lag SET value = %s WHERE key = %s", (b"y" * 64, k))

    return _concurrently(one), pool.close


def _server_systems(
    label: str, spec: tuple[str, str], add: Callable[[str, Run], None]
) -> tuple[list[Store], Callable[[], Awaitable[Callable[[], Awaitable[None]]]]]:
    """A server store's three lag systems: async, blocking, and its raw client (opened by the
    returned coroutine function, which returns how to close it)."""
    native, inline = open_store(spec), open_store(spec, blocks=True)
    add(f"{label} async", _concurrently(_decorated(native, f"lag.{label}", _lag_body)))
    add(f"{label} blocking", _concurrently(_decorated(inline, f"lag.{label}.b", _lag_body)))

    async def raw() -> Callable[[], Awaitable[None]]:
        run, close = await (
            _raw_redis_run(spec[1]) if spec[0] == "redis" else _raw_postgres_run(spec[1])
        )
        add(f"{label} raw client", run)
        return close

    return [native, inline], raw


async def _lag_rounds(systems: list[LagSystem], rounds: int) -> None:
    """A warm-up round (connections and pools open), then ``rounds`` rounds, each running every
    system once in an order that rotates, a ticker beside each."""
    for system in systems:
        await system.run([f"warm:{system.name}:{i}" for i in range(BURST)])
    for r in range(rounds):
        shift = r % len(systems)
        for system in systems[shift:] + systems[:shift]:
            keys = system.keys(r)
            gc.collect()
            async with Ticker() as ticker:
                t0 = time.perf_counter()
                await system.run(keys)
                system.seconds.append(time.perf_counter() - t0)
            lags = ticker.lags()
            system.worst.append(max(lags, default=0.0))
            system.lags += lags


def _server_figures(
    report: Report, by: dict[str, LagSystem], label: str, part: str = "lag"
) -> None:
    ours, old = by[f"{label} async"], by[f"{label} blocking"]
    raw = by[f"{label} raw client"]
    report.add(_lag_figure(ours, ("<=", 5.0), part))
    report.add(_lag_figure(old, None, part))
    report.add(_lag_figure(raw, None, part))
    for system in (ours, old, raw):
        report.add(_rate_figure(system, part))
    ratio = ours.calls_per_s() / old.calls_per_s()
    report.add(Figure(part, f"{label}: async / blocking calls/s", ratio, "x", (">=", 3.0)))


async def part_lag(servers: dict[str, str], root: Path, settings: Settings, report: Report) -> None:
    print(
        f"\nlag: {BURST} concurrent calls per round, a ticker sleeping 1 ms; {settings.rounds}"
        " rounds (medians)"
    )
    systems: list[LagSystem] = []
    closers: list[Callable[[], Awaitable[None]]] = []
    stores: list[Store] = []

    def add(name: str, run: Run, keys: Callable[[int], list[str]] | None = None) -> None:
        systems.append(LagSystem(name, run, keys or _fresh_keys(name)))

    labels = {"RedisStore": "redis", "PostgresStore": "postgres"}
    for label, kind in labels.items():
        opened, raw = _server_systems(label, (kind, servers[kind]), add)
        stores += opened
        closers.append(await raw())
    disk = DiskStore(root / "lag-disk")
    memory = MemoryStore()
    stores += [disk, memory]
    add("DiskStore async", _concurrently(_decorated(disk, "lag.disk", _lag_body)))
    # No-op bodies: the store's path alone. Async awaited one at a time, as the sync calls run,
    # and concurrently, which adds asyncio's own cost of a task per call.
    first = _decorated(disk, "lag.disk.n", _noop_body)
    add("DiskStore async no-op, one at a time", _awaited_in_a_loop(first))
    add("DiskStore async no-op, concurrent", _concurrently(first))
    add("DiskStore sync no-op", _in_a_loop(_decorated(disk, "lag.disk.n", _sync_noop_body)))
    # Replays: every round replays the same 200 recorded keys.
    replayed = [f"r{i}" for i in range(BURST)]
    disk_async_replay = _decorated(disk, "lag.disk.r", _noop_body)
    disk_sync_replay = _decorated(disk, "lag.disk.r", _sync_noop_body)
    for k in replayed:
        disk_sync_replay(k)
    again = lambda r: replayed  # noqa: E731
    add("DiskStore async replay, one at a time", _awaited_in_a_loop(disk_async_replay), again)
    add("DiskStore async replay, concurrent", _concurrently(disk_async_replay), again)
    add("DiskStore sync replay", _in_a_loop(disk_sync_replay), again)
    add("MemoryStore async", _concurrently(_decorated(memory, "lag.memory", _lag_body)))
    add("asyncio alone (the body, no idemfn)", _concurrently(_lag_body))

    await _lag_rounds(systems, settings.rounds)
    by = {system.name: system for system in systems}
    report.raw["lag"] = {x.name: {"seconds": x.seconds, "worst_lag": x.worst} for x in systems}
    for label in labels:
        _server_figures(report, by, label)
    for name in ("DiskStore async", "MemoryStore async", "asyncio alone (the body, no idemfn)"):
        report.add(_lag_figure(by[name], None))
        report.add(_rate_figure(by[name]))
    for what in ("no-op", "replay"):
        ours, sync = by[f"DiskStore async {what}, one at a time"], by[f"DiskStore sync {what}"]
        concurrent = by[f"DiskStore async {what}, concurrent"]
        report.add(_lag_figure(concurrent, None))
        for system in (concurrent, ours, sync):
            report.add(_rate_figure(system))
        ratio = ours.calls_per_s() / sync.calls_per_s()
        report.add(
            Figure(
                "lag",
                f"DiskStore {what}, one at a time: async / sync calls/s",
                ratio,
                "x",
                (">=", 1.0),
            )
        )
    for close in closers:
        await close()
    for store in stores:
        store.close()


# --------------------------------------------------------------------------------------------
# rtt: the lag rows again, each server behind a proxy that delays every chunk it forwards, as a
# network would: over a local unix socket a round trip is tens of µs, and blocking on it costs
# little, which is not what a service on another machine than its server sees.


def _proxy_child(listen: str, upstream: str, delay: float, ready: Connection) -> None:
    asyncio.run(_proxy(listen, upstream, delay, ready))


async def _proxy(listen: str, upstream: str, delay: float, ready: Connection) -> None:
    """Forward unix-socket connections from ``listen`` to ``upstream``, every chunk ``delay``
    seconds after it arrived (asyncio's timers wake on whole milliseconds: at most 1 ms late),
    in order, each direction on its own."""
    loop = asyncio.get_running_loop()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await chunks.get()
                if not data:
                    writer.close()
                    return
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                writer.write(data)

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(1 << 16):
                chunks.put_nowait((loop.time() + delay, data))
        finally:
            chunks.put_nowait((0.0, b""))
            await sender

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(upstream)
        await asyncio.gather(
            pump(reader, up_writer), pump(up_reader, writer), return_exceptions=True
        )

    await asyncio.start_unix_server(connected, path=listen)
    ready.send(True)
    await asyncio.Event().wait()  # until the benchmark terminates this process


class Proxy:
    """A delaying proxy in a process of its own (its CPU time is not this loop's)."""

    def __init__(self, listen: str, upstream: str, delay: float) -> None:
        context = multiprocessing.get_context("spawn")
        mine, theirs = context.Pipe()
        self.process = context.Process(
            target=_proxy_child, args=(listen, upstream, delay, theirs), daemon=True
        )
        self.process.start()
        if not mine.poll(30):
            raise RuntimeError("the delaying proxy did not start")

    def close(self) -> None:
        self.process.terminate()
        self.process.join(10)


def _round_trip_us(kind: str, where: str) -> float:
    """Median µs of one round trip to the server: redis-py PING, psycopg ``SELECT 1``."""
    times = []
    if kind == "redis":
        import redis

        with redis.Redis(unix_socket_path=where.removeprefix("unix://")) as client:
            for _ in range(100):
                t0 = time.perf_counter()
                client.ping()
                times.append(time.perf_counter() - t0)
    else:
        import psycopg

        with psycopg.connect(where, autocommit=True) as conn:
            for _ in range(100):
                t0 = time.perf_counter()
                conn.execute("SELECT 1").fetchone()
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


async def part_rtt(servers: dict[str, str], root: Path, settings: Settings, report: Report) -> None:
    print(
        "\nrtt: the lag rows with each server behind a proxy (another process) that holds each"
        f" chunk it forwards for a while; {settings.rtt_rounds} rounds"
    )
    for delay in settings.rtt_delays:
        await _rtt_with(delay, servers, root, settings, report)


async def _rtt_with(
    delay: float, servers: dict[str, str], root: Path, settings: Settings, report: Report
) -> None:
    where = root / f"proxy-{delay}"
    (where / "pg").mkdir(parents=True)
    host = dict(part.split("=", 1) for part in servers["postgres"].split())["host"]
    proxies = [
        Proxy(str(where / "redis.sock"), servers["redis"].removeprefix("unix://"), delay),
        Proxy(str(where / "pg" / ".s.PGSQL.5432"), f"{host}/.s.PGSQL.5432", delay),
    ]
    proxied = {
        "redis": f"unix://{where / 'redis.sock'}",
        "postgres": servers["postgres"].replace(f"host={host}", f"host={where / 'pg'}"),
    }
    try:
        labels: dict[str, str] = {}
        for label, kind in (("RedisStore", "redis"), ("PostgresStore", "postgres")):
            direct, through = (
                _round_trip_us(kind, servers[kind]),
                _round_trip_us(kind, proxied[kind]),
            )
            labels[f"{label}, RTT {through / 1000:.2f} ms"] = kind
            print(
                f"  {label}: a round trip takes {direct:.0f} µs direct, {through:.0f} µs through"
                f" the proxy holding each chunk {delay * 1000:g} ms"
            )
        systems: list[LagSystem] = []
        closers: list[Callable[[], Awaitable[None]]] = []
        stores: list[Store] = []

        def add(name: str, run: Run) -> None:
            systems.append(LagSystem(name, run, _fresh_keys(f"rtt:{delay}:{name}")))

        for label, kind in labels.items():
            opened, raw = _server_systems(label, (kind, proxied[kind]), add)
            stores += opened
            closers.append(await raw())
        await _lag_rounds(systems, settings.rtt_rounds)
        by = {system.name: system for system in systems}
        report.raw.setdefault("rtt", {}).update(
            {x.name: {"seconds": x.seconds, "worst_lag": x.worst} for x in systems}
        )
        for label in labels:
            _server_figures(report, by, label, "rtt")
        for close in closers:
            await close()
        for store in stores:
            store.close()
    finally:
        for proxy in proxies:
            proxy.close()


def _rate_figure(s: LagSystem, part: str = "lag") -> Figure:
    return Figure(part, f"{s.name}: calls/s", s.calls_per_s(), "/s", detail=_spread(s.rates()))


def _lag_figure(s: LagSystem, target: tuple[str, float] | None, part: str = "lag") -> Figure:
    pooled = sorted(s.lags)
    p99 = pooled[int(len(pooled) * 0.99)] * 1000 if pooled else 0.0
    return Figure(
        part,
        f"{s.name}: worst lag",
        statistics.median(s.worst) * 1000,
        "ms",
        target,
        f"max {max(s.worst) * 1000:.1f}, p99 {p99:.2f}, {len(pooled) // len(s.worst)} ticks/round",
    )


# --------------------------------------------------------------------------------------------
# stall: the server stopped (SIGSTOP) for a while as calls are made.


def _redis_pids(url: str) -> list[int]:
    import redis

    with redis.Redis(unix_socket_path=url.removeprefix("unix://")) as client:
        return [int(client.info("server")["process_id"])]


def _postgres_pids(dsn: str) -> list[int]:
    """The postmaster (its data directory is beside the socket directory) and its children."""
    host = dict(part.split("=", 1) for part in dsn.split())["host"]
    postmaster = int((Path(host).parent / "data" / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == postmaster:
                pids.append(int(stat.parent.name))
    return pids


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


async def part_stall(servers: dict[str, str], settings: Settings, report: Report) -> None:
    n, seconds = settings.stall_calls, settings.stall_seconds
    print(f"\nstall: {n} first calls made while the server is stopped (SIGSTOP) for {seconds:g} s")
    for label, spec, pids in (
        ("RedisStore", ("redis", servers["redis"]), _redis_pids),
        ("PostgresStore", ("postgres", servers["postgres"]), _postgres_pids),
    ):
        for blocks in (False, True):
            store = open_store(spec, blocks=blocks)
            name = f"{label} {'blocking' if blocks else 'async'}"
            fn = _decorated(store, f"stall.{name}", _lag_body)
            # Connections open, as in a running service: a first burst of as many calls as
            # the stall's, on the new store (its lag is shown: opening connections costs CPU).
            async with Ticker() as ticker:
                await asyncio.gather(*(fn(f"warm:{i}") for i in range(n)))
            if not blocks:
                cold = max(ticker.lags(), default=0.0) * 1000
                report.add(
                    Figure("stall", f"{name}: a new store's first {n} calls: worst lag", cold, "ms")
                )
            # The server's processes now: PostgreSQL's backends are the connections just made.
            result = await _stalled(fn, [f"s{i}" for i in range(n)], pids(spec[1]), seconds)
            store.close()
            report.raw.setdefault("stall", {})[name] = result
            outcomes = ", ".join(f"{v} {k}" for k, v in sorted(result["outcomes"].items()))
            report.add(
                Figure(
                    "stall",
                    f"{name}: worst lag while stopped",
                    result["worst_lag_stopped"] * 1000,
                    "ms",
                    None if blocks else ("<=", 50.0),
                    f"{outcomes}; all done {result['done_after_cont']:.2f} s after SIGCONT",
                )
            )


async def _stalled(
    fn: Callable[[str], Awaitable[object]], keys: list[str], pids: list[int], seconds: float
) -> dict[str, Any]:
    resumed: list[float] = []

    def resume() -> None:
        _signal_all(pids, signal.SIGCONT)
        resumed.append(time.perf_counter())

    # From another thread: a blocking store blocks this loop until the server answers.
    timer = threading.Timer(seconds, resume)
    outcomes: Counter[str] = Counter()
    try:
        async with Ticker() as ticker:
            _signal_all(pids, signal.SIGSTOP)
            stopped = time.perf_counter()
            timer.start()
            tasks = [asyncio.ensure_future(fn(k)) for k in keys]
            done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 300)
            finished = time.perf_counter()
    finally:
        timer.join()  # (SIGCONT sent)
        _signal_all(pids, signal.SIGCONT)
    for value in done:
        if isinstance(value, StoreError):
            outcomes["StoreError"] += 1
        elif isinstance(value, BaseException):
            outcomes[type(value).__name__] += 1
        else:
            outcomes["completed"] += 1
    lags = ticker.lags(stopped, resumed[0])
    return {
        "worst_lag_stopped": max(lags, default=0.0),
        "ticks_stopped": len(lags),
        "outcomes": dict(outcomes),
        "done_after_cont": finished - resumed[0],
    }


# --------------------------------------------------------------------------------------------
# latency: one awaited call at a time, against the raw async client on the same server.


async def _timed(fn: Callable[[int], Awaitable[object]], args: list[int]) -> float:
    """Microseconds per awaited call of ``fn`` over ``args``."""
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        for a in args:
            await fn(a)
        return (time.perf_counter_ns() - t0) / len(args) / 1000
    finally:
        gc.enable()


async def _versus(
    ours: Callable[[int], Awaitable[object]],
    floor: Callable[[int], Awaitable[object]],
    settings: Settings,
    fresh: Iterator[int] | None,
) -> tuple[list[float], list[float]]:
    """Alternating rounds (A B, B A, ...) of ``ours`` and ``floor``; µs per call of each.
    ``fresh``: first calls, each with an argument never used before; else replays of 0."""

    def args(n: int) -> list[int]:
        return [next(fresh) for _ in range(n)] if fresh is not None else [0] * n

    sizes = []
    for fn in (ours, floor):
        await _timed(fn, args(20))  # warm-up
        per_call = await _timed(fn, args(50))
        sizes.append(max(20, int(settings.round_seconds / (per_call / 1e6))))
    a: list[float] = []
    b: list[float] = []
    for r in range(settings.latency_rounds):
        if r % 2 == 0:
            a.append(await _timed(ours, args(sizes[0])))
            b.append(await _timed(floor, args(sizes[1])))
        else:
            b.append(await _timed(floor, args(sizes[1])))
            a.append(await _timed(ours, args(sizes[0])))
    return a, b


FLOORS = {
    ("RedisStore", "replay"): "GET",
    ("RedisStore", "first call"): "SET NX + SET",
    ("PostgresStore", "replay"): "SELECT",
    ("PostgresStore", "first call"): "INSERT + UPDATE",
}


async def part_latency(servers: dict[str, str], settings: Settings, report: Report) -> None:
    import psycopg
    import redis.asyncio

    print(f"\nlatency: one awaited call at a time, µs per call, {settings.latency_rounds} rounds")
    url, dsn = servers["redis"], servers["postgres"]
    client = redis.asyncio.Redis(unix_socket_path=url.removeprefix("unix://"))
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await conn.execute("CREATE TABLE IF NOT EXISTS raw_latency (key text PRIMARY KEY, value bytea)")
    await conn.execute(
        "INSERT INTO raw_latency VALUES ('k', %s) ON CONFLICT DO NOTHING", (b"x" * 64,)
    )
    await client.set("k", b"x" * 64)
    value = b"x" * 64

    async def redis_get(i: int) -> object:
        return await client.get("k")

    async def redis_first(i: int) -> object:
        await client.set(f"f{i}", value, nx=True)
        return await client.set(f"f{i}", value)

    async def pg_select(i: int) -> object:
        cur = await conn.execute("SELECT value FROM raw_latency WHERE key = 'k'")
        return await cur.fetchone()

    async def pg_first(i: int) -> object:
        await conn.execute(
            "INSERT INTO raw_latency VALUES (%s, %s) ON CONFLICT DO NOTHING", (f"f{i}", value)
        )
        return await conn.execute(
            "UPDATE raw_latency SET value = %s WHERE key = %s", (value, f"f{i}")
        )

    async def body(i: int) -> dict[str, int]:
        return {"i": i}

    fresh = count(1)
    for label, spec, replay_floor, first_floor in (
        ("RedisStore", ("redis", url), redis_get, redis_first),
        ("PostgresStore", ("postgres", dsn), pg_select, pg_first),
    ):
        store = open_store(spec)
        fn = idempotent(key="{i}", store=store, name=f"latency.{label}")(body)
        await fn(0)
        for what, floor, limit in (("replay", replay_floor, 1.3), ("first call", first_floor, 1.4)):
            a, b = await _versus(fn, floor, settings, fresh if what == "first call" else None)
            ma, mb = statistics.median(a), statistics.median(b)
            report.raw.setdefault("latency", {})[f"{label} {what}"] = {"idemfn": a, "raw": b}
            report.add(
                Figure("latency", f"{label} async {what}: idemfn", ma, "µs", detail=_spread(a))
            )
            report.add(
                Figure(
                    "latency",
                    f"{label} async {what}: raw ({FLOORS[label, what]})",
                    mb,
                    "µs",
                    detail=_spread(b),
                )
            )
            report.add(
                Figure("latency", f"{label} async {what}: ratio", ma / mb, "x", ("<=", limit))
            )
        store.close()
    await client.aclose()
    await conn.close()


# --------------------------------------------------------------------------------------------
# wake: from the owner's settling write to the waiter's return, the waiter in a thread, a task,
# or another process (its loop in a child). Times are time.monotonic() (CLOCK_MONOTONIC, which
# is system-wide on Linux).

WAIT = 30.0  # waiters' wait=: far longer than any sample


def _waiter_functions(store: Store, label: str) -> tuple[Any, Any]:
    """The waiter's sync and async functions: same stored name and key as the owner's; the
    body must never run (the waiter replays the owner's outcome)."""
    name = f"wake.{label}"

    def never(k: str) -> str:
        raise RuntimeError(f"the waiter ran the body of {k!r}")

    async def anever(k: str) -> str:
        raise RuntimeError(f"the waiter ran the body of {k!r}")

    sync = idempotent(key="{k}", store=store, name=name, wait=WAIT)(never)
    return sync, idempotent(key="{k}", store=store, name=name, wait=WAIT)(anever)


def _waiter_child(conn: Connection, spec: tuple[str, str], label: str) -> None:
    """Another process's waiter: for each ("sync"|"async", key) received, signals that it
    starts, calls, and sends back when it returned and what it returned."""
    store = open_store(spec)
    sync, async_ = _waiter_functions(store, label)
    loop = asyncio.new_event_loop()  # one loop for every async call, as a service has
    while True:
        command = conn.recv()
        if command is None:
            break
        mode, key = command
        conn.send(time.monotonic())
        try:
            got = sync(key) if mode == "sync" else loop.run_until_complete(async_(key))
            answer: object = got == key
        except Exception as exc:
            answer = f"{type(exc).__name__}: {exc}"
        conn.send((time.monotonic(), answer))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
    store.close()


class Child:
    """A waiter process for one store (spawned: nothing of this process's state is shared)."""

    def __init__(self, spec: tuple[str, str], label: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=_waiter_child, args=(theirs, spec, label))
        self.process.start()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(30)


@dataclass
class WakeRow:
    name: str
    samples: list[float] = field(default_factory=list)  # s, from the owner's settle to the return
    missed: list[str] = field(default_factory=list)  # samples that did not wait, or failed


async def _wake_sample(
    store: Store, label: str, mode: str, where: str, child: Child | None, delay: float, key: str
) -> tuple[float | None, str]:
    """One sample: the owner claims ``key`` (body blocked), the waiter starts and waits,
    ``delay`` later the owner's body returns. (latency, problem)."""
    name = f"wake.{label}"
    waiter_sync, waiter_async = _WAITERS[id(store)]
    if mode == "sync":
        gate, entered = threading.Event(), threading.Event()

        def body(k: str) -> str:
            entered.set()
            gate.wait(WAIT)
            return k

        owner = idempotent(key="{k}", store=store, name=name)(body)

        owner_thread = threading.Thread(target=owner, args=(key,))
        owner_thread.start()
        await asyncio.to_thread(entered.wait, WAIT)
    else:
        agate, aentered = asyncio.Event(), asyncio.Event()

        async def abody(k: str) -> str:
            aentered.set()
            await agate.wait()
            return k

        aowner = idempotent(key="{k}", store=store, name=name)(abody)

        owner_task = asyncio.create_task(aowner(key))
        await aentered.wait()

    waited: list[tuple[float, float, object]] = []
    if where == "process":
        assert child is not None
        child.conn.send((mode, key))
        started = await asyncio.to_thread(child.conn.recv)
    else:
        started = time.monotonic()
        if mode == "sync":

            def wait_here() -> None:
                try:
                    answer: object = waiter_sync(key) == key
                except Exception as exc:
                    answer = f"{type(exc).__name__}: {exc}"
                waited.append((started, time.monotonic(), answer))

            waiter_thread = threading.Thread(target=wait_here)
            waiter_thread.start()
        else:

            async def await_here() -> None:
                try:
                    answer: object = await waiter_async(key) == key
                except Exception as exc:
                    answer = f"{type(exc).__name__}: {exc}"
                waited.append((started, time.monotonic(), answer))

            waiter_task = asyncio.create_task(await_here())
    await asyncio.sleep(delay)
    if mode == "sync":
        gate.set()
        await asyncio.to_thread(owner_thread.join)
    else:
        agate.set()
        await owner_task
    if where == "process":
        returned, answer = await asyncio.to_thread(child.conn.recv)  # type: ignore[union-attr]
    else:
        if mode == "sync":
            await asyncio.to_thread(waiter_thread.join)
        else:
            await waiter_task
        _, returned, answer = waited[0]
    # The owner's completion: when its settling write returned (before the engine wakes this
    # process's watchers); its call's return if the store did not note it.
    stamps: dict[str, float] = store.settled_at  # type: ignore[attr-defined]
    settled_at = stamps.pop(f"{name}:{key}", None)
    if settled_at is None:
        return None, "the owner's settling write was not seen"
    if answer is not True:
        return None, f"waiter: {answer}"
    if started > settled_at:
        return None, "the waiter started after the owner settled"
    return returned - settled_at, ""


_WAITERS: dict[int, tuple[Any, Any]] = {}


async def part_wake(
    servers: dict[str, str], root: Path, settings: Settings, report: Report
) -> None:
    n = settings.wake_samples
    lo, hi = settings.wake_delay
    print(
        f"\nwake: owner's settling write to the waiter's return, median of {n} samples (waiting"
        f" {lo * 1000:.0f}-{hi * 1000:.0f} ms first)"
    )
    specs: dict[str, tuple[str, str]] = {
        "MemoryStore": ("memory", ""),
        "DiskStore": ("disk", str(root / "wake-disk")),
        "RedisStore": ("redis", servers["redis"]),
        "PostgresStore": ("postgres", servers["postgres"]),
    }
    rng = random.Random(16)
    keys = count()
    for label, spec in specs.items():
        store = open_store(spec, stamps=True)
        _WAITERS[id(store)] = _waiter_functions(store, label)
        child = None if label == "MemoryStore" else Child(spec, label)
        target = None if label == "DiskStore" else ("<=", 10.0)
        for mode in ("sync", "async"):
            for where in ("here", "process") if child is not None else ("here",):
                row = WakeRow(
                    f"{label} {mode} waiter ({'a thread' if mode == 'sync' else 'a task'}"
                    f"{', another process' if where == 'process' else ''})"
                )
                for i in range(n + 1):
                    latency, problem = await _wake_sample(
                        store, label, mode, where, child, rng.uniform(lo, hi), f"k{next(keys)}"
                    )
                    if i == 0:
                        continue  # warm-up: connections, the child's loop and subscriptions
                    if latency is None:
                        row.missed.append(problem)
                    else:
                        row.samples.append(latency)
                report.raw.setdefault("wake", {})[row.name] = {
                    "samples": row.samples,
                    "missed": row.missed,
                }
                if not row.samples:
                    print(f"  {row.name}: no sample ({row.missed[:1]})")
                    continue
                ms = [s * 1000 for s in row.samples]
                detail = f"min {min(ms):.2f}, max {max(ms):.2f}"
                if row.missed:
                    detail += f"; {len(row.missed)} not counted: {row.missed[0]}"
                report.add(Figure("wake", row.name, statistics.median(ms), "ms", target, detail))
        if child is not None:
            child.close()
        store.close()


# --------------------------------------------------------------------------------------------


def _summary(report: Report, commit: str) -> None:
    print(f"\nsummary (idemfn at {commit}): every figure with a target")
    for f in report.figures:
        if f.target is not None:
            print(f"  {_line(f)}")
    missed = [f for f in report.figures if f.met is False]
    print(f"  {len(missed)} target(s) missed" if missed else "  every target met")


def _commit() -> str:
    import subprocess

    where = Path(idemfn.__file__).resolve().parent.parent
    out = subprocess.run(
        ["git", "-C", str(where), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return f"{out.stdout.strip() or '?'} ({where})"


PARTS = ("lag", "rtt", "stall", "latency", "wake")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--only", default=",".join(PARTS), help=f"some of {','.join(PARTS)}")
    parser.add_argument("--json", type=Path, help="also write every round and sample here")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    if parts - set(PARTS):
        parser.error(f"--only: unknown part(s) {','.join(sorted(parts - set(PARTS)))}")
    settings = QUICK if args.quick else FULL
    commit = _commit()
    print(f"idemfn at {commit}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    report = Report()
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory() as tmp,
        redis_server(Path(tmp)) as url,
        postgres_server() as dsn,
    ):
        servers = {"redis": url, "postgres": dsn}

        async def run() -> None:
            if "lag" in parts:
                await part_lag(servers, Path(tmp), settings, report)
            if "rtt" in parts:
                await part_rtt(servers, Path(tmp), settings, report)
            if "stall" in parts:
                await part_stall(servers, settings, report)
            if "latency" in parts:
                await part_latency(servers, settings, report)
            if "wake" in parts:
                await part_wake(servers, Path(tmp), settings, report)

        asyncio.run(run())
    _summary(report, commit)
    print(f"({time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.1f})")
    if args.json is not None:
        figures = [f.__dict__ | {"met": f.met} for f in report.figures]
        data = {"commit": commit, "figures": figures, "raw": report.raw}
        args.json.write_text(json.dumps(data, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
