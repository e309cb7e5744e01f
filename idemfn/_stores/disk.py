"""``DiskStore``: records in a diskcache ``Cache`` (SQLite), shared by a machine's processes."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import diskcache
import platformdirs

from .._record import Entry, decode, encode
from .base import Store

__all__ = ["DiskStore", "default_directory"]

# Errors the backend may raise for a broken, locked, full or unreadable store.
_BACKEND_ERRORS = (sqlite3.Error, OSError, diskcache.Timeout)

# The fence. A processing record keeps its claim's token in diskcache's ``tag`` column (NULL
# once finished), so "replace/remove it if it is still that live claim" is ONE conditional
# statement: atomic in SQLite, and a single write instead of a read-then-write transaction.
# Records are always rows (never diskcache's side files: see disk_min_file_size below), so
# these statements see all of a record. The columns are diskcache 5's Cache table, checked
# when the store opens.
_SWAP = (
    "UPDATE Cache SET store_time = ?, expire_time = ?, access_time = ?, tag = ?, size = 0,"
    " mode = 1, filename = NULL, value = ? WHERE key = ? AND raw = 1 AND tag = ?"
)
_RELEASE = "DELETE FROM Cache WHERE key = ? AND raw = 1 AND tag = ?"
# A replay's one read: the row's bytes, without Cache.get's per-call layers (the entry's own
# expires_at decides expiry).
_GET = "SELECT value FROM Cache WHERE key = ? AND raw = 1"
_COLUMNS = {"key", "raw", "store_time", "expire_time", "access_time", "tag", "size", "mode",
            "filename", "value"}  # fmt: skip
_MODE_RAW = 1  # diskcache.core.MODE_RAW: the value column holds the bytes as they are


def default_directory() -> Path:
    """Where the default store lives: the user's *state* directory, never a cache directory,
    which the OS may wipe (a lost record means a side effect runs twice)."""
    return platformdirs.user_state_path("idemfn")


class DiskStore(Store):
    """Records in a diskcache ``Cache`` in ``directory`` (default: ``default_directory()``).

    Safe across threads, processes and ``fork``: SQLite serialises writers, and a forked child
    opens its own connection instead of sharing its parent's. Records are never evicted by size
    (``eviction_policy="none"``): only expiry, ``forget`` and ``prune`` remove them. The
    directory is created with mode ``0700``. Nothing touches the disk until the first use.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, timeout: float = 60.0):
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise TypeError(
                f"DiskStore(directory=...) takes a path, not {type(directory).__name__}"
            )
        if not timeout > 0:
            raise ValueError(f"DiskStore(timeout=...) must be > 0 seconds, not {timeout!r}")
        self.directory = Path(directory) if directory is not None else default_directory()
        self.timeout = timeout
        self._cache: diskcache.Cache | None = None
        self._lock = threading.Lock()
        _open_stores.add(self)

    def __repr__(self) -> str:
        return f"DiskStore({str(self.directory)!r})"

    @property
    def cache(self) -> diskcache.Cache:
        """The underlying ``diskcache.Cache``, opened on first use."""
        cache = self._cache
        if cache is None:
            with self._lock:
                if self._cache is None:
                    self._cache = self._open()
                cache = self._cache
        return cache

    def _open(self) -> diskcache.Cache:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            cache = diskcache.Cache(
                str(self.directory),
                timeout=self.timeout,
                # The default policy evicts past 1 GiB: a lost record re-runs a side effect.
                eviction_policy="none",
                statistics=False,
                # Every record is a row, never a side file (see _SWAP).
                disk_min_file_size=2**62,
            )
            columns = {row[1] for row in cache._sql("PRAGMA table_info(Cache)")}
        except _BACKEND_ERRORS as exc:
            raise self.error("open the store for", str(self.directory), exc) from exc
        if not columns >= _COLUMNS or _MODE_RAW != diskcache.core.MODE_RAW:
            cache.close()
            raise self.error(
                "open the store for",
                str(self.directory),
                f"diskcache {diskcache.__version__} has a table layout this idemfn does not know",
            )
        return cache

    def _decode(self, key: str, data: object) -> Entry:
        if not isinstance(data, bytes):
            raise self.error("read", key, "the stored value is not an idemfn record")
        try:
            return decode(data)
        except ValueError as exc:
            raise self.error("read", key, f"the record is corrupt: {exc}") from None

    def _expire_in(self, entry: Entry) -> float | None:
        """Seconds until diskcache may drop the row; the entry's own expires_at still decides."""
        if entry.expires_at is None:
            return None
        return max(entry.expires_at - self.time(), 0.0)

    def claim(self, entry: Entry) -> Entry | None:
        key = entry.key
        data = encode(entry)
        tag = entry.token if entry.status == "processing" else None
        with _guard:
            try:
                cache = self.cache
                while True:
                    if cache.add(key, data, expire=self._expire_in(entry), tag=tag, retry=True):
                        return None
                    current = cache.get(key, retry=True)
                    if current is None:
                        continue  # removed between add and get: try again
                    found = self._decode(key, current)
                    if not found.is_expired(self.time()):
                        return found
                    self.delete(key, found.token)  # expired, not yet dropped: replace it
            except _BACKEND_ERRORS as exc:
                raise self.error("claim", key, exc) from exc

    def get(self, key: str) -> Entry | None:
        with _guard:
            try:
                row = self.cache._sql(_GET, (key,)).fetchone()
            except _BACKEND_ERRORS as exc:
                raise self.error("read", key, exc) from exc
        if row is None:
            return None
        entry = self._decode(key, row[0])
        return None if entry.is_expired(self.time()) else entry

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        now = time.time()
        expire_in = self._expire_in(entry)
        tag = entry.token if entry.status == "processing" else None
        params = (now, None if expire_in is None else now + expire_in, now, tag, encode(entry),
                  key, token)  # fmt: skip
        with _guard:
            try:
                return bool(self.cache._sql(_SWAP, params).rowcount == 1)
            except _BACKEND_ERRORS as exc:
                raise self.error("update", key, exc) from exc

    def release(self, key: str, token: str) -> bool:
        with _guard:
            try:
                return bool(self.cache._sql(_RELEASE, (key, token)).rowcount == 1)
            except _BACKEND_ERRORS as exc:
                raise self.error("release", key, exc) from exc

    def delete(self, key: str, token: str | None = None) -> bool:
        with _guard:
            try:
                cache = self.cache
                if token is None:
                    return bool(cache.delete(key, retry=True))
                with cache.transact(retry=True):
                    data = cache.get(key, retry=True)
                    if data is None or self._decode(key, data).token != token:
                        return False
                    return bool(cache.delete(key, retry=True))
            except _BACKEND_ERRORS as exc:
                raise self.error("delete", key, exc) from exc

    def scan(self, prefix: str = "") -> Iterator[Entry]:
        with _guard:
            try:
                cache = self.cache
                keys = [k for k in cache.iterkeys() if isinstance(k, str) and k.startswith(prefix)]
            except _BACKEND_ERRORS as exc:
                raise self.error("list", prefix or "*", exc) from exc
        for key in keys:
            with _guard:
                try:
                    data = cache.get(key, retry=True)
                except _BACKEND_ERRORS as exc:
                    raise self.error("read", key, exc) from exc
            if data is not None:
                yield self._decode(key, data)

    def prune(self) -> int:
        with _guard:
            try:
                expired = int(self.cache.expire(retry=True))  # rows diskcache knows are expired
            except _BACKEND_ERRORS as exc:
                raise self.error("prune", str(self.directory), exc) from exc
        return expired + super().prune()

    def close(self) -> None:
        with self._lock:
            cache, self._cache = self._cache, None
        if cache is not None:
            cache.close()

    def _forget_inherited_connection(self) -> None:
        # A SQLite connection must not be used on both sides of a fork. The child keeps the
        # inherited one referenced, never closing it under the parent, and opens its own.
        if self._cache is not None:
            _inherited.append(self._cache)
        self._cache = None
        self._lock = threading.Lock()


_open_stores: weakref.WeakSet[DiskStore] = weakref.WeakSet()
_inherited: list[diskcache.Cache] = []

# Every store operation holds this process-wide guard, and fork() takes it first: a child forked
# while another thread was inside a SQLite transaction inherits that lock state and is locked
# out of the database (found by tests/test_processes.py, 2026-11-22). Reentrant: claim() may
# delete an expired record while it holds the guard.
_guard = threading.RLock()


def _after_fork_in_child() -> None:
    _guard.release()
    for store in list(_open_stores):
        store._forget_inherited_connection()


os.register_at_fork(
    before=_guard.acquire, after_in_parent=_guard.release, after_in_child=_after_fork_in_child
)
