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
