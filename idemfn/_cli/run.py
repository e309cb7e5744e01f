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

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, Final

from .._engine import Claim, Finished, begin
from .._errors import AlreadyRunning, FingerprintMismatch, Halted, StoreError
from .._policy import Policy
from .._record import Entry, Status
from .._stores import Store
from .._stores.base import Corrupt
from ..events import Observer
from .command_outcome import (
    MARK,
    MAX_OUTPUT,
    CommandFailed,
    CommandOutcome,
    describe,
    dropped_note,
    exit_status,
    fingerprint,
    outcome_in,
    status_of,
)
from .parser import PROG, CliError, Exit, say
from .process import (
    FORWARDED,
    CannotStart,
    Command,
    Streams,
    await_replaced,
    claim_marker,
    interrupted_start,
    kept_output,
    pump,
)
from .store import command_store

__all__ = ["ForeignRecord", "recorded", "replay", "run_command", "run_once"]

_KEYBOARD: Final = (signal.SIGINT, signal.SIGQUIT)


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
        self.child: Command | None = None
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


# The command's events (idemfn.events) name their function "idemfn run".
RUN_OBSERVER = Observer("idemfn run")


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

    _forwards_to_store = True  # (its events name the store's kind: idemfn.events.store_kind)

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


def _execute(
    claim: Claim,
    argv: list[str],
    forwarder: _Forwarder,
    max_output: int,
    replaced: str | None,
    settle: Callable[[CommandOutcome], None],
) -> CommandOutcome:
    """Run the command and ``settle`` its outcome (record it) before letting go of it: until
    then, a runner that dies takes down all the command started (see ``Command``)."""
    env = dict(os.environ, IDEMFN_KEY=claim.key, IDEMFN_ATTEMPT=str(claim.attempt))
    _not_interrupted(forwarder, argv)
    if replaced is not None:
        await_replaced(replaced, claim.key, lambda: _not_interrupted(forwarder, argv))
    command = Command(argv, env, claim_marker(claim.token))
    # The signal that interrupted the command: one received before it exited. (One received
    # while its leftover output drains does not turn a success into a failure.)
    ended_by: list[signal.Signals | None] = []
    with command:
        forwarder.child = command
        early = forwarder.first()
        if early is not None:  # arrived while the supervisor (elsewhere: the command) started
            command.send_signal(early)  # (the supervisor then does not start the command)
        command.start()
        chunks = pump(command, Streams(), lambda: ended_by.append(forwarder.first()))
        output, dropped = kept_output(chunks, max_output)
        returncode = command.wait()
        received = ended_by[0] if ended_by else forwarder.first()
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
        raise interrupted_start(early, argv)


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
                    elif outcome["interrupted_by"] is not None:
                        # (recorded as an interruption: the halted event, the metrics and
                        # idemfn stats say "interrupted", not "raised")
                        claim._settle(
                            claim._halting(
                                CommandFailed(outcome),
                                f"the call was interrupted by {outcome['interrupted_by']}",
                            ),
                        )
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
    streams = Streams()
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


def run_command(args: argparse.Namespace) -> int:
    key = args.key
    if not key.strip():
        raise CliError(f"{PROG} run: --key must not be empty", Exit.USAGE)
    try:
        policy = Policy(
            ttl=args.ttl, wait=args.wait, lease=args.lease, on_abandoned=args.on_abandoned
        )
        policy.observer = RUN_OBSERVER
    except (TypeError, ValueError) as exc:
        raise CliError(f"{PROG} run: {exc}", Exit.USAGE) from None
    store = command_store(args, create=True)
    given = fingerprint(args.argv, args.fingerprint_env)
    try:
        outcome, ran = run_once(
            store,
            key,
            args.argv,
            policy=policy,
            fingerprint=given,
            retry_on_exit=frozenset(args.retry_on_exit),
            max_output=args.max_output,
        )
    except CannotStart as exc:
        raise CliError(f"{exc} (key {key!r} released: nothing ran)", exc.status) from None
    except ForeignRecord as exc:
        raise CliError(str(exc), Exit.MISMATCH) from None
    except FingerprintMismatch:
        raise CliError(
            f"key {key!r} was first used with another command line"
            f"{' or environment' if args.fingerprint_env else ''}: use another key, or"
            f" `{PROG} show {key}` to see the recorded one",
            Exit.MISMATCH,
        ) from None
    except AlreadyRunning as exc:
        raise CliError(
            f"key {key!r} is being run by {exc.owner} since {exc.started_at:%Y-%m-%d %H:%M:%S}Z;"
            " retry later, or pass --wait S to wait for its outcome",
            Exit.RUNNING,
        ) from None
    except Halted as exc:
        raise CliError(
            f"key {key!r} halted: {exc.reason}. A side effect may have happened: check it, then"
            f" `{PROG} forget {key}` to allow another run",
            Exit.HALTED,
        ) from None
    if ran:
        if outcome["dropped"]:
            say(dropped_note(outcome).removeprefix(f"{PROG}: "))
        if args.verbose:
            say(f"ran {key!r}: {describe(outcome)}")
        die_like_the_command(outcome)
        return status_of(outcome)
    status = replay(outcome)
    if args.verbose:
        say(f"replayed {key!r} from its record: {describe(outcome)}; the command did not run")
    return status
