"""The store a command uses: ``--store``, ``IDEMFN_STORE`` or the default directory.

Inspecting commands never create a store: a mistyped ``--store`` is an error, not an empty
listing.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
from pathlib import Path

from .._signing import signer_for
from .._stores import ENV_VAR, Store, locate, open_store
from .._stores.disk import DiskStore, default_directory
from .parser import PROG, STATES, CliError, Exit

__all__ = ["command_store"]


def command_store(args: argparse.Namespace, *, create: bool = False) -> Store:
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
        raise CliError(f"{source}: {exc}", Exit.BAD_STORE) from None
    if kind == "memory":
        raise CliError(
            f"{source}: {text!r} is a store inside one process, empty in every new one:"
            f" {PROG} needs a store that outlives it (a directory, or a server URL)",
            Exit.BAD_STORE,
        )
    if kind == "disk":
        try:
            _check_directory(Path(where), source, create)
        except CliError as error:
            if source == "--store" and text in STATES:  # `ls -s halted`: -S was meant
                raise CliError(
                    f"{error} (-s is --store; for a status, write -S {text} or --status {text})",
                    error.status,
                ) from None
            raise
    keys = _signing_keys(args)
    try:
        return open_store(text, signing_key=keys)
    except (TypeError, ValueError) as exc:  # a bad server URL or key, or an extra is missing
        raise CliError(f"{source}: {exc}", Exit.BAD_STORE) from None


def _signing_keys(args: argparse.Namespace) -> list[str] | None:
    """The keys of ``--signing-key-file`` (None: the store reads ``IDEMFN_SIGNING_KEY``)."""
    path = getattr(args, "signing_key_file", None)
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"--signing-key-file: cannot read {path}: {exc}", Exit.USAGE) from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [key for key in keys if key and not key.startswith("#")]
    if not keys:
        raise CliError(f"--signing-key-file: {path} holds no key", Exit.USAGE)
    try:
        signer_for(keys, option=f"--signing-key-file {path}")
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc), Exit.USAGE) from None
    return keys


def _check_directory(directory: Path, source: str, create: bool) -> None:
    """``CliError`` unless ``directory`` holds a store (with ``create``: unless one can be made
    there), saying what is in the way: a missing directory, a file, or a permission."""
    if create:
        # A store is made on first use, but not its parents: a mistyped path must not become
        # a new, empty store in which every step runs again.
        if source != "the default store":
            problem = _not_a_directory(directory.parent)
            if problem is _MISSING:
                raise CliError(
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
        raise CliError(
            f"no store at {directory} ({source}): the directory does not exist", Exit.NO_STORE
        )
    if problem is not None:
        raise _no_store(directory, source, problem)
    try:
        found = DiskStore._exists_at(directory)
    except OSError as exc:  # it cannot tell (a permission): say why
        raise _no_store(directory, source, exc) from None
    if not found:
        raise CliError(
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


def _no_store(directory: Path, source: str, problem: OSError) -> CliError:
    """The one line for a store directory that cannot be reached: its path, and why."""
    what = f"{problem.filename}: {problem.strerror}" if problem.filename else str(problem)
    if isinstance(problem, NotADirectoryError):
        return CliError(f"no store at {directory} ({source}): {what}", Exit.NO_STORE)
    return CliError(f"cannot use the store at {directory} ({source}): {what}", Exit.STORE_ERROR)
