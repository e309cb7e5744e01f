"""benchmarks/compare.py stays runnable, measures every peer it finds, and writes its table,
CSV and plot (no timing is asserted: targets are for the benchmark's own report)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# One machine-loading tool at a time under xdist (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("machine-load")

PEERS = [
    "idemfn DiskStore",
    "raw diskcache get / add+set",
    "diskcache memoize",
    "joblib.Memory",
    "cachier (pickle)",
    "functools.lru_cache",
    "idemfn RedisStore",
    "raw redis GET / SET NX",
    "Powertools (Redis)",
    "idemfn PostgresStore",
    "raw SELECT / INSERT",
]


@pytest.mark.slow
def test_the_comparison_runs_and_writes_its_table_csv_and_plot(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "compare.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = (tmp_path / "compare.md").read_text()
    for name in PEERS:  # the test extra installs every peer: none may be missing
        assert f"| {name} |" in table, name
    assert "Not measured" not in table
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert {r["section"] for r in rows} == {"latency", "concurrency", "scaling"}
    # idemfn never runs a body twice, whatever the concurrency; lru_cache (per process) does.
    duplicates = {
        (r["system"], r["measure"], r["x"]): int(r["value"])
        for r in rows
        if r["measure"].endswith("duplicates")
    }
    assert all(v == 0 for (system, *_), v in duplicates.items() if system.startswith("idemfn"))
    assert duplicates[("functools.lru_cache", "hot duplicates", "2")] > 0
    png = (tmp_path / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
