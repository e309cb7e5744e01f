"""What ``idemfn run`` records of a command: its outcome, and how that reads back.

A command that exited 0 is recorded ``ok`` with its ``CommandOutcome`` (plain values only); any
other ending is recorded ``halted`` with a ``CommandFailed`` carrying the same outcome.
"""

from __future__ import annotations

import os
import shlex
import signal
from collections.abc import Sequence
from typing import Final, TypedDict

from .._fingerprint import fingerprint_value

__all__ = [
    "MARK",
    "MAX_OUTPUT",
    "MAX_OUTPUT_LIMIT",
    "CommandFailed",
    "CommandOutcome",
    "describe",
    "dropped_note",
    "ending",
    "exit_status",
    "fingerprint",
    "outcome_in",
    "status_of",
]

#: Marks a recorded value as the outcome of ``idemfn run``, and its layout's version.
MARK: Final = "idemfn.run/1"

#: How many bytes of output a run records by default (the rest is still streamed), and at
#: most: a record must stay well below SQLite's 1 GB limit on a value, and fit in memory.
MAX_OUTPUT: Final = 16 * 2**20
MAX_OUTPUT_LIMIT: Final = 256 * 2**20


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

    Records refer to this class by its import path (``idemfn._run.CommandFailed``, below): keep
    it.
    """

    def __init__(self, outcome: CommandOutcome) -> None:
        super().__init__(describe(outcome))
        self.outcome = outcome

    def __reduce__(self) -> tuple[object, ...]:
        return (CommandFailed, (self.outcome,))


# Records name this class by its module: idemfn._run, where it was defined until the CLI became
# a package (issue 15), and which still exports it. Records written before and after then load
# in every version, older ones included.
CommandFailed.__module__ = "idemfn._run"


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


# Import idemfn._run now, so that every pickler finds CommandFailed where its __module__ says
# (cloudpickle stores a class whose module is not imported by value instead of by reference).
from .. import _run  # noqa: E402, F401
