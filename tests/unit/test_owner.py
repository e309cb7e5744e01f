"""``idemfn._owner``: whether a claim's owner on this machine still runs, from /proc."""

from __future__ import annotations

import os

import pytest

from idemfn import _owner

pytestmark = pytest.mark.skipif(not _owner._HAS_PROC, reason="owners are judged from /proc")


def stat_line(pid: int, state: str, flags: int, start: str) -> str:
    # /proc/<pid>/stat: pid (comm) state ppid pgrp session tty tpgid flags ... starttime (22nd)
    fields = [state, "1", str(pid), str(pid), "0", "-1", str(flags)] + ["0"] * 12 + [start]
    return f"{pid} (python3 (worker)) " + " ".join(fields + ["0"] * 10)


def owner_of(pid: int, start: str) -> str:
    host, machine, _, _ = _owner.parse(_owner.current())  # type: ignore[misc]
    return f"{host}/{machine}/{pid}/{start}"


@pytest.mark.parametrize(
    ("state", "flags", "gone"),
    [
        ("S", 0x400100, False),  # asleep in a syscall: alive
        ("R", 0x400040, False),  # running: alive
        ("R", 0x400044, True),  # running do_exit() (PF_EXITING), e.g. a SIGKILL carried out
        ("D", 0x404, True),  # exiting, waiting on I/O as it tears down
        ("Z", 0x400004, True),  # exited, not yet reaped
    ],
)
def test_a_process_that_is_exiting_is_gone(
    monkeypatch: pytest.MonkeyPatch, state: str, flags: int, gone: bool
) -> None:
    # A SIGKILLed worker's connection drops before the kernel is done tearing it down: a retry
    # in that window must see the owner gone (500 "interrupted"), not alive (409).
    pid = 4_000_000
    line = stat_line(pid, state, flags, "123456")
    real = _owner._read
    monkeypatch.setattr(
        _owner, "_read", lambda path: line if path == f"/proc/{pid}/stat" else real(path)
    )
    reason = _owner.gone_reason(owner_of(pid, "123456"))
    assert (reason is not None) is gone, reason


def test_a_recycled_pid_is_gone_and_the_running_process_is_not() -> None:
    me = _owner.current()
    assert _owner.gone_reason(me) is None
    host, machine, pid, start = _owner.parse(me)  # type: ignore[misc]
    assert _owner.gone_reason(f"{host}/{machine}/{os.getppid()}/{start}x") is not None
    assert _owner.gone_reason(f"{host}/{machine}/{pid}/{start}") is None
