"""The ``idemfn`` command: look at and repair records, and run a shell command once.

``parser`` reads the arguments; ``records`` holds the commands that look at and repair records
(``ls``, ``show``, ``forget``, ``prune``, ``stats``); ``run`` runs a shell command once per key,
with ``process`` (the command's process), ``supervise`` (the process between the runner and
its command) and ``command_outcome`` (what a run records).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .._errors import (
    AlreadyRunning,
    DeadlineExceeded,
    FingerprintMismatch,
    Halted,
    IdempotencyError,
    OwnershipLost,
    StoreError,
)
from . import records, run
from .parser import PROG, CliError, Exit, parse, say

__all__ = ["entry_point", "main"]

_ERROR_STATUS: tuple[tuple[type[IdempotencyError], Exit], ...] = (
    (FingerprintMismatch, Exit.MISMATCH),
    (AlreadyRunning, Exit.RUNNING),
    (Halted, Exit.HALTED),
    (OwnershipLost, Exit.LOST),
    (DeadlineExceeded, Exit.DEADLINE),
    (StoreError, Exit.STORE_ERROR),
)

#: What each command runs: its arguments in, its exit status out.
HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "ls": records.ls,
    "show": records.show,
    "forget": records.forget,
    "prune": records.prune,
    "stats": records.stats,
    "run": run.run_command,
}


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
        args = parse(sys.argv[1:] if argv is None else argv)
        if argv is None:  # the real command, not a call from Python code
            _log_to_stderr(getattr(args, "verbose", False))
        return int(HANDLERS[args.command](args))
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else Exit.USAGE
    except CliError as error:
        say(str(error))
        return error.status
    except IdempotencyError as exc:
        say(str(exc))
        return next(status for kind, status in _ERROR_STATUS if isinstance(exc, kind))
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except BrokenPipeError:  # `idemfn ls | head`: the reader has what it wanted
        _silence_stdout()
        return Exit.OK
    except OSError as exc:  # writing the output failed (stores raise StoreError instead)
        if exc.filename is not None:  # a file, not the output: say which, and not that
            say(f"{exc.filename}: {exc.strerror or exc}")
            return Exit.STORE_ERROR
        _silence_stdout()
        say(f"cannot write the output: {exc}")
        return Exit.STORE_ERROR
    except Exception as exc:
        say(
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
