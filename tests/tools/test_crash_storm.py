"""The crash storm (stress/crash_storm.py), short: a few seconds per store and mode.

Worker processes call ``@idempotent`` keys while the script SIGKILLs them at random, then it
checks the invariants of ``on_abandoned="halt"`` and ``"retry"`` from evidence the bodies write
outside the store. The long run is by hand (see the script's docstring). The script runs on the
suite's own servers (``--url``), and one run with ``--sabotage`` proves that the checker fails
when a body does run twice.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import PostgresServer, RedisServer

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "stress" / "crash_storm.py"

# One machine-loading tool at a time under xdist (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("machine-load")

# Short and light (2 cores): 3 workers, 30 keys in play, a new key set every second. A 5 s
# lease (renewed every 1.7 s): a live worker's heartbeat may fall 3 s behind on a busy machine
# before its claim could be taken over, which the checker would count as a violation.
QUICK = ["--workers", "3", "--keys", "30", "--generation", "1", "--lease", "5"]


def storm(*args: str, timeout: float = 120) -> tuple[int, str, list[dict[str, str]]]:
    """Run the script; its exit status, its output, and its summary lines as dicts."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = done.stdout + done.stderr
    summaries = [
        dict(field.split("=", 1) for field in line.split()[1:])
        for line in done.stdout.splitlines()
        if line.startswith("crash-storm ")
    ]
    return done.returncode, output, summaries


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["disk", "redis", "postgres"])
def test_crash_storm_finds_no_violation(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if kind == "disk":
        url = str(tmp_path / "store")
    elif kind == "redis":
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        url = redis_server.url
    else:
        pg: PostgresServer = request.getfixturevalue("postgres_server")
        url = pg.dsn
    status, output, summaries = storm(
        "--store",
        kind,
        "--url",
        url,
        "--mode",
        "both",
        "--seconds",
        "2.5",
        "--workdir",
        str(tmp_path / "work"),
        *QUICK,
    )
    assert status == 0, output
    assert [s["mode"] for s in summaries] == ["halt", "retry"], output
    for summary in summaries:
        assert summary["store"] == kind
        assert summary["violations"] == "0", output
        assert int(summary["kills"]) > 0, output
        assert int(summary["calls"]) > 0, output
        assert int(summary["runs"]) > 0, output
        assert int(summary["ok"]) > 0, output
    halt, retry = summaries
    assert retry["halted"] == "0" and retry["ok"] == retry["keys"], output
    assert int(halt["ok"]) + int(halt["halted"]) == int(halt["keys"]), output


@pytest.mark.slow
def test_crash_storm_reports_a_body_that_runs_twice(tmp_path: Path) -> None:
    # --sabotage (test only): now and then a worker runs the body without idempotency.
    status, output, summaries = storm(
        "--store",
        "disk",
        "--url",
        str(tmp_path / "store"),
        "--mode",
        "both",
        "--seconds",
        "1.5",
        "--workdir",
        str(tmp_path / "work"),
        "--sabotage",
        "--show",
        "10000",
        *QUICK,
    )
    assert status == 1, output
    assert [s["mode"] for s in summaries] == ["halt", "retry"], output
    for summary in summaries:
        assert int(summary["violations"]) > 0, output
    assert "the body started 2 times with on_abandoned='halt'" in output
    assert "attempt 1 started 2 times" in output
    assert "evidence kept in" in output
