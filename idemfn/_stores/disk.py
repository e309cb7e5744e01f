"""``DiskStore``: records in a diskcache ``Cache`` (SQLite), shared by a machine's processes.

Over 1,000 lines on purpose: one adapter behind one interface. Its SQL, the checks of the way
to its directory (who may change it), its fork gate and its async primitives' connection all
guard this store's one database and read best beside it; the directory checks are the seam to
split along if a second file store comes.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import diskcache
import platformdirs

from .._errors import StoreError
from .._logs import CHECKPOINT_FAILED, CLEANUP_FAILED, no_key
from .._record import Entry
from .._signing import SigningKey
from .base import Corrupt, Store, offload, prunable, remove_judged, skip_corrupt

if TYPE_CHECKING:
    import asyncio

__all__ = ["DiskStore", "default_directory"]

# "cache.db": the database file in a store's directory, as diskcache names it.
DBNAME: str = diskcache.core.DBNAME

logger = logging.getLogger("idemfn")

T = TypeVar("T")

# Errors the backend may raise for a broken, locked, full or unreadable store. (sqlite3 raises
# UnicodeDecodeError for text that is not UTF-8, and for an error message quoting some: a
# damaged schema's.)
_BACKEND_ERRORS = (sqlite3.Error, OSError, diskcache.Timeout, UnicodeDecodeError)

# Records are rows of diskcache 5's Cache table (the columns are checked when a store opens),
# always stored inline (never diskcache's side files: see disk_min_file_size), so that each
# transition is ONE statement, atomic in SQLite, instead of a read-then-write transaction.
# A processing record keeps its claim's token in the ``tag`` column (NULL once finished): that
# is the fence of every write after a claim.
#
# SQL alone removes or replaces a row only when two copies of its expiry agree that it has
# passed: ``expire_time`` (indexed) and ``access_time``, which holds ``expire_time + 1``. The
# record's checksum covers neither column, and one flipped bit in ``expire_time`` (in the row
# or in its index) made a live record look expired to a claim, the cull or prune, which
# removed it: its body ran again (issue 14, review). A row whose copies disagree is judged by
# its record instead (a claim reads it, prune reads it). A row written before the copy has
# ``access_time = store_time``, and is removed as it always was.
_COLUMNS = (
    "key, raw, store_time, expire_time, access_time, access_count, tag, size, mode, filename, value"
)
_MODE_RAW = 1  # diskcache.core.MODE_RAW: the value column holds the bytes as they are
# Whether a row's expiry has passed by both of its copies (``?`` is the time now, twice; the
# second comparison is the one that cannot read the index's copy of expire_time).
_PASSED = (
    "expire_time <= ? AND (access_time = expire_time + 1 AND access_time <= ? + 1"
    " OR access_time = store_time)"
)
# Insert, or replace an expired row; a live row is left alone (rowcount 0).
_CLAIM = (
    f"INSERT INTO Cache ({_COLUMNS}) VALUES (?, 1, ?, ?, ?, 0, ?, 0, 1, NULL, ?)"
    " ON CONFLICT (key, raw) DO UPDATE SET store_time = excluded.store_time,"
    " expire_time = excluded.expire_time, access_time = excluded.access_time, access_count = 0,"
    " tag = excluded.tag, size = 0, mode = 1, filename = NULL, value = excluded.value"
    " WHERE Cache.expire_time <= excluded.store_time AND (Cache.access_time ="
    " Cache.expire_time + 1 OR Cache.access_time = Cache.store_time)"
)
_SWAP = (
    "UPDATE Cache SET store_time = ?, expire_time = ?, access_time = ?, tag = ?, size = 0,"
    " mode = 1, filename = NULL, value = ? WHERE key = ? AND raw = 1 AND tag = ?"
)
_RELEASE = "DELETE FROM Cache WHERE key = ? AND raw = 1 AND tag = ?"
# What os.path.expandvars replaces (posixpath's own pattern), when the variable is set.
_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})", re.ASCII)
_MAX_LINKS = 40  # links followed on the way to a store, as Linux's MAXSYMLINKS
#: Set to 1 to trust store directories that fail the ownership check (see DiskStore).
TRUST_ENV_VAR = "IDEMFN_TRUST_DIRECTORY"

_GET = "SELECT value FROM Cache WHERE key = ? AND raw = 1"
_DELETE = "DELETE FROM Cache WHERE key = ? AND raw = 1"
_DELETE_ROW = "DELETE FROM Cache WHERE key = ? AND raw = 1 AND value = ?"
_PROCESSING = "SELECT key FROM Cache WHERE raw = 1 AND tag IS NOT NULL"
# diskcache's add() removed up to 10 expired rows each time; claims do it in batches instead.
_CULL = (
    f"DELETE FROM Cache WHERE rowid IN (SELECT rowid FROM Cache WHERE {_PASSED}"
    " ORDER BY expire_time LIMIT 100)"
)
_CULL_EVERY = 64  # claims
_EXPIRE = f"DELETE FROM Cache WHERE raw = 1 AND {_PASSED}"
_FENCE = "SELECT tag, value FROM Cache WHERE key = ? AND raw = 1"
# The tables and indexes of a store's database (diskcache makes them), by their names.
_SCHEMA = frozenset({b"Settings", b"Cache", b"Cache_key_raw", b"Cache_expire_time"})

# The async primitives (issue 16) run the sync ones' code on the event loop's thread, on a
# connection of that thread's own that never waits for SQLite's lock: a statement that finds it
# held fails at once, having written nothing (each write is one autocommit statement, or a
# BEGIN IMMEDIATE transaction, that takes the lock before it writes), and the operation is tried
# again after an asyncio sleep, on the schedule of SQLite's own busy handler, which is how the
# sync path waits, until ``timeout``. So no worker thread sits out another process's write: a
# waiting call holds no executor thread, and a cancelled one has written nothing. Inline, since
# a worker thread costs more than the work: a read takes ~10 us inline and ~100 us through
# asyncio.to_thread, a first call's claim and swap ~200 us and ~550 us (bench_disk_async.py).
_RETRY_DELAYS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.025, 0.025, 0.05, 0.05, 0.1)
# That connection never checkpoints the write-ahead log into the database, which SQLite does in
# the connection that commits once the log passes 1,000 pages: the checkpoint's fsyncs held the
# event loop for 3-8 ms each time, and up to 80 ms on a busy disk. A worker thread does it after
# this many of its writes instead (about 4 pages each: a log of about 1,000 pages), while the
# async writes of this process wait for it, as a sync writer waits for its own checkpoint.
_CHECKPOINT_EVERY = 256


def default_directory() -> Path:
    """Where the default store lives: the user's *state* directory.

    Never a cache directory, which the OS may wipe: a lost record means a side effect runs
    twice. The store does not exist until it is first used.

    Returns:
        ``platformdirs.user_state_path("idemfn")``: ``~/.local/state/idemfn`` on Linux
        (``$XDG_STATE_HOME/idemfn`` when that is set).
    """
    return platformdirs.user_state_path("idemfn")


class _ForkGate:
    """Store operations run side by side; ``fork()`` waits until none is inside SQLite.

    A child forked while a thread of its parent was inside a SQLite transaction inherits that
    lock state and is locked out of the database for good (found by
    tests/contract/test_processes.py, 2026-11-22). Nothing is held while an operation waits on
    SQLite, so a busy database never blocks another store, or a heartbeat.

    No lock on the fast path: a thread marks itself busy *before* it looks for a fork, and the
    forking thread announces the fork *before* it looks for busy threads; with the interpreter's
    sequentially consistent dict and attribute updates, one of the two always sees the other.
    Not reentrant: store methods never nest operations.
    """

    __slots__ = ("_busy", "_forking")

    def __init__(self) -> None:
        self._busy: dict[int, bool] = {}  # thread ident -> inside a store operation
        self._forking = False

    def __enter__(self) -> None:
        busy = self._busy
        ident = _get_ident()
        busy[ident] = True
        while self._forking:
            del busy[ident]
            time.sleep(0.001)
            busy[ident] = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        del self._busy[_get_ident()]

    def before_fork(self) -> None:
        self._forking = True
        me = _get_ident()
        while any(ident != me for ident in list(self._busy)):
            time.sleep(0.001)

    def after_fork_in_parent(self) -> None:
        self._forking = False

    def after_fork_in_child(self) -> None:
        self.__init__()  # type: ignore[misc]  # the child's other threads are gone


class _Forking(Exception):
    """An inline attempt met a fork under way: it steps aside and is tried again later."""


class _NowaitGate:
    """``_gate``, for the async primitives' inline attempts: while a fork is under way it raises
    ``_Forking`` instead of waiting, since ``fork()`` waits for every other thread's store
    operation, which may be waiting for another process's write lock: the event loop would
    wait with it."""

    __slots__ = ()

    def __enter__(self) -> None:
        busy = _gate._busy
        ident = _get_ident()
        busy[ident] = True  # before looking, as _ForkGate.__enter__
        if _gate._forking:
            del busy[ident]
            raise _Forking

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        del _gate._busy[_get_ident()]


_get_ident = threading.get_ident
_gate = _ForkGate()
_nowait_gate = _NowaitGate()


class DiskStore(Store):
    """Records in a diskcache ``Cache`` in ``directory`` (default: ``default_directory()``).

    Safe across threads, processes and ``fork``: SQLite serialises writers, a forked child opens
    its own connection, and ``fork()`` waits for store operations in flight. Records are never
    evicted by size (``eviction_policy="none"``): only expiry, ``forget`` and ``prune`` remove
    them. The directory, and each missing parent, is created with mode ``0700`` and the
    database files are ``0600``, whatever the umask. Nothing touches the disk until the first
    use. ``~`` and relative paths are made absolute when the store is made; symbolic links are
    resolved when it first opens, and every connection (each thread's, a forked child's, a
    reopened store's) opens the directory they led to then.

    Records hold pickles, so whoever can write the directory, or change the way to it, can run
    code in every process that replays from it. A directory (or database file) owned by
    another user, or writable by its group or others, a database file that is a link, and a
    way to the directory that another user could change (a directory on it that they own, or
    that its group or others may write to without the sticky bit, or an entry of a sticky
    directory that they own) are refused with ``StoreError`` unless ``trust_directory=True``
    (or ``IDEMFN_TRUST_DIRECTORY=1``), for stores shared on purpose. With ``signing_key`` (or
    ``IDEMFN_SIGNING_KEY``), records are signed, and one that fails its check is never loaded.

    Args:
        directory: The store's directory, made (with its missing parents) if missing.
            Default None: ``default_directory()``.
        timeout: Seconds an operation waits for another process's write lock on the
            database before it raises ``StoreError``. Default 60.0.
        trust_directory: True to skip the ownership and mode checks, for a store shared
            between users on purpose. Default None: ``IDEMFN_TRUST_DIRECTORY=1`` in the
            environment, else False.
        signing_key: Keys to sign and verify records with (as ``idempotent``'s
            ``signing_key``). Default None: ``IDEMFN_SIGNING_KEY`` when set.

    Attributes:
        directory: The store's directory, as given but absolute.
        timeout: The ``timeout`` given.
        trust_directory: Whether the directory checks are skipped.

    Raises:
        TypeError: ``directory`` is not a path, or ``trust_directory`` not a bool.
        ValueError: ``timeout`` is not > 0, or a signing key is too short.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 60.0,
        trust_directory: bool | None = None,
        signing_key: SigningKey | None = None,
    ):
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise TypeError(
                f"DiskStore(directory=...) takes a path, not {type(directory).__name__}"
            )
        if not timeout > 0:
            raise ValueError(f"DiskStore(timeout=...) must be > 0 seconds, not {timeout!r}")
        path = default_directory() if directory is None else Path(directory).expanduser()
        self.directory = path.absolute()
        self.timeout = timeout
        if trust_directory is None:
            trust_directory = os.environ.get(TRUST_ENV_VAR, "") == "1"
        if not isinstance(trust_directory, bool):
            raise TypeError(
                f"DiskStore(trust_directory=...) must be True or False, not {trust_directory!r}"
            )
        self.trust_directory = trust_directory
        self.sign_with(signing_key)
        self._cache: diskcache.Cache | None = None
        self._pinned: str | None = None  # the directory the path led to when first opened
        self._lock = threading.Lock()
        self._local = threading.local()  # this thread's connection.execute, once looked up
        self._claims = itertools.count(1)
        self._writes = itertools.count(1)  # by the async primitives (see _CHECKPOINT_EVERY)
        # The checkpoint under way for the async primitives, done when it is (see _retrying).
        self._checkpoint: asyncio.Future[None] | None = None
        _open_stores.add(self)

    def __repr__(self) -> str:
        return f"DiskStore({str(self.directory)!r})"

    # (issue 15) Asked by the idemfn command before it opens a store only to look at it.
    @classmethod
    def _exists_at(cls, where: str | os.PathLike[str]) -> bool:
        """Whether a DiskStore was made in directory ``where`` (its database is there). Raises
        ``OSError`` when it cannot tell (a directory it may not search)."""
        return (Path(where) / DBNAME).is_file()  # is_file: False only when it is absent

    @property
    def cache(self) -> diskcache.Cache:
        """The underlying ``diskcache.Cache``, opened (and its directory checked) on first use.

        Raises:
            StoreError: The directory cannot be made, is not safe to unpickle from, or its
                database is damaged.
        """
        cache = self._cache
        if cache is None:
            with self._lock:
                if self._cache is None:
                    self._cache = self._open()
                cache = self._cache
        return cache

    @property
    def _sql(self) -> Callable[..., sqlite3.Cursor]:
        """This thread's ``execute`` on the store's database (diskcache keeps a connection per
        thread). Cached here: diskcache's own lookup costs a getpid() on every statement, and
        this store handles fork() itself."""
        try:
            return self._local.execute  # type: ignore[no-any-return]
        except AttributeError:
            pass  # opened below, outside the handler: an error opening it chains nothing
        cache = self.cache
        self._check_again(cache.directory)
        execute = self._local.execute = cache._con.execute
        return execute  # type: ignore[no-any-return]

    @property
    def _sql_nowait(self) -> Callable[..., sqlite3.Cursor]:
        """This thread's ``execute`` on a second connection to the database, the async
        primitives': a statement that finds the lock held fails at once (``_retrying`` waits
        instead), and it never checkpoints (``_checkpoint_soon`` has a worker thread do it). Opened
        here, inline: the store must be open already (``_retrying`` opens it in a thread)."""
        try:
            return self._local.nowait  # type: ignore[no-any-return]
        except AttributeError:
            pass
        where = self.cache.directory
        self._check_again(where)
        con = sqlite3.connect(os.path.join(where, DBNAME), timeout=0, isolation_level=None)
        try:
            # The settings diskcache sets on each of its connections, set as it sets them.
            for name, value in con.execute("SELECT key, value FROM Settings").fetchall():
                if name.startswith("sqlite_"):
                    pragma = name[len("sqlite_") :]
                    if con.execute(f"PRAGMA {pragma}").fetchall() != [(value,)]:
                        con.execute(f"PRAGMA {pragma} = {value}").fetchall()
            con.execute("PRAGMA wal_autocheckpoint = 0")
        except BaseException:
            con.close()
            raise
        execute = self._local.nowait = con.execute
        return execute

    def _check_again(self, where: str) -> None:
        """Before a new connection opens the directory by path again: checked again, as when
        the store opened. (Issue 14: after a tmp cleaner removed an idle store in /tmp, another
        user made one of theirs in its place, and a new thread unpickled it.)"""
        if not self.trust_directory and self._resolve(where, make=False) != where:
            self._refuse_way(f"{where} now leads elsewhere than when the store opened")

    def _open(self) -> diskcache.Cache:
        # The way to the directory is resolved and checked when the store first opens; every
        # connection then opens the result, checked again first (see _sql). Opened again
        # (after close(), or in a forked child), the store walks and checks that resolved path.
        where = self._resolve(self._pinned or str(self.directory))
        self._refuse_expansion(where)
        self._pinned = where
        try:
            # A trusted directory is shared on purpose: its modes are its owner's to set.
            private = not self.trust_directory
            if private:
                self._check_files(where)
                # Created 0600 before SQLite opens it: its -wal and -shm files copy the mode.
                # Only when missing: closing any descriptor of an open database drops every
                # POSIX lock this process holds on it, those of its other connections too.
                try:
                    fd = os.open(
                        os.path.join(where, DBNAME),
                        os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o600,
                    )
                except FileExistsError:
                    pass
                else:
                    try:
                        os.fchmod(fd, 0o600)  # whatever the umask took away
                    finally:
                        os.close(fd)
            self._check_schema(where)
            try:
                cache = diskcache.Cache(
                    where,
                    timeout=self.timeout,
                    # The default policy evicts past 1 GiB: a lost record re-runs a side effect.
                    eviction_policy="none",
                    statistics=False,
                    # Every record is a row, never a side file (see _CLAIM).
                    disk_min_file_size=2**62,
                )
            except _BACKEND_ERRORS:
                raise
            except Exception as exc:  # diskcache's own, reading a damaged Settings table
                raise self._damaged(where, f"its settings: {type(exc).__name__}: {exc}") from exc
            for database in Path(where).glob(f"{DBNAME}*") if private else ():
                try:
                    database.chmod(0o600)  # files an older idemfn left readable by others
                except FileNotFoundError:  # another process's transient -journal
                    pass
            columns = {row[1] for row in cache._sql("PRAGMA table_info(Cache)")}
        except _BACKEND_ERRORS as exc:
            if _is_damage(exc):
                raise self._damaged(where, f"{type(exc).__name__}: {exc}") from exc
            raise self.error("open the store for", str(self.directory), exc) from exc
        expected = {c.strip() for c in _COLUMNS.split(",")}
        if not columns >= expected or diskcache.core.MODE_RAW != _MODE_RAW:
            cache.close()
            raise self.error(
                "open the store for",
                str(self.directory),
                f"diskcache {diskcache.__version__} has a table layout this idemfn does not know",
            )
        return cache

    def _check_schema(self, where: str) -> None:
        """Refuse a database whose schema is damaged, before diskcache opens it: diskcache
        makes the tables and indexes it finds missing. (Issue 14, review: a flipped bit in the
        first page hid the Cache table from the schema, and diskcache made a new, empty one:
        every key ran its body again; another pointed the key index at a page of another
        index, and every key looked unrecorded.) Reading the schema costs an open a fraction
        of a millisecond; a schema with a table missing (a new store's, or one still being
        made by another process) is then checked page by page (``PRAGMA quick_check``), as
        only its pages can tell it from a damaged one."""
        path = os.path.join(where, DBNAME)
        try:
            if os.stat(path).st_size == 0:
                return  # new: diskcache makes it
        except FileNotFoundError:
            return
        con = sqlite3.connect(path, timeout=self.timeout)
        try:
            con.text_factory = bytes  # a damaged name is a finding, not a UnicodeDecodeError
            rows = con.execute("SELECT name, tbl_name, rootpage FROM sqlite_master").fetchall()
            (pages,) = con.execute("PRAGMA page_count").fetchone()
            names = {name for name, _, _ in rows}
            roots = [root for _, _, root in rows if root]  # (a trigger has none)
            problem = None
            if len(set(roots)) != len(roots) or any(not 0 < r <= pages for r in roots):
                problem = "two schema objects share a page, or one lies outside the file"
            elif not {table for _, table, _ in rows} <= names:
                problem = "an index or trigger is on a table the schema does not hold"
            elif not names >= _SCHEMA:
                checked = [row[0] for row in con.execute("PRAGMA quick_check(5)")]
                if checked != [b"ok"]:
                    problem = b"; ".join(checked).decode("utf-8", "replace")
        finally:
            con.close()
        if problem is not None:
            raise self._damaged(where, f"its schema is damaged: {problem}")

    def _damaged(self, where: str, problem: str) -> StoreError:
        database = os.path.join(where, DBNAME)
        return self.error(
            "open the store for",
            str(self.directory),
            f"{database} is damaged ({problem}); no record was read from it. Restore it"
            f" from a backup, or inspect it (sqlite3 {database} 'PRAGMA"
            " integrity_check'); a store moved aside starts empty, and every call then runs"
            " its body again",
        )

    def _resolve(self, path: str, *, make: bool = True) -> str:
        """``path`` with every symbolic link resolved and each missing directory created
        ``0700`` (whatever the umask); unless the store is trusted, checked on the way.

        diskcache opens the database by path again in every new thread (and SQLite its -wal and
        -shm files), so the store opens the path returned, which holds no link, and the check
        makes sure that no other user can change where it leads: each directory on the way is
        owned by this user or root, one that its group or others may write to is sticky and
        what is next in it is owned by this user or root, and the store's own directory is
        this user's, written by nobody else. (Issue 14: a link in /tmp that its owner
        re-pointed after the check made a new thread in another user's process unpickle a
        record of theirs.) Like ssh's check of ~/.ssh, plus the sticky directories of /tmp.
        Without ``make``, a missing directory is an error: it was there when the store opened.
        """
        check = not self.trust_directory
        me = os.geteuid()
        try:
            way = [("/", os.lstat("/"))]  # the directories walked so far, from the root
        except OSError as exc:
            raise self.error("open the store for", str(self.directory), exc) from None
        todo = path.split("/")[::-1]  # the names still to walk, the next one last
        links = 0
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if len(way) > 1:
                    way.pop()
                continue
            parent, above = way[-1]
            here = os.path.join(parent, name)
            shared = above.st_mode & 0o022
            if check and above.st_uid not in (me, 0):
                self._refuse_way(
                    f"{parent} is owned by uid {above.st_uid}, not this process's uid {me}"
                    + (" nor root" if me else "")
                    + f", so its owner can put a directory of theirs in place of {name}"
                )
            if check and shared and not above.st_mode & stat.S_ISVTX:
                self._refuse_way(
                    f"{parent} is writable by its group or others"
                    f" (mode {stat.S_IMODE(above.st_mode):04o}) and not sticky, so they can put"
                    f" a directory of theirs in place of {name}"
                )
            info = self._lstat(here)
            if info is None:
                skip = _left_later(todo)
                if skip:  # left again by a later "..": not made (as os.path.realpath)
                    del todo[len(todo) - skip :]
                    continue
                if not make:
                    raise self.error(
                        "open the store for",
                        str(self.directory),
                        f"{here} was removed since the store opened. close() the store to make"
                        " it again",
                    )
                self._refuse_expansion(here)  # before it is made, not after
                info = self._make(here)
            if check and shared and info.st_uid not in (me, 0):
                self._refuse_way(
                    f"{here} is owned by uid {info.st_uid}, in {parent}, which others may"
                    f" write to (mode {stat.S_IMODE(above.st_mode):04o}), so its owner can"
                    " replace it"
                )
            if stat.S_ISLNK(info.st_mode):
                links += 1
                if links > _MAX_LINKS:
                    self._refuse_way(f"{path} leads through more than {_MAX_LINKS} links")
                try:
                    target = os.readlink(here)
                except OSError as exc:
                    raise self.error("open the store for", str(self.directory), exc) from None
                if target.startswith("/"):
                    del way[1:]
                todo.extend(target.split("/")[::-1])
                continue
            if not stat.S_ISDIR(info.st_mode):
                raise self.error(
                    "create the directory of",
                    str(self.directory),
                    f"{here} is not a directory (NotADirectoryError). Pass store= a directory"
                    " this user can create, or set IDEMFN_STORE",
                ) from None
            way.append((here, info))
        where, info = way[-1]
        if check:
            self._refuse_unless_private(where, info, me)
        return where

    def _refuse_expansion(self, where: str) -> None:
        """Refuse a directory that diskcache would not open as named: it passes its directory
        through ``os.path.expandvars``, so a ``$NAME`` or ``${NAME}`` of a variable set in the
        environment made it open (and create, with the umask's modes) a directory that was
        never checked (issue 14: ``/tmp/idemfn-$USER``, made and checked as named, then opened
        as another user's ``/tmp/idemfn-ada``). Trusted stores too: nobody named that one."""
        if os.path.expandvars(where) == where:
            return
        found = [match.group(0) for match in _VARIABLE.finditer(where)]
        names = [name for name in found if os.path.expandvars(name) != name]
        raise self.error(
            "open the store for",
            str(self.directory),
            f"{where} holds {', '.join(names)}, which diskcache would replace with the"
            " environment variable's value, opening another directory than this one. Name the"
            " store by a path without it (expand it first with os.path.expandvars if that is"
            " what was meant), or rename the directory",
        )

    def _lstat(self, here: str) -> os.stat_result | None:
        """``here``, not followed if a link; None if missing."""
        try:
            return os.lstat(here)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self.error("open the store for", str(self.directory), exc) from None

    def _make(self, here: str) -> os.stat_result:
        """``here`` made a directory ``0700``, whatever the umask."""
        try:
            os.mkdir(here, 0o700)
        except FileExistsError:  # made meanwhile (by another process): checked as found
            pass
        except OSError as exc:
            # The usual first-hour mistake (a path this user cannot create): one clear line,
            # with no traceback from inside the os module chained to it.
            raise self.error(
                "create the directory of",
                str(self.directory),
                f"{here}: {exc.strerror or exc} ({type(exc).__name__}). Pass store= a"
                " directory this user can create, or set IDEMFN_STORE",
            ) from None
        else:
            # The umask can only take bits from 0o700: give the owner's back (a umask of 0o277
            # would leave a directory its owner cannot write).
            os.chmod(here, 0o700)
        info = self._lstat(here)
        if info is None:  # removed as soon as made: nothing sensible to do but say so
            raise self.error("create the directory of", str(self.directory), f"{here} vanished")
        return info

    def _refuse_way(self, problem: str) -> NoReturn:
        raise self.error(
            "open the store for",
            str(self.directory),
            f"{problem}: whoever can change the way to the store can make this process open"
            " records of theirs and unpickle what they like. Keep the store where only this"
            " user (or root) can change the way to it, or trust it: DiskStore(...,"
            f" trust_directory=True) or {TRUST_ENV_VAR}=1",
        )

    def _refuse_unless_private(self, path: str, info: os.stat_result, me: int) -> None:
        """Refuse ``path`` (the store's directory, or one of its database files) unless it is
        this user's and nobody else may write it."""
        problem = None
        if stat.S_ISLNK(info.st_mode):
            problem = "is a symbolic link, which SQLite would follow out of the checked directory"
        elif info.st_uid != me:
            problem = f"is owned by uid {info.st_uid}, not this process's uid {me}"
        elif info.st_mode & 0o022:
            problem = f"is writable by its group or others (mode {stat.S_IMODE(info.st_mode):04o})"
        if problem is not None:
            raise self.error(
                "open the store for",
                str(self.directory),
                f"{path} {problem}: whoever can write there can make this process unpickle"
                f" what they like. Fix it (chown, chmod 700 the directory and 600 its"
                f" files, no links), or trust it: DiskStore(..., trust_directory=True) or"
                f" {TRUST_ENV_VAR}=1",
            )

    def _check_files(self, where: str) -> None:
        """The database files in the store's directory: this user's, written by nobody else,
        and not links. The directory holds nothing else that idemfn reads (records are rows,
        never diskcache's side files)."""
        me = os.geteuid()
        for path in sorted(Path(where).glob(f"{DBNAME}*")):
            try:
                info = path.lstat()
            except FileNotFoundError:  # another process's transient -journal, gone already
                continue
            self._refuse_unless_private(str(path), info, me)

    def _expiry(self, entry: Entry, now: float) -> tuple[float | None, float | None]:
        """The row's ``expire_time``, when SQL may remove the row, on the real clock (the
        record's own expires_at still decides what a read sees), and its copy in
        ``access_time`` (see _PASSED)."""
        if entry.expires_at is None:
            return None, None
        at = now + max(entry.expires_at - self.time(), 0.0)
        return at, at + 1

    def claim(self, entry: Entry) -> Entry | None:
        return self._claim(entry, False)

    def _claim(self, entry: Entry, inline: bool) -> Entry | None:
        key = entry.key
        data = self.encode(entry)
        tag = entry.token if entry.status == "processing" else None
        with _nowait_gate if inline else _gate:
            try:
                sql = self._sql_nowait if inline else self._sql
                while True:
                    now = time.time()
                    params = (key, now, *self._expiry(entry, now), tag, data)
                    if sql(_CLAIM, params).rowcount == 1:
                        if next(self._claims) % _CULL_EVERY == 0:
                            self._cull(now, inline)
                        return None
                    row = sql(_GET, (key,)).fetchone()
                    if row is None:
                        continue  # removed since: try again
                    found = self.decode(key, row[0])
                    if not found.is_expired(self.time()):
                        return found
                    # Expired by its own clock, not yet by the row's (or the row's two copies
                    # of its expiry disagree, see _PASSED): remove it, but only
                    # the row looked at. Another caller that read it too may have removed it
                    # and claimed since: deleting that claim would let two callers run.
                    sql(_DELETE_ROW, (key, row[0]))
            except _BACKEND_ERRORS as exc:
                raise self.error("claim", key, exc) from exc

    def _cull(self, now: float, inline: bool = False) -> None:
        # Tidying after a claim that is won: a failure here must not fail the claim (nor send
        # an inline one round again: it is won), and a lock held elsewhere is no news inline.
        try:
            (self._sql_nowait if inline else self._sql)(_CULL, (now, now))
        except _BACKEND_ERRORS as exc:
            if not (inline and _busy(exc)):
                logger.warning(
                    "idemfn: could not remove expired records from %r: %s",
                    self,
                    exc,
                    extra=no_key(CLEANUP_FAILED),
                )

    def get(self, key: str) -> Entry | None:
        return self._get(key, False)

    def _get(self, key: str, inline: bool) -> Entry | None:
        with _nowait_gate if inline else _gate:
            try:
                row = (self._sql_nowait if inline else self._sql)(_GET, (key,)).fetchone()
            except _BACKEND_ERRORS as exc:
                raise self.error("read", key, exc) from exc
        if row is None:
            return None
        entry = self.decode(key, row[0])
        return None if entry.is_expired(self.time()) else entry

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        return self._swap(key, token, entry, False)

    def _swap(self, key: str, token: str, entry: Entry, inline: bool) -> bool:
        now = time.time()
        tag = entry.token if entry.status == "processing" else None
        params = (now, *self._expiry(entry, now), tag, self.encode(entry), key, token)
        with _nowait_gate if inline else _gate:
            try:
                sql = self._sql_nowait if inline else self._sql
                if sql(_SWAP, params).rowcount == 1:
                    return True
                row = sql(_FENCE, (key,)).fetchone()  # refused: by the claim's own fence?
            except _BACKEND_ERRORS as exc:
                raise self.error("update", key, exc) from exc
        if row is not None:
            self.check_fence(key, token, row[0], row[1])
        return False

    def release(self, key: str, token: str) -> bool:
        return self._release(key, token, False)

    def _release(self, key: str, token: str, inline: bool) -> bool:
        with _nowait_gate if inline else _gate:
            try:
                sql = self._sql_nowait if inline else self._sql
                return bool(sql(_RELEASE, (key, token)).rowcount == 1)
            except _BACKEND_ERRORS as exc:
                raise self.error("release", key, exc) from exc

    def delete(self, key: str, token: str | None = None) -> bool:
        return self._delete(key, token, False)

    def _delete(self, key: str, token: str | None, inline: bool) -> bool:
        with _nowait_gate if inline else _gate:
            try:
                # Before the transaction: a new thread's connection is checked first.
                sql = self._sql_nowait if inline else self._sql
                with _immediate(sql) if inline else self.cache.transact(retry=True):
                    row = sql(_GET, (key,)).fetchone()
                    if row is None:
                        return False
                    try:
                        entry: Entry | None = self.decode(key, row[0])
                    except StoreError:
                        entry = None  # a corrupt record can still be forgotten
                    if token is not None and (entry is None or entry.token != token):
                        return False
                    sql(_DELETE, (key,))
                    # An expired record counts as absent: removing it is tidying, not forgetting.
                    return token is not None or entry is None or not entry.is_expired(self.time())
            except _BACKEND_ERRORS as exc:
                raise self.error("delete", key, exc) from exc

    # The async primitives (issue 16): the sync ones' code, inline (see _RETRY_DELAYS).

    async def aclaim(self, entry: Entry) -> Entry | None:
        """``claim``, awaitable: inline, never waiting for SQLite's lock on the event loop."""
        return await self._retrying(self._claim, entry, writes=True)

    async def aget(self, key: str) -> Entry | None:
        """``get``, awaitable: inline, never waiting for SQLite's lock on the event loop."""
        if self._cache is not None:  # the replay path: one try, without the retry loop's setup
            try:
                return self._get(key, True)
            except StoreError as exc:
                if not _busy(exc.__cause__):
                    raise
            except _Forking:
                pass
        return await self._retrying(self._get, key, writes=False)

    async def aswap(self, key: str, token: str, entry: Entry) -> bool:
        """``swap``, awaitable: inline, never waiting for SQLite's lock on the event loop."""
        return await self._retrying(self._swap, key, token, entry, writes=True)

    async def arelease(self, key: str, token: str) -> bool:
        """``release``, awaitable: inline, never waiting for SQLite's lock on the event loop."""
        return await self._retrying(self._release, key, token, writes=True)

    async def adelete(self, key: str, token: str | None = None) -> bool:
        """``delete``, awaitable: inline, never waiting for SQLite's lock on the event loop."""
        return await self._retrying(self._delete, key, token, writes=True)

    async def _retrying(self, core: Callable[..., T], *args: Any, writes: bool) -> T:
        """``core(*args, True)``: a sync primitive's code on this thread's connection that
        never waits for a lock. While the lock is held elsewhere it is tried again after a
        sleep, up to ``timeout``, then fails as the sync primitive does (the same
        ``StoreError``)."""
        import asyncio

        if self._cache is None:
            # The first open walks the directory and may make the database, waiting for another
            # process making it too: in a worker thread.
            await offload(lambda: self.cache)
        deadline = None
        for attempt in itertools.count():
            checkpoint = self._checkpoint
            if writes and checkpoint is not None:
                # Writes wait for the checkpoint, as a sync writer waits for its own: one that
                # ran beside writes would never catch up with them, and the log would grow.
                if checkpoint.get_loop() is asyncio.get_running_loop():
                    await asyncio.wait((checkpoint,))
                else:
                    await asyncio.sleep(0.001)
                continue
            try:
                result = core(*args, True)
            except StoreError as exc:
                if not _busy(exc.__cause__):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.timeout
                elif now >= deadline:
                    raise
                delay = min(_RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS) - 1)], deadline - now)
            except _Forking:
                delay = 0.001  # until the fork is done (it waits for the other threads)
            else:
                if writes and next(self._writes) % _CHECKPOINT_EVERY == 0:
                    self._checkpoint_soon()
                return result
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # itertools.count() never ends

    def _checkpoint_soon(self) -> None:
        """Have a thread copy the write-ahead log into the database, as SQLite's auto-checkpoint
        would have after the async primitives' commits (see _CHECKPOINT_EVERY), unless one is
        at it already. A thread of its own, not the loop's executor, which the application's
        work may keep busy: writes wait for it."""
        import asyncio

        if self._checkpoint is not None:
            return
        loop = asyncio.get_running_loop()
        self._checkpoint = done = loop.create_future()

        def checkpoint() -> None:
            try:
                with _gate:
                    self._sql("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # waits for nobody
            except (StoreError, *_BACKEND_ERRORS) as exc:
                logger.debug(
                    "idemfn: could not checkpoint %r: %s",
                    self,
                    exc,
                    extra=no_key(CHECKPOINT_FAILED),
                )
            finally:
                self._checkpoint = None
                with suppress(RuntimeError):  # its loop is closed: nobody waits any more
                    loop.call_soon_threadsafe(_resolve, done)

        try:
            threading.Thread(target=checkpoint, name="idemfn-checkpoint").start()
        except RuntimeError:  # no thread to be had (at exit): a later write checkpoints
            self._checkpoint = None
            _resolve(done)

    def _keys(self, query: str, params: tuple[object, ...], what: str) -> list[str]:
        with _gate:
            try:
                rows = self._sql(query, params)
                return [key for (key,) in rows if isinstance(key, str)]  # ours are all str
            except _BACKEND_ERRORS as exc:
                raise self.error("list", what, exc) from exc

    def _entries(self, keys: list[str], corrupt: Corrupt | None) -> Iterator[Entry]:
        for key in keys:  # one row at a time: payloads may be large
            with _gate:
                try:
                    row = self._sql(_GET, (key,)).fetchone()
                except _BACKEND_ERRORS as exc:
                    raise self.error("read", key, exc) from exc
            if row is not None and (entry := self.decoded(key, row[0], corrupt)) is not None:
                yield entry

    def scan(self, prefix: str = "", *, corrupt: Corrupt | None = None) -> Iterator[Entry]:
        # str keys, raw = 1; ordered by key. The prefix test is done here, not in SQL, so that
        # no character of the prefix is a LIKE/GLOB wildcard.
        keys = self._keys("SELECT key FROM Cache WHERE raw = 1 ORDER BY key", (), prefix or "*")
        yield from self._entries([key for key in keys if key.startswith(prefix)], corrupt)

    def prune(self) -> int:
        """Remove expired records, and claims whose lease ran out more than their ttl ago.

        Expired rows go in one statement, without reading them, when both copies of their
        expiry agree (see ``_PASSED``); claims, and rows whose copies disagree, are judged by
        their record as ``Store.prune`` does.

        Returns:
            How many records were removed.

        Raises:
            StoreError: The database failed.
        """
        with _gate:
            try:
                # Never diskcache's expire(): it removes the file a row's ``filename`` names,
                # a column no signature covers (idemfn never writes side files).
                now = time.time()
                expired = self._sql(_EXPIRE, (now, now)).rowcount
            except _BACKEND_ERRORS as exc:
                raise self.error("prune", str(self.directory), exc) from exc
        # What is left to judge by its record: claims, rows expired by the store's clock only,
        # and rows whose two copies of their expiry disagree (see _PASSED).
        now = self.time()
        candidates = self._keys(_PROCESSING, (), "processing records")
        candidates += self._keys(
            "SELECT key FROM Cache WHERE raw = 1 AND tag IS NULL AND expire_time IS NOT NULL",
            (),
            "finished records",
        )
        removed = 0
        for entry in self._entries(candidates, skip_corrupt):
            if prunable(entry, now) and remove_judged(self, entry):
                removed += 1
        return expired + removed

    def bytes_used(self) -> int | None:
        """The size of the store's database files (the directory holds nothing else of ours).

        Returns:
            The bytes, or None when the files cannot be read.
        """
        try:
            where = Path(self._pinned or self.directory)
            return sum(f.stat().st_size for f in where.glob(f"{DBNAME}*"))
        except OSError:
            return None

    def close(self) -> None:
        with self._lock:
            cache, self._cache = self._cache, None
            self._local = threading.local()
        if cache is not None:
            cache.close()

    def _forget_inherited_connection(self) -> None:
        # A SQLite connection must not be used on both sides of a fork. The child keeps the
        # inherited one referenced, never closing it under the parent, and opens its own.
        if self._cache is not None:
            _inherited.append(self._cache)
        _inherited.append(self._local)  # which holds the async primitives' connection
        self._checkpoint = None  # (its thread is not in the child)
        self._cache = None
        self._lock = threading.Lock()
        self._local = threading.local()


def _is_damage(exc: BaseException) -> bool:
    """Whether ``exc``, from SQLite, says the database file is damaged (SQLITE_CORRUPT,
    SQLITE_NOTADB: a plain DatabaseError), rather than busy, locked or unreachable."""
    if isinstance(exc, UnicodeDecodeError):
        return True
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError)


def _busy(exc: BaseException | None) -> bool:
    """Whether ``exc``, from SQLite, says another connection holds a lock the statement needed
    (SQLITE_BUSY, SQLITE_LOCKED): on a connection that does not wait, the statement wrote
    nothing, and can be tried again."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is None:
        return "locked" in str(exc)  # "database is locked", "database table is locked"
    return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED, and their extended codes


@contextmanager
def _immediate(sql: Callable[..., sqlite3.Cursor]) -> Iterator[None]:
    """A transaction that takes the write lock as it begins, as diskcache's ``transact`` does;
    a BEGIN that finds the lock held raises at once, having begun nothing (``transact(retry=
    True)`` would wait for it, again and again)."""
    sql("BEGIN IMMEDIATE")
    try:
        yield
        sql("COMMIT")
    except BaseException:
        with suppress(sqlite3.Error):  # (none to roll back when COMMIT failed and ended it)
            sql("ROLLBACK")
        raise


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _left_later(todo: list[str]) -> int:
    """How many of the names still to walk (the next one last) lead out of a directory that
    does not exist, through a "..", that ".." included; 0 if none does. Nothing below a
    missing directory exists, so no link can change what a ".." there means."""
    depth = 1
    for count, name in enumerate(reversed(todo), 1):
        if name == "..":
            depth -= 1
            if depth == 0:
                return count
        elif name not in ("", "."):
            depth += 1
    return 0


_open_stores: weakref.WeakSet[DiskStore] = weakref.WeakSet()
_inherited: list[object] = []


def _after_fork_in_child() -> None:
    _gate.after_fork_in_child()
    for store in list(_open_stores):
        store._forget_inherited_connection()


os.register_at_fork(
    before=_gate.before_fork,
    after_in_parent=_gate.after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
