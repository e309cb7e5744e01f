"""The ``idemfn`` command: look at and repair records, and run a shell command once.

Every command prints one line on stderr and exits with a documented status when something is
wrong (``Exit``), never a traceback. Inspecting commands never create a store: a mistyped
``--store`` is an error, not an empty listing.
"""

from __future__ import annotations

import argparse
import base64
import enum
import errno
import json
import logging
import math
import os
import shlex
import shutil
import stat
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, _owner, _run
from ._engine import Policy
from ._errors import (
    AlreadyRunning,
    DeadlineExceeded,
    FingerprintMismatch,
    Halted,
    IdempotencyError,
    OwnershipLost,
    StoreError,
)
from ._lease import abandoned_reason
from ._outcome import load
from ._record import Entry, Status
from ._signing import ENV_VAR as SIGNING_ENV_VAR
from ._signing import signer_for
from ._stores import ENV_VAR, Store, locate, open_store
from ._stores.base import TamperedRecord
from ._stores.disk import default_directory

__all__ = ["Exit", "main"]

PROG = "idemfn"
#: The states ls and stats show for a record that cannot be read: its bytes are not a record,
#: or it failed its signature check.
CORRUPT = "corrupt"
TAMPERED = "tampered"
#: Every state the STATUS column of ls (and stats) can show; ``ls --status`` takes each.
STATES = ("ok", "halted", "processing", "abandoned", "expired", CORRUPT, TAMPERED)
#: The widest KEY column of ls when stdout is not a terminal (one that is: its width).
KEY_WIDTH = 80


def _unreadable(error: StoreError) -> str:
    return TAMPERED if isinstance(error, TamperedRecord) else CORRUPT


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


class Failure(Exception):
    """Ends the command: ``message`` on stderr, exit with ``status``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


_ERROR_STATUS: tuple[tuple[type[IdempotencyError], Exit], ...] = (
    (FingerprintMismatch, Exit.MISMATCH),
    (AlreadyRunning, Exit.RUNNING),
    (Halted, Exit.HALTED),
    (OwnershipLost, Exit.LOST),
    (DeadlineExceeded, Exit.DEADLINE),
    (StoreError, Exit.STORE_ERROR),
)


# ---------------------------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise Failure(f"{self.prog}: {message} (see `{self.prog} --help`)", Exit.USAGE)


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
_byte_count = _whole(
    0, _run.MAX_OUTPUT_LIMIT, f"a number of bytes from 0 to {_run.MAX_OUTPUT_LIMIT}"
)
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
    ls.set_defaults(handler=_ls)

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
    show.set_defaults(handler=_show)

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
    forget.set_defaults(handler=_forget)

    prune = command(
        "prune",
        "remove expired records",
        "Remove expired records, and claims whose lease ran out more than their ttl ago.",
        as_json,
    )
    prune.set_defaults(handler=_prune)

    stats = command(
        "stats",
        "count records per status",
        "Count records per status; show the store's size and its oldest record.",
        as_json,
    )
    stats.set_defaults(handler=_stats)

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
        default=_run.MAX_OUTPUT,
        metavar="BYTES",
        help="record at most this much output (stdout and stderr together; more is still"
        f" streamed, and a replay says how much was left out); default {_run.MAX_OUTPUT}",
    )
    run.add_argument(
        "-v", "--verbose", action="store_true", help="say on stderr whether CMD ran or replayed"
    )
    run.add_argument("argv", nargs="*", help=argparse.SUPPRESS)  # after `--`: see _parse
    run.set_defaults(handler=_run_command)
    return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    args = list(argv)
    parser = _parser()
    # `run ... -- CMD [ARG ...]`: everything after the first `--` is the command, untouched,
    # whatever it looks like. (Other commands take `--` as argparse does: before keys that
    # start with "-".)
    if "--" in args:
        split = args.index("--")
        try:
            head = parser.parse_args(args[:split])
        except Failure:
            head = None
        if head is not None and head.command == "run":
            if head.argv:
                raise Failure(
                    f"{PROG} run: unexpected {head.argv[0]!r} before `--`"
                    f" (write `{PROG} run --key KEY -- CMD [ARG ...]`)",
                    Exit.USAGE,
                )
            head.argv = args[split + 1 :]
            if not head.argv:
                raise Failure(f"{PROG} run: no command after `--`", Exit.USAGE)
            return head
    namespace = parser.parse_args(args)
    if namespace.command == "run":
        raise Failure(
            f"{PROG} run: put the command after `--`: `{PROG} run --key KEY -- CMD [ARG ...]`",
            Exit.USAGE,
        )
    return namespace


# ----------------------------------------------------------------------------------- the store


def _store(args: argparse.Namespace, *, create: bool = False) -> Store:
    """The store of ``--store``, ``IDEMFN_STORE`` or the default directory.

    Unless ``create``, a directory without a store is an error: looking must not create one.
    """
    given = getattr(args, "store", None)
    configured = os.environ.get(ENV_VAR, "").strip()
    if given is not None:
        text, source = given, "--store"
    elif configured:
        text, source = configured, ENV_VAR
    else:
        text, source = str(default_directory()), "the default store"
    try:
        kind, where = locate(text)
    except (TypeError, ValueError) as exc:
        raise Failure(f"{source}: {exc}", Exit.BAD_STORE) from None
    if kind == "memory":
        raise Failure(
            f"{source}: {text!r} is a store inside one process, empty in every new one:"
            f" {PROG} needs a store that outlives it (a directory, or a server URL)",
            Exit.BAD_STORE,
        )
    if kind == "disk":
        try:
            _check_directory(Path(where), source, create)
        except Failure as failure:
            if source == "--store" and text in STATES:  # `ls -s halted`: -S was meant
                raise Failure(
                    f"{failure} (-s is --store; for a status, write -S {text} or --status {text})",
                    failure.status,
                ) from None
            raise
    keys = _signing_keys(args)
    try:
        return open_store(text, signing_key=keys)
    except (TypeError, ValueError) as exc:  # a bad server URL or key, or an extra is missing
        raise Failure(f"{source}: {exc}", Exit.BAD_STORE) from None


def _signing_keys(args: argparse.Namespace) -> list[str] | None:
    """The keys of ``--signing-key-file`` (None: the store reads ``IDEMFN_SIGNING_KEY``)."""
    path = getattr(args, "signing_key_file", None)
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Failure(f"--signing-key-file: cannot read {path}: {exc}", Exit.USAGE) from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [key for key in keys if key and not key.startswith("#")]
    if not keys:
        raise Failure(f"--signing-key-file: {path} holds no key", Exit.USAGE)
    try:
        signer_for(keys, option=f"--signing-key-file {path}")
    except (TypeError, ValueError) as exc:
        raise Failure(str(exc), Exit.USAGE) from None
    return keys


def _check_directory(directory: Path, source: str, create: bool) -> None:
    """``Failure`` unless ``directory`` holds a store (with ``create``: unless one can be made
    there), saying what is in the way: a missing directory, a file, or a permission."""
    if create:
        # A store is made on first use, but not its parents: a mistyped path must not become
        # a new, empty store in which every step runs again.
        if source != "the default store":
            problem = _not_a_directory(directory.parent)
            if problem is _MISSING:
                raise Failure(
                    f"no store at {directory} ({source}), and its parent directory does not exist"
                    " either: check the path (idemfn creates a store, not its parents)",
                    Exit.NO_STORE,
                )
            if problem is None:
                problem = _not_a_directory(directory)
            if problem is not None and problem is not _MISSING:
                raise _no_store(directory, source, problem)
        return
    problem = _not_a_directory(directory)
    if problem is _MISSING:
        raise Failure(
            f"no store at {directory} ({source}): the directory does not exist", Exit.NO_STORE
        )
    if problem is not None:
        raise _no_store(directory, source, problem)
    try:
        found = (directory / "cache.db").is_file()
    except OSError as exc:  # is_file() only answers False for a missing file
        raise _no_store(directory, source, exc) from None
    if not found:
        raise Failure(
            f"no store at {directory} ({source}): the directory holds no idemfn store",
            Exit.NO_STORE,
        )


_MISSING = FileNotFoundError()


def _not_a_directory(path: Path) -> OSError | None:
    """None if ``path`` is a directory; ``_MISSING`` if nothing is there; else what is in the
    way (a ``NotADirectoryError`` naming the file, or the ``OSError`` that stat raised)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return _MISSING
    except NotADirectoryError:  # a file where the path needs a directory: name it
        blocking = next((p for p in path.parents if _is_file(p)), path)
        return NotADirectoryError(errno.ENOTDIR, "a file, not a directory", str(blocking))
    except OSError as exc:  # permission denied, a name too long, …
        return exc
    if stat.S_ISDIR(mode):
        return None
    return NotADirectoryError(errno.ENOTDIR, "a file, not a directory", str(path))


def _is_file(path: Path) -> bool:
    try:
        return not stat.S_ISDIR(path.stat().st_mode)
    except OSError:
        return False


def _no_store(directory: Path, source: str, problem: OSError) -> Failure:
    """The one line for a store directory that cannot be reached: its path, and why."""
    what = f"{problem.filename}: {problem.strerror}" if problem.filename else str(problem)
    if isinstance(problem, NotADirectoryError):
        return Failure(f"no store at {directory} ({source}): {what}", Exit.NO_STORE)
    return Failure(f"cannot use the store at {directory} ({source}): {what}", Exit.STORE_ERROR)


# ------------------------------------------------------------------------------------ records


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def _span(seconds: float) -> str:
    """A duration for people: 42s, 5m, 3h, 12d."""
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _state(entry: Entry, now: float) -> str:
    """The status, with what the store alone does not say: expired, or abandoned."""
    if entry.is_expired(now):
        return "expired"
    if entry.status == Status.PROCESSING and abandoned_reason(entry, now) is not None:
        return "abandoned"
    return entry.status


def _why_gone(entry: Entry, now: float) -> str | None:
    """Why a processing record's owner is known to be gone (None while it may run)."""
    if abandoned_reason(entry, now) is None:
        return None
    return _owner.gone_reason(entry.owner) or f"its lease ran out at {_iso(entry.lease_until)}"


def _shown(key: str) -> str:
    """A key as a table cell: control characters escaped, never sent to the terminal."""
    return key if key.isprintable() else key.encode("unicode_escape").decode("ascii")


def _owner_short(owner: str) -> str:
    parsed = _owner.parse(owner)
    return f"{parsed[0]}:{parsed[2]}" if parsed else owner


def _changed_at(entry: Entry) -> float:
    return entry.finished_at if entry.finished_at is not None else entry.started_at


def record_json(entry: Entry, now: float) -> dict[str, Any]:
    """Every field of a record, as JSON values (times as ISO 8601 UTC)."""
    processing = entry.status == Status.PROCESSING
    return {
        "key": entry.key,
        "status": entry.status,
        "state": _state(entry, now),
        "fingerprint": entry.fingerprint,
        "owner": entry.owner,
        "owner_gone": _why_gone(entry, now) if processing else None,
        "token": entry.token,
        "attempt": entry.attempt,
        "started_at": _iso(entry.started_at),
        "finished_at": _iso(entry.finished_at),
        "expires_at": _iso(entry.expires_at),
        "lease_expires_at": _iso(entry.lease_until) if processing else None,
        "ttl": entry.ttl,
        "reason": entry.reason,
        "exc_type": entry.exc_type,
        "message": entry.message,
        "traceback": entry.traceback,
    }


def _expiry(entry: Entry, now: float) -> str:
    if entry.status == Status.PROCESSING:
        if abandoned_reason(entry, now) is not None:
            return "owner gone"
        if entry.lease_until is None:
            return "-"
        return f"lease {_span(entry.lease_until - now)}"
    if entry.expires_at is None:
        return "never"
    if entry.expires_at <= now:
        return f"expired {_span(now - entry.expires_at)} ago"
    return f"in {_span(entry.expires_at - now)}"


def _print_json(value: object) -> None:
    if sys.stdout is not None:  # None: closed (`>&-`)
        json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")


def _table(rows: list[list[str]], header: list[str], *, wide: bool) -> int:
    """Print ``rows`` in columns under ``header``; return how many keys were shortened.

    The first column (the keys) is at most as wide as a terminal leaves beside the others (at
    least 12), or ``KEY_WIDTH`` when stdout is no terminal; with ``wide``, as wide as its widest.
    """
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    if not wide:
        if sys.stdout is not None and sys.stdout.isatty():
            room = shutil.get_terminal_size().columns - sum(widths[1:]) - 2 * (len(widths) - 1)
            limit = max(room, 12)
        else:
            limit = KEY_WIDTH
        widths[0] = max(min(widths[0], limit), len(header[0]))
    shortened = 0
    for row in [header, *rows]:
        key = row[0]
        if len(key) > widths[0]:
            key = _shorten(key, widths[0])
            shortened += 1
        cells = [key, *row[1:]]
        line = "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
        print(line.rstrip())
    return shortened


def _shorten(key: str, width: int) -> str:
    """``key`` in ``width`` characters: its start and its end, with "…" for the middle (keys
    that share a function's name differ at the end)."""
    tail = (width - 1) // 3
    return key[: width - 1 - tail] + "…" + key[len(key) - tail :]


def _ls(args: argparse.Namespace) -> Exit:
    store = _store(args)
    now = store.time()
    status: str | None = args.status
    broken: list[tuple[str, StoreError]] = []
    found = list(store.scan(args.prefix, corrupt=lambda key, error: broken.append((key, error))))
    scanned = [e for e in found if args.all or status == "expired" or not e.is_expired(now)]
    # The filter is on what the STATUS column shows (abandoned, expired), not the stored status.
    entries = [e for e in scanned if status is None or _state(e, now) == status]
    entries.sort(key=_changed_at, reverse=True)
    listed_broken = [b for b in broken if status is None or _unreadable(b[1]) == status]
    if args.limit is not None:
        entries = entries[: args.limit]
        listed_broken = listed_broken[: max(0, args.limit - len(entries))]
    if getattr(args, "json", False):
        _print_json(
            [record_json(e, now) for e in entries]
            + [
                {"key": key, "status": _unreadable(error), "error": str(error)}
                for key, error in listed_broken
            ]
        )
        return Exit.OK
    rows = [
        [
            _shown(e.key),
            _state(e, now),
            _span(now - _changed_at(e)),
            _owner_short(e.owner),
            _expiry(e, now),
        ]
        for e in entries
    ] + [[_shown(key), _unreadable(err), "-", "-", "-"] for key, err in listed_broken]
    if not rows:
        hidden = len(found) - len(scanned)
        print(_nothing_listed(args, store, len(scanned) + len(broken), hidden), file=sys.stderr)
        return Exit.OK
    shortened = _table(rows, ["KEY", "STATUS", "AGE", "OWNER", "EXPIRES"], wide=args.wide)
    if listed_broken:
        _say(
            f"{len(listed_broken)} record{'' if len(listed_broken) == 1 else 's'} cannot be"
            f" read: `{PROG} show KEY` says why, `{PROG} forget --force KEY` deletes one unread"
        )
    if shortened:
        _say(
            f"{shortened} key{' was' if shortened == 1 else 's were'} shortened with …:"
            f" `{PROG} ls --wide` or `--json` shows keys whole"
        )
    return Exit.OK


def _nothing_listed(args: argparse.Namespace, store: Store, scanned: int, hidden: int) -> str:
    """Why ls lists nothing: no records (of the prefix), or a --status that matches none of
    them; never "no records" for a store that has some."""
    where = f" starting with {args.prefix!r}" if args.prefix else ""
    expired = f"{hidden} expired record{'' if hidden == 1 else 's'}"
    if args.status is None or scanned == 0:
        also = f" but {expired}: `{PROG} ls --all` lists them" if hidden else ""
        return f"no records in {store!r}{where}{also}"
    also = f", and {expired}" if hidden else ""
    return (
        f"no records match --status {args.status} in {store!r}, which holds {scanned}"
        f" record{'' if scanned == 1 else 's'}{where}{also}: `{PROG} stats` counts them by status"
    )


def _forget_hint(error: StoreError, key: str) -> str:
    """How to delete an unreadable record, unless the error says so already."""
    if isinstance(error, TamperedRecord) or "forget --force" in str(error):
        return ""
    return f"; `{PROG} forget --force {key}` deletes it unread"


def _ignore(key: str, error: StoreError) -> None:
    """A ``corrupt=`` for look-ups that only need the readable records."""


def _find(store: Store, key: str) -> Entry:
    """``key``'s record, expired or not; ``Failure`` naming close keys when there is none, or
    saying why it cannot be read."""
    broken: dict[str, StoreError] = {}
    for entry in store.scan(key, corrupt=broken.__setitem__):
        if entry.key == key:
            return entry
    if key in broken:
        raise Failure(f"{broken[key]}{_forget_hint(broken[key], key)}", Exit.STORE_ERROR)
    raise _no_record(store, key)


def _no_record(store: Store, key: str) -> Failure:
    keys = [e.key for e in store.scan(corrupt=_ignore)]
    similar = sorted(k for k in keys if k.endswith(key) or key in k)[:5]
    hint = f"; keys like it: {', '.join(map(repr, similar))}" if similar else ""
    return Failure(f"no record for key {key!r} in {store!r}{hint}", Exit.NO_RECORD)


def _value(entry: Entry) -> dict[str, Any]:
    """What ``show`` says of a record's payload (loaded once, as a replay loads it)."""
    if entry.payload is None:
        return {}
    try:
        value = load(entry.payload)
    except Exception as exc:
        if entry.status != Status.OK:
            return {}  # an exception that no longer loads: its type and message are shown
        return {
            "value_error": f"{type(exc).__name__}: {exc} (run idemfn where the value's classes"
            " import: from your project's directory, or with PYTHONPATH set)"
        }
    command = _run.outcome_in(value)
    if command is not None:
        streams: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        for fd, data in command["output"]:
            streams[fd].extend(data)
        return {
            "command": {
                "argv": command["argv"],
                "exit_status": _run.status_of(command),
                "ended": _run.ending(command),
                "interrupted_by": command["interrupted_by"],
                "dropped": command["dropped"],
                "stdout": streams[1].decode("utf-8", "backslashreplace"),
                "stderr": streams[2].decode("utf-8", "backslashreplace"),
                # The text above is for people; these are the bytes, unambiguous.
                "stdout_base64": base64.b64encode(streams[1]).decode("ascii"),
                "stderr_base64": base64.b64encode(streams[2]).decode("ascii"),
            }
        }
    if entry.status != Status.OK:
        return {}
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<repr() failed: {type(exc).__name__}: {exc}>"
    return {"value_repr": text}


def _show(args: argparse.Namespace) -> Exit:
    store = _store(args)
    now = store.time()
    entry = _find(store, args.key)
    fields = record_json(entry, now) | _value(entry)
    if getattr(args, "json", False):
        _print_json(fields)
        return Exit.OK
    since = f" ({_span(now - entry.started_at)} ago)"
    state = fields["state"]
    status = state if state == entry.status else f"{entry.status} ({state})"
    lines = [
        ("key", _shown(entry.key)),
        ("status", status),
        ("attempt", str(entry.attempt)),
        ("started", f"{fields['started_at']}{since}"),
    ]
    if entry.finished_at is not None:
        ago = _span(now - entry.finished_at)
        lines.append(("finished", f"{fields['finished_at']} ({ago} ago)"))
        expires = "never" if entry.expires_at is None else f"{fields['expires_at']}"
        lines.append(
            (
                "expires",
                expires if entry.expires_at is None else f"{expires} ({_expiry(entry, now)})",
            )
        )
    owner = f"{entry.owner}"
    if entry.status == Status.PROCESSING:
        gone = fields["owner_gone"]
        owner += f" (gone: {gone})" if gone else " (running)"
        lines.append(("lease until", f"{fields['lease_expires_at']} ({_expiry(entry, now)})"))
    lines += [
        ("owner", owner),
        ("ttl", "forever" if entry.ttl is None else f"{entry.ttl:g}s"),
        ("fingerprint", entry.fingerprint or "-"),
        ("token", entry.token),
    ]
    command = fields.get("command")
    if entry.reason and command is None:  # a command's ending says it better
        lines.append(("reason", entry.reason))
    if entry.exc_type and command is None:
        lines.append(("exception", f"{entry.exc_type}: {entry.message}"))
    if "value_repr" in fields:
        lines.append(("value", fields["value_repr"]))
    if "value_error" in fields:
        lines.append(("value", f"(cannot load it: {fields['value_error']})"))
    if command is not None:
        lines += [
            ("command", shlex.join(command["argv"])),
            ("exit status", f"{command['exit_status']} ({command['ended']})"),
        ]
        if command["dropped"]:
            lines.append(("not recorded", f"{command['dropped']} bytes of output (--max-output)"))
    for name, text in lines:
        print(f"{name + ':':<13}{text}")
    blocks = [("stdout", command["stdout"]), ("stderr", command["stderr"])] if command else []
    if entry.traceback and not command:
        blocks.append(("traceback", entry.traceback))
    for name, text in blocks:
        print(f"{name}:" + ("" if text else " (empty)"))
        for line in text.splitlines():
            print(f"  {line}")
    return Exit.OK


def _forget(args: argparse.Namespace) -> int:
    store = _store(args)
    removed: list[dict[str, Any]] = []
    problems: list[Failure] = []
    for key in dict.fromkeys(args.keys):  # each key once, in the order given
        try:
            removed.append(_forget_one(store, key, args.status, args.force))
        except Failure as failure:
            problems.append(failure)
    if getattr(args, "json", False):
        _print_json(
            {
                "removed": removed,
                "not_removed": [{"error": str(p), "exit_status": int(p.status)} for p in problems],
            }
        )
    else:
        for record in removed:
            print(f"forgot {record['key']} (was {record['state']})")
    for problem in problems:
        _say(str(problem))
    return problems[0].status if problems else Exit.OK


def _forget_one(store: Store, key: str, status: str | None, force: bool) -> dict[str, Any]:
    for _ in range(5):  # the record may change between the look and the delete: look again
        try:
            entry = store.get(key)
        except StoreError as exc:  # a record that cannot be read can still be deleted
            if not force or status is not None:
                raise Failure(f"{exc}{_forget_hint(exc, key)}", Exit.STORE_ERROR) from None
            if store.delete(key):
                return {"key": key, "state": "unreadable", "error": str(exc)}
            raise _no_record(store, key) from None
        now = store.time()
        if entry is None:  # absent, or expired: `ls --all` lists those, so tidy them too
            entry = next((e for e in store.scan(key, corrupt=_ignore) if e.key == key), None)
            if entry is None or (status is not None and entry.status != status):
                raise _no_record(store, key)
        if status is not None and entry.status != status:
            raise Failure(
                f"key {key!r} is {entry.status}, not {status}: left alone", Exit.NO_RECORD
            )
        state = _state(entry, now)
        if state == Status.PROCESSING and not force:
            raise Failure(
                f"key {key!r} is running: its owner {entry.owner} started it at"
                f" {_iso(entry.started_at)} and is alive. Forgetting it would let a second call"
                " start while it runs; wait for it, or pass --force",
                Exit.RUNNING,
            )
        if store.delete(key, entry.token):
            return record_json(entry, now)
    raise Failure(f"key {key!r} kept changing while being forgotten: try again", Exit.RUNNING)


def _prune(args: argparse.Namespace) -> Exit:
    store = _store(args)
    removed = store.prune()
    if getattr(args, "json", False):
        _print_json({"removed": removed})
    else:
        print(f"removed {removed} expired record{'' if removed == 1 else 's'} from {store!r}")
    return Exit.OK


def _stats(args: argparse.Namespace) -> Exit:
    store = _store(args)
    now = store.time()
    counts: Counter[str] = Counter()
    oldest: Entry | None = None
    newest: Entry | None = None
    for entry in store.scan(corrupt=lambda key, error: counts.update([_unreadable(error)])):
        counts[_state(entry, now)] += 1
        if entry.is_expired(now):
            continue
        if oldest is None or entry.started_at < oldest.started_at:
            oldest = entry
        if newest is None or entry.started_at > newest.started_at:
            newest = entry
    states = ["ok", "halted", "processing", "abandoned", "expired", CORRUPT, TAMPERED]
    size = store.bytes_used()
    summary: dict[str, Any] = {
        "store": repr(store),
        "records": sum(counts[s] for s in states if s != "expired"),
        "by_state": {s: counts[s] for s in states},
        "bytes": size,
        "oldest": None
        if oldest is None
        else {"key": oldest.key, "started_at": _iso(oldest.started_at)},
        "newest": None
        if newest is None
        else {"key": newest.key, "started_at": _iso(newest.started_at)},
    }
    if getattr(args, "json", False):
        _print_json(summary)
        return Exit.OK
    detail = ", ".join(f"{s} {counts[s]}" for s in states)
    print(f"{'store:':<9}{store!r}")
    print(f"{'records:':<9}{summary['records']} ({detail})")
    print(f"{'size:':<9}{'unknown' if size is None else _bytes(size)}")
    for name, record in (("oldest", oldest), ("newest", newest)):
        if record is not None:
            ago = _span(now - record.started_at)
            print(f"{name + ':':<9}{record.key} (started {_iso(record.started_at)}, {ago} ago)")
    return Exit.OK


def _bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


def _run_command(args: argparse.Namespace) -> int:
    key = args.key
    if not key.strip():
        raise Failure(f"{PROG} run: --key must not be empty", Exit.USAGE)
    try:
        policy = Policy(
            ttl=args.ttl, wait=args.wait, lease=args.lease, on_abandoned=args.on_abandoned
        )
    except (TypeError, ValueError) as exc:
        raise Failure(f"{PROG} run: {exc}", Exit.USAGE) from None
    store = _store(args, create=True)
    fingerprint = _run.fingerprint(args.argv, args.fingerprint_env)
    try:
        outcome, ran = _run.run_once(
            store,
            key,
            args.argv,
            policy=policy,
            fingerprint=fingerprint,
            retry_on_exit=frozenset(args.retry_on_exit),
            max_output=args.max_output,
        )
    except _run.CannotStart as exc:
        raise Failure(f"{exc} (key {key!r} released: nothing ran)", exc.status) from None
    except _run.ForeignRecord as exc:
        raise Failure(str(exc), Exit.MISMATCH) from None
    except FingerprintMismatch:
        raise Failure(
            f"key {key!r} was first used with another command line"
            f"{' or environment' if args.fingerprint_env else ''}: use another key, or"
            f" `{PROG} show {key}` to see the recorded one",
            Exit.MISMATCH,
        ) from None
    except AlreadyRunning as exc:
        raise Failure(
            f"key {key!r} is being run by {exc.owner} since {exc.started_at:%Y-%m-%d %H:%M:%S}Z;"
            " retry later, or pass --wait S to wait for its outcome",
            Exit.RUNNING,
        ) from None
    except Halted as exc:
        raise Failure(
            f"key {key!r} halted: {exc.reason}. A side effect may have happened: check it, then"
            f" `{PROG} forget {key}` to allow another run",
            Exit.HALTED,
        ) from None
    if ran:
        if outcome["dropped"]:
            _say(_run.dropped_note(outcome).removeprefix(f"{PROG}: "))
        if args.verbose:
            _say(f"ran {key!r}: {_run.describe(outcome)}")
        _run.die_like_the_command(outcome)
        return _run.status_of(outcome)
    status = _run.replay(outcome)
    if args.verbose:
        _say(f"replayed {key!r} from its record: {_run.describe(outcome)}; the command did not run")
    return status


# ---------------------------------------------------------------------------------- the driver


def _say(message: str) -> None:
    if sys.stderr is None:  # closed (`2>&-`): print() would write to stdout instead
        return
    if not message.startswith((f"{PROG} ", f"{PROG}:")):  # usage errors name the command
        message = f"{PROG}: {message}"
    print(message, file=sys.stderr, flush=True)


class _LogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if message.startswith(f"{PROG}: ") else f"{PROG}: {message}"


def _log_to_stderr(verbose: bool) -> None:
    """idemfn's log on stderr: errors only, warnings too with ``--verbose``. (An abandoned
    key's warning would otherwise repeat the error line the command prints.)"""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter("%(message)s"))
    logger = logging.getLogger(PROG)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if verbose else logging.ERROR)
    # psycopg_pool logs each failed connection attempt; the store's error says why it failed,
    # on one line (without this, Python's last-resort handler would print each attempt).
    logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``idemfn`` command with ``argv`` (default: ``sys.argv[1:]``); return its status."""
    try:
        args = _parse(sys.argv[1:] if argv is None else argv)
        if argv is None:  # the real command, not a call from Python code
            _log_to_stderr(getattr(args, "verbose", False))
        handler: Callable[[argparse.Namespace], int] = args.handler
        return int(handler(args))
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else Exit.USAGE
    except Failure as failure:
        _say(str(failure))
        return failure.status
    except IdempotencyError as exc:
        _say(str(exc))
        return next(status for kind, status in _ERROR_STATUS if isinstance(exc, kind))
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except BrokenPipeError:  # `idemfn ls | head`: the reader has what it wanted
        _silence_stdout()
        return Exit.OK
    except OSError as exc:  # writing the output failed (stores raise StoreError instead)
        if exc.filename is not None:  # a file, not the output: say which, and not that
            _say(f"{exc.filename}: {exc.strerror or exc}")
            return Exit.STORE_ERROR
        _silence_stdout()
        _say(f"cannot write the output: {exc}")
        return Exit.STORE_ERROR
    except Exception as exc:
        _say(
            f"internal error: {type(exc).__name__}: {exc}. Please report it, with the command"
            " you ran (IDEMFN_DEBUG=1 prints the traceback)"
        )
        if os.environ.get("IDEMFN_DEBUG"):
            raise
        return Exit.INTERNAL


def _silence_stdout() -> None:
    # Python would otherwise report the broken pipe again when it flushes stdout at exit.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def entry_point() -> NoReturn:
    """The console script."""
    sys.exit(main())
