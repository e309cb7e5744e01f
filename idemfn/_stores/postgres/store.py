"""``PostgresStore`` itself: its pools, its primitives (each written once, for ``_drive`` and
``_adrive``), its transactions, its renewals and its listening connections.

Over 600 lines on purpose: one class behind one interface, whose parts share the store's
state and the table's layout (see the package's docstring) and are read against each
other; what they share with no state (SQL, connections, wake-ups, the transactional
context) lives in the package's other modules.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import reprlib
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from ... import _lease
from ..._errors import StoreError
from ..._logs import WATCH_FAILED, no_key
from ..._record import Entry
from ..._signing import SigningKey
from ..._steps import arun, run
from ..._wakeups import AsyncWatch, Watch
from ..awaiting import within
from ..base import Corrupt, Store, prunable, removable_at, remove_judged, skip_corrupt
from ..clock import ServerClock
from . import pooling
from .connections import (
    _MAX_CONNECTIONS,
    _RENEWAL_SILENCE,
    BUSY_POOL_WAIT,
    DEFAULT_CONNECT_TIMEOUT,
    _Attempts,
    _cause,
    _connection_lost,
    _describe,
    _dropped,
    _finish,
    _LoopPool,
    _NoConnection,
    _not_ours,
    _recording,
    _Renewer,
    _Side,
    _timeout,
)
from .listen import (
    _IDLE_LISTENERS,
    _LOCK_TIMEOUT,
    _MARK,
    _RELISTEN,
    _UNMARK,
    PostgresAsyncWatch,
    PostgresWatch,
    _Listener,
    _NoListen,
)
from .statements import (
    _NOW,
    _TABLE_NAME,
    T,
    _channel,
    _leases_table,
    _Query,
    _renewed,
    _result,
    _rows,
    _statements,
    _Steps,
    _too_long_for_the_index,
)
from .transaction import _did_not_commit, _still_in, _Transaction, _transaction

if TYPE_CHECKING:
    import asyncio

    import psycopg
    import psycopg_pool


logger = logging.getLogger("idemfn")

#: Connections of the store's own pool kept out of it between statements, at most: a check-out
#: and return of psycopg_pool costs ~8 µs a statement (its locks, logging and statistics), a
#: spare connection a list's pop and append. Each goes back to the pool once it has been out
#: of it ``_SPARE_FOR`` seconds, so that the pool's upkeep (``max_lifetime``, closing the
#: connections of a pool gone idle) still reaches it.
_SPARES = 4
_SPARE_FOR = 10.0
#: Rows a DELETE of prune removes at most, each batch its own transaction: the row locks a
#: claim of an expired key may wait for, and the WAL of one transaction, stay this small.
_PRUNE_BATCH = 1000
#: A spare connection keeps its cursor (a new cursor, its adapters and their lookups cost ~6 µs
#: a statement), unless the cursor's last statement sent or read a value longer than this: a
#: cursor holds its last statement's parameters and result until its next.
_KEPT_BYTES = 1 << 16


def _cursor(pool: Any, conn: Any) -> Any:
    """A binary cursor of ``conn`` (bytea as bytes, not hex text), taken out of ``pool``, which
    takes ``conn`` back if it has none to give (a broken connection)."""
    try:
        return conn.cursor(binary=True)
    except BaseException:
        pool.putconn(conn)
        raise


def _light(params: Any, rows: Any) -> bool:
    """Whether a spare connection's cursor may keep the statement it last ran (``params``, and
    ``rows``: its rows or row count), which it holds until the next: at most one row came
    back, and no value longer than ``_KEPT_BYTES`` went either way."""
    if type(rows) is list and rows and (len(rows) > 1 or not _short(rows[0])):
        return False
    return _short(params.values() if type(params) is dict else params)


def _short(values: Any) -> bool:
    return all(type(v) not in (bytes, str) or len(v) <= _KEPT_BYTES for v in values)


class PostgresStore(Store):
    """Records in a PostgreSQL table (extra ``idemfn[postgres]``), created if missing.

    Every transition is one statement (an ``INSERT … ON CONFLICT`` claim, then writes fenced
    on the claim's token); the store's clock is the server's. The table, and a
    ``<table>_leases`` table beside it for lease renewals, are created on first use. With
    ``transactional=True``, a body's writes commit with its ``ok`` record
    (``current_connection()``, or ``current_async_connection()`` in an ``async def`` body).

    Async callers never block their event loop: the awaitable primitives run on connections
    of each event loop's own, at most 16 a loop (a script that calls ``asyncio.run`` twice
    gets two sets, each closed as its loop shuts down). A caller waiting for a busy key is
    woken through ``LISTEN``/``NOTIFY`` as soon as its owner settles it, on any machine; a
    settle that nobody waits for sends no ``NOTIFY``.

    Behind a pooler in transaction mode (PgBouncer's ``pool_mode = transaction``, pgcat,
    Supavisor, RDS Proxy) pass ``transaction_pooling=True``: the store then keeps no session
    state on its connections (no prepared statements, no ``LISTEN``, no session advisory
    locks), and a caller waiting for a busy key looks at it again now and then instead of
    being woken (see ``docs/stores/postgres.md``, "Behind PgBouncer").

    Args:
        dsn_or_pool: A connection string or URL (``postgresql://…``; one that names a
            primary and its standby, ``postgresql://app@db1,db2/app?target_session_attrs=
            read-write``, reaches whichever is the primary, also after a failover); or a
            ``psycopg_pool.ConnectionPool`` the caller already has (the store never closes
            it; async callers get pools of their own made with its ``conninfo`` and
            ``kwargs``); or a ``psycopg_pool.AsyncConnectionPool``, which serves async calls
            on the one event loop it is opened on (the store never closes it; sync calls,
            lease renewals and waiters get connections of their own made with its
            ``conninfo`` and ``kwargs``).
        table: The table's name: a plain SQL name (letters, digits, ``_``). Default
            ``"idemfn_records"``.
        signing_key: Keys to sign and verify records with (as ``idempotent``'s
            ``signing_key``): one that fails its check is never loaded. Default None:
            ``IDEMFN_SIGNING_KEY`` when set.
        connect_timeout: Seconds a call waits for a connection from a server that gives
            none (down, refusing, or not answering) before it raises ``StoreError`` saying
            so. Default None: the connection string's ``connect_timeout`` parameter, else
            the given pool's ``timeout``, else 5. (When the server answers but every pooled
            connection is in use, a call waits up to 30 s for a free one.)
        transaction_pooling: True when the store reaches PostgreSQL through a pooler in
            transaction mode (PgBouncer's ``pool_mode = transaction``, pgcat, Supavisor, RDS
            Proxy), which lends each transaction a server connection the next may not get:
            every connection the store makes then runs with ``prepare_threshold=None``
            (psycopg prepares nothing), no session advisory lock and no ``LISTEN`` is taken,
            and a caller waiting for a busy key looks at it again now and then instead of
            being woken. A given pool must be made with ``kwargs={..., "prepare_threshold":
            None}``. ``transaction_pooling=true`` in the connection string turns it on too
            (``postgresql://…?transaction_pooling=true``, as ``IDEMFN_STORE`` and the CLI
            take it). Default False; a pooler in session mode needs nothing.

    Attributes:
        table: The table's name.
        server: Where the server is, without a password.
        connect_timeout: The connection timeout in effect, in seconds.
        transaction_pooling: Whether the store keeps no session state (see above).

    Raises:
        ImportError: psycopg 3 or psycopg_pool is not installed
            (``pip install 'idemfn[postgres]'``).
        TypeError: ``dsn_or_pool`` is neither a str nor a ``psycopg_pool.ConnectionPool`` or
            ``AsyncConnectionPool``, or an ``AsyncConnectionPool`` whose ``conninfo`` or
            ``kwargs`` is an async function (sync connections could not call it).
        ValueError: A bad connection string, table name or ``connect_timeout``, or with
            ``transaction_pooling`` a given pool whose connections prepare statements.
    """

    def __init__(
        self,
        dsn_or_pool: str | psycopg_pool.ConnectionPool | psycopg_pool.AsyncConnectionPool,
        *,
        table: str = "idemfn_records",
        signing_key: SigningKey | None = None,
        connect_timeout: float | None = None,
        transaction_pooling: bool = False,
    ) -> None:
        try:
            import psycopg
            import psycopg_pool
        except ImportError:
            raise ImportError(
                "PostgresStore needs psycopg 3 and psycopg_pool: pip install 'idemfn[postgres]'"
            ) from None
        if not _TABLE_NAME.fullmatch(str(table)):
            raise ValueError(
                f"PostgresStore(table=...) must be a plain SQL name (letters, digits, _), not"
                f" {table!r}"
            )
        self.table = table
        self.sign_with(signing_key)
        self._given_pool: psycopg_pool.ConnectionPool | None = None
        self._given_apool: psycopg_pool.AsyncConnectionPool | None = None
        given: psycopg_pool.ConnectionPool | psycopg_pool.AsyncConnectionPool | None = None
        if isinstance(dsn_or_pool, str):
            dsn_or_pool, in_dsn = pooling.split(dsn_or_pool)
            transaction_pooling = bool(transaction_pooling) or in_dsn
            try:
                info = psycopg.conninfo.conninfo_to_dict(dsn_or_pool)
            except psycopg.ProgrammingError as exc:
                raise ValueError(f"PostgresStore: bad connection string: {exc}") from None
            self._dsn: str | None = dsn_or_pool
            # How the store connects where it makes connections of its own (a str or a sync
            # function; a dict of arguments, or a function returning one).
            self._conninfo: Any = dsn_or_pool
            self._kwargs: Any = {}
        elif isinstance(
            dsn_or_pool, psycopg_pool.ConnectionPool | psycopg_pool.AsyncConnectionPool
        ):
            given, self._dsn = dsn_or_pool, None
            if isinstance(given, psycopg_pool.ConnectionPool):
                self._given_pool = given
            elif any(inspect.iscoroutinefunction(v) for v in (given.conninfo, given.kwargs)):
                raise TypeError(
                    "PostgresStore() cannot use an AsyncConnectionPool whose conninfo or kwargs"
                    " is an async function: sync calls, lease renewals and waiters connect"
                    " with them too. Give the pool a conninfo string (or a sync function)"
                )
            else:
                self._given_apool = given
            if transaction_pooling:
                pooling.check_pool_kwargs(given.kwargs, type(given).__name__)
            conninfo = given.conninfo
            info = psycopg.conninfo.conninfo_to_dict(conninfo if isinstance(conninfo, str) else "")
            self._conninfo, self._kwargs = conninfo or "", given.kwargs or {}
        else:
            raise TypeError(
                "PostgresStore() takes a connection string, a psycopg_pool.ConnectionPool or an"
                f" AsyncConnectionPool, not {type(dsn_or_pool).__name__}"
            )
        self.server = _describe(info)  # never a password
        self.transaction_pooling = bool(transaction_pooling)
        if connect_timeout is not None:
            self.connect_timeout = _timeout(connect_timeout, "PostgresStore(connect_timeout=...)")
        elif info.get("connect_timeout") is not None:
            self.connect_timeout = _timeout(
                info["connect_timeout"],
                "the connect_timeout parameter of the connection string",
                text=True,
            )
        elif given is not None:
            self.connect_timeout = given.timeout
        else:
            self.connect_timeout = DEFAULT_CONNECT_TIMEOUT
        self._pool_timeout = psycopg_pool.PoolTimeout
        self._errors: tuple[type[BaseException], ...] = (
            psycopg.Error,
            psycopg_pool.PoolTimeout,
            _NoConnection,
        )
        self._psycopg_error = psycopg.Error
        self._idle_status = psycopg.pq.TransactionStatus.IDLE
        self._lock = threading.Lock()
        self._renewer = _Renewer()
        # key -> token of the claims this process renewed: the lease row a transactional
        # body's commit leaves behind is removed after it.
        self._leased: dict[str, str] = {}
        self._pool: psycopg_pool.ConnectionPool | None = None
        # Connections of self._pool's taken out of it (_checkout): (connection, its cursor or
        # None, pool, since).
        self._spares: list[tuple[psycopg.Connection[Any], Any, Any, float]] = []
        self._ready = False  # the pool is this process's, and the table exists
        self._attempts: _Attempts | None = None  # of the pool this store made
        self._pid = os.getpid()
        self._made_by: int | None = None  # the process that made sure the tables exist
        self._clock = ServerClock(self._read_clock)
        self._leases = _leases_table(table)
        self._sql = _statements(table, self._leases)
        # Async callers: each event loop's connections (see _Side), and the loop a given
        # AsyncConnectionPool serves (the first it was used on).
        self._sides: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Side] = (
            weakref.WeakKeyDictionary()
        )
        self._apool_loop: weakref.ReferenceType[asyncio.AbstractEventLoop] | None = None
        # Wake-ups: the table's channel; the sync watches' idle connections, of _listen_pid.
        self._channel = _channel(table)
        self._idle: list[psycopg.Connection[Any]] = []
        self._listen_pid = os.getpid()
        self._quiet_until = 0.0  # LISTEN failed: sync watches poll until then (monotonic)
        self._told_polling = False

    def __repr__(self) -> str:
        pooled = ", transaction_pooling=True" if self.transaction_pooling else ""
        return f"PostgresStore({self.server!r}, table={self.table!r}{pooled})"

    # Connections: a pool opened on first use, and again in a forked child (a connection must
    # not be used on both sides of a fork).
    def _usable_pool(self) -> psycopg_pool.ConnectionPool:
        pool = self._pool
        if pool is None or not self._ready or self._pid != os.getpid():
            pool = self._open()
        return pool

    def _checkout(self, pool: psycopg_pool.ConnectionPool) -> tuple[Any, Any, float]:
        """A connection of ``pool``, a binary cursor of it, and when it was taken out of
        ``pool``: a spare one (see ``_SPARES``), else one from the pool (``_getconn``). Give it
        back with ``_checkin``, or after an error ``pool.putconn``, which closes a broken one."""
        spares = self._spares
        while spares:
            try:
                conn, cur, owner, since = spares.pop()
            except IndexError:  # another thread took the last one
                break
            if owner is pool and not _dropped(conn):
                return conn, _cursor(pool, conn) if cur is None else cur, since
            if owner is pool:
                self._lost(conn)  # dropped by its server (see _dropped)
            owner.putconn(conn)  # of a pool closed since: it closes it
        conn = self._getconn(pool)
        while _dropped(conn):  # each one the server dropped, as the spares
            self._lost(conn)
            pool.putconn(conn)
            conn = self._getconn(pool)
        return conn, _cursor(pool, conn), time.monotonic()

    def _checkin(
        self, pool: psycopg_pool.ConnectionPool, conn: Any, cur: Any, since: float
    ) -> None:
        """Give back ``conn`` and its cursor ``cur`` (None: not kept), taken out of ``pool`` at
        ``since``: kept as a spare when it is the store's own pool's, idle, not out of it too
        long, and nobody waits in the pool for a connection (a waiter is woken only by one
        the pool gets back); else returned to ``pool``."""
        if (
            pool is self._pool
            and pool is not self._given_pool
            and len(self._spares) < _SPARES
            and time.monotonic() - since < _SPARE_FOR
            and conn.pgconn.transaction_status == self._idle_status
            and not getattr(pool, "_waiting", True)  # (psycopg_pool's queue of waiters)
        ):
            spare = (conn, cur, pool, since)
            self._spares.append(spare)
            if pool is self._pool:
                return
            # The store closed meanwhile and took the spares it had: this one is not among them.
            try:
                self._spares.remove(spare)
            except ValueError:  # taken since, by a caller that gives it back to its pool
                return
        pool.putconn(conn)

    def _getconn(self, pool: psycopg_pool.ConnectionPool) -> Any:
        """A connection within ``connect_timeout``, or ``_NoConnection`` saying why not. A pool
        that answers but has every connection in use gets longer: that is load, not an outage."""
        try:
            return pool.getconn(timeout=self.connect_timeout)
        except self._pool_timeout:
            rest = self._longer(pool, self._attempts)
        try:
            return pool.getconn(timeout=rest)
        except self._pool_timeout:
            raise self._none_free(pool, rest, "ConnectionPool") from None

    async def _agetconn(self, pool: Any) -> Any:
        """``_getconn`` for this loop's pool (a ``_LoopPool``, or a given async pool)."""
        if isinstance(pool, _LoopPool):
            return await pool.getconn()  # (which skips the connections dropped: _dropped)
        try:
            conn = await pool.getconn(timeout=self.connect_timeout)
            while _dropped(conn):  # (see _checkout)
                self._lost(conn)
                await pool.putconn(conn)
                conn = await pool.getconn(timeout=self.connect_timeout)
            return conn
        except self._pool_timeout:
            rest = self._longer(pool, None)
        try:
            return await pool.getconn(timeout=rest)
        except self._pool_timeout:
            raise self._none_free(pool, rest, "AsyncConnectionPool") from None

    def _lost(self, conn: Any) -> None:
        """Close ``conn``, which its server dropped (its pool then discards it), and read the
        server's clock again: the next connection may reach another server (see _failed)."""
        _finish(conn)
        self._clock.forget()

    def _longer(self, pool: Any, attempts: _Attempts | None) -> float:
        """After no connection came within ``connect_timeout``: how much longer to wait, when
        the server answers but every connection is in use; else ``_NoConnection``."""
        answering = attempts is None or (attempts.connected and attempts.error is None)
        busy = answering and pool.get_stats().get("pool_size", 0) >= pool.max_size
        rest = float(pool.timeout - self.connect_timeout)  # ours: BUSY_POOL_WAIT
        if not busy or rest <= 0:
            why = (
                "the server did not answer"
                if attempts is None or attempts.error is None
                else _cause(attempts.error)
            )
            raise _NoConnection(
                f"could not connect within {self.connect_timeout:g} s (connect_timeout="
                f"{self.connect_timeout:g}): {why}"
            ) from None
        return rest

    def _none_free(self, pool: Any, rest: float, kind: str) -> _NoConnection:
        return _NoConnection(
            f"found no free connection within {self.connect_timeout + rest:g} s: all"
            f" {pool.max_size} connections of the pool were in use (give PostgresStore a"
            f" psycopg_pool.{kind} with a larger max_size)"
        )

    def _own_pool_kwargs(self) -> Any:
        """The connection arguments of a pool the store makes: the given ones, in autocommit,
        with libpq's own connect_timeout (whole seconds, at least 2), which frees the pool's
        worker from an attempt the caller stopped waiting for."""
        ours: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(2, math.ceil(self.connect_timeout)),
        }
        if self.transaction_pooling:  # (a prepared statement would not outlive its transaction)
            ours["prepare_threshold"] = None
        given = self._kwargs
        if callable(given):
            return lambda: {**(given() or {}), **ours}
        return {**given, **ours}

    def _setup(self) -> list[tuple[str, Any]]:
        """The statements that make the tables if missing, in one transaction. CREATE … IF NOT
        EXISTS races with itself in PostgreSQL (a unique violation in its catalog): callers
        opening a new table at once take turns on an advisory lock."""
        lock = ("SELECT pg_advisory_xact_lock(%s)", (zlib.crc32(self.table.encode()),))
        return [lock, *((self._sql[name], None) for name in ("create", "index", "create_leases"))]

    def _open(self) -> psycopg_pool.ConnectionPool:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                # Kept even when the table cannot be made yet: a pool per failed call would
                # leave a thread pool behind each, retrying.
                if self._pid != os.getpid():  # a forked child: its parent's are not its own
                    _not_ours.extend(conn for conn, _, _, _ in self._spares)
                    self._spares = []
                self._pid, self._ready = os.getpid(), False
                if self._given_pool is not None:
                    self._pool = self._given_pool
                else:
                    import psycopg_pool

                    self._attempts = _Attempts()
                    self._pool = psycopg_pool.ConnectionPool(
                        self._conninfo,
                        min_size=1,
                        max_size=_MAX_CONNECTIONS,
                        open=False,
                        connection_class=_recording(self._attempts),
                        timeout=BUSY_POOL_WAIT,
                        kwargs=self._own_pool_kwargs(),
                        name=f"idemfn {self.server}",
                    )
                    self._pool.open(wait=False)
            pool = self._pool
        if self._made_by != os.getpid():  # (an event loop's first call may have made them)
            # Outside the lock, so that each thread waits connect_timeout at most, not in turn.
            conn = self._getconn(pool)
            try:
                with conn, conn.transaction():
                    for statement, params in self._setup():
                        conn.execute(statement, params)
            finally:
                pool.putconn(conn)
            self._made_by = os.getpid()
        self._ready = True
        return pool

    # Async connections: a pool per event loop (see _Side).
    def _side(self) -> _Side:
        """This event loop's side of the store, made on its first call (not yet opened)."""
        import asyncio

        loop = asyncio.get_running_loop()
        side = self._sides.get(loop)
        if side is not None and side.pid == os.getpid():
            return side
        with self._lock:
            side = self._sides.get(loop)
            if side is None or side.pid != os.getpid():
                self._forget_closed_loops()
                if side is not None:  # a parent's, inherited through a fork
                    side.dispose()
                side = self._sides[loop] = _Side(loop)
                made = True
            else:
                made = False
        if made:
            side.close_with_loop(self)
        return side

    def _forget_closed_loops(self) -> None:
        """Dispose of the sides of loops closed without shutting down their async generators
        (``loop.close()`` without ``shutdown_asyncgens``): nothing else ever would."""
        for loop, side in list(self._sides.items()):
            if loop.is_closed():
                del self._sides[loop]
                side.dispose()

    def _drop_side(self, side: _Side) -> None:
        """``side``'s loop is shutting down: forget it and close its connections."""
        with self._lock:
            if self._sides.get(side.loop) is side:
                del self._sides[side.loop]
        side.dispose()

    async def _apool(self) -> Any:
        """This loop's pool, with the tables made (``_usable_pool`` for async callers)."""
        side = self._side()
        if not side.ready:
            await self._aopen(side)
        return side.pool

    async def _aopen(self, side: _Side) -> None:
        import asyncio

        async with side.start_lock:
            if side.pool is None:
                if self._given_apool is not None:
                    loop = asyncio.get_running_loop()
                    if self._apool_loop is None:
                        self._apool_loop = weakref.ref(loop)
                    elif self._apool_loop() is not loop:
                        raise _NoConnection(
                            "the AsyncConnectionPool it was given serves the event loop it was"
                            " first used on, and this call runs on another (was asyncio.run"
                            " called again?): give PostgresStore a connection string or a"
                            " ConnectionPool to use it from several event loops"
                        )
                    side.pool = self._given_apool
                else:
                    side.pool = _LoopPool(
                        self._aconnect, _MAX_CONNECTIONS, BUSY_POOL_WAIT, self._clock.forget
                    )
            if side.ready:
                return
            if self._made_by != os.getpid():  # (the sync pool, or another loop, made them)
                conn = await self._agetconn(side.pool)
                try:
                    async with conn.transaction():
                        for statement, params in self._setup():
                            await conn.execute(statement, params)
                finally:
                    await side.pool.putconn(conn)
                self._made_by = os.getpid()
            side.ready = True

    async def _aconnect(self) -> psycopg.AsyncConnection[Any]:
        """A new connection for this loop's pool, within ``connect_timeout``, or
        ``_NoConnection`` saying why not."""
        import asyncio

        import psycopg

        conninfo = (self._conninfo() if callable(self._conninfo) else self._conninfo) or ""
        kwargs = self._own_pool_kwargs()
        kwargs = dict(kwargs() if callable(kwargs) else kwargs)
        give_up = time.monotonic() + self.connect_timeout
        pause = 0.05
        while True:  # tried again until connect_timeout, as the sync pool does: a restart
            try:
                return await within(
                    psycopg.AsyncConnection.connect(conninfo, **kwargs),
                    max(give_up - time.monotonic(), 0.001),
                    dispose=_finish,  # connected as the caller was cancelled: not its own
                )
            except asyncio.TimeoutError:
                why = "the server did not answer"
                break
            except psycopg.Error as exc:
                why = _cause(exc)
                if time.monotonic() + pause >= give_up:
                    break
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
        raise _NoConnection(
            f"could not connect within {self.connect_timeout:g} s (connect_timeout="
            f"{self.connect_timeout:g}): {why}"
        )

    def _run(self, action: str, key: str | None, query: str, params: Any, conn: Any = None) -> Any:
        """Run one statement (on ``conn``, else a pooled connection in autocommit): its rows,
        or its row count when it returns none. Errors name ``key`` (None: a statement of no
        key's)."""
        try:
            if conn is not None:
                return _rows(conn.execute(query, params, binary=True))  # bytea as bytes
            pool = self._usable_pool()
            c, cur, since = self._checkout(pool)
            try:
                if pool is not self._given_pool:  # ours, in autocommit: nothing to commit
                    rows = _rows(cur.execute(query, params))
                else:
                    with c:  # commit, or roll back on an error, as pool.connection() does
                        rows = _rows(cur.execute(query, params))
            except BaseException:
                pool.putconn(c)
                raise
            self._checkin(pool, c, cur if _light(params, rows) else None, since)
            return rows
        except self._errors as exc:
            raise self._failed(action, key, exc) from exc

    async def _arun(
        self, action: str, key: str | None, query: str, params: Any, conn: Any = None
    ) -> Any:
        """``_run`` on this event loop's pool (or ``conn``, an async connection)."""
        try:
            if conn is not None:
                return await _result(await conn.execute(query, params, binary=True))
            pool = await self._apool()
            c = await self._agetconn(pool)
            try:
                if isinstance(pool, _LoopPool):  # in autocommit, each connection its cursor
                    cur = pool.cursors.pop(c, None)
                    if cur is None:
                        cur = c.cursor(binary=True)  # binary: bytea as bytes, not hex text
                    rows = await _result(await cur.execute(query, params))
                    if _light(params, rows):
                        pool.cursors[c] = cur
                    return rows
                async with c:  # commit, or roll back on an error, as pool.connection() does
                    return await _result(await c.execute(query, params, binary=True))
            finally:
                await pool.putconn(c)
        except self._errors as exc:
            raise self._failed(action, key, exc) from exc

    def _failed(self, action: str, key: str | None, exc: BaseException) -> StoreError:
        # The server may be gone, and the next connection reach another (a failover to a
        # standby: another machine, another clock): the store's clock is read again from
        # whichever server answers next (issue 19), as after a connection found dropped (_lost).
        self._clock.forget()
        if key is None:
            return StoreError(f"{self!r} could not {action}: {_cause(exc)}")
        return self.error(action, key, _cause(exc))

    def _drive(self, steps: _Steps[T]) -> T:
        """Run the primitive ``steps`` for a sync caller: each ``_Query`` on a pooled
        connection (or its own), each ``_NOW`` with ``time()``."""
        return run(steps, PostgresStore._step, self)

    async def _adrive(self, steps: _Steps[T]) -> T:
        """``_drive`` for an async caller: on this event loop's pool, with ``atime()``."""
        return await arun(steps, PostgresStore._astep, self)

    def _step(self, step: _Query | object) -> Any:
        return self.time() if step is _NOW else self._run(*step)  # type: ignore[misc]

    async def _astep(self, step: _Query | object) -> Any:
        return await (self.atime() if step is _NOW else self._arun(*step))  # type: ignore[misc]

    @contextlib.contextmanager
    def transaction(self, key: str) -> Iterator[psycopg.Connection[Any]]:
        """A transaction for the body of ``key``'s claim, as ``transactional=True`` runs it.

        ``current_connection()`` returns its connection inside, and the claim's ``ok``
        record is written in it, so that both commit, or roll back, together. (A halted
        record is written outside it: it must stay when the body's writes go.)

        Args:
            key: The stored key whose body runs in it.

        Yields:
            The transaction's connection.

        Raises:
            StoreError: No connection, or BEGIN failed. Only idemfn's own steps become
                ``StoreError``: what the body raises, its own database errors included, and
                an error at COMMIT (a deferred constraint, a serialization failure: the
                body's writes did not commit) are raised as themselves, for the caller and
                ``retry_on`` (issue 14).
        """
        try:
            pool = self._usable_pool()
            # (A spare first: a spare that no transaction could take would let them wait for
            # the pool while it sits idle.)
            conn, _, _ = self._checkout(pool)
        except self._errors as exc:
            raise self.error("start the transaction of", key, _cause(exc)) from exc
        state = _Transaction(self, key, conn)
        try:
            try:
                block = conn.transaction()
                block.__enter__()  # BEGIN
            except self._errors as exc:
                raise self.error("start the transaction of", key, _cause(exc)) from exc
            reset = _transaction.set(state)
            try:
                yield conn
            except BaseException as exc:
                # Rolls back; psycopg logs a failed ROLLBACK instead of hiding the body's error.
                block.__exit__(type(exc), exc, exc.__traceback__)
                raise
            finally:
                _transaction.reset(reset)
            try:
                block.__exit__(None, None, None)  # COMMIT
            except self._psycopg_error as exc:
                _did_not_commit(exc, key)
                raise
        finally:
            pool.putconn(conn)
        if self._lease_row_left(state):
            with contextlib.suppress(StoreError):
                self._run("tidy", key, self._sql["tidy"], (key, state.fence))

    @contextlib.asynccontextmanager
    async def atransaction(self, key: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """``transaction`` for an ``async def`` body: ``async with store.atransaction(key):``.

        ``current_async_connection()`` returns its connection inside, and the claim's ``ok``
        record, written with ``aswap`` inside it, commits with the body's writes, or rolls
        back with them. The connection is one of this event loop's pool.

        Args:
            key: The stored key whose body runs in it.

        Yields:
            The transaction's ``psycopg.AsyncConnection``.

        Raises:
            StoreError: No connection, or BEGIN failed. What the body raises, and an error at
                COMMIT, are raised as themselves (as ``transaction``'s).
        """
        try:
            pool = await self._apool()
            conn = await self._agetconn(pool)
        except self._errors as exc:
            raise self.error("start the transaction of", key, _cause(exc)) from exc
        state = _Transaction(self, key, conn, is_async=True)
        try:
            try:
                block = conn.transaction()
                await block.__aenter__()  # BEGIN
            except self._errors as exc:
                raise self.error("start the transaction of", key, _cause(exc)) from exc
            reset = _transaction.set(state)
            try:
                yield conn
            except BaseException as exc:
                await block.__aexit__(type(exc), exc, exc.__traceback__)  # ROLLBACK
                raise
            finally:
                _transaction.reset(reset)
            try:
                await block.__aexit__(None, None, None)  # COMMIT
            except self._psycopg_error as exc:
                _did_not_commit(exc, key)
                raise
        finally:
            await pool.putconn(conn)
        if self._lease_row_left(state):
            with contextlib.suppress(StoreError):
                await self._arun("tidy", key, self._sql["tidy"], (key, state.fence))

    def _lease_row_left(self, state: _Transaction) -> bool:
        """Whether the committed transaction ``state`` left its claim's lease row behind:
        renewed while it ran, it could not be removed inside it (the heartbeat updates it), so
        it goes now. Left behind, prune removes it."""
        if state.fence is not None and self._leased.get(state.key) == state.fence:
            self._leased.pop(state.key, None)
            return True
        return False

    def _read_clock(self, first: bool) -> float:
        rows = self._run("read the server's clock", None, self._sql["now"], ())
        return float(rows[0][0])

    async def _aread_clock(self, first: bool) -> float:
        rows = await self._arun("read the server's clock", None, self._sql["now"], ())
        return float(rows[0][0])

    def time(self) -> float:
        return self._clock.now()

    async def atime(self) -> float:
        """``time``, awaitable: the server's clock, read on this loop's pool when a reading is
        due (see ``clock.ServerClock``)."""
        return await self._clock.anow(self._aread_clock)

    def _row(self, entry: Entry) -> dict[str, Any]:
        live = entry.token if entry.status == "processing" else None
        return {
            "key": entry.key,
            "live": live,
            "token": entry.token,
            "expires_at": entry.expires_at,
            "drop_at": removable_at(entry),
            "entry": self.encode(entry),
        }

    def _lease_of(self, entry: Entry) -> _Steps[Entry]:
        """``entry``, a claim, with its latest renewal, from its lease row when it has one."""
        rows = yield _Query("read", entry.key, self._sql["lease"], (entry.key, entry.token))
        return _renewed(entry, *rows[0]) if rows else entry

    def claim(self, entry: Entry) -> Entry | None:
        try:
            return self._drive(self._claim(entry))
        except StoreError as exc:
            if _too_long_for_the_index(exc):
                raise self._too_long(entry.key) from None
            raise

    async def aclaim(self, entry: Entry) -> Entry | None:
        try:
            return await self._adrive(self._claim(entry))
        except StoreError as exc:
            if _too_long_for_the_index(exc):
                raise self._too_long(entry.key) from None
            raise

    def _too_long(self, key: str) -> ValueError:
        size = len(key.encode("utf-8", "surrogatepass"))
        return ValueError(
            f"{self!r} cannot hold the key {reprlib.repr(key)} ({size:,} bytes): its index holds"
            " keys of at most ~2,700 bytes once compressed. Use a shorter key, e.g. a key"
            " template over an id, or a hash of the long part"
        )

    def _claim(self, entry: Entry) -> _Steps[Entry | None]:
        row = self._row(entry)
        while True:
            claimed, again = yield from self._resent(
                _Query("claim", entry.key, self._sql["claim"], row)
            )
            if claimed == 1:
                return None
            # Refused: a row holds the key. Read it: one more round trip when the key is taken
            # (rare on the engine's path, which read the key first), none when the claim wins.
            rows = yield _Query("claim", entry.key, self._sql["get"], (entry.key,))
            if rows:
                found = rows[0][0]
                live = self.decode(entry.key, found)
                if again and live.status == "processing" and live.token == entry.token:
                    return None  # the claim sent before the connection was lost landed
                if live.status == "processing":
                    return (yield from self._lease_of(live))
                if not live.is_expired((yield _NOW)):
                    return live
                # Expired by its own clock, yet not replaced: the row's two copies of its expiry
                # disagree (see the package's docstring), or it expired after the statement. Remove
                # it, but only the row looked at: another caller that read it too may have
                # removed it and claimed since, and deleting that claim would let two run.
                yield _Query("claim", entry.key, self._sql["delete_row"], (entry.key, found))
                continue
            # None: the row was removed since (forgotten, pruned, released). Claim again.

    def get(self, key: str) -> Entry | None:
        return self._drive(self._get(key))

    async def aget(self, key: str) -> Entry | None:
        return await self._adrive(self._get(key))

    def _get(self, key: str) -> _Steps[Entry | None]:
        rows = yield _Query("read", key, self._sql["get"], (key,))
        if not rows:
            return None
        entry = self.decode(key, rows[0][0])
        if entry.status == "processing":
            return (yield from self._lease_of(entry))
        return None if entry.is_expired((yield _NOW)) else entry

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        return self._drive(self._swap(key, token, entry))

    async def aswap(self, key: str, token: str, entry: Entry) -> bool:
        return await self._adrive(self._swap(key, token, entry))

    def _swap(self, key: str, token: str, entry: Entry) -> _Steps[bool]:
        row = self._row(entry) | {"fence": token}
        if entry.status == "processing":
            # A takeover (or a rewrite): its lease row goes, since the entry written holds its
            # lease. Not a settle: nobody is woken.
            return (yield from self._fenced(key, token, self._sql["take"], row))
        current = _transaction.get()
        if (
            current is not None
            and current.store is self
            and current.key == key
            and entry.status == "ok"
        ):
            # The ok record commits with the body's writes (and its NOTIFY with them). Its lease
            # row stays untouched: the heartbeat may have renewed it after the transaction's
            # snapshot was taken.
            _still_in(current)
            current.fence = token
            if (yield _Query("update", key, self._sql["swap"], row, current.conn)) == 1:
                return True
            return (yield from self._refused(key, token, current.conn))
        # The lease row of a claim this process renewed goes as it ends; else the write costs
        # what it did before lease rows (a claim another process renewed leaves one for prune).
        tidy = bool(self._leased) and self._leased.pop(key, None) is not None
        return (
            yield from self._fenced(key, token, self._sql["swap_tidy" if tidy else "swap"], row)
        )

    def _fenced(self, key: str, token: str, query: str, row: dict[str, Any]) -> _Steps[bool]:
        """Write ``row`` over ``key``'s claim ``token`` with ``query`` (an UPDATE fenced on
        ``live = token``), outside a transaction: whether it landed. Sent again once when the
        connection was lost under it (``_resent``); refused then, it had landed if the row is
        exactly the one written (its entry holds its token: no other caller writes it)."""
        updated, again = yield from self._resent(_Query("update", key, query, row))
        if updated == 1:
            return True
        # Landed, it may not be on a synchronous standby yet (the wait for it went with the
        # connection): the "landed" statement's commit waits until it is.
        if again and (yield _Query("update", key, self._sql["landed"], row)) == 1:
            return True
        return (yield from self._refused(key, token, None))

    def _resent(self, query: _Query) -> _Steps[tuple[Any, bool]]:
        """``query``'s answer, and whether it was sent twice: once more when the connection it
        went on was lost under it (the server went: a failover to a standby, a restart), on
        the connection that reaches a server now. The first may have landed or not: the
        caller tells which (issue 19). Failed before, an owner's outcome in flight as the
        primary went was not recorded, and its key halted (or, ``on_abandoned="retry"``, ran
        again); a claim was left with no one to run it."""
        try:
            return (yield query), False
        except StoreError as exc:
            if not _connection_lost(exc):
                raise
        return (yield query), True

    def _refused(self, key: str, token: str, conn: Any) -> _Steps[bool]:
        """After ``swap`` on ``token`` updated no row: False (the claim is lost), unless the
        row is still that claim and only its fence (``live``, which no checksum covers)
        disagrees, a StoreError (``check_fence``). A caller that judged the claim abandoned
        could neither halt it nor take it over, and looked again forever (issue 14, review).
        Read only after a refusal: a write that succeeds costs what it did."""
        rows = yield _Query("update", key, self._sql["fence"], (key,), conn)
        if rows:
            self.check_fence(key, token, rows[0][0], rows[0][1])
        return False

    def release(self, key: str, token: str) -> bool:
        return self._drive(self._release(key, token))

    async def arelease(self, key: str, token: str) -> bool:
        return await self._adrive(self._release(key, token))

    def _release(self, key: str, token: str) -> _Steps[bool]:
        tidy = bool(self._leased) and self._leased.pop(key, None) is not None
        query = self._sql["release_tidy" if tidy else "release"]
        return bool((yield _Query("release", key, query, {"key": key, "token": token})) == 1)

    def renew(self, entry: Entry, lease: float) -> Entry | None:
        """Extend the lease of the live claim ``entry`` to ``lease`` seconds from now.

        On this store's renewal connection, in a lease row of its own: never waiting for the
        pool, never writing the record's row (see the package's docstring). The lease runs
        out ``lease`` seconds from now by the server's clock, read in the statement.

        Args:
            entry: The claim as the caller holds it.
            lease: Seconds from now.

        Returns:
            The renewed entry, or None when the claim is no longer live.

        Raises:
            StoreError: The server failed; the next renewal connects again.
        """
        mono = _lease.clock() + lease
        params = {"key": entry.key, "token": entry.token, "lease": lease, "mono": mono}
        self._leased[entry.key] = entry.token
        renewer = self._renewer_here()
        with renewer.lock:
            try:
                conn = renewer.conn
                if conn is None or conn.closed or _dropped(conn):
                    if conn is not None and not conn.closed:
                        self._clock.forget()  # (as _lost)
                    renewer.drop()
                    conn = renewer.conn = self._connect_for_renewals()
                # READ COMMITTED whatever the server's default: a renewal reads the record's
                # row, and must not take part in a SERIALIZABLE body's conflicts.
                with conn.transaction():
                    rows = conn.execute(self._sql["renew"], params).fetchall()
            except self._errors as exc:
                renewer.drop()
                self._clock.forget()  # (as _failed)
                raise self.error("renew the lease of", entry.key, _cause(exc)) from exc
        if not rows:
            return None
        return entry._replace(lease_until=float(rows[0][0]), lease_mono=mono)

    def _renewer_here(self) -> _Renewer:
        """This process's renewer. A forked child makes its own: its parent's connection is
        not its own, and the lock of a renewal its parent had under way when it forked stays
        held in the child, where no thread will release it (its close() waited forever)."""
        renewer = self._renewer
        if renewer.pid != os.getpid():
            renewer = self._renewer = _Renewer()
        return renewer

    def _session_args(self) -> tuple[str, dict[str, Any]]:
        """The connection string and arguments of a connection the store keeps outside its
        pools (renewals, listeners): the given pool's (or the connection string), with libpq's
        limits on a server gone silent, unless they set their own, and connect_timeout."""
        import psycopg

        conninfo = (self._conninfo() if callable(self._conninfo) else self._conninfo) or ""
        kwargs = dict((self._kwargs() if callable(self._kwargs) else self._kwargs) or {})
        given = psycopg.conninfo.conninfo_to_dict(conninfo).keys() | kwargs.keys()
        if psycopg.pq.version() < 120000:  # a libpq before 12 refuses tcp_user_timeout
            given |= {"tcp_user_timeout"}
        kwargs |= {k: v for k, v in _RENEWAL_SILENCE.items() if k not in given}
        kwargs["connect_timeout"] = max(2, math.ceil(self.connect_timeout))  # libpq's: >= 2 s
        if self.transaction_pooling:
            kwargs["prepare_threshold"] = None
        return conninfo, kwargs

    def _connect_for_renewals(self) -> psycopg.Connection[Any]:
        """A new connection, configured as the pool's, in READ COMMITTED transactions."""
        import psycopg

        conninfo, kwargs = self._session_args()
        pool = self._given_pool
        if pool is None:
            conn = psycopg.connect(conninfo, **kwargs)
        else:  # the caller's pool: its connection class and configure callback too
            conn = pool.connection_class.connect(conninfo, **kwargs)
            configure = getattr(pool, "_configure", None)
            if configure is not None:
                configure(conn)
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
        conn.autocommit = False
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        return conn

    def delete(self, key: str, token: str | None = None) -> bool:
        return self._drive(self._delete(key, token))

    async def adelete(self, key: str, token: str | None = None) -> bool:
        return await self._adrive(self._delete(key, token))

    def _delete(self, key: str, token: str | None) -> _Steps[bool]:
        if self._leased:
            self._leased.pop(key, None)
        rows = yield _Query("delete", key, self._sql["delete"], {"key": key, "token": token})
        if not rows:
            return False
        expires_at = rows[0][0]
        # An expired record counts as absent: removing it is tidying, not forgetting.
        return token is not None or expires_at is None or expires_at > (yield _NOW)

    def scan(self, prefix: str = "", *, corrupt: Corrupt | None = None) -> Iterator[Entry]:
        keys = [k for (k,) in self._run("list", prefix or "*", self._sql["keys"], (prefix,))]
        yield from self._entries(keys, corrupt)

    def _entries(self, keys: list[str], corrupt: Corrupt | None) -> Iterator[Entry]:
        for key in keys:  # one row at a time: payloads may be large
            rows = self._run("read", key, self._sql["get"], (key,))
            if rows and (entry := self.decoded(key, rows[0][0], corrupt)) is not None:
                yield self._drive(self._lease_of(entry)) if entry.status == "processing" else entry

    def prune(self) -> int:
        """Remove expired records, and claims whose lease ran out more than their ttl ago.

        Indexed DELETEs of expired records (whose two copies of their expiry agree: see the
        package's docstring), ``_PRUNE_BATCH`` rows at a time, each batch a transaction; then
        each claim whose lease ran out ttl ago by the server's clock, and each finished row
        whose copies disagree, is judged by its record and the engine's rule (``prunable``):
        a claim whose owner is alive on its machine's monotonic clock stays, whatever the
        wall clocks say. Lease rows no claim holds go too.

        Returns:
            How many records were removed.

        Raises:
            StoreError: The server failed.
        """
        # In batches, each its own transaction, until the rows expired at the start are gone:
        # one DELETE of them all held the lock of every row it removed until it committed (a
        # claim of an expired key waited for all of them), and wrote one transaction as large
        # as the table's expired part (the WAL, a standby's replay, vacuum wait for its end).
        ((until,),) = self._run("prune", self.table, self._sql["now"], ())
        removed = 0
        while True:
            batch = {"until": until, "batch": _PRUNE_BATCH}
            ((picked, gone),) = self._run("prune", self.table, self._sql["prune"], batch)
            removed += int(gone)
            # Until a batch finds fewer rows than it may take: a full batch may have removed
            # none (each claimed since it was picked), and rows expired at the start remain.
            # Rows claimed since no longer match, so each batch picks others.
            if int(picked) < _PRUNE_BATCH:
                break
        now = self.time()
        stale = [k for (k,) in self._run("prune", self.table, self._sql["stale"], ())]
        for entry in self._entries(stale, skip_corrupt):
            if prunable(entry, now) and remove_judged(self, entry):
                removed += 1
        # Lease rows no live claim holds (a transactional commit's, a crashed owner's), once
        # run out: a row renewed since this statement's snapshot is never removed.
        self._run("prune", self.table, self._sql["prune_leases"], ())
        return removed

    def bytes_used(self) -> int | None:
        rows = self._run("measure", self.table, self._sql["size"], (self.table, self._leases))
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    # Wake-ups (see the package's docstring).
    def watch(self, key: str) -> Watch:
        """A sync waiter's watch on ``key``, woken by a settle of it on any machine.

        Args:
            key: The stored key.

        Returns:
            A ``PostgresWatch``: marked and listening when this returns (so that the caller's
            next look sees any settle it is not woken for), polling if LISTEN fails. With
            ``transaction_pooling``, the default watch (polled: it holds nothing on a
            session).
        """
        if self.transaction_pooling:
            return super().watch(key)
        return PostgresWatch(self, key)

    def awatch(self, key: str) -> AsyncWatch:
        """An async waiter's watch on ``key``, woken by a settle of it on any machine.

        Args:
            key: The stored key.

        Returns:
            A ``PostgresAsyncWatch``, marked and listening once entered (``async with``). With
            ``transaction_pooling``, the default watch (polled).
        """
        if self.transaction_pooling:
            return super().awatch(key)
        return PostgresAsyncWatch(self, key)

    def _cannot_listen(self, exc: BaseException) -> None:
        """Say once that waiters poll, since LISTEN/NOTIFY failed with ``exc``."""
        if self._told_polling:
            logger.debug(
                "idemfn: %r: LISTEN/NOTIFY failed again: %s",
                self,
                _cause(exc),
                extra=no_key(WATCH_FAILED),
            )
            return
        self._told_polling = True
        logger.warning(
            "idemfn: %r cannot wake waiters through LISTEN/NOTIFY (%s): a caller waiting for a"
            " busy key looks at it again now and then instead, and may wake later than its"
            " owner settles it",
            self,
            _cause(exc),
            extra=no_key(WATCH_FAILED),
        )

    def _listening(self, mark: tuple[int, str]) -> psycopg.Connection[Any] | None:
        """A connection (of the process's idle ones, or a new one) that LISTENs on the
        table's channel and holds ``mark``; None, logged, when that fails."""
        with self._lock:
            if self._listen_pid != os.getpid():  # a forked child: its parent's are not its own
                _not_ours.extend(self._idle)
                self._idle, self._listen_pid, self._quiet_until = [], os.getpid(), 0.0
            if time.monotonic() < self._quiet_until:
                return None
            conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = self._connect_listening()
            else:
                conn.execute(self._sql["listen"])
                with contextlib.closing(conn.notifies(timeout=0)) as stale:
                    for _ in stale:  # (from its previous watch)
                        pass
            conn.execute(_MARK, mark)
        except (self._psycopg_error, _NoListen) as exc:
            if conn is not None:
                _finish(conn)
            self._quiet_until = time.monotonic() + _RELISTEN
            self._cannot_listen(exc)
            return None
        return conn

    def _connect_listening(self) -> psycopg.Connection[Any]:
        import psycopg

        conninfo, kwargs = self._session_args()
        conn = psycopg.connect(conninfo, **kwargs | {"autocommit": True})
        try:
            conn.execute(_LOCK_TIMEOUT)  # (its marks)
            conn.execute(self._sql["listen"])
            probe = f"idemfn probe {uuid.uuid4().hex}"
            conn.execute("SELECT pg_notify(%s, %s)", (self._channel, probe))
            with contextlib.closing(conn.notifies(timeout=self.connect_timeout)) as notes:
                if not any(note.payload == probe for note in notes):
                    raise self._probe_lost()
        except BaseException:
            _finish(conn)
            raise
        return conn

    def _probe_lost(self) -> _NoListen:
        """A listening connection sends itself a NOTIFY, which must come back: LISTEN may be
        accepted where notifications never arrive (a pooler in transaction mode)."""
        return _NoListen(
            f"a NOTIFY on {self._channel!r} did not come back within {self.connect_timeout:g} s"
            " (connect_timeout): notifications do not reach this session (a pooler in"
            " transaction mode?)"
        )

    def _unlisten(self, conn: psycopg.Connection[Any], mark: tuple[int, str]) -> None:
        """Let go of ``mark`` on ``conn``, and keep ``conn`` for the next watch (or close it).
        It stops listening meanwhile: a session that LISTENs and is never read holds back the
        server's notification queue, which every NOTIFY of the cluster goes through."""
        try:
            conn.execute(_UNMARK, mark)
            conn.execute("UNLISTEN *")
        except self._psycopg_error:
            _finish(conn)  # (its marks go with it)
            return
        with self._lock:
            if self._listen_pid == os.getpid() and len(self._idle) < _IDLE_LISTENERS:
                self._idle.append(conn)
                return
        _finish(conn)

    async def _alistener(self) -> _Listener | None:
        """This loop's listener (made on its first watch); None, logged, when LISTEN fails."""
        side = self._side()
        listener = side.listener
        if listener is not None and not listener.broken:
            return listener
        async with side.listen_lock:
            listener = side.listener
            if listener is not None and not listener.broken:
                return listener
            if listener is not None:  # broken: its connections go
                side.listener = None
                listener.close()
            if time.monotonic() < side.quiet_until:
                return None
            try:
                listener = side.listener = await self._new_listener()
            except (self._psycopg_error, _NoListen) as exc:
                side.quiet_until = time.monotonic() + _RELISTEN
                self._cannot_listen(exc)
                return None
        return listener

    async def _new_listener(self) -> _Listener:
        """``_connect_listening`` for this loop: a connection that LISTENs, and one for marks."""
        import psycopg

        conninfo, kwargs = self._session_args()
        kwargs["autocommit"] = True
        conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
        try:
            marks = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
            try:
                await marks.execute(_LOCK_TIMEOUT)
                await conn.execute(self._sql["listen"])
                probe = f"idemfn probe {uuid.uuid4().hex}"
                await conn.execute("SELECT pg_notify(%s, %s)", (self._channel, probe))
                # (Closed at once: the generator holds the connection's lock until it is.)
                notes = conn.notifies(timeout=self.connect_timeout)
                async with contextlib.aclosing(notes):
                    async for note in notes:
                        if note.payload == probe:
                            break
                    else:
                        raise self._probe_lost()
            except BaseException:
                _finish(marks)
                raise
        except BaseException:
            _finish(conn)
            raise
        return _Listener(self, conn, marks)

    def close(self) -> None:
        with self._lock:
            pool, self._pool, self._ready = self._pool, None, False
            spares, self._spares = self._spares, []
            sides = list(self._sides.values())
            self._sides.clear()
            idle = self._idle if self._listen_pid == os.getpid() else []
            self._idle = []
        if self._pid != os.getpid():  # a forked child's: its parent's connections
            _not_ours.extend(conn for conn, _, _, _ in spares)
        else:
            for conn, _, owner, _ in spares:
                owner.putconn(conn)
        if pool is not None and pool is not self._given_pool and self._pid == os.getpid():
            pool.close()
        renewer = self._renewer_here()
        with renewer.lock:
            renewer.drop()
        for side in sides:
            side.dispose()
        for conn in idle:
            _finish(conn)

    async def aclose(self) -> None:
        """``close``, for async callers: this event loop's pool is closed on the loop (its
        tasks end with it), and the rest in a worker thread (nothing blocks the loop)."""
        import asyncio

        side = self._sides.get(asyncio.get_running_loop())
        if side is not None and side.pool is not None and side.pool is not self._given_apool:
            with contextlib.suppress(Exception):
                await side.pool.close()
        await asyncio.to_thread(self.close)
