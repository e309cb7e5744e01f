"""The scale benchmark stays runnable in its quick form, and checks what it measures."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# One machine-loading tool at a time under xdist (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("machine-load")


@pytest.mark.slow
def test_scale_benchmark_quick_run_measures_every_size(tmp_path: Path) -> None:
    report = tmp_path / "scale.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_scale.py"),
            "--quick",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for records in ("1,000 records", "10,000 records", "100,000 records"):
        assert records in out
    for row in ("100 B result", "100 kB result", "10 MB result"):
        assert row in out
    assert "through the decorator" in out
    results = json.loads(report.read_text(encoding="utf-8"))
    assert [f["records"] for f in results["fill"]] == [1_000, 10_000, 100_000]
    scale = results["scale"]
    assert {(r["records"], r["name"].split()[0]) for r in scale} == {
        (n, access) for n in (1_000, 10_000, 100_000) for access in ("hot", "uniform")
    }
    for r in scale + results["result_size"]:
        assert r["idemfn_us"] > 0 and r["baseline_us"] > 0
    assert [r["result_bytes"] for r in results["result_size"]] == [100, 100_000, 10_000_000]


def test_scale_benchmark_fills_records_a_replay_reads(tmp_path: Path) -> None:
    """The records the benchmark fills through the store API replay like the decorator's own:
    same key, same fingerprint, no body run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_scale
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    scale = bench_scale.ScaleStore(tmp_path)
    try:
        assert scale.fill(2_000) > 0
        assert scale.count == 2_000
        scale.check(2_000, random.Random(0))
        record = scale.fn.status(1_999)
        assert record is not None
        assert record.key == scale.fn.key_for(1_999)
        assert scale.body_calls == 1  # only the template record ran the body
    finally:
        scale.store.close()


@pytest.mark.slow
def test_sizing_benchmark_quick_run_measures_every_store(tmp_path: Path) -> None:
    """bench_sizing.py --quick (docs/scaling.md's figures, small): bytes per record, server CPU
    per call, and prune at two sizes with a caller running meanwhile, on real servers."""
    report = tmp_path / "sizing.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_sizing.py"),
            "--quick",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(report.read_text(encoding="utf-8"))
    stores = ["DiskStore", "RedisStore", "PostgresStore"]
    assert [(r["store"], r["result"]) for r in results["bytes"]] == [
        (s, size) for s in stores for size in ("100 B", "10 kB")
    ]
    for row in results["bytes"]:
        assert row["bytes"] > 0
        assert row["entry_bytes"] > 0
    assert all(r["wal_bytes"] > 0 for r in results["bytes"] if r["store"] == "PostgresStore")
    assert {(r["store"], r["call"]) for r in results["cpu"]} == {
        (s, c) for s in stores[1:] for c in ("first call", "replay")
    }
    assert all(r["server_cpu_us"] > 0 for r in results["cpu"])
    prune = results["prune"]
    assert {(r["store"], r["how"], r["records"]) for r in prune} == {
        (s, how, n)
        for n in (1_000, 3_000)
        for s, how in [(s, "prune()") for s in stores] + [("PostgresStore", "one DELETE (before)")]
    }
    for row in prune:
        expired = 0 if row["store"] == "RedisStore" else row["records"] // 10
        if row["records"] == 1_000:  # (at 3,000 a caller claims some expired keys first)
            assert row["removed"] == expired
        else:  # (none when prune ended before the caller's next call: a busy machine)
            assert isinstance(row["during"], dict), row  # the caller's latencies meanwhile
