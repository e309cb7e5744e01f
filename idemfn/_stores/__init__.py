"""Stores, and how a path, URL or ``IDEMFN_STORE`` becomes one."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .base import Store
from .disk import DiskStore, default_directory
from .memory import MemoryStore

__all__ = [
    "DiskStore",
    "MemoryStore",
    "Store",
    "default_store",
    "locate",
    "open_store",
    "resolve_store",
]

ENV_VAR = "IDEMFN_STORE"

_lock = threading.Lock()
_opened: dict[tuple[str, Path | str], Store] = {}
_memory_store: MemoryStore | None = None


def open_store(url_or_path: str | os.PathLike[str] | Store) -> Store:
    """The store a path or URL names.

    A directory path (or ``file://`` URL) gives a ``DiskStore``, one per directory in this
    process; ``memory://`` gives this process's ``MemoryStore``; ``redis://``, ``rediss://``
    and ``unix://`` give a ``RedisStore``, ``postgresql://`` and ``postgres://`` a
    ``PostgresStore``, one per URL. A ``Store`` is returned as is.
    """
    global _memory_store
    if isinstance(url_or_path, Store):
        return url_or_path
    kind, where = locate(url_or_path)
    with _lock:
        if kind == "memory":
            if _memory_store is None:
                _memory_store = MemoryStore()
            return _memory_store
        store = _opened.get((kind, where))
        if store is None:
            store = DiskStore(where) if kind == "disk" else _server_store(kind, str(where))
            _opened[(kind, where)] = store
        return store


def _server_store(kind: str, url: str) -> Store:
    # Each imports its client library only when a store needs it.
    if kind == "redis":
        from .redis import RedisStore

        try:
            return RedisStore(url)
        except ImportError:
            raise ValueError(
                f"store URL {url!r} needs redis-py: pip install 'idemfn[redis]'"
            ) from None
    from .postgres import PostgresStore

    try:
        return PostgresStore(url)
    except ImportError:
        raise ValueError(
            f"store URL {url!r} needs psycopg 3: pip install 'idemfn[postgres]'"
        ) from None


def locate(url_or_path: str | os.PathLike[str]) -> tuple[str, Path | str]:
    """What a path or URL names: ("disk", resolved directory), ("memory", ""), ("redis", URL)
    or ("postgres", URL).

    Raises ``TypeError``/``ValueError`` for anything that names no store this version has.
    """
    if not isinstance(url_or_path, (str, os.PathLike)):
        raise TypeError(
            "open_store() takes a directory path, a store URL or a Store, not "
            f"{type(url_or_path).__name__}"
        )
    text = os.fspath(url_or_path)
    if not text.strip():
        raise ValueError("open_store() got an empty path or URL")
    scheme, sep, rest = text.partition("://")
    if sep and scheme.isidentifier():
        scheme = scheme.lower()
        if scheme == "memory":
            return "memory", ""
        if scheme in ("redis", "rediss", "unix"):
            return "redis", text
        if scheme in ("postgresql", "postgres"):
            return "postgres", text
        if scheme == "file":
            text = rest
        else:
            raise ValueError(
                f"unknown store URL scheme {scheme!r} in {text!r}: expected a directory path,"
                " file://, memory://, redis://, rediss://, unix://, postgresql:// or postgres://"
            )
    return "disk", Path(text).expanduser().resolve()


def default_store() -> Store:
    """``IDEMFN_STORE`` (a directory or URL) if set, else a ``DiskStore`` in the user's state
    directory (see ``default_directory()``)."""
    configured = os.environ.get(ENV_VAR, "").strip()
    try:
        return open_store(configured or default_directory())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{ENV_VAR}={configured!r}: {exc}") from None


def resolve_store(store: Store | str | os.PathLike[str] | None, *, option: str) -> Store:
    """``store=`` as the decorator and ``begin`` take it; errors name ``option``."""
    if store is None:
        return default_store()
    try:
        return open_store(store)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{option}: {exc}") from None
