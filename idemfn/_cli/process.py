"""The command's process, as ``idemfn run`` starts, watches and copies it.

On Linux the command runs under a supervising process (``supervise``), which kills all the
command started when the runner dies; elsewhere it is the runner's own child.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import selectors
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import BinaryIO, Final

from .command_outcome import exit_status

__all__ = [
    "FORWARDED",
    "CannotStart",
    "Command",
    "Streams",
    "await_replaced",
    "claim_marker",
    "interrupted_start",
    "kept_output",
    "pump",
    "supervisor_script",
]

# Signals the runner passes on to the command instead of dying of them. SIGINT and SIGQUIT
# come from the keyboard too: see _Forwarder.
FORWARDED: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

_CHUNK = 65536
_LINGER = 0.1  # seconds without output after which the runner checks the command
_DRAIN = 1.0  # seconds the runner keeps reading, after the command exited, from what it left
_AWAIT_POLL = 0.01  # seconds between looks at the replaced claim's supervisor (see await_replaced)
_SAY_WAITING = 0.5  # seconds of that wait after which the runner says what it waits for


class Streams:
    """This process's stdout and stderr, written as raw bytes. A stream that fails (a reader
    that left, a full disk, a terminal that hung up, a closed descriptor) stops the copying to
    that stream, never the command or the recording."""

    def __init__(self) -> None:
        # A closed stream (`>&-`) is None in sys; its output is still recorded.
        self._out: dict[int, BinaryIO | None] = {
            1: getattr(sys.stdout, "buffer", None),
            2: getattr(sys.stderr, "buffer", None),
        }

    def write(self, fd: int, data: bytes) -> None:
        stream = self._out[fd]
        if stream is None:
            return
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            self._out[fd] = None
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), fd)  # no error at interpreter exit
            if not isinstance(exc, (BrokenPipeError, ValueError)):
                name = "stdout" if fd == 1 else "stderr"
                self.write(
                    2,
                    f"idemfn: stopped copying the command's {name} ({exc});"
                    " it is still recorded\n".encode(),
                )


def pump(
    child: Command, streams: Streams, on_exit: Callable[[], None]
) -> Iterator[tuple[int, bytes]]:
    """Copy the command's output to ``streams`` as it comes, yielding each chunk.

    Ends when both pipes are closed, or, once the command has exited, when nothing more comes
    for a moment: a process it left in the background may hold the pipes open for ever.
    """
    pipes = {child.stdout.fileno(): 1, child.stderr.fileno(): 2}
    exited_at: float | None = None
    with selectors.DefaultSelector() as selector:
        for pipe in pipes:
            os.set_blocking(pipe, False)
            selector.register(pipe, selectors.EVENT_READ)
        while selector.get_map():
            ready = selector.select(timeout=_LINGER)
            for key, _ in ready:
                pipe = int(key.fd)
                data = _read(pipe)
                if data == b"":
                    selector.unregister(pipe)
                elif data is not None:
                    streams.write(pipes[pipe], data)
                    yield pipes[pipe], data
            if exited_at is None:
                if child.poll() is not None:
                    exited_at = time.monotonic()
                    on_exit()
            elif not ready or time.monotonic() - exited_at > _DRAIN:
                break


def _read(pipe: int) -> bytes | None:
    """Up to a chunk from a non-blocking pipe: b"" at its end, None when nothing is there."""
    try:
        return os.read(pipe, _CHUNK)
    except BlockingIOError:
        return None


def kept_output(
    chunks: Iterator[tuple[int, bytes]], limit: int
) -> tuple[list[tuple[int, bytes]], int]:
    """The first ``limit`` bytes of the chunks, neighbours from one stream joined, and how
    many bytes were left out."""
    merged: list[tuple[int, bytearray]] = []
    kept = dropped = 0
    for fd, data in chunks:
        room = limit - kept
        if len(data) > room:
            dropped += len(data) - max(room, 0)
            data = data[: max(room, 0)]
            if not data:
                continue
        kept += len(data)
        if merged and merged[-1][0] == fd:
            merged[-1][1].extend(data)
        else:
            merged.append((fd, bytearray(data)))
    return [(fd, bytes(data)) for fd, data in merged], dropped


class CannotStart(Exception):
    """The command could not be started (not found, not executable); nothing ran."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def interrupted_start(sig: signal.Signals, argv: list[str]) -> CannotStart:
    return CannotStart(f"interrupted by {sig.name} before {argv[0]!r} started", exit_status(-sig))


def supervisor_script() -> str | None:
    """The supervising process's script (``supervise.py``), where it can run: Linux, with
    ``/proc`` and an interpreter to run it with."""
    if not sys.platform.startswith("linux") or not sys.executable or hasattr(sys, "frozen"):
        return None  # (a frozen application's executable would run itself)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "supervise.py")
    return script if os.path.isfile(script) and os.path.isdir("/proc/self/task") else None


def claim_marker(token: str) -> str:
    """What names a claim in the command line of the process supervising its command (a hash:
    other users can read command lines, and the token fences the claim)."""
    import hashlib

    return f"idemfn-claim={hashlib.sha256(token.encode()).hexdigest()[:32]}"


class Command:
    """The running command, as the runner sees it.

    On Linux the runner starts a supervising process (``idemfn/_cli/supervise.py``), which starts
    the command when told to (``start``), passes on the signals the runner writes to it and
    reports the command's status; when the runner dies, even of SIGKILL, before it is done
    with the command (``__exit__``: its outcome recorded), it kills every process the command
    started (issue 14: ``PR_SET_PDEATHSIG`` reached only the command's own process). It is in
    a process group of its own, so that SIGKILL for the runner's group does not kill it too
    (the command stays in the runner's group). The runner is a child subreaper as well:
    should the supervisor be killed, what the command started comes to the runner, which
    kills it (``_report``). Elsewhere the command is the runner's own child. Both share the
    runner's stdin and output pipes.
    """

    def __init__(self, argv: list[str], env: dict[str, str], marker: str) -> None:
        self.argv = argv
        self._ctl: int | None = None  # the control pipe's write end (supervised)
        self._status: int | None = None  # the status pipe's read end (supervised)
        self._reported = b""
        self._ended: int | None = None  # the command's return code (supervised)
        script = supervisor_script()
        self._supervised = script is not None
        if script is None:
            self._process = self._popen(argv, env)
            return
        from . import supervise

        supervise.become_subreaper()
        ctl_r, self._ctl = map(_above_stdio, os.pipe())
        self._status, status_w = map(_above_stdio, os.pipe())
        # The supervisor starts with these blocked, until it ignores them: one sent to the
        # runner's group while its interpreter starts killed it (exit 126 for a signal before
        # the start). This thread's mask only: the runner's handler still sees them.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            self._process = self._popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    script,
                    str(ctl_r),
                    str(status_w),
                    marker,
                    "--",
                    *argv,
                ],
                env,
                pass_fds=(ctl_r, status_w),
            )
        except BaseException:
            self._close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(ctl_r)
            os.close(status_w)
        os.set_blocking(self._ctl, False)  # written from a signal handler: never block there

    def _popen(
        self, argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()
    ) -> subprocess.Popen[bytes]:
        try:
            return subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, pass_fds=pass_fds
            )
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise CannotStart(f"cannot run {argv[0]!r}: {exc.strerror}", 127) from exc
        except OSError as exc:  # permission denied, exec format error, ...
            raise CannotStart(f"cannot run {argv[0]!r}: {exc.strerror or exc}", 126) from exc

    @property
    def stdout(self) -> BinaryIO:
        assert self._process.stdout is not None
        return self._process.stdout  # type: ignore[return-value]

    @property
    def stderr(self) -> BinaryIO:
        assert self._process.stderr is not None
        return self._process.stderr  # type: ignore[return-value]

    @property
    def returncode(self) -> int | None:
        """Not None once the command is known to have exited (see ``poll``)."""
        return self._ended if self._supervised else self._process.returncode

    def poll(self) -> int | None:
        """The command's return code if it has exited, else None."""
        if not self._supervised:
            return self._process.poll()
        if self._ended is None:
            self._report(block=False)
        return self._ended

    def send_signal(self, sig: signal.Signals) -> None:
        if not self._supervised:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(sig)
        elif self._ctl is not None:
            with contextlib.suppress(OSError):  # the supervisor is gone (or hopelessly behind)
                os.write(self._ctl, bytes([sig]))

    def start(self) -> None:
        """Let the supervisor start the command: raise ``CannotStart`` if it could not, or if
        a signal was passed on before this (then the command is not started)."""
        if self._ctl is None:
            return  # started by Popen
        with contextlib.suppress(OSError):  # (a supervisor that died says nothing: see below)
            os.write(self._ctl, b"\0")
        line = self._line() or ""
        if line == "S":
            return
        what, _, number = line.partition(" ")
        if what == "I":
            raise interrupted_start(signal.Signals(int(number)), self.argv)
        if what == "E":
            code = int(number)
            missing = code in (errno.ENOENT, errno.ENOTDIR)
            raise CannotStart(
                f"cannot run {self.argv[0]!r}: {os.strerror(code)}", 127 if missing else 126
            )
        self._process.wait()
        why = self.stderr.read().decode(errors="replace").strip().splitlines()
        raise CannotStart(
            f"cannot run {self.argv[0]!r}: its supervising process ({sys.executable}) exited"
            f" with status {self._process.returncode} before starting it"
            f"{': ' + why[-1] if why else ''}",
            126,
        )

    def _line(self, block: bool = True) -> str | None:
        """The next line the supervisor reports ("" when it exited without one; None when
        none is there yet and not ``block``)."""
        assert self._status is not None
        while b"\n" not in self._reported:
            if not block and not _readable(self._status):
                return None
            data = os.read(self._status, 512)
            if not data:
                break
            self._reported += data
        line, _, self._reported = self._reported.partition(b"\n")
        return line.decode("ascii", errors="replace")

    def wait(self) -> int:
        """The command's return code, as subprocess gives it (-N: ended by signal N). The
        supervisor stays until ``__exit__``."""
        if not self._supervised:
            return self._process.wait()
        if self._ended is None:
            self._report(block=True)
        assert self._ended is not None
        return self._ended

    def _report(self, block: bool) -> None:
        """Read the supervisor's report that the command ended, if it is there (``block``:
        wait for it), into ``_ended``."""
        line = self._line(block)
        if line is None:
            return
        if line.startswith("X "):
            self._ended = os.waitstatus_to_exitcode(int(line[2:]))
            return
        # Killed before it could report (the OOM killer, a kill -9 of its pid): the command
        # died with it, and what it started came to this process (a subreaper): kill it, or
        # it would run on behind a key recorded halted.
        code = self._process.wait()
        from . import supervise

        supervise.kill_children()
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.write(
                f"idemfn run: the process supervising `{shlex.join(self.argv)}` ended"
                f" ({exit_status(code)}) before reporting how the command ended; what the"
                " command started was killed\n"
            )
        self._ended = code

    def __enter__(self) -> Command:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._ctl is not None:  # done with the command: the supervisor may go
                from .supervise import LET_GO

                with contextlib.suppress(OSError):
                    os.write(self._ctl, bytes([LET_GO]))
            self._process.__exit__(exc_type, exc, tb)  # close the pipes, wait
        finally:
            self._close()

    def _close(self) -> None:
        for fd in (self._ctl, self._status):
            if fd is not None:
                os.close(fd)
        self._ctl = self._status = None


def _readable(fd: int) -> bool:
    """Whether reading ``fd`` would not block. (poll, not select: the runner may have been
    given descriptors past select's limit of 1024.)"""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _above_stdio(fd: int) -> int:
    """``fd``, moved above 2 if it is a standard stream's number (one that was closed, as by
    ``<&-``): there, starting the supervisor or writing to a failed stream would replace it."""
    if fd > 2:
        return fd
    import fcntl

    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def await_replaced(replaced: str, key: str, not_interrupted: Callable[[], None]) -> None:
    """Before a takeover runs the command again: wait until the process that supervised the
    replaced claim's command on this machine, if one is left, has killed all it started and
    exited (its runner died: see ``Command``), so that the two never run side by side."""
    if supervisor_script() is None:
        return
    marker = claim_marker(replaced).encode()
    waiting = [pid for pid in _own_processes() if _runs(pid, marker)]
    say_at: float | None = time.monotonic() + _SAY_WAITING
    while waiting:
        not_interrupted()  # raises CannotStart when a signal came meanwhile
        if say_at is not None and time.monotonic() >= say_at:
            say_at = None
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.write(
                    f"idemfn run: key {key!r} was abandoned by a runner that died; waiting for"
                    f" the processes its command started to be killed (by pid {waiting[0]})"
                    " before running it again\n"
                )
                sys.stderr.flush()
        time.sleep(_AWAIT_POLL)
        waiting = [pid for pid in waiting if _runs(pid, marker)]


def _own_processes() -> Iterator[int]:
    uid = os.getuid()
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if entry.stat().st_uid == uid:
                        yield int(entry.name)


def _runs(pid: int, marker: bytes) -> bool:
    """Whether ``pid`` still runs with ``marker`` in its command line (a zombie has none)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False
