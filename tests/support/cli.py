"""Running the real ``idemfn`` command in subprocesses, for the tests in tests/cli and beyond."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

__all__ = [
    "PY",
    "SCRIPT",
    "TIMEOUT",
    "argv_of",
    "checked",
    "cli_env",
    "idemfn_cli",
    "needs_script",
    "one_line",
    "poll",
]

TIMEOUT = 60.0
PY = sys.executable


def _installed_script() -> str | None:
    """The ``idemfn`` console script of this interpreter's environment, if installed."""
    beside = Path(sys.executable).with_name("idemfn")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("idemfn")


SCRIPT = _installed_script()
needs_script = pytest.mark.skipif(SCRIPT is None, reason="the idemfn console script is absent")


def cli_env(store: Path | str, **extra: str | None) -> dict[str, str]:
    """This environment with ``IDEMFN_STORE=store`` (and ``extra``; None unsets a variable)."""
    env = {k: v for k, v in os.environ.items() if k != "IDEMFN_DEBUG"}
    env["IDEMFN_STORE"] = str(store)
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def argv_of(args: Sequence[str | Path], *, script: bool = False) -> list[str]:
    if script:
        assert SCRIPT is not None
        return [SCRIPT, *map(str, args)]
    return [sys.executable, "-m", "idemfn", *map(str, args)]


def checked(
    proc: subprocess.CompletedProcess[bytes], status: int | None
) -> subprocess.CompletedProcess[bytes]:
    """``proc``, after checking it printed no traceback and exited ``status`` (unless None)."""
    what = (
        f"{subprocess.list2cmdline(proc.args)} exited {proc.returncode}\n"
        f"stdout: {proc.stdout[-2000:]!r}\nstderr: {proc.stderr[-2000:]!r}"
    )
    assert b"Traceback" not in proc.stderr, what
    if status is not None:
        assert proc.returncode == status, what
    return proc


def idemfn_cli(
    *args: str | Path,
    env: Mapping[str, str],
    status: int | None = 0,
    script: bool = False,
    cwd: Path | None = None,
    stderr: int = subprocess.PIPE,
) -> subprocess.CompletedProcess[bytes]:
    """Run the command; check its exit status (unless None) and that it printed no traceback."""
    proc = subprocess.run(
        argv_of(args, script=script),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=dict(env),
        cwd=cwd,
        timeout=TIMEOUT,
        check=False,
    )
    err = proc.stderr if stderr == subprocess.PIPE else b""  # None when redirected
    return checked(
        subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, err), status
    )


def one_line(stderr: bytes) -> str:
    """The one line an error prints on stderr."""
    text = stderr.decode()
    assert text.endswith("\n") and text.count("\n") == 1, text
    return text


def poll(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)
