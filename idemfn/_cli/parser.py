"""The ``idemfn`` command's arguments: the parser, the usage errors, the exit statuses.

Every command prints one line on stderr and exits with a documented status when something is
wrong (``Exit``), never a traceback.
"""

from __future__ import annotations

import argparse
import enum
import math
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import NoReturn

from .. import __version__
from .._record import Status
from .._signing import ENV_VAR as SIGNING_ENV_VAR
from .._stores import ENV_VAR
from .._stores.disk import default_directory
from .command_outcome import MAX_OUTPUT, MAX_OUTPUT_LIMIT

__all__ = ["EXIT_CODES", "PROG", "STATES", "CliError", "Exit", "parse", "say"]

PROG = "idemfn"
#: The states ls and stats show for a record that cannot be read: its bytes are not a record,
#: or it failed its signature check.
CORRUPT = "corrupt"
TAMPERED = "tampered"
#: Every state the STATUS column of ls (and stats) can show; ``ls --status`` takes each.
STATES = ("ok", "halted", "processing", "abandoned", "expired", CORRUPT, TAMPERED)
#: The widest KEY column of ls when stdout is not a terminal (one that is: its width).
KEY_WIDTH = 80


class Exit(enum.IntEnum):
    """The statuses ``idemfn`` exits with (``idemfn run`` also passes on its command's)."""

    OK = 0
    USAGE = 64  # a bad option or argument
    MISMATCH = 65  # run: the key was first used with another command line
    NO_RECORD = 66  # show, forget: the key has no record (or not the --status asked for)
    NO_STORE = 67  # no store at --store / IDEMFN_STORE / the default directory
    BAD_STORE = 68  # --store or IDEMFN_STORE is not a store path or URL idemfn knows
    HALTED = 69  # run: the key halted with no recorded outcome (its runner was killed)
    INTERNAL = 70  # a bug in idemfn: please report it
    LOST = 71  # run: the claim was taken over while the command ran; outcome not recorded
    DEADLINE = 72  # reserved: the deadline passed before the call could start
    STORE_ERROR = 74  # the store failed (unreadable, locked, full, corrupt/tampered record)
    RUNNING = 75  # run: another run holds the key; forget: refused, the owner is alive
    CANNOT_EXECUTE = 126  # run: the command was found but could not be executed
    NOT_FOUND = 127  # run: the command was not found
    INTERRUPTED = 130  # idemfn itself was interrupted (Ctrl-C) outside `run`


EXIT_CODES = """\
exit status:
  0    success (run: the command succeeded, now or when it was recorded)
  1-125, 128+N
       run: the command's own exit status, now or as recorded (128+N: ended by signal N)
  64   bad option or argument
  65   run: the key was first used with another command line (fingerprint mismatch)
  66   no record for the key (show, forget)
  67   no store at the given or default location (inspecting commands never create one)
  68   --store / IDEMFN_STORE is not a store path or URL this idemfn knows
  69   run: the key halted without a recorded outcome (its runner died): check, then forget
  70   internal error in idemfn (please report it)
  71   run: the claim was taken over while the command ran; its outcome was not recorded
  74   the store failed (unreadable, locked, full, or a corrupt or tampered record)
  75   the key is running: run found a live owner; forget refused without --force
  126  run: the command could not be executed (nothing recorded)
  127  run: the command was not found (nothing recorded)
  128+N
       run: a signal N reached the runner after its claim, before the command started
       (nothing ran, the key is released); or the command was ended by signal N
  130  idemfn itself was interrupted (Ctrl-C) outside run
"""


class CliError(Exception):
    """An error that ends the ``idemfn`` command: ``message`` on stderr, exit with ``status``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CliError(f"{self.prog}: {message} (see `{self.prog} --help`)", Exit.USAGE)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


def _seconds(*, allow_none: bool = False, positive: bool = False) -> Callable[[str], float | None]:
    def parse(text: str) -> float | None:
        if allow_none and text.lower() in ("none", "never", "forever"):
            return None
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number of seconds{' or none' if allow_none else ''}, not {text!r}"
            ) from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(
                f"expected a finite number of seconds {'> 0' if positive else '>= 0'}, not {text!r}"
            )
        return value

    return parse


def _whole(low: int, high: int | None, expected: str) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``, else "expected …"."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, not {text!r}")
        return value

    return parse


_exit_code = _whole(1, 255, "an exit status from 1 to 255")
_byte_count = _whole(0, MAX_OUTPUT_LIMIT, f"a number of bytes from 0 to {MAX_OUTPUT_LIMIT}")
_positive_int = _whole(1, None, "a whole number >= 1")


def _key(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"a key must be valid UTF-8 text, not {text.encode('utf-8', 'surrogateescape')!r}"
        ) from None
    return text


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "-s",
        "--store",
        metavar="DIR|URL",
        default=argparse.SUPPRESS,
        help=f"the store: a directory or URL (default: ${ENV_VAR}, else {default_directory()})",
    )
    common.add_argument(
        "--signing-key-file",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"sign and verify records with the keys in FILE, one per line, the first signing"
        f" (default: ${SIGNING_ENV_VAR}, comma-separated, if set)",
    )
    as_json = _Parser(add_help=False)
    as_json.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
    )

    parser = _Parser(
        prog=PROG,
        formatter_class=_Formatter,
        parents=[common],
        description="Look at and repair idemfn's records, and run a shell command once.",
        epilog="Each command has its own --help.\n\n" + EXIT_CODES,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(metavar="COMMAND", dest="command", required=True)

    def command(
        name: str, help: str, description: str, *parents: _Parser, usage: str | None = None
    ) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            usage=usage,
            help=help,
            description=textwrap.fill(description, 88),
            epilog=EXIT_CODES,
            formatter_class=_Formatter,
            parents=[common, *parents],
        )

    ls = command(
        "ls",
        "list records, newest first",
        "List records, newest first: key, status, age (since the last change), owner, and when"
        " the record expires (for a running call: when its lease runs out). Expired records"
        " count as absent and are left out unless --all.",
        as_json,
    )
    ls.add_argument(
        "-S",
        "--status",
        choices=STATES,
        metavar="STATUS",
        help="only records whose STATUS column says this: ok, halted, processing (its owner"
        " runs), abandoned (processing, its owner gone), expired (implies --all), corrupt or"
        " tampered (records that cannot be read)",
    )
    ls.add_argument(
        "-p", "--prefix", default="", type=_key, metavar="P", help="keys starting with P"
    )
    ls.add_argument("-n", "--limit", type=_positive_int, metavar="N", help="at most N records")
    ls.add_argument("-a", "--all", action="store_true", help="include expired records")
    ls.add_argument(
        "--wide",
        action="store_true",
        help=f"never shorten keys (by default a key wider than the terminal, or than"
        f" {KEY_WIDTH} characters when not writing to one, is shortened with …)",
    )

    show = command(
        "show",
        "show every field of a record",
        "Show every field of KEY's record: status, times, owner and whether it still runs,"
        " lease, attempts, fingerprint, and the recorded value's repr (or the exception's"
        " type, message and traceback; or a command's exit status and output). Showing a"
        " value loads it as a replay does, so its classes must be importable here.",
        as_json,
    )
    show.add_argument(
        "key", metavar="KEY", type=_key, help="the full stored key, as `idemfn ls` lists it"
    )

    forget = command(
        "forget",
        "delete records",
        "Delete the records of the KEYs, so that the next call runs again (after a human checked"
        " what a halted call did, say). A running call's record is only deleted with --force.",
        as_json,
    )
    forget.add_argument("keys", nargs="+", metavar="KEY", type=_key, help="full stored keys")
    forget.add_argument(
        "-S",
        "--status",
        choices=[s.value for s in Status],
        help="only delete records in this status",
    )
    forget.add_argument(
        "-f",
        "--force",
        action="store_true",
        help="also delete a record whose owner still runs: a second call may then start while"
        " the first runs, and the first gets OwnershipLost when it finishes",
    )

    command(
        "prune",
        "remove expired records",
        "Remove expired records, and claims whose lease ran out more than their ttl ago.",
        as_json,
    )

    command(
        "stats",
        "count records per status, halted ones per reason",
        "Count records per status, and halted records per reason (raised, unstorable,"
        " interrupted, abandoned, incomplete, other: the words of the `halted` event and the"
        " metrics); show the store's size, its oldest and newest records, and its oldest"
        " processing claim (whose, how old, and whether its owner is gone).",
        as_json,
    )

    run = command(
        "run",
        "run a shell command at most once per key",
        "Run CMD unless KEY has a record; otherwise replay the recorded outcome: write the"
        " recorded stdout and stderr to the same streams, in order, and exit with the recorded"
        " status. CMD's output is streamed live and recorded. Exit status 0 records the key ok;"
        " any other records it halted (list failed runs with `idemfn ls --status halted`;"
        " `idemfn forget KEY` allows another run). The command line (and the --fingerprint-env"
        " variables) is the fingerprint: the same key with another command is an error. SIGINT,"
        " SIGTERM, SIGHUP and SIGQUIT are passed on to CMD and the key is recorded halted. CMD"
        " gets IDEMFN_KEY and IDEMFN_ATTEMPT in its environment. Records are kept forever"
        " unless --ttl.",
        usage=f"{PROG} run [options] -k KEY -- CMD [ARG ...]",
    )
    run.add_argument("-k", "--key", required=True, type=_key, help="the key (stored as given)")
    run.add_argument(
        "-t",
        "--ttl",
        type=_seconds(allow_none=True, positive=True),
        default=None,
        metavar="S",
        help="seconds to keep the record after CMD finished (default: none, kept forever)",
    )
    run.add_argument(
        "-w",
        "--wait",
        type=_seconds(),
        default=0.0,
        metavar="S",
        help="seconds to wait for a run of KEY in progress elsewhere (default: 0)",
    )
    run.add_argument(
        "--lease",
        type=_seconds(positive=True),
        default=30.0,
        metavar="S",
        help="seconds a claim stays valid without a heartbeat (default: 30)",
    )
    run.add_argument(
        "--on-abandoned",
        choices=["halt", "retry"],
        default="halt",
        help="when KEY's previous runner died mid-run: record it halted and fail (default), or"
        " run CMD again",
    )
    run.add_argument(
        "--retry-on-exit",
        type=_exit_code,
        nargs="+",
        action="extend",
        default=[],
        metavar="CODE",
        help="exit statuses that release KEY instead of recording it, so a later run tries again",
    )
    run.add_argument(
        "--fingerprint-env",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help="environment variables that are part of the fingerprint besides the command line",
    )
    run.add_argument(
        "--max-output",
        type=_byte_count,
        default=MAX_OUTPUT,
        metavar="BYTES",
        help="record at most this much output (stdout and stderr together; more is still"
        f" streamed, and a replay says how much was left out); default {MAX_OUTPUT}",
    )
    run.add_argument(
        "-v", "--verbose", action="store_true", help="say on stderr whether CMD ran or replayed"
    )
    run.add_argument("argv", nargs="*", help=argparse.SUPPRESS)  # after `--`: see _parse
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    args = list(argv)
    parser = _parser()
    # `run ... -- CMD [ARG ...]`: everything after the first `--` is the command, untouched,
    # whatever it looks like. (Other commands take `--` as argparse does: before keys that
    # start with "-".)
    if "--" in args:
        split = args.index("--")
        try:
            head = parser.parse_args(args[:split])
        except CliError:
            head = None
        if head is not None and head.command == "run":
            if head.argv:
                raise CliError(
                    f"{PROG} run: unexpected {head.argv[0]!r} before `--`"
                    f" (write `{PROG} run --key KEY -- CMD [ARG ...]`)",
                    Exit.USAGE,
                )
            head.argv = args[split + 1 :]
            if not head.argv:
                raise CliError(f"{PROG} run: no command after `--`", Exit.USAGE)
            return head
    namespace = parser.parse_args(args)
    if namespace.command == "run":
        raise CliError(
            f"{PROG} run: put the command after `--`: `{PROG} run --key KEY -- CMD [ARG ...]`",
            Exit.USAGE,
        )
    return namespace


def say(message: str) -> None:
    if sys.stderr is None:  # closed (`2>&-`): print() would write to stdout instead
        return
    if not message.startswith((f"{PROG} ", f"{PROG}:")):  # usage errors name the command
        message = f"{PROG}: {message}"
    print(message, file=sys.stderr, flush=True)
