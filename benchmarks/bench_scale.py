#!/usr/bin/env python
"""Scale benchmarks of idemfn: does a DiskStore replay stay fast as the store grows, and what
does the size of the result cost?

    python benchmarks/bench_scale.py              # full run: 1k, 100k and 1M records (minutes)
    python benchmarks/bench_scale.py --quick      # 1k, 10k, 100k records (< 30 s), for the tests
    python benchmarks/bench_scale.py --sizes 1000,50000 --json PATH

One DiskStore grows to each size in turn; at each size, replays of ``@idempotent`` are timed
against a raw ``diskcache.Cache.get`` of the same keys on the same cache (the store's own), with
bench_core.py's method: calibrated rounds, a warm-up round per side, rounds alternating idemfn
and baseline (A B, B A, ...), the garbage collector off, medians. Two access patterns:

- hot: replays cycle over 4,096 recorded keys spread over the whole store (after warm-up their
  pages sit in SQLite's page cache);
- uniform: each replay is of a key drawn at random from every record in the store (at 1M
  records the table is ~400 MB, far more than SQLite's page cache: pages come from the OS).

Records are filled through the store API (``DiskStore.claim`` of finished records, in
transactions of 5,000), each a copy of one record the decorator wrote, with its own key and
fingerprint: the bytes a replay reads are the bytes the decorator writes. Then replays of
results of 100 B, 100 kB and 10 MB are timed the same way.

Results are reported, never asserted: the exit code is 0 unless a replay ran the body or
returned a wrong value.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import CLOCKS, Pair, machine_info, spread

from idemfn import DiskStore, Status, idempotent
from idemfn._fingerprint import fingerprint_arguments

clock = time.perf_counter_ns

SIZES_FULL = (1_000, 100_000, 1_000_000)
SIZES_QUICK = (1_000, 10_000, 100_000)
RESULT_SIZES = (100, 100_000, 10_000_000)
HOT_KEYS = 4096  # more than the decorator's key memo holds (256): every replay misses it
BATCH = 5_000  # records per fill transaction
SMALL_RESULT = {"a": 1, "b": 2, "c": 3}


def _timed_calls(fn: Callable[[Any], Any], args: Sequence[Any]) -> int:
    t0 = clock()
    for a in args:
        fn(a)
    return clock() - t0


class ScaleStore:
    """A DiskStore of replayable records of one decorated function, grown by ``fill``."""

    def __init__(self, root: Path) -> None:
        self.store = DiskStore(root / "scale")
        self.body_calls = 0

        @idempotent(key="r:{i}", store=self.store, name="bench.scale.replay")
        def replay(i: int) -> dict[str, int]:
            self.body_calls += 1
            return dict(SMALL_RESULT)

        self.fn = replay
        assert replay(0) == SMALL_RESULT  # record 0 through the decorator: the template
        first_key = replay.key_for(0)
        template = self.store.get(first_key)
        assert template is not None
        assert template.status == "ok"
        # The filled records carry the fingerprint the decorator computes for their arguments.
        assert template.fingerprint == fingerprint_arguments(("i",), {"i": 0})
        self.template = template
        self.prefix = first_key.removesuffix("0")
        assert self.key(12345) == replay.key_for(12345)
        self.count = 1

    def key(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def fill(self, n: int) -> float:
        """Grow to ``n`` records; the seconds it took."""
        store, template, fingerprint = self.store, self.template, fingerprint_arguments
        started = time.perf_counter()
        i = self.count
        while i < n:
            end = min(i + BATCH, n)
            with store.cache.transact():
                for j in range(i, end):
                    record = template._replace(
                        key=f"{self.prefix}{j}",
                        fingerprint=fingerprint(("i",), {"i": j}),
                        token=f"fill-{j}",
                    )
                    if store.claim(record) is not None:
                        raise AssertionError(f"record {j} was already there")
            i = end
        self.count = max(self.count, n)
        return time.perf_counter() - started

    def check(self, n: int, rng: random.Random) -> None:
        """Spot-check records across the store: recorded ok, replayed without the body."""
        before = self.body_calls
        for i in [0, n - 1, *rng.sample(range(n), min(n, 50))]:
            record = self.fn.status(i)
            assert record is not None, i
            assert record.status is Status.OK, i
            assert self.fn(i) == SMALL_RESULT
        assert self.body_calls == before, "a replay ran the body"


def decorator_first_call_us(store: DiskStore, calls: int) -> float:
    """Microseconds per first call through the decorator (no-op body, a new key each)."""

    @idempotent(key="f:{i}", store=store, name="bench.scale.first")
    def first(i: int) -> None:
        return None

    first(-1)  # warm-up
    t0 = time.perf_counter_ns()
    for i in range(calls):
        first(i)
    return (time.perf_counter_ns() - t0) / calls / 1000


@dataclass
class Row:
    pair: Pair
    extra: dict[str, Any]


def scale_pairs(scale: ScaleStore, n: int, seed: int) -> list[Pair]:
    fn, cache = scale.fn, scale.store.cache
    hot = random.Random(seed).sample(range(n), min(n, HOT_KEYS))
    hot_keys = [scale.key(i) for i in hot]
    offsets = {"idemfn": 0, "baseline": 0}
    rngs = {"idemfn": random.Random(seed + 1), "baseline": random.Random(seed + 2)}

    def cycle(side: str, n_calls: int) -> list[int]:
        start = offsets[side]
        offsets[side] = (start + n_calls) % len(hot)
        return [(start + j) % len(hot) for j in range(n_calls)]

    def replays(args: list[int]) -> int:
        before = scale.body_calls
        elapsed = _timed_calls(fn, args)
        assert scale.body_calls == before, "a replay ran the body"
        return elapsed

    def gets(keys: list[str]) -> int:
        elapsed = _timed_calls(cache.get, keys)
        assert cache.get(keys[-1]) is not None
        return elapsed

    def hot_idemfn(calls: int) -> int:
        return replays([hot[j] for j in cycle("idemfn", calls)])

    def hot_baseline(calls: int) -> int:
        return gets([hot_keys[j] for j in cycle("baseline", calls)])

    def uniform_idemfn(calls: int) -> int:
        rng = rngs["idemfn"]
        return replays([rng.randrange(n) for _ in range(calls)])

    def uniform_baseline(calls: int) -> int:
        rng = rngs["baseline"]
        return gets([scale.key(rng.randrange(n)) for _ in range(calls)])

    return [
        Pair(f"hot {len(hot):,} keys", hot_idemfn, hot_baseline, "Cache.get", None),
        Pair("uniform over all", uniform_idemfn, uniform_baseline, "Cache.get", None),
    ]


def result_size_pairs(root: Path) -> tuple[DiskStore, list[tuple[int, Pair]]]:
    store = DiskStore(root / "sizes")
    cache = store.cache
    calls = {"body": 0}
    values: dict[int, bytes] = {}

    @idempotent(key="size:{size}", store=store, name="bench.scale.sized")
    def sized(size: int) -> bytes:
        calls["body"] += 1
        return values[size]

    pairs = []
    for size in RESULT_SIZES:
        values[size] = os.urandom(size)
        assert sized(size) == values[size]
        assert sized(size) == values[size]  # replayed, equal
        key = sized.key_for(size)
        assert calls["body"] == len(values)

        def idemfn_replay(n: int, size: int = size) -> int:
            before = calls["body"]
            elapsed = _timed_calls(sized, [size] * n)
            assert calls["body"] == before, "a replay ran the body"
            return elapsed

        def raw_get(n: int, key: str = key) -> int:
            return _timed_calls(cache.get, [key] * n)

        pairs.append((size, Pair(_size_label(size), idemfn_replay, raw_get, "Cache.get", None)))
    values.clear()  # the records are in the store now
    return store, pairs


def minor_faults_per_call(run: Callable[[int], int], calls: int = 5) -> float:
    """Page faults per call over a few untimed calls: a large result's time is mostly the
    faults of fresh buffers when the allocator hands out new pages (see the README)."""
    if resource is None:  # not on this platform
        return float("nan")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run(calls)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def _size_label(size: int) -> str:
    for unit, scale in (("MB", 1_000_000), ("kB", 1_000)):
        if size >= scale:
            return f"{size / scale:g} {unit} result"
    return f"{size} B result"


def print_scale_table(rows: list[Row], rounds: int) -> None:
    print(f"\nDiskStore replay vs store size: us per call, median of {rounds} interleaved rounds\n")
    header = (
        f"{'records':>10} {'access':<18} {'idemfn us':>10} {'Cache.get us':>13} {'ratio':>7}"
        f" {'overhead us':>12} {'spread A/B':>11}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        p = row.pair
        noise = f"{spread(p.idemfn_rounds):.0f}%/{spread(p.baseline_rounds):.0f}%"
        print(
            f"{row.extra['records']:>10,} {p.name:<18} {p.idemfn_us:>10.2f} {p.baseline_us:>13.2f}"
            f" {p.ratio:>6.2f}x {p.idemfn_us - p.baseline_us:>12.2f} {noise:>11}"
        )
    for access in ("hot", "uniform"):
        same = [r for r in rows if r.pair.name.startswith(access)]
        if len(same) >= 2:
            lo, hi = same[0], same[-1]
            print(
                f"{access}: from {lo.extra['records']:,} to {hi.extra['records']:,} records,"
                f" idemfn replay x{hi.pair.idemfn_us / lo.pair.idemfn_us:.2f},"
                f" Cache.get x{hi.pair.baseline_us / lo.pair.baseline_us:.2f},"
                f" idemfn's overhead {lo.pair.idemfn_us - lo.pair.baseline_us:.2f} ->"
                f" {hi.pair.idemfn_us - hi.pair.baseline_us:.2f} us"
            )


def print_size_table(rows: list[Row], rounds: int) -> None:
    print(f"\nDiskStore replay vs result size: us per call, median of {rounds} rounds\n")
    header = (
        f"{'result':<18} {'idemfn us':>11} {'Cache.get us':>13} {'ratio':>7} {'overhead us':>12}"
        f" {'idemfn MB/s':>12} {'faults/call A/B':>16} {'spread A/B':>11}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        p = row.pair
        noise = f"{spread(p.idemfn_rounds):.0f}%/{spread(p.baseline_rounds):.0f}%"
        rate = row.extra["result_bytes"] / p.idemfn_us  # bytes per us = MB/s
        f = row.extra["minor_faults"]
        faults = f"{f['idemfn']:.0f}/{f['baseline']:.0f}"
        print(
            f"{p.name:<18} {p.idemfn_us:>11.1f} {p.baseline_us:>13.1f} {p.ratio:>6.2f}x"
            f" {p.idemfn_us - p.baseline_us:>12.1f} {rate:>12.0f} {faults:>16} {noise:>11}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (test suite)")
    parser.add_argument("--sizes", help="comma-separated store sizes (default 1k,100k,1M)")
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
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    if args.sizes:
        sizes = tuple(sorted(int(s.replace("_", "")) for s in args.sizes.split(",")))
    else:
        sizes = SIZES_QUICK if args.quick else SIZES_FULL
    if sizes[0] < 1:
        parser.error("--sizes must be positive")
    rounds = args.rounds or (7 if args.quick else 11)
    round_ns = 1e9 * (args.round_time or (0.02 if args.quick else 0.2))

    info = machine_info()
    print("idemfn scale benchmarks" + (" (--quick)" if args.quick else ""))
    print("  " + ", ".join(f"{k} {v}" for k, v in info.items()))
    started = time.perf_counter()
    scale_rows: list[Row] = []
    size_rows: list[Row] = []
    fills: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="idemfn-bench-scale-") as tmp:
        root = Path(tmp)
        first_store = DiskStore(root / "first")
        try:
            first_us = decorator_first_call_us(first_store, 300 if args.quick else 2000)
        finally:
            first_store.close()
        scale = ScaleStore(root)
        try:
            for n in sizes:
                seconds = scale.fill(n)
                scale.check(n, random.Random(n))
                db_bytes = scale.store.bytes_used() or 0
                fills.append({"records": n, "seconds": seconds, "db_bytes": db_bytes})
                print(
                    f"\n{n:,} records: filled in {seconds:.1f} s through DiskStore.claim;"
                    f" database {db_bytes / 1e6:.1f} MB ({db_bytes / max(scale.count, 1):.0f}"
                    " B per record)"
                )
                for pair in scale_pairs(scale, n, seed=n):
                    pair.measure(rounds, round_ns)
                    scale_rows.append(Row(pair, {"records": n}))
                    print(
                        f"  {pair.name:<18} idemfn {pair.idemfn_us:8.2f} us,"
                        f" Cache.get {pair.baseline_us:8.2f} us"
                    )
        finally:
            scale.store.close()
        per_record = sum(f["seconds"] for f in fills) / max(scale.count - 1, 1) * 1e6
        print(
            f"\nFilling: {per_record:.1f} us per record through DiskStore.claim (transactions"
            f" of {BATCH:,}); a first call through the decorator takes {first_us:.1f} us, so"
            f" 1,000,000 records through it would take ~{first_us:.0f} s"
        )
        print_scale_table(scale_rows, rounds)

        sized_store, pairs = result_size_pairs(root)
        try:
            for size, pair in pairs:
                pair.measure(rounds, round_ns)
                faults = {
                    side: minor_faults_per_call(run)
                    for side, run in (("idemfn", pair.idemfn), ("baseline", pair.baseline))
                }
                size_rows.append(Row(pair, {"result_bytes": size, "minor_faults": faults}))
        finally:
            sized_store.close()
        print_size_table(size_rows, rounds)

    elapsed = time.perf_counter() - started
    print(f"\nscale benchmarks done in {elapsed:.1f} s")
    if args.json is not None:
        report = {
            "machine": info,
            "settings": {
                "quick": args.quick,
                "sizes": list(sizes),
                "rounds": rounds,
                "round_seconds": round_ns / 1e9,
                "hot_keys": HOT_KEYS,
                "clock": args.clock,
            },
            "fill": fills,
            "decorator_first_call_us": first_us,
            "scale": [{**r.extra, **r.pair.as_json()} for r in scale_rows],
            "result_size": [{**r.extra, **r.pair.as_json()} for r in size_rows],
            "elapsed_seconds": elapsed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
