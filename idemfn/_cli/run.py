"""``idemfn run``: run a shell command at most once per key, and replay its outcome after.

The command's output is streamed live to this process's stdout and stderr and recorded, in
order, with its exit status. Exit 0 records the key ``ok``; any other status (or a signal)
records it ``halted`` with a ``CommandFailed`` carrying the same outcome, so ``idemfn ls
--status halted`` lists failed steps and ``idemfn forget`` releases one after a human checked
it. A later run with the key writes the recorded bytes to the same streams and exits with the
recorded status. The claim, its heartbeat, the fencing and abandoned owners are the engine's,
exactly as for a Python caller.
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
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType, TracebackType
from typing import Any, BinaryIO, Final, TypedDict

from ._engine import Claim, Finished, Policy, begin
from ._errors import Halted, StoreError
from ._fingerprint import fingerprint_value
from ._record import Entry, Status
from ._stores import Store
from ._stores.base import Corrupt

__all__ = [
    "CommandFailed",
    "CommandOutcome",
    "ForeignRecord",
    "exit_status",
    "outcome_in",
    "recorded",
    "replay",
    "run_once",
]

#: Marks a recorded value as the outcome of ``idemfn run``, and its layout's version.
MARK: Final = "idemfn.run/1"

#: How many bytes of output a run records by default (the rest is still streamed), and at
#: most: a record must stay well below SQLite's 1 GB limit on a value, and fit in memory.
MAX_OUTPUT: Final = 16 * 2**20
MAX_OUTPUT_LIMIT: Final = 256 * 2**20

# Signals the runner passes on to the command instead of dying of them. SIGINT and SIGQUIT
# come from the keyboard too: see _Forwarder.
FORWARDED: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_KEYBOARD: Final = (signal.SIGINT, signal.SIGQUIT)

_CHUNK = 65536
_LINGER = 0.1  # seconds without output after which the runner checks the command
_DRAIN = 1.0  # seconds the runner keeps reading, after the command exited, from what it left
_AWAIT_POLL = 0.01  # seconds between looks at the replaced claim's supervisor (see _await_replaced)
_SAY_WAITING = 0.5  # seconds of that wait after which the runner says what it waits for


class CommandOutcome(TypedDict):
    """What ``idemfn run`` records: plain values only, so a record never depends on a class."""

    format: str  # MARK
    argv: list[str]
    returncode: int  # as subprocess reports it: -N when a signal N ended the command
    output: list[tuple[int, bytes]]  # (1 = stdout, 2 = stderr, bytes), in the order written
    dropped: int  # bytes of output past the recording limit: streamed, not recorded
    interrupted_by: str | None  # the signal the runner received and passed on, if any


class CommandFailed(Exception):
    """The recorded failure of a command run by ``idemfn run``: it exited with a non-zero
    status, was ended by a signal, or the runner was interrupted.

    Records refer to this class by its import path (``idemfn._run.CommandFailed``): keep it.
    """

    def __init__(self, outcome: CommandOutcome) -> None:
        super().__init__(describe(outcome))
        self.outcome = outcome

    def __reduce__(self) -> tuple[object, ...]:
        return (CommandFailed, (self.outcome,))


def describe(outcome: CommandOutcome) -> str:
    """One line saying which command ran and how it ended."""
    return f"command `{shlex.join(outcome['argv'])}` {ending(outcome)}"


def ending(outcome: CommandOutcome) -> str:
    """How the command ended: "exited with code 3", "was ended by SIGKILL", ..."""
    code = outcome["returncode"]
    ended = f"was ended by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
    if outcome["interrupted_by"]:
        ended += f" after the runner received {outcome['interrupted_by']}"
    return ended


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def exit_status(returncode: int) -> int:
    """The status a shell reports for a command that ended with ``returncode``."""
    return 128 - returncode if returncode < 0 else returncode


def status_of(outcome: CommandOutcome) -> int:
    """The status ``idemfn run`` exits with for ``outcome``, now and on every replay: the
    command's, except that an interrupted command that still exited 0 gives 128 + the signal
    (its record is halted: a success status would hide that)."""
    status = exit_status(outcome["returncode"])
    interrupted = outcome["interrupted_by"]
    if status == 0 and interrupted:
        return 128 + int(signal.Signals[interrupted])
    return status


def fingerprint(argv: Sequence[str], env_names: Sequence[str]) -> str:
    """What identifies a run: the command line and the named environment variables (an unset
    variable and an empty one differ)."""
    env = {name: os.environ.get(name) for name in env_names}
    return fingerprint_value([MARK, list(argv), env], where="the command line")


class _Forwarder:
    """Passes the signals in ``FORWARDED`` on to the command, and remembers the first one.

    While the runner holds nothing, such a signal ends it as if it had no handler (nothing
    ran, nothing is held). From the moment a claim may be written (``claiming``: see
    ``_Watched``) it is remembered instead: a claim that took the key is then released and
    the command is not started, and one that did not ends the runner at once (``let_go``).
    Once the command runs, it is passed on. The command runs in the runner's process group, so
    that a terminal works with it as with any command (it may read the terminal; Ctrl-Z stops
    both). The price: a key pressed on the terminal sends SIGINT or SIGQUIT to both processes,
    so those two are only passed on when the runner is not in the terminal's foreground group
    (a ``kill -INT`` from elsewhere).
    """

    def __init__(self) -> None:
        self.holding = False  # a claim: from now on, signals are remembered
        self.claiming = False  # a claim may have been written, and may be this runner's
        self.child: _Command | None = None
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> _Forwarder:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may handle signals (main() called from a thread)
        for signum in FORWARDED:
            # A signal the runner was started ignoring (nohup, a background job's SIGINT)
            # stays ignored, by the runner and by the command, which inherits that.
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def first(self) -> signal.Signals | None:
        """The first signal received since the claim (a handler may set it at any moment)."""
        return self.received

    def let_go(self) -> None:
        """No claim was taken (or none is held any more): end the runner now if a signal came
        while a claim was being written, as it would have had the runner held nothing."""
        self.claiming = False
        if self.received is not None and not self.holding:
            _die_of(self.received)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if not (self.holding or self.claiming):  # still looking at the key: die of it
            _die_of(sig)
            return
        if self.received is None:
            self.received = sig
        child = self.child
        if child is None or child.returncode is not None:
            return  # not started (and it will not be), or already gone
        if sig in _KEYBOARD and _terminal_delivers_to_us():
            return  # the terminal sent it to the command as well
        child.send_signal(sig)


def _die_of(sig: signal.Signals) -> None:
    """End this process with ``sig``, as if it had no handler for it."""
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


class _Watched(Store):
    """The store, as ``begin`` sees it in the runner: the same store, except that a write that
    may take the key (a claim, the takeover of an abandoned claim) puts the forwarder in its
    ``claiming`` state first. Between that write and ``begin`` returning the claim, the runner
    holds a key it cannot know of yet: a signal handled then must not kill it (issue 14: the
    key stayed processing, the command never ran, and the next run exited 69). Records the
    token of the claim a takeover replaced (``replaced``). The claim it returns is given the
    store itself (``run_once``)."""

    def __init__(self, store: Store, forwarder: _Forwarder) -> None:
        self.store = store
        self.forwarder = forwarder
        self.replaced: str | None = None
        self.signer = store.signer
        self._thread = threading.get_ident()

    @property
    def claims_first(self) -> bool:  # type: ignore[override]
        return self.store.claims_first

    def _looking(self) -> bool:
        # Not the heartbeat's renewals, nor the claim's own writes once it is held.
        return not self.forwarder.holding and threading.get_ident() == self._thread

    def claim(self, entry: Entry) -> Entry | None:
        if not self._looking():
            return self.store.claim(entry)
        self.forwarder.claiming = True
        found: Entry | None = entry
        try:
            found = self.store.claim(entry)
        finally:
            if found is not None:  # not taken (or it raised): nothing is held
                self.forwarder.let_go()
        return found

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        if entry.status != Status.PROCESSING or entry.token == token or not self._looking():
            return self.store.swap(key, token, entry)  # not a takeover
        self.forwarder.claiming = True
        taken = False
        try:
            taken = self.store.swap(key, token, entry)
        finally:
            if not taken:
                self.forwarder.let_go()
        if taken:
            self.replaced = token
        return taken

    def get(self, key: str) -> Entry | None:
        return self.store.get(key)

    def release(self, key: str, token: str) -> bool:
        return self.store.release(key, token)

    def delete(self, key: str, token: str | None = None) -> bool:
        return self.store.delete(key, token)

    def scan(self, prefix: str = "", *, corrupt: Corrupt | None = None) -> Iterator[Entry]:
        return self.store.scan(prefix, corrupt=corrupt)

    def time(self) -> float:
        return self.store.time()

    def prune(self) -> int:
        return self.store.prune()

    def bytes_used(self) -> int | None:
        return self.store.bytes_used()

    def close(self) -> None:
        self.store.close()

    def __repr__(self) -> str:
        return repr(self.store)

    def __getattr__(self, name: str) -> Any:  # what stores add beyond the interface
        if name == "store":  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self.store, name)


def _terminal_delivers_to_us() -> bool:
    """Whether this process is in its terminal's foreground process group."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False  # no controlling terminal
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


class _Streams:
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


def _pump(
    child: _Command, streams: _Streams, on_exit: Callable[[], None]
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


def _record(chunks: Iterator[tuple[int, bytes]], limit: int) -> tuple[list[tuple[int, bytes]], int]:
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


def _execute(
    claim: Claim,
    argv: list[str],
    forwarder: _Forwarder,
    max_output: int,
    replaced: str | None,
    settle: Callable[[CommandOutcome], None],
) -> CommandOutcome:
    """Run the command and ``settle`` its outcome (record it) before letting go of it: until
    then, a runner that dies takes down all the command started (see ``_Command``)."""
    env = dict(os.environ, IDEMFN_KEY=claim.key, IDEMFN_ATTEMPT=str(claim.attempt))
    _not_interrupted(forwarder, argv)
    if replaced is not None:
        _await_replaced(replaced, claim.key, argv, forwarder)
    command = _Command(argv, env, _marker(claim.token))
    # The signal that interrupted the command: one received before it exited. (One received
    # while its leftover output drains does not turn a success into a failure.)
    interrupted: list[signal.Signals | None] = []
    with command:
        forwarder.child = command
        early = forwarder.first()
        if early is not None:  # arrived while the supervisor (elsewhere: the command) started
            command.send_signal(early)  # (the supervisor then does not start the command)
        command.start()
        chunks = _pump(command, _Streams(), lambda: interrupted.append(forwarder.first()))
        output, dropped = _record(chunks, max_output)
        returncode = command.wait()
        received = interrupted[0] if interrupted else forwarder.first()
        outcome: CommandOutcome = {
            "format": MARK,
            "argv": argv,
            "returncode": returncode,
            "output": output,
            "dropped": dropped,
            "interrupted_by": received.name if received is not None else None,
        }
        settle(outcome)
    return outcome


def _not_interrupted(forwarder: _Forwarder, argv: list[str]) -> None:
    """Raise ``CannotStart`` (the key is then released) if a signal came since the claim."""
    early = forwarder.first()
    if early is not None:
        raise _interrupted(early, argv)


def _interrupted(sig: signal.Signals, argv: list[str]) -> CannotStart:
    return CannotStart(f"interrupted by {sig.name} before {argv[0]!r} started", exit_status(-sig))


def _supervisor() -> str | None:
    """The supervising process's script (``_supervise``), where it can run: Linux, with
    ``/proc`` and an interpreter to run it with."""
    if not sys.platform.startswith("linux") or not sys.executable or hasattr(sys, "frozen"):
        return None  # (a frozen application's executable would run itself)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_supervise.py")
    return script if os.path.isfile(script) and os.path.isdir("/proc/self/task") else None


def _marker(token: str) -> str:
    """What names a claim in the command line of the process supervising its command (a hash:
    other users can read command lines, and the token fences the claim)."""
    import hashlib

    return f"idemfn-claim={hashlib.sha256(token.encode()).hexdigest()[:32]}"


class _Command:
    """The running command, as the runner sees it.

    On Linux the runner starts a supervising process (``idemfn/_supervise.py``), which starts
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
        script = _supervisor()
        self._supervised = script is not None
        if script is None:
            self._process = self._popen(argv, env)
            return
        from . import _supervise

        _supervise.become_subreaper()
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
            raise _interrupted(signal.Signals(int(number)), self.argv)
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
        from . import _supervise

        _supervise.kill_children()
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.write(
                f"idemfn run: the process supervising `{shlex.join(self.argv)}` ended"
                f" ({exit_status(code)}) before reporting how the command ended; what the"
                " command started was killed\n"
            )
        self._ended = code

    def __enter__(self) -> _Command:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._ctl is not None:  # done with the command: the supervisor may go
                from ._supervise import LET_GO

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


def _await_replaced(replaced: str, key: str, argv: list[str], forwarder: _Forwarder) -> None:
    """Before a takeover runs the command again: wait until the process that supervised the
    replaced claim's command on this machine, if one is left, has killed all it started and
    exited (its runner died: see ``_Command``), so that the two never run side by side."""
    if _supervisor() is None:
        return
    marker = _marker(replaced).encode()
    waiting = [pid for pid in _own_processes() if _runs(pid, marker)]
    say_at: float | None = time.monotonic() + _SAY_WAITING
    while waiting:
        _not_interrupted(forwarder, argv)
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


def run_once(
    store: Store,
    key: str,
    argv: list[str],
    *,
    policy: Policy,
    fingerprint: str,
    retry_on_exit: frozenset[int] = frozenset(),
    max_output: int = MAX_OUTPUT,
) -> tuple[CommandOutcome, bool]:
    """Run ``argv`` unless ``key`` has a record; return its outcome and whether it ran now.

    Raises what ``begin`` raises, ``Halted`` for a halted key with no recorded outcome (its
    runner was killed), ``CannotStart``, and ``OwnershipLost`` from recording. A store that
    fails to record the outcome of a command that ran is reported on stderr, and the command's
    own outcome is returned: its exit status is what the runner exits with.
    """
    with _Forwarder() as forwarder:
        watched = _Watched(store, forwarder)
        try:
            step = begin(key, store=watched, fingerprint=fingerprint, policy=policy)
        except BaseException:
            forwarder.let_go()
            raise
        if isinstance(step, Finished):
            forwarder.let_go()
            return recorded(step), False
        forwarder.holding = True  # (from claiming: a signal is remembered all along)
        step.store = store  # its heartbeat and outcome need no watching: the store itself
        with step as claim:

            def settle(outcome: CommandOutcome) -> None:
                status = exit_status(outcome["returncode"])
                try:
                    if outcome["interrupted_by"] is None and status in retry_on_exit:
                        claim.release()
                    elif outcome["returncode"] == 0 and outcome["interrupted_by"] is None:
                        claim.complete(outcome)
                    else:
                        claim.halt(CommandFailed(outcome))
                except StoreError as exc:
                    sys.stderr.write(
                        f"idemfn run: {shlex.join(argv)} ran and exited {status}, but its"
                        f" outcome could not be recorded: {exc}. The key is left processing:"
                        " the next run finds it abandoned and halts it (with --on-abandoned"
                        " retry, runs it again)\n"
                    )

            try:
                outcome = _execute(claim, argv, forwarder, max_output, watched.replaced, settle)
            except CannotStart:
                claim.release()  # nothing ran: the next run may try again
                raise
    return outcome, True


class ForeignRecord(Exception):
    """The key's record was made by a Python call, not by ``idemfn run``."""


def recorded(finished: Finished) -> CommandOutcome:
    """The command outcome a finished record holds.

    Raises ``Halted`` when it holds none (its runner died), and ``ForeignRecord`` when a Python
    call made it (with ``fingerprint=False``, or the check would have refused it first).
    """
    key = finished.entry.key
    try:
        value = finished.replay()
    except CommandFailed as failed:
        return failed.outcome
    except Halted:
        exc_type = finished.entry.exc_type
        if exc_type is None:  # abandoned, or interrupted while recording
            raise
        if exc_type.endswith(".CommandFailed"):
            raise Halted(
                f"the recorded outcome of key {key!r} ({finished.entry.message}) no longer loads"
                " in this version of idemfn",
                key=key,
                reason="the recorded command outcome no longer loads",
            ) from None
        raise ForeignRecord(_foreign(key)) from None
    except Exception:  # a Python call's recorded exception
        raise ForeignRecord(_foreign(key)) from None
    outcome = outcome_in(value)
    if outcome is None:
        raise ForeignRecord(_foreign(key))
    return outcome


def _foreign(key: str) -> str:
    return f"key {key!r} holds the record of a Python call, not of `idemfn run`: use another key"


def replay(outcome: CommandOutcome) -> int:
    """Write the recorded output to the same streams, in order; return the exit status."""
    streams = _Streams()
    for fd, data in outcome["output"]:
        streams.write(fd, data)
    if outcome["dropped"]:
        errors = [data for fd, data in outcome["output"] if fd == 2]
        apart = b"\n" if errors and not errors[-1].endswith(b"\n") else b""
        streams.write(2, apart + f"{dropped_note(outcome)}\n".encode())
    return status_of(outcome)


def die_like_the_command(outcome: CommandOutcome) -> None:
    """End this process with the signal that ended the command, if the runner received it
    too (Ctrl-C, a SIGTERM passed on): a shell running a script of ``idemfn run`` lines then
    stops the script, as it would had it run the command itself ("wait and cooperative exit").
    A command that caught the signal and exited leaves the runner to exit with its status."""
    code, received = outcome["returncode"], outcome["interrupted_by"]
    if code >= 0 or received is None or signal.Signals(-code).name != received:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)


def dropped_note(outcome: CommandOutcome) -> str:
    return (
        f"idemfn: {outcome['dropped']} more bytes of output were not recorded (past the"
        " --max-output limit)"
    )


def outcome_in(value: object) -> CommandOutcome | None:
    """The command outcome a record's loaded value or exception is, if it is one."""
    if isinstance(value, CommandFailed):
        return value.outcome
    if isinstance(value, dict) and value.get("format") == MARK:
        return value  # type: ignore[return-value]
    return None
