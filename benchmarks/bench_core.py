#!/usr/bin/env python
"""Core benchmarks of idemfn: what ``@idempotent`` costs over the raw store it sits on.

    python benchmarks/bench_core.py              # full run (one to two minutes)
    python benchmarks/bench_core.py --quick      # short run, used by the test suite
    python benchmarks/bench_core.py --json PATH  # also write every round's numbers as JSON
    python benchmarks/bench_core.py --profile    # also break the replay path down by function

Every idemfn measurement is paired with a baseline measured in the same run: rounds alternate
idemfn and baseline (A B, then B A, ...) so machine noise hits both, each round is timed with
``perf_counter_ns`` over enough calls to last ``--round-time`` seconds, with the garbage
collector off, after calibration and a warm-up round. The table reports the median of the rounds
as microseconds per call, and the ratio of the medians.

Targets are reported, never asserted: the exit code is 0 when a target is missed. It is 1 when
the memory check finds per-call growth or a thread started per call.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import json
import os
import pickle
import platform
import pstats
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diskcache

import idemfn
from idemfn import DiskStore, MemoryStore, Store, idempotent
from idemfn._keys import _MEMO_SIZE  # the key memo's bound: the memory check fills it first

# A round runs n calls and returns the nanoseconds its timed part took (inputs are prepared
# before the clock starts).
Runner = Callable[[int], int]

# The clock rounds are timed with: wall time (perf_counter_ns), or with --clock cpu this
# thread's CPU time (thread_time_ns), which leaves out the time other processes take the CPU.
CLOCKS: dict[str, Callable[[], int]] = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}
clock = time.perf_counter_ns

# The settings DiskStore opens its diskcache.Cache with; the baseline cache uses the same.
CACHE_SETTINGS: dict[str, Any] = {"eviction_policy": "none", "statistics": False, "timeout": 60.0}
TTL = 86400.0  # the decorator's default ttl: DiskStore sets rows with this expiry
POOL = 64  # replays cycle over this many recorded keys (the same keys for the baseline)
SMALL_RESULT = {"a": 1, "b": 2, "c": 3}

# Memory check: growth up to a slack plus LEAK_BYTES_PER_CALL per call is no leak. The smallest
# Python object is 16 bytes, so leaking one object per call shows up as >= 16 B/call. The slack
# absorbs one-off reallocations: a few hundred bytes for a MemoryStore; for a DiskStore, sqlite3
# and diskcache move up to ~15 KiB up or down between batches whatever their size.
LEAK_BYTES_PER_CALL = 2.0
LEAK_SLACK_BYTES = {"MemoryStore": 4 * 1024, "DiskStore": 32 * 1024}


# --------------------------------------------------------------------------------------------
# Timing harness


def timed_round(run: Runner, n: int) -> float:
    """Nanoseconds per call of one round of ``n`` calls, with the collector off."""
    gc.collect()
    gc.disable()
    try:
        elapsed = run(n)
    finally:
        gc.enable()
    return elapsed / n


def calibrate(run: Runner, round_ns: float) -> int:
    """How many calls make a round last about ``round_ns`` (these rounds also warm up)."""
    n = 4
    while True:
        per_call = timed_round(run, n)
        if per_call * n >= round_ns / 4 or n >= 1 << 24:
            return max(1, round(round_ns / max(per_call, 1.0)))
        n *= 4


@dataclass
class Pair:
    """One idemfn measurement and its baseline."""

    name: str
    idemfn: Runner
    baseline: Runner
    baseline_name: str
    target: float | None  # the ratio idemfn/baseline should stay at or below; None: no target
    idemfn_rounds: list[float] = field(default_factory=list)  # ns per call
    baseline_rounds: list[float] = field(default_factory=list)
    n_idemfn: int = 0
    n_baseline: int = 0

    @property
    def idemfn_us(self) -> float:
        return statistics.median(self.idemfn_rounds) / 1000

    @property
    def baseline_us(self) -> float:
        return statistics.median(self.baseline_rounds) / 1000

    @property
    def ratio(self) -> float:
        return self.idemfn_us / self.baseline_us

    @property
    def paired_ratio(self) -> float:
        """The median of each round's own ratio: robust to slow drifts of the machine."""
        return statistics.median(
            a / b for a, b in zip(self.idemfn_rounds, self.baseline_rounds, strict=True)
        )

    @property
    def result(self) -> str:
        if self.target is None:
            return "-"
        return "PASS" if self.ratio <= self.target else "MISS"

    def measure(self, rounds: int, round_ns: float) -> None:
        self.n_idemfn = calibrate(self.idemfn, round_ns)
        self.n_baseline = calibrate(self.baseline, round_ns)
        timed_round(self.idemfn, self.n_idemfn)  # warm-up round of each, not recorded
        timed_round(self.baseline, self.n_baseline)
        for r in range(rounds):
            sides = [
                (self.idemfn, self.n_idemfn, self.idemfn_rounds),
                (self.baseline, self.n_baseline, self.baseline_rounds),
            ]
            if r % 2:  # A B, B A, A B, ...: neither side always runs first
                sides.reverse()
            for run, n, into in sides:
                into.append(timed_round(run, n))

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "baseline": self.baseline_name,
            "idemfn_us": self.idemfn_us,
            "baseline_us": self.baseline_us,
            "overhead_us": self.idemfn_us - self.baseline_us,
            "ratio": self.ratio,
            "paired_ratio": self.paired_ratio,
            "target": self.target,
            "result": self.result,
            "calls_per_round": {"idemfn": self.n_idemfn, "baseline": self.n_baseline},
            "rounds_us": {
                "idemfn": [x / 1000 for x in self.idemfn_rounds],
                "baseline": [x / 1000 for x in self.baseline_rounds],
            },
        }


def spread(rounds: list[float]) -> float:
    """(max - min) / median of the rounds, in percent."""
    return 100 * (max(rounds) - min(rounds)) / statistics.median(rounds)


# --------------------------------------------------------------------------------------------
# The benchmarks


class Fixture:
    """A DiskStore, a raw baseline cache with the same settings, and a MemoryStore, each opened
    once and reused by every round (opening is never measured)."""

    def __init__(self, root: Path) -> None:
        self.disk = DiskStore(root / "idemfn")
        self.signed = DiskStore(root / "signed", signing_key="bench-signing-key-0123456789")
        self.raw = diskcache.Cache(str(root / "raw"), **CACHE_SETTINGS)
        self.memory = MemoryStore()
        self.replay_records: list[bytes] = []  # the stored bytes of the DiskStore replays
        self.body_calls = 0
        self._next = 0  # fresh keys for first calls: never reused, so each is a real first call

    def fresh(self, n: int) -> range:
        start = self._next
        self._next += n
        return range(start, start + n)

    def close(self) -> None:
        self.disk.close()
        self.signed.close()
        self.raw.close()


def _timed_calls(fn: Callable[[Any], Any], args: list[Any] | range) -> int:
    t0 = clock()
    for a in args:
        fn(a)
    return clock() - t0


def bodies(fx: Fixture, store: Store, name: str) -> tuple[Any, Any]:
    """The two decorated functions measured on ``store``: a replayed small result, and a no-op
    body called with a new key each time."""

    @idempotent(key="replay:{i}", store=store, name=f"bench.{name}.replay_small")
    def replay_small(i: int) -> dict[str, int]:
        fx.body_calls += 1
        return dict(SMALL_RESULT)

    @idempotent(key="first:{i}", store=store, name=f"bench.{name}.first_noop")
    def first_noop(i: int) -> None:
        fx.body_calls += 1

    return replay_small, first_noop


def disk_pairs(fx: Fixture) -> list[Pair]:
    store, raw = fx.disk, fx.raw
    replay_small, first_noop = bodies(fx, store, "disk")

    # Record the replayed keys, then copy their exact stored bytes to the baseline cache.
    replay_keys = []
    for i in range(POOL):
        assert replay_small(i) == SMALL_RESULT
        key = replay_small.key_for(i)
        raw.set(key, store.cache.get(key), expire=TTL)
        replay_keys.append(key)
        fx.replay_records.append(store.cache.get(key))

    # The bytes a first call writes: its claim (read from inside the body), then its outcome.
    seen: list[bytes] = []

    @idempotent(key="first:{i}", store=store, name="bench.disk.first_noop")
    def probe(i: int) -> None:
        seen.append(store.cache.get(probe.key_for(i)))

    probe(-1)
    claim_bytes, final_bytes = seen[0], store.cache.get(probe.key_for(-1))
    assert isinstance(claim_bytes, bytes)
    assert isinstance(final_bytes, bytes)

    def idemfn_replay(n: int) -> int:
        args = [i % POOL for i in range(n)]
        before = fx.body_calls
        elapsed = _timed_calls(replay_small, args)
        assert fx.body_calls == before, "a replay ran the body"
        return elapsed

    def raw_get(n: int) -> int:
        keys = [replay_keys[i % POOL] for i in range(n)]
        elapsed = _timed_calls(raw.get, keys)
        assert raw.get(keys[-1]) is not None
        return elapsed

    def idemfn_first(n: int) -> int:
        args = fx.fresh(n)
        before = fx.body_calls
        elapsed = _timed_calls(first_noop, args)
        assert fx.body_calls == before + n, "a first call did not run the body"
        return elapsed

    def raw_add_set(n: int) -> int:
        keys = [f"bench.raw.first_noop:first:{i}" for i in fx.fresh(n)]
        add, set_ = raw.add, raw.set
        t0 = clock()
        for k in keys:
            add(k, claim_bytes)
            set_(k, final_bytes, expire=TTL)
        return clock() - t0

    return [
        Pair("replay, DiskStore", idemfn_replay, raw_get, "Cache.get", 1.5),
        Pair("first call, DiskStore", idemfn_first, raw_add_set, "Cache.add+set", 1.3),
    ]


def variant_pairs(fx: Fixture) -> list[Pair]:
    """Replays with signed records and with the JSON serializer, against the same raw get of
    the same keys' bytes: what each option costs (no target)."""
    raw = fx.raw

    @idempotent(key="replay:{i}", store=fx.signed, name="bench.signed.replay_small")
    def signed(i: int) -> dict[str, int]:
        fx.body_calls += 1
        return dict(SMALL_RESULT)

    @idempotent(key="replay:{i}", store=fx.disk, name="bench.json.replay_small", serializer="json")
    def as_json(i: int) -> dict[str, int]:
        fx.body_calls += 1
        return dict(SMALL_RESULT)

    pairs = []
    for label, fn, store in (("signed", signed, fx.signed), ("json", as_json, fx.disk)):
        keys = []
        for i in range(POOL):
            assert fn(i) == SMALL_RESULT
            key = fn.key_for(i)
            raw.set(key, store.cache.get(key), expire=TTL)
            keys.append(key)

        def replay(n: int, fn: Any = fn) -> int:
            before = fx.body_calls
            elapsed = _timed_calls(fn, [i % POOL for i in range(n)])
            assert fx.body_calls == before, "a replay ran the body"
            return elapsed

        def raw_get(n: int, keys: list[str] = keys) -> int:
            return _timed_calls(raw.get, [keys[i % POOL] for i in range(n)])

        pairs.append(Pair(f"replay, DiskStore {label}", replay, raw_get, "Cache.get", None))
    return pairs


def memory_pairs(fx: Fixture) -> list[Pair]:
    store = fx.memory
    plain: dict[str, Any] = {}
    replay_small, first_noop = bodies(fx, store, "mem")

    replay_keys = []
    for i in range(POOL):
        assert replay_small(i) == SMALL_RESULT
        key = replay_small.key_for(i)
        plain[key] = dict(SMALL_RESULT)
        replay_keys.append(key)
    first_keep = set(replay_keys)

    def idemfn_replay(n: int) -> int:
        args = [i % POOL for i in range(n)]
        before = fx.body_calls
        elapsed = _timed_calls(replay_small, args)
        assert fx.body_calls == before, "a replay ran the body"
        return elapsed

    def dict_get(n: int) -> int:
        keys = [replay_keys[i % POOL] for i in range(n)]
        return _timed_calls(plain.get, keys)

    def drop_first_records() -> None:
        # Keep each round's dict the same size: drop the previous round's first-call records.
        for entry in list(store.scan("bench.mem.first_noop:")):
            store.delete(entry.key)
        for k in [k for k in plain if k not in first_keep]:
            del plain[k]

    def idemfn_first(n: int) -> int:
        drop_first_records()
        args = fx.fresh(n)
        before = fx.body_calls
        elapsed = _timed_calls(first_noop, args)
        assert fx.body_calls == before + n, "a first call did not run the body"
        return elapsed

    def dict_insert_update(n: int) -> int:
        drop_first_records()
        keys = [f"bench.plain.first_noop:first:{i}" for i in fx.fresh(n)]
        claim, final = object(), object()
        d = plain
        t0 = clock()
        for k in keys:
            d[k] = claim
            d[k] = final
        return clock() - t0

    return [
        Pair("replay, MemoryStore", idemfn_replay, dict_get, "dict.get", None),
        Pair(
            "first call, MemoryStore", idemfn_first, dict_insert_update, "dict insert+update", None
        ),
    ]


def checksum_cost(fx: Fixture, pairs: list[Pair], rounds: int, round_ns: float) -> dict[str, Any]:
    """What the record checksum (issue 14) costs: the check ``decode`` runs on every record it
    reads, over the replayed records' bytes and over a 1 MiB record, timed alone in rounds."""
    import zlib

    from idemfn._record import _RESIDUE, _checksum

    def check(records: list[bytes]) -> Runner:
        def run(n: int) -> int:
            batch = [records[i % len(records)] for i in range(n)]
            crc32, residue = zlib.crc32, _RESIDUE
            t0 = clock()
            for data in batch:  # as decode checks it
                crc32(data) != residue  # noqa: B015
            return clock() - t0

        return run

    mib = os.urandom(1 << 20)
    us = {}
    for name, records in (("replay", fx.replay_records), ("1 MiB", [mib + _checksum(mib)])):
        run = check(records)
        n = calibrate(run, round_ns)
        us[name] = statistics.median(timed_round(run, n) for _ in range(rounds)) / 1000
    replay = next(p for p in pairs if p.name == "replay, DiskStore").idemfn_us
    size = statistics.median(len(r) for r in fx.replay_records)
    print(
        f"\nRecord checksum (CRC-32, checked before a record is decoded): {us['replay']:.2f} us"
        f" per replay of a {size:.0f}-byte record ({100 * us['replay'] / replay:.1f}% of the"
        f" DiskStore replay); {us['1 MiB'] / 1000:.2f} ms per MiB"
    )
    return {"replay_us": us["replay"], "record_bytes": size, "per_mib_us": us["1 MiB"]}


# --------------------------------------------------------------------------------------------
# Memory and threads


def traced_now() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


@contextmanager
def counting_thread_starts() -> Iterator[list[str]]:
    """Names of the threads started inside the block (short-lived ones included)."""
    started: list[str] = []
    original = threading.Thread.start

    def start(self: threading.Thread) -> None:
        started.append(self.name)
        original(self)

    threading.Thread.start = start  # type: ignore[method-assign]
    try:
        yield started
    finally:
        threading.Thread.start = original  # type: ignore[method-assign]


@dataclass
class MemoryResult:
    store: str
    calls: int
    first_calls_growth: int  # bytes left after the first calls, minus what the records hold
    records_bytes: int  # what the records themselves hold in this process's memory
    replays_1_growth: int
    replays_2_growth: int
    threads_started: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def per_call(self, nbytes: int) -> float:
        return nbytes / self.calls

    @property
    def leaks(self) -> bool:
        limit = LEAK_SLACK_BYTES[self.store] + LEAK_BYTES_PER_CALL * self.calls
        return self.first_calls_growth > limit or self.replays_2_growth > limit

    def as_json(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "calls": self.calls,
            "first_calls_growth_bytes": self.first_calls_growth,
            "records_bytes": self.records_bytes,
            "records_bytes_per_record": self.records_bytes / self.calls,
            "replays_1_growth_bytes": self.replays_1_growth,
            "replays_2_growth_bytes": self.replays_2_growth,
            "threads_started": self.threads_started,
            "leaks": self.leaks,
            **self.extra,
        }


def refill_key_memo(body: Callable[[int], object]) -> None:
    """Replay enough warm-up keys that the decorator's key memo (bounded, flat once full) holds
    only entries made while tracing: its size is then the same before and after each batch."""
    for i in range(-1000, -1000 + _MEMO_SIZE):  # warm-up keys the memo has since dropped
        body(i)


def memory_check_memorystore(n: int) -> MemoryResult:
    store = MemoryStore()

    @idempotent(key="mem:{i}", store=store)
    def body(i: int) -> dict[str, int]:
        return {"a": i, "b": 2, "c": 3}

    for i in range(-1000, 0):  # warm-up: one-time allocations are not per-call growth
        body(i)
        body(i)

    with counting_thread_starts() as started:
        tracemalloc.start()
        try:
            refill_key_memo(body)
            store.clear()
            m0 = traced_now()
            for i in range(n):
                body(i)
            m1 = traced_now()
            for i in range(n):
                body(i)
            m2 = traced_now()
            for i in range(n):
                body(i)
            m3 = traced_now()
            store.clear()  # what the records held comes back; what stays is per-call growth
            m4 = traced_now()
        finally:
            tracemalloc.stop()
    return MemoryResult(
        "MemoryStore",
        n,
        first_calls_growth=m4 - m0,
        records_bytes=m3 - m4,
        replays_1_growth=m2 - m1,
        replays_2_growth=m3 - m2,
        threads_started=started,
    )


def memory_check_diskstore(n: int, root: Path) -> MemoryResult:
    store = DiskStore(root / "memcheck")

    @idempotent(key="mem:{i}", store=store)
    def body(i: int) -> dict[str, int]:
        return {"a": i, "b": 2, "c": 3}

    for i in range(-1000, 0):  # warm-up (opens the cache, fills sqlite3's statement cache)
        body(i)
        body(i)
    volume0 = store.cache.volume()

    with counting_thread_starts() as started:
        tracemalloc.start()
        try:
            refill_key_memo(body)
            m0 = traced_now()
            for i in range(n):
                body(i)
            m1 = traced_now()
            for i in range(n):
                body(i)
            m2 = traced_now()
            for i in range(n):
                body(i)
            m3 = traced_now()
        finally:
            tracemalloc.stop()
    disk_bytes = store.cache.volume() - volume0
    store.close()
    # The records live in SQLite, not in Python objects: all growth counts as per-call growth.
    return MemoryResult(
        "DiskStore",
        n,
        first_calls_growth=m1 - m0,
        records_bytes=0,
        replays_1_growth=m2 - m1,
        replays_2_growth=m3 - m2,
        threads_started=started,
        extra={"disk_bytes_per_record": disk_bytes / n},
    )


# --------------------------------------------------------------------------------------------
# Profile of the replay path (--profile)


def ladder(
    title: str, steps: list[tuple[str, Callable[[int], Any]]], rounds: int, round_ns: float
) -> dict[str, float]:
    """Time a replay rebuilt one stage at a time, each step adding one stage to the previous
    one, with rounds interleaved across the steps. A stage's increment is what it costs inside
    the whole call (cold caches and all), which its cost alone, in a tight loop, understates."""
    args = [i % POOL for i in range(POOL)]
    runners = {name: _stage(fn, args) for name, fn in steps}
    sizes = {name: calibrate(run, round_ns) for name, run in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            times[name].append(timed_round(runners[name], sizes[name]))
    us = {name: statistics.median(values) / 1000 for name, values in times.items()}
    whole = us[order[-1]]
    print(f"\n{title}, rebuilt stage by stage (median us per call):")
    print(
        f"  {'step (each adds one stage to the one above)':<62} {'us':>7} {'+us':>7} {'share':>6}"
    )
    previous = 0.0
    for name, value in us.items():
        step = value - previous
        print(f"  {name:<62} {value:7.2f} {step:+7.2f} {100 * step / whole:5.1f}%")
        previous = value
    return us


def _stage(fn: Callable[[int], Any], args: list[int]) -> Runner:
    def run(n: int) -> int:
        return _timed_calls(fn, [args[i % len(args)] for i in range(n)])

    return run


def profile_replay(fx: Fixture, rounds: int, round_ns: float) -> dict[str, Any]:
    """Rebuild the replay path stage by stage on both stores, then cProfile DiskStore calls."""
    result: dict[str, Any] = {}
    loads = pickle.loads
    disk_replay: Callable[[int], Any] | None = None
    for label, store in (("DiskStore", fx.disk), ("MemoryStore", fx.memory)):

        @idempotent(key="profile:{i}", store=store, name="bench.profile.replay_small")
        def replay_small(i: int) -> dict[str, int]:
            return dict(SMALL_RESULT)

        for i in range(POOL):
            replay_small(i)
        key_for, get = replay_small.key_for, store.get
        keys = [key_for(i) for i in range(POOL)]
        fps = [replay_small.status(i).fingerprint for i in range(POOL)]  # type: ignore[union-attr]
        policy = replay_small.policy  # type: ignore[attr-defined]

        def with_loads(i: int, get: Callable[[str], Any] = get, keys: list[str] = keys) -> Any:
            return loads(get(keys[i]).payload)

        def with_key(i: int, get: Callable[[str], Any] = get, key_for: Any = key_for) -> Any:
            return loads(get(key_for(i)).payload)

        def with_engine(
            i: int,
            store: Any = store,
            key_for: Any = key_for,
            fps: list[str] = fps,
            policy: Any = policy,
        ) -> Any:
            outcome = idemfn.begin(key_for(i), store=store, fingerprint=fps[i], policy=policy)
            return outcome.replay()  # type: ignore[union-attr]  # a recorded key: Finished

        def whole(i: int, fn: Callable[[int], Any] = replay_small) -> Any:
            return fn(i)

        def store_get(i: int, get: Callable[[str], Any] = get, keys: list[str] = keys) -> Any:
            return get(keys[i])

        steps: list[tuple[str, Callable[[int], Any]]] = []
        if isinstance(store, DiskStore):

            def cache_get(
                i: int, get: Callable[[str], Any] = store.cache.get, keys: list[str] = keys
            ) -> Any:
                return get(keys[i])

            steps.append(("Cache.get(key)", cache_get))
        steps += [
            (f"{label}.get(key)" + (": + decode, expiry check" if steps else ""), store_get),
            ("+ pickle.loads(payload)", with_loads),
            ("+ key and fingerprint from the arguments: key_for(i)", with_key),
            ("+ engine: begin(key, ...).replay() instead of get+loads", with_engine),
            ("+ decorator wrapper: the whole call f(i)", whole),
        ]
        result[label] = ladder(f"{label} replay", steps, rounds, round_ns)
        if isinstance(store, DiskStore):
            disk_replay = replay_small

    @idempotent(key="profile-first:{i}", store=fx.disk, name="bench.profile.first_noop")
    def first_noop(i: int) -> None:
        return None

    assert disk_replay is not None
    for title, fn, inputs in (
        ("DiskStore replay", disk_replay, [i % POOL for i in range(20000)]),
        ("DiskStore first call", first_noop, list(fx.fresh(3000))),
    ):
        profiler = cProfile.Profile(clock, 1e-9)  # the clock the rounds use
        profiler.enable()
        for a in inputs:
            fn(a)
        profiler.disable()
        print(f"\ncProfile, {len(inputs)} calls of {title}, top functions by own time:")
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(14)
    return result


# --------------------------------------------------------------------------------------------
# Report


def machine_info() -> dict[str, Any]:
    import sqlite3

    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "idemfn": idemfn.__version__,
        "diskcache": diskcache.__version__,
        "sqlite": sqlite3.sqlite_version,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def print_table(pairs: list[Pair], rounds: int) -> None:
    print(f"\nPer-call time, median of {rounds} interleaved rounds (us = microseconds)\n")
    header = (
        f"{'benchmark':<24} {'baseline':<19} {'idemfn us':>10} {'base us':>9}"
        f" {'ratio':>7} {'overhead us':>12} {'target':>7} {'result':>6}"
        f" {'spread A/B':>11}"
    )
    print(header)
    print("-" * len(header))
    for p in pairs:
        target = "-" if p.target is None else f"<={p.target:.1f}x"
        noise = f"{spread(p.idemfn_rounds):.0f}%/{spread(p.baseline_rounds):.0f}%"
        print(
            f"{p.name:<24} {p.baseline_name:<19} {p.idemfn_us:>10.2f} {p.baseline_us:>9.2f}"
            f" {p.ratio:>6.2f}x {p.idemfn_us - p.baseline_us:>12.2f} {target:>7}"
            f" {p.result:>6} {noise:>11}"
        )
    print(
        "spread: (max - min) / median of the rounds, idemfn / baseline. Targets are reported,"
        " not asserted."
    )


def print_memory(
    results: list[MemoryResult], threads_before: int, threads_after: int, names: list[str]
) -> bool:
    ok = True
    slack = " or ".join(f"{v // 1024} KiB ({k})" for k, v in LEAK_SLACK_BYTES.items())
    print(
        f"\nMemory (tracemalloc; a leak is growth > {slack} + {LEAK_BYTES_PER_CALL:g} B/call)"
        " and threads\n"
    )
    for r in results:
        records = (
            f"records hold {r.records_bytes:,} B ({r.records_bytes / r.calls:.0f} B each)"
            if r.store == "MemoryStore"
            else f"records are on disk ({r.extra['disk_bytes_per_record']:.0f} B each)"
        )
        verdict = "LEAK" if r.leaks else "ok"
        ok = ok and not r.leaks
        print(
            f"  {r.store}, {r.calls:,} first calls: {records}; growth besides them"
            f" {r.first_calls_growth:+,} B ({r.per_call(r.first_calls_growth):+.3f} B/call)"
        )
        print(
            f"  {r.store}, {r.calls:,} replays, batch 1: {r.replays_1_growth:+,} B"
            f" ({r.per_call(r.replays_1_growth):+.3f} B/call); batch 2:"
            f" {r.replays_2_growth:+,} B ({r.per_call(r.replays_2_growth):+.3f} B/call)"
            f"  -> {verdict}"
        )
        started_ok = len(r.threads_started) <= 1
        ok = ok and started_ok
        print(
            f"  {r.store}: threads started during the {3 * r.calls:,} calls:"
            f" {len(r.threads_started)} {r.threads_started}"
            f"  -> {'ok' if started_ok else 'THREAD PER CALL'}"
        )
    count_ok = threads_after <= threads_before + 1
    ok = ok and count_ok
    print(
        f"  threading.active_count(): {threads_before} before any call, {threads_after} after"
        f" (at most {threads_before + 1} allowed)  -> {'ok' if count_ok else 'TOO MANY'}"
    )
    print(f"  threads now: {names}")
    return ok


def main(argv: list[str] | None = None) -> int:
    threads_before = threading.active_count()  # before any idemfn call: no heartbeat yet
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (test suite)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write results here")
    parser.add_argument("--rounds", type=int, help="timed rounds per side (default 11, quick 7)")
    parser.add_argument(
        "--round-time",
        type=float,
        metavar="SECONDS",
        help="target duration of one round (default 0.2, quick 0.02)",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="time rounds with wall time (default) or this thread's CPU time (busy machines)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also time the replay path stage by stage and cProfile it",
    )
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]

    rounds = args.rounds or (7 if args.quick else 11)
    round_ns = 1e9 * (args.round_time or (0.02 if args.quick else 0.2))
    mem_calls = 5_000 if args.quick else 100_000
    disk_mem_calls = 1_500 if args.quick else 20_000

    info = machine_info()
    print(
        "idemfn core benchmarks"
        + (" (--quick)" if args.quick else "")
        + (", timed with this thread's CPU time" if args.clock == "cpu" else "")
    )
    print("  " + ", ".join(f"{k} {v}" for k, v in info.items()))

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="idemfn-bench-") as tmp:
        root = Path(tmp)
        fx = Fixture(root)
        try:
            pairs = disk_pairs(fx) + variant_pairs(fx) + memory_pairs(fx)
            for p in pairs:
                p.measure(rounds, round_ns)
            print_table(pairs, rounds)
            checksum = checksum_cost(fx, pairs, rounds, round_ns)
            profile = profile_replay(fx, rounds, round_ns) if args.profile else None

            memory_started = time.perf_counter()
            memory = [
                memory_check_memorystore(mem_calls),
                memory_check_diskstore(disk_mem_calls, root),
            ]
            threads_after = threading.active_count()
            names = sorted(t.name for t in threading.enumerate())
            memory_ok = print_memory(memory, threads_before, threads_after, names)
            memory_seconds = time.perf_counter() - memory_started
        finally:
            fx.close()

    elapsed = time.perf_counter() - started
    print(
        f"\n{'memory/threads ok' if memory_ok else 'MEMORY/THREAD CHECK FAILED'};"
        f" {elapsed:.1f} s ({memory_seconds:.1f} s of it the memory check)"
    )
    if args.json is not None:
        report = {
            "machine": info,
            "settings": {
                "quick": args.quick,
                "rounds": rounds,
                "round_seconds": round_ns / 1e9,
                "replay_key_pool": POOL,
                "clock": args.clock,
            },
            "benchmarks": [p.as_json() for p in pairs],
            "record_checksum": checksum,
            "memory": [m.as_json() for m in memory],
            "threads": {"before": threads_before, "after": threads_after, "names": names},
            "memory_ok": memory_ok,
            "replay_stages_us": profile,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    return 0 if memory_ok else 1


if __name__ == "__main__":
    sys.exit(main())
