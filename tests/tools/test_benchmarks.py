"""The benchmark stays runnable, and its memory and thread checks hold (no timing asserted)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# One machine-loading tool at a time under xdist (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("machine-load")


@pytest.mark.slow
def test_core_benchmark_quick_run_finds_no_leak_and_no_thread_per_call() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_core.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for row in ("replay, DiskStore", "first call, DiskStore", "replay, MemoryStore"):
        assert row in out
    assert "memory/threads ok" in out


@pytest.mark.slow
def test_store_benchmark_quick_run_measures_every_store() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_stores.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for store in ("MemoryStore", "DiskStore", "RedisStore", "PostgresStore"):
        for what in ("replay", "first call"):
            assert f"{store} {what}" in done.stdout


@pytest.mark.slow
def test_deployment_benchmark_quick_run_measures_every_deployment() -> None:
    # Exit 0 also says no setting broke what it promises (GuaranteeBroken exits 1): no
    # duplicate run with replicas=1, nothing acknowledged lost with a synchronous standby.
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_deploy.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for section in ("cluster", "pgbouncer", "redis-failover", "pg-failover"):
        assert f"## {section} (load" in done.stdout, section
    assert "GUARANTEE BROKEN" not in done.stdout


@pytest.mark.slow
def test_observability_benchmark_quick_run_measures_every_setting() -> None:
    # Exit 0 also says each integration measured recorded what it was fed (spans exported,
    # decisions counted): a cost measured with nothing recorded would be no cost at all.
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_observe.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for call in ("replay, DiskStore", "first call, DiskStore", "replay, MemoryStore"):
        for setting in ("no handler", "live, no event", "no-op handler"):
            assert f"{call:<24} {setting:<28}" in out, (call, setting)
    # The integrations are measured wherever they import (the test group has their libraries).
    for setting, module in (
        ("otel spans+metrics", "idemfn.otel"),
        ("otel metrics only", "idemfn.otel"),
        ("prometheus", "idemfn.prometheus"),
    ):
        row = f"replay, DiskStore        {setting:<28}"
        assert row in out, setting
        if importlib.util.find_spec(module) is not None:
            assert f"{row} skipped" not in out, out
