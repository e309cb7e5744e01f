"""The process between ``idemfn run`` and its command, on Linux: when the runner dies, even of
SIGKILL, it kills every process the command started.

Why (issue 14): ``PR_SET_PDEATHSIG`` on the command reached only the command's own process, so
the ``step`` of ``sh -c 'step; echo done'`` ran on after its runner was killed, beside the
retry of the abandoned key. This process is a child subreaper (``PR_SET_CHILD_SUBREAPER``):
every process the command starts that loses its parent (a killed shell's step, a daemon that
forked twice) becomes its child. When the runner dies, the control pipe, whose only write end
the runner holds, reads end-of-file: this process kills the command with SIGKILL, then each
process that comes to it, until it has no child left. It stays until the runner is done with
the command's outcome, not only until the command exits: a runner killed while the command
exits, or while it records the outcome, leaves the key abandoned, and what the command left
running (a background job) is killed then too. (A group SIGKILL ends the command and its runner
at the same instant: had this process taken the command's end for a finished run, what the
command started elsewhere would run on beside the retry.)

It runs in a process group of its own, and puts the command back in the runner's: a signal
for the runner's whole group (``kill -9 -- -PGID``, ``timeout -s KILL``) killed it along with
the runner, and then nothing killed what the command started outside that group (a step that
``timeout`` put in a group of its own, a daemon). The runner starts it with the signals it
passes on blocked, so that one sent to the group before this process could ignore them (while
the interpreter starts) waits, and is then dropped: it reached the runner too, which passes it
on through CTL. The runner is a child subreaper as well, and kills what comes to it should this
process die first (``kill_children``).

Started by ``idemfn._cli.process`` as ``python -I -S supervise.py CTL STATUS MARKER -- CMD
[ARG ...]``: no site, no environment variables, and only modules that cost no time to import
(every run that starts a command waits for this process to start it). MARKER only names the
claim in this process's command line, for a runner that takes the key over (see
``process.await_replaced``).

CTL (read): byte 0 means "start the command", byte 255 (``LET_GO``) "done with the command:
leave what it left running", any other byte is a signal for the command. A signal that comes
before byte 0, or right after it, before this process read it, means the runner was
interrupted before the start: the command is not started.
STATUS (written), one line each: ``S`` started; ``E errno`` could not start; ``I signum`` not
started, interrupted; ``X status`` the command ended, with this wait status.
"""

from __future__ import annotations

import os
import select
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
else:
    import _signal as signal  # `signal` builds its enums at import: 5 ms of every run

# The runner passes these on through CTL (``process.FORWARDED``): sent to the whole process
# group (a key pressed on the terminal), they reach the command directly, and must not end this.
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
#: The runner's last byte on CTL: it is done with the command (see above).
LET_GO = 255


def main(argv: list[str]) -> int:
    """Start the command when the runner says so, pass on its signals, report how it ended;
    kill all it started if the runner dies first. ``argv`` is ``sys.argv`` (see above)."""
    ctl, status = int(argv[1]), int(argv[2])
    command = argv[5:]  # argv[3] is the marker, argv[4] "--"
    group = os.getpgrp()  # the runner's: the command's
    try:
        os.setpgid(0, 0)  # out of reach of what is sent to the runner's group (see above)
    except OSError:  # pragma: no cover - a session leader
        pass
    for fd in (ctl, status):
        os.set_inheritable(fd, False)  # the command gets neither
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # The command gets the dispositions the runner had: a signal the runner was started
    # ignoring stays ignored (nohup), the others take their default action, as do SIGPIPE and
    # SIGXFSZ, which Python ignores (as subprocess restores them).
    default = [sig for sig in _FORWARDED if signal.getsignal(sig) != signal.SIG_IGN]
    default += [signal.SIGPIPE, signal.SIGXFSZ]
    for sig in _FORWARDED:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)  # (blocked by the runner: above)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)  # a child that ends wakes the poll below
    signal.signal(signal.SIGCHLD, _ignore)

    first = os.read(ctl, 1)
    if not first:
        return 0  # the runner died before the start: nothing to do
    if first == b"\0":
        # The runner says "start" as soon as this process exists: a signal it passed on
        # while this interpreter started (some 20 ms) came before the start too.
        os.set_blocking(ctl, False)
        try:
            first = os.read(ctl, 1) or first  # (end-of-file: seen again below)
        except BlockingIOError:
            pass
        os.set_blocking(ctl, True)
    if first != b"\0":
        _tell(status, f"I {first[0]}")
        return 0
    try:
        pid = _spawn(command, default, prctl, group)
    except OSError as exc:
        _tell(status, f"E {exc.errno or 0}")
        return 0
    _tell(status, "S")
    # Let go of the output pipes: the runner reads them until the command's processes close them.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)

    poller = select.poll()
    poller.register(ctl, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    ended = let_go = False
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if wake_r in ready:
            os.read(wake_r, 512)
            wait_status = _reap(pid)  # (and any other child that ended: no zombies)
            if wait_status is not None and not ended:  # (not a later child with its pid)
                ended = True  # reaped: from now on `pid` may be another process's
                _tell(status, f"X {wait_status}")
        if ctl in ready:
            data = os.read(ctl, 512)
            if not data:  # the runner died: take down all the command started
                if not ended:
                    _kill(pid, signal.SIGKILL)
                kill_children()
                return 0
            for signum in data:
                if signum == LET_GO:
                    let_go = True
                elif not ended:
                    _kill(pid, signum)  # not reaped yet: still the command's pid
        if ended and let_go:
            return 0


def _ignore(signum: int, frame: object) -> None:
    """SIGCHLD's handler: only there so that the wakeup fd is written."""


def _spawn(
    command: list[str],
    default: list[signal.Signals],
    prctl: Callable[..., int] | None,
    group: int,
) -> int:
    """Start the command in process group ``group`` with ``default`` signals back to their
    default action; raise the ``OSError`` of a failed exec. (Not posix_spawn: glibc's leaves
    its internal signals ignored in the command.) Should this process be killed, the command
    dies with it."""
    report_r, report_w = os.pipe()  # close-on-exec: end-of-file means the exec succeeded
    me = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, until exec
        try:
            os.close(report_r)
            if prctl is not None:
                prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                if os.getppid() != me:  # killed before that took effect
                    os._exit(128 + signal.SIGKILL)
            for sig in default:
                signal.signal(sig, signal.SIG_DFL)
            try:
                os.setpgid(0, group)  # the terminal's foreground group, when the runner is in it
            except OSError:  # the group is gone: the runner died, this process kills it
                pass
            os.execvpe(command[0], command, os.environ)
        except OSError as exc:
            os.write(report_w, str(exc.errno or 0).encode())
        finally:
            os._exit(127)
    os.close(report_w)
    with os.fdopen(report_r, "rb") as report:
        failed = report.read()
    if failed:
        os.waitpid(pid, 0)
        code = int(failed)
        raise OSError(code, os.strerror(code))
    return pid


def _prctl() -> Callable[..., int] | None:
    try:
        import ctypes

        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):  # pragma: no cover - a Python without ctypes
        return None
    return prctl


def become_subreaper() -> None:
    """Make this process a child subreaper, where Linux offers it: the runner's part in
    ``kill_children`` (the processes the command started that this process's child left)."""
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _tell(status: int, line: str) -> None:
    try:
        os.write(status, f"{line}\n".encode())
    except OSError:  # the runner is gone
        pass


def _kill(pid: int, signum: int) -> bool:
    """Send ``signum`` to ``pid``; False if it may not be signalled (another user's)."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        return False
    return True


def _reap(pid: int) -> int | None:
    """Reap every child that ended; the command's wait status, if it is one of them."""
    ended = None
    while True:
        try:
            child, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return ended
        if child == 0:
            return ended
        if child == pid:
            ended = wait_status


def kill_children() -> None:
    """SIGKILL every child this process has or gets, until none is left.

    A killed process cannot start another, and what it started comes to this process when it
    dies (its subreaper), so this ends. A process that cannot be signalled (it runs as another
    user: sudo) is left alone.
    """
    spared: set[int] = set()
    while True:
        for child in _children() - spared:
            if not _kill(child, signal.SIGKILL):
                spared.add(child)
        if spared and not _children() - spared:
            return  # only processes out of reach are left: do not wait for them
        try:
            os.waitpid(-1, 0)  # one ended: whatever it started is now a child of this process
        except ChildProcessError:
            return


def _children() -> set[int]:
    me = os.getpid()
    children: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{me}/task"):  # each thread's (the runner has several)
            try:
                with open(f"/proc/{me}/task/{task}/children", encoding="ascii") as f:
                    children.update(int(child) for child in f.read().split())
            except FileNotFoundError:
                if task == str(me):
                    raise
                # a thread that ended meanwhile: its children went to another
        return children
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: look at every process
        pass
    children = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                parent = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if parent == me:
            children.add(int(name))
    return children


if __name__ == "__main__":
    sys.exit(main(sys.argv))
