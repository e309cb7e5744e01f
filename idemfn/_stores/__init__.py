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
    "open_store",
    "resolve_store",
    "store_directory",
]

ENV_VAR = "IDEMFN_STORE"

# Backends other issues build; until then their URLs are refused with a message saying so.
_PLANNED = {
    "redis": "RedisStore",
    "rediss": "RedisStore",
    "unix": "RedisStore",
    "postgresql": "PostgresStore",
    "postgres": "PostgresStore",
}

_lock = threading.Lock()
_disk_stores: dict[Path, DiskStore] = {}
_memory_store: MemoryStore | None = None


def open_store(url_or_path: str | os.PathLike[str] | Store) -> Store:
    """The store a path or URL names.

    A directory path (or ``file://`` URL) gives a ``DiskStore``, one per directory in this
    process; ``memory://`` gives this process's ``MemoryStore``. A ``Store`` is returned as is.
    """
    global _memory_store
    if isinstance(url_or_path, Store):
        return url_or_path
    directory = store_directory(url_or_path)
    if directory is None:  # memory://, the only other scheme store_directory lets through
        with _lock:
            if _memory_store is None:
                _memory_store = MemoryStore()
            return _memory_store
    with _lock:
        store = _disk_stores.get(directory)
        if store is None:
            store = _disk_stores[directory] = DiskStore(directory)
        return store


def store_directory(url_or_path: str | os.PathLike[str]) -> Path | None:
    """The directory a path or ``file://`` URL names (resolved), or None for ``memory://``.

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
            return None
        if scheme == "file":
            text = rest
        elif scheme in _PLANNED:
            raise ValueError(
                f"store URL {text!r} needs {_PLANNED[scheme]}, which this version of idemfn does"
                " not have yet; use a directory path (DiskStore) or memory://"
            )
        else:
            raise ValueError(
                f"unknown store URL scheme {scheme!r} in {text!r}: expected a directory path,"
                " file://, memory://"
            )
    return Path(text).expanduser().resolve()


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
