"""The README's examples run, and its commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_python_examples_run_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {"__name__": "readme"}
    blocks = _blocks("python")
    assert len(blocks) >= 8
    for number, block in enumerate(blocks, 1):
        code = compile(block, f"README.md python block {number}", "exec")
        exec(code, namespace)
    out = capsys.readouterr().out
    assert out.count("charging o-17") == 1  # the intro's second call replayed
    assert "readme.charge:charge:o-1" in out


def test_ci_runs_the_readme_test_command_exactly() -> None:
    commands = [
        line
        for block in _blocks("sh")
        for line in block.splitlines()
        if line and not line.startswith("#")
    ]
    assert len(commands) == 2, commands
    demo, test = commands
    assert "examples/demo.py" in demo
    assert demo.endswith("&& idemfn ls")  # test_demo_... runs that part too
    assert "pytest" in test and "ruff check" in test and "mypy --strict idemfn" in test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == test


def test_demo_runs_and_replays_across_processes(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "IDEMFN_STORE": str(tmp_path / "store")}
    demo = [sys.executable, str(ROOT / "examples" / "demo.py")]
    first = subprocess.run(demo, env=env, capture_output=True, text=True, check=True).stdout
    second = subprocess.run(demo, env=env, capture_output=True, text=True, check=True).stdout
    assert "call 1: " in first and "(ran the body)" in first
    assert first.count("the body runs") == 2  # the charge and the failing refund
    assert "the body runs" not in second and "(ran the body)" not in second
    assert second.count("replayed, body not run") == 2
    listing = subprocess.run(
        [sys.executable, "-m", "idemfn", "ls"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert listing.split()[:5] == ["KEY", "STATUS", "AGE", "OWNER", "EXPIRES"]
    assert "idemfn.demo.charge:charge:order-1001  ok" in listing
    assert "idemfn.demo.refund:refund:order-1001  halted" in listing
    assert second.count("idemfn: replayed from the record") == 2
