"""Bare ``os.fork()`` children that never return into pytest."""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections.abc import Callable

__all__ = ["fork_and_wait"]


def fork_and_wait(child: Callable[[], int], timeout: float = 120.0) -> int:
    """Run ``child`` in a forked process and return its exit status: what ``child`` returns,
    70 if it raised (its traceback printed). A child still running after ``timeout`` seconds is
    SIGKILLed and the test fails."""
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            code = child()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(raw)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child hung")
