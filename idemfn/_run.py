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
import os
import selectors
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import BinaryIO, Final, TypedDict

from ._engine import Claim, Finished, Policy, begin
from ._errors import Halted, StoreError
from ._fingerprint import fingerprint_value
from ._stores import Store

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

    Until the runner holds a claim, such a signal ends it as if it had no handler (nothing
    ran, nothing is held). Between the claim and the command's start, it is remembered and the
    command is not started. The command runs in the runner's process group, so that a terminal
    works with it as with any command (it may read the terminal; Ctrl-Z stops both). The
    price: a key pressed on the terminal sends SIGINT or SIGQUIT to both processes, so those
    two are only passed on when the runner is not in the terminal's foreground group (a
    ``kill -INT`` from elsewhere).
    """

    def __init__(self) -> None:
        self.holding = False  # a claim: from now on, signals are remembered
        self.child: subprocess.Popen[bytes] | None = None
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

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if not self.holding:  # still looking at the key: die of it, as without a handler
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            return
        if self.received is None:
            self.received = sig
        child = self.child
        if child is None or child.returncode is not None:
            return  # not started (and it will not be), or already gone
        if sig in _KEYBOARD and _terminal_delivers_to_us():
            return  # the terminal sent it to the command as well
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(sig)


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
                self.write(2, f"idemfn: stopped copying the command's {name} ({exc});"
                              " it is still recorded\n".encode())  # fmt: skip


def _pump(
    child: subprocess.Popen[bytes], streams: _Streams, on_exit: Callable[[], None]
) -> Iterator[tuple[int, bytes]]:
    """Copy the command's output to ``streams`` as it comes, yielding each chunk.

    Ends when both pipes are closed, or, once the command has exited, when nothing more comes
    for a moment: a process it left in the background may hold the pipes open for ever.
    """
    assert child.stdout is not None
    assert child.stderr is not None
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


def _record(
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


def _execute(
    claim: Claim, argv: list[str], forwarder: _Forwarder, max_output: int
) -> CommandOutcome:
    env = dict(os.environ, IDEMFN_KEY=claim.key, IDEMFN_ATTEMPT=str(claim.attempt))
    early = forwarder.first()
    if early is not None:
        raise CannotStart(
            f"interrupted by {early.name} before {argv[0]!r} started", exit_status(-early)
        )
    try:
        child = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            preexec_fn=None if _die_with_runner is None else _die_with_runner(os.getpid()),
        )  # fmt: skip
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise CannotStart(f"cannot run {argv[0]!r}: {exc.strerror}", 127) from exc
    except OSError as exc:  # permission denied, exec format error, ...
        raise CannotStart(f"cannot run {argv[0]!r}: {exc.strerror or exc}", 126) from exc
    # The signal that interrupted the command: one received before it exited. (One received
    # while its leftover output drains does not turn a success into a failure.)
    interrupted: list[signal.Signals | None] = []
    with child:
        forwarder.child = child
        early = forwarder.first()
        if early is not None:  # arrived while the command was being started
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(early)
        chunks = _pump(child, _Streams(), lambda: interrupted.append(forwarder.first()))
        output, dropped = _record(chunks, max_output)
        returncode = child.wait()
    received = interrupted[0] if interrupted else forwarder.first()
    return {
        "format": MARK,
        "argv": argv,
        "returncode": returncode,
        "output": output,
        "dropped": dropped,
        "interrupted_by": received.name if received is not None else None,
    }


def _parent_death_signal() -> Callable[[int], Callable[[], None]] | None:
    """``prctl(PR_SET_PDEATHSIG, SIGKILL)`` for the command, where Linux offers it: a runner
    killed with SIGKILL takes its command down with it, so that the abandoned claim it leaves
    never has a command still running behind it (which a retry would run a second time)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def for_runner(runner: int) -> Callable[[], None]:
        def die_with_runner() -> None:  # in the child, between fork and exec: keep it tiny
            prctl(pr_set_pdeathsig, signal.SIGKILL)
            if os.getppid() != runner:  # the runner died before prctl took effect
                os._exit(128 + signal.SIGKILL)

        return die_with_runner

    return for_runner


_die_with_runner = _parent_death_signal()


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
        step = begin(key, store=store, fingerprint=fingerprint, policy=policy)
        if isinstance(step, Finished):
            return recorded(step), False
        forwarder.holding = True
        with step as claim:
            try:
                outcome = _execute(claim, argv, forwarder, max_output)
            except CannotStart:
                claim.release()  # nothing ran: the next run may try again
                raise
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
                    f"idemfn run: {shlex.join(argv)} ran and exited {status}, but its outcome"
                    f" could not be recorded: {exc}. The key is left processing: the next run"
                    " finds it abandoned and halts it (with --on-abandoned retry, runs it"
                    " again)\n"
                )
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
