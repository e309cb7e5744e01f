"""Who owns a claim, and whether that owner still runs.

An owner is ``host/machine/pid/start``: the hostname; the machine's boot id plus the pid
namespace (two containers with one hostname are still told apart, and so is the same host after
a reboot); the pid; and the process's start time in clock ticks since boot, so a recycled pid is
never mistaken for the original process. On the same machine a dead owner is seen at once; a
remote owner is only judged by its lease, above this module.
"""

from __future__ import annotations

import os
import socket
import sys

__all__ = ["current", "gone_reason", "parse"]


_HAS_PROC = sys.platform.startswith("linux") and os.path.exists("/proc/self/stat")


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _machine() -> str:
    boot = _read("/proc/sys/kernel/random/boot_id").replace("-", "")[:16]
    try:
        pidns = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        pidns = ""
    return f"{boot}.{pidns}" if boot and _HAS_PROC else ""


_PF_EXITING = 0x4  # the kernel's flag for a process in do_exit(): it never runs code again


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(state, start time, flags) of a pid from /proc, or None when no such process exists."""
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = raw.rpartition(")")[2].split()
    if len(fields) < 20:
        return None
    try:
        flags = int(fields[6])
    except ValueError:
        flags = 0
    return fields[0], fields[19], flags


def _identity() -> str:
    pid = os.getpid()
    stat = _stat(pid) if _HAS_PROC else None
    start = stat[1] if stat else ""
    return f"{socket.gethostname()}/{_machine()}/{pid}/{start}"


_current = _identity()


def current() -> str:
    """This process's owner string."""
    return _current


def _after_fork() -> None:
    global _current
    _current = _identity()


os.register_at_fork(after_in_child=_after_fork)


def parse(owner: str) -> tuple[str, str, int, str] | None:
    """(host, machine, pid, start) of an owner string, or None if it is not one of ours."""
    parts = owner.split("/")
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2]), parts[3]


def same_boot(owner: str) -> bool:
    """Whether ``owner`` runs on this machine, since its last boot (so that its monotonic clock
    is this process's)."""
    mine = parse(_current)
    theirs = parse(owner)
    return mine is not None and theirs is not None and bool(mine[1]) and theirs[:2] == mine[:2]


def gone_reason(owner: str) -> str | None:
    """Why ``owner`` is known to be gone, or None when it may still run.

    Only owners on this machine can be judged here; for any other owner this returns None and
    the lease decides.
    """
    if owner == _current:
        return None
    mine = parse(_current)
    theirs = parse(owner)
    if mine is None or theirs is None:
        return None
    host, machine, pid, start = theirs
    # Without /proc (macOS, Windows) the machine part is empty: only the lease can tell.
    if host != mine[0] or machine != mine[1] or not machine:
        return None
    stat = _stat(pid)
    if stat is None:
        return f"its process {pid} on {host} no longer exists"
    state, now_start, flags = stat
    if state in ("Z", "X") or (flags & _PF_EXITING and now_start == start):
        # Exiting (a SIGKILL being carried out) counts as gone: it runs no more of the body.
        return f"its process {pid} on {host} has exited"
    if now_start != start:
        return f"its process {pid} on {host} has exited (the pid now runs another process)"
    return None
