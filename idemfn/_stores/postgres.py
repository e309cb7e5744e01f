"""``PostgresStore``: records in one PostgreSQL table, shared by every machine that reaches it.

Over 600 lines on purpose: one adapter behind one interface. Its statements, its connections
(the pool, the renewals' own connection, fork handling) and the transactional mode share the
table's layout and the store's state, and each part is read against the others.

    key text PRIMARY KEY   the stored key
    live text              the token of a live claim, NULL once finished: the fence
    token text             the entry's token, whatever its status (delete on a token)
    expires_at float8      when a finished record counts as absent, server UNIX seconds
    drop_at float8         when prune may remove the row (expiry, or an abandoned claim's
                           lease + ttl); indexed, so prune is one indexed DELETE
                           (and a look at each stale claim: is its owner gone?)
    entry bytea            the encoded entry

Every transition is one statement: the claim an ``INSERT … ON CONFLICT`` that replaces only
an expired row and returns the live one in the same statement, every later write an
``UPDATE``/``DELETE … WHERE key = … AND live = token``. The clock is the server's
(``clock_timestamp()``, see ``clock.ServerClock``).

The record's checksum covers ``entry`` only. SQL alone replaces or removes a finished row only
when its two copies of its expiry agree that it has passed: ``expires_at`` and ``drop_at``,
which every version has written equal whenever ``expires_at`` is set (a claim has no
``expires_at``: only its lease + ttl in ``drop_at``). One flipped bit in either made a live
record look expired to a claim or prune, which removed it: its body ran again (issue 14,
review). A row whose copies disagree is judged by its record: the claim reads it (and removes
that exact row if the record says it expired), prune reads it. A write refused by the fence
``live`` reads the row once, to tell a lost claim from a damaged fence (``_refused``).

Lease renewals go to a second table, ``<table>_leases`` (key, token, lease_until, lease_mono),
never to the record's row, and on a connection of their own outside the pool (issue 14). A
transactional body's ``ok`` record is an ``UPDATE`` of the record's row inside the body's
transaction: a renewal that updated that row after the transaction's snapshot made the ``ok``
write fail at REPEATABLE READ and SERIALIZABLE ("could not serialize access"), and renewals
that waited for a pooled connection starved while the bodies they kept alive held them all.
A read that finds a claim (``get``, the claim's answer, ``scan``) also reads its lease row, so
that whoever judges it sees its latest renewal; reads of finished records, and first calls,
cost what they did. A takeover, ``forget``, and the end of a claim this process renewed remove
its lease row; ``prune`` removes the ones left behind (a crashed owner's, or a claim another
process settled).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
import reprlib
import threading
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import _lease
from .._errors import StoreError
from .._record import Entry
from .._signing import SigningKey
from .base import Corrupt, Store, prunable, removable_at, remove_judged, skip_corrupt
from .clock import ServerClock

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = ["PostgresStore", "current_connection"]


class _Transaction:
    """The transaction of the transactional call running in this context."""

    __slots__ = ("conn", "fence", "key", "running", "store")

    def __init__(self, store: PostgresStore, key: str, conn: Any) -> None:
        from .._engine import _running  # (the engine imports the stores)

        self.store = store
        self.key = key
        self.conn = conn
        self.fence: str | None = None  # the claim token its ok record was written on
        # The keys whose bodies run in this context as the body starts: one more later is an
        # idempotent call nested in it, whose record is not written in this transaction.
        self.running = _running.get()


_transaction: contextvars.ContextVar[_Transaction | None] = contextvars.ContextVar(
    "idemfn_transaction", default=None
)


def current_connection() -> psycopg.Connection[Any]:
    """The connection of the transaction a ``transactional=True`` body runs in.

    The body's writes on it commit together with the key's ``ok`` record, or roll back
    together when the body raises; neither is written when the commit fails.

    Returns:
        The body's ``psycopg.Connection``, inside its transaction. Do not commit or roll it
        back: use a savepoint (``with conn.transaction():``) for a statement that may fail.

    Raises:
        RuntimeError: Outside the body of a function decorated with
            ``@idempotent(..., store=<PostgresStore>, transactional=True)``, or in an
            idempotent call nested in it that is not transactional itself (its own record
            would not commit with its writes).

    Examples:
        ```python
        @idempotent(key="credit:{transfer_id}", store=db, transactional=True)
        def credit(transfer_id: str, account: str, cents: int) -> None:
            current_connection().execute(
                "UPDATE accounts SET balance = balance + %s WHERE id = %s", (cents, account)
            )
        ```
    """
    current = _transaction.get()
    if current is None:
        raise RuntimeError(
            "idemfn.current_connection() is only available inside the body of a function"
            " decorated with @idempotent(..., store=<PostgresStore>, transactional=True)"
        )
    from .._engine import _running

    nested = _running.get() - current.running
    if nested:
        # Its writes would roll back with the outer body while its own ok record, written
        # outside the transaction, stays: replayed later, with its writes gone (issue 14).
        raise RuntimeError(
            f"idemfn.current_connection() was called in the body of key"
            f" {', '.join(map(repr, sorted(nested)))}, an idempotent call nested in the"
            f" transactional body of key {current.key!r} but not transactional itself: its ok"
            " record would not commit with its writes. Make it transactional=True (it then"
            " runs in a transaction of its own), or call a plain function (its writes then"
            " commit with the outer key's record)"
        )
    return current.conn  # type: ignore[no-any-return]


_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

#: How long a call waits for a connection to a server that gives none (refuses, or never
#: answers) before ``StoreError``, unless ``connect_timeout=`` or the connection string says.
#: psycopg_pool's own default is 30 s, which an unreachable server made every call wait (issue 13).
DEFAULT_CONNECT_TIMEOUT = 5.0
#: How long a call waits for a free connection when the server answers but every connection of
#: the pool is in use (transactional bodies hold one each): psycopg_pool's default, as before.
BUSY_POOL_WAIT = 30.0
_MAX_CONNECTIONS = 16
#: The renewals' connection gives up on a server that has gone silent (vanished from the
#: network: its host down, its address moved, a half-open connection) within about 10 s, and
#: the next renewal connects again: TCP's own retransmissions kept a renewal waiting ~15
#: minutes, and every claim of the store unrenewed meanwhile. Keepalives find it gone while a
#: renewal awaits its answer, tcp_user_timeout while its query goes unacknowledged. Each is
#: libpq's parameter: a connection string (or a given pool's kwargs) that sets one keeps it.
_RENEWAL_SILENCE = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # milliseconds
}


class _Renewer:
    """The connection a store renews leases on, outside its pool, in the process that opened it
    (a connection must not be used on both sides of a fork): a renewal never waits for a
    pooled connection, which transactional bodies may hold every one of (issue 14)."""

    __slots__ = ("conn", "lock", "pid")

    def __init__(self) -> None:
        self.conn: psycopg.Connection[Any] | None = None
        self.lock = threading.Lock()
        self.pid = os.getpid()

    def drop(self) -> None:
        """Close the connection after an error: the next renewal connects again."""
        conn, self.conn = self.conn, None
        if conn is not None and self.pid == os.getpid():
            with contextlib.suppress(Exception):
                conn.close()


class _NoConnection(Exception):
    """No connection in time; the message says why, for ``StoreError``."""


class _Attempts:
    """What the pool's latest connection attempt gave. The pool connects in its own threads and
    only logs why it failed; a call that gives up waiting says why, from here."""

    __slots__ = ("connected", "error")

    def __init__(self) -> None:
        self.connected = False
        self.error: BaseException | None = None


def _recording(attempts: _Attempts) -> type[psycopg.Connection[Any]]:
    """A connection class that notes in ``attempts`` how each connection attempt ended."""
    import psycopg

    class Connection(psycopg.Connection[Any]):
        @classmethod
        def connect(cls, *args: Any, **kwargs: Any) -> Connection:
            try:
                conn = super().connect(*args, **kwargs)
            except Exception as exc:
                attempts.error = exc
                raise
            attempts.connected, attempts.error = True, None
            return conn

    return Connection


def _timeout(value: object, where: str, *, text: bool = False) -> float:
    """``value`` (a number, or with ``text`` a connection string's text) as a number of
    seconds > 0, else ``ValueError`` naming ``where``."""
    seconds = math.nan
    if isinstance(value, str if text else (int, float)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(
            f"{where} must be a number of seconds > 0, not {value!r}: how long a call waits for"
            f" a server that does not answer (default {DEFAULT_CONNECT_TIMEOUT:g})"
        )
    return seconds


class PostgresStore(Store):
    """Records in a PostgreSQL table (extra ``idemfn[postgres]``), created if missing.

    Every transition is one statement (an ``INSERT … ON CONFLICT`` claim, then writes fenced
    on the claim's token); the store's clock is the server's. The table, and a
    ``<table>_leases`` table beside it for lease renewals, are created on first use. With
    ``transactional=True``, a body's writes commit with its ``ok`` record
    (``current_connection()``).

    Args:
        dsn_or_pool: A connection string or URL (``postgresql://…``), or a
            ``psycopg_pool.ConnectionPool`` the caller already has (the store then never
            closes it).
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

    Attributes:
        table: The table's name.
        server: Where the server is, without a password.
        connect_timeout: The connection timeout in effect, in seconds.

    Raises:
        ImportError: psycopg 3 or psycopg_pool is not installed
            (``pip install 'idemfn[postgres]'``).
        TypeError: ``dsn_or_pool`` is neither a str nor a ``psycopg_pool.ConnectionPool``.
        ValueError: A bad connection string, table name or ``connect_timeout``.
    """

    def __init__(
        self,
        dsn_or_pool: str | psycopg_pool.ConnectionPool,
        *,
        table: str = "idemfn_records",
        signing_key: SigningKey | None = None,
        connect_timeout: float | None = None,
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
        if isinstance(dsn_or_pool, str):
            try:
                info = psycopg.conninfo.conninfo_to_dict(dsn_or_pool)
            except psycopg.ProgrammingError as exc:
                raise ValueError(f"PostgresStore: bad connection string: {exc}") from None
            self._dsn: str | None = dsn_or_pool
            self._given_pool: psycopg_pool.ConnectionPool | None = None
        elif isinstance(dsn_or_pool, psycopg_pool.ConnectionPool):
            conninfo = dsn_or_pool.conninfo
            info = psycopg.conninfo.conninfo_to_dict(conninfo if isinstance(conninfo, str) else "")
            self._dsn = None
            self._given_pool = dsn_or_pool
        else:
            raise TypeError(
                "PostgresStore() takes a connection string or a psycopg_pool.ConnectionPool,"
                f" not {type(dsn_or_pool).__name__}"
            )
        self.server = _describe(info)  # never a password
        if connect_timeout is not None:
            self.connect_timeout = _timeout(connect_timeout, "PostgresStore(connect_timeout=...)")
        elif info.get("connect_timeout") is not None:
            self.connect_timeout = _timeout(
                info["connect_timeout"],
                "the connect_timeout parameter of the connection string",
                text=True,
            )
        elif self._given_pool is not None:
            self.connect_timeout = self._given_pool.timeout
        else:
            self.connect_timeout = DEFAULT_CONNECT_TIMEOUT
        self._pool_timeout = psycopg_pool.PoolTimeout
        self._errors: tuple[type[BaseException], ...] = (
            psycopg.Error,
            psycopg_pool.PoolTimeout,
            _NoConnection,
        )
        self._psycopg_error = psycopg.Error
        self._lock = threading.Lock()
        self._renewer = _Renewer()
        # key -> token of the claims this process renewed: the lease row a transactional
        # body's commit leaves behind is removed after it.
        self._leased: dict[str, str] = {}
        self._pool: psycopg_pool.ConnectionPool | None = None
        self._ready = False  # the pool is this process's, and the table exists
        self._attempts: _Attempts | None = None  # of the pool this store made
        self._pid = os.getpid()
        self._clock = ServerClock(self._read_clock)
        self._leases = _leases_table(table)
        self._sql = _statements(table, self._leases)

    def __repr__(self) -> str:
        return f"PostgresStore({self.server!r}, table={self.table!r})"

    # Connections: a pool opened on first use, and again in a forked child (a connection must
    # not be used on both sides of a fork).
    def _usable_pool(self) -> psycopg_pool.ConnectionPool:
        pool = self._pool
        if pool is None or not self._ready or self._pid != os.getpid():
            pool = self._open()
        return pool

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        pool = self._usable_pool()
        conn = self._getconn(pool)
        try:
            with conn:  # commit, or roll back on an error, as pool.connection() does
                yield conn
        finally:
            pool.putconn(conn)

    def _getconn(self, pool: psycopg_pool.ConnectionPool) -> Any:
        """A connection within ``connect_timeout``, or ``_NoConnection`` saying why not. A pool
        that answers but has every connection in use gets longer: that is load, not an outage."""
        try:
            return pool.getconn(timeout=self.connect_timeout)
        except self._pool_timeout:
            attempts = self._attempts
            answering = attempts is None or (attempts.connected and attempts.error is None)
            busy = answering and pool.get_stats().get("pool_size", 0) >= pool.max_size
            rest = pool.timeout - self.connect_timeout  # ours: BUSY_POOL_WAIT
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
        try:
            return pool.getconn(timeout=rest)
        except self._pool_timeout:
            raise _NoConnection(
                f"found no free connection within {self.connect_timeout + rest:g} s: all"
                f" {pool.max_size} connections of the pool were in use (give PostgresStore a"
                " psycopg_pool.ConnectionPool with a larger max_size)"
            ) from None

    def _open(self) -> psycopg_pool.ConnectionPool:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                # Kept even when the table cannot be made yet: a pool per failed call would
                # leave a thread pool behind each, retrying.
                self._pid, self._ready = os.getpid(), False
                if self._given_pool is not None:
                    self._pool = self._given_pool
                else:
                    import psycopg_pool

                    self._attempts = _Attempts()
                    self._pool = psycopg_pool.ConnectionPool(
                        self._dsn or "",
                        min_size=1,
                        max_size=_MAX_CONNECTIONS,
                        open=False,
                        connection_class=_recording(self._attempts),
                        timeout=BUSY_POOL_WAIT,
                        # libpq's own limit (whole seconds, at least 2) frees the pool's
                        # thread from an attempt the caller stopped waiting for.
                        kwargs={
                            "autocommit": True,
                            "connect_timeout": max(2, math.ceil(self.connect_timeout)),
                        },
                        name=f"idemfn {self.server}",
                    )
                    self._pool.open(wait=False)
            pool = self._pool
        # Outside the lock, so that each thread waits connect_timeout at most, not in turn.
        # CREATE … IF NOT EXISTS races with itself in PostgreSQL (a unique violation in its
        # catalog): callers opening a new table at once take turns on an advisory lock.
        conn = self._getconn(pool)
        try:
            with conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (zlib.crc32(self.table.encode()),))
                conn.execute(self._sql["create"])
                conn.execute(self._sql["index"])
                conn.execute(self._sql["create_leases"])
        finally:
            pool.putconn(conn)
        self._ready = True
        return pool

    def _run(
        self, action: str, key: str | None, query: str, params: Any, *, conn: Any = None
    ) -> Any:
        """Run one statement (on ``conn``, else a pooled connection in autocommit): its rows,
        or its row count when it returns none. Errors name ``key`` (None: a statement of no
        key's)."""
        try:
            with contextlib.nullcontext(conn) if conn is not None else self._connection() as c:
                cur = c.execute(query, params, binary=True)  # bytea as bytes, not hex text
                if cur.description is None:
                    return cur.rowcount
                return cur.fetchall()
        except self._errors as exc:
            if key is None:
                raise StoreError(f"{self!r} could not {action}: {_cause(exc)}") from exc
            raise self.error(action, key, _cause(exc)) from exc

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
            conn = self._getconn(pool)
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
                from .._engine import _add_note  # (the engine imports the stores)

                _add_note(
                    exc,
                    f"idemfn: the transaction of key {key!r} did not commit: neither the body's"
                    " writes nor its ok record were written",
                )
                raise
        finally:
            pool.putconn(conn)
        if state.fence is not None and self._leased.get(key) == state.fence:
            # Renewed while it ran: its lease row could not be removed inside the transaction
            # (the heartbeat updates it), so it goes now. Left behind, prune removes it.
            self._leased.pop(key, None)
            with contextlib.suppress(StoreError):
                self._run("tidy", key, self._sql["tidy"], (key, state.fence))

    def _read_clock(self, first: bool) -> float:
        rows = self._run("read the server's clock", None, self._sql["now"], ())
        return float(rows[0][0])

    def time(self) -> float:
        return self._clock.now()

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

    def _with_lease(self, entry: Entry) -> Entry:
        """``entry``, a claim, with its latest renewal, from its lease row when it has one."""
        rows = self._run("read", entry.key, self._sql["lease"], (entry.key, entry.token))
        return _renewed(entry, *rows[0]) if rows else entry

    def claim(self, entry: Entry) -> Entry | None:
        row = self._row(entry)
        while True:
            try:
                [(won, found)] = self._run("claim", entry.key, self._sql["claim"], row)
            except StoreError as exc:
                if _too_long_for_the_index(exc):
                    size = len(entry.key.encode("utf-8", "surrogatepass"))
                    raise ValueError(
                        f"{self!r} cannot hold the key {reprlib.repr(entry.key)} ({size:,}"
                        " bytes): its index holds keys of at most ~2,700 bytes once compressed."
                        " Use a shorter key, e.g. a key template over an id, or a hash of the"
                        " long part"
                    ) from None
                raise
            if won:
                return None
            if found is not None:
                live = self.decode(entry.key, found)
                if live.status == "processing":
                    return self._with_lease(live)
                if not live.is_expired(self.time()):
                    return live
                # Expired by its own clock, yet not replaced: the row's two copies of its expiry
                # disagree (see the module's docstring), or it expired after the statement. Remove
                # it, but only the row looked at: another caller that read it too may have
                # removed it and claimed since, and deleting that claim would let two run.
                self._run("claim", entry.key, self._sql["delete_row"], (entry.key, found))
                continue
            # Neither: a row committed by another caller after this statement's snapshot was
            # taken (or removed since). Look again.

    def get(self, key: str) -> Entry | None:
        rows = self._run("read", key, self._sql["get"], (key,))
        if not rows:
            return None
        entry = self.decode(key, rows[0][0])
        if entry.status == "processing":
            return self._with_lease(entry)
        return None if entry.is_expired(self.time()) else entry

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        row = self._row(entry) | {"fence": token}
        current = _transaction.get()
        if (
            current is not None
            and current.store is self
            and current.key == key
            and (entry.status == "ok")
        ):
            # The ok record commits with the body's writes. Its lease row stays untouched: the
            # heartbeat may have renewed it after the transaction's snapshot was taken.
            _still_in(current)
            current.fence = token
            if self._run("update", key, self._sql["swap"], row, conn=current.conn) == 1:
                return True
            return self._refused(key, token, current.conn)
        # A claim's lease row goes when the claim is taken over or rewritten (the entry written
        # holds its lease), or ends after this process renewed it; else the write costs what
        # it did before lease rows (a claim another process renewed leaves one for prune).
        tidy = entry.status == "processing" or (
            bool(self._leased) and self._leased.pop(key, None) is not None
        )
        query = self._sql["swap_tidy" if tidy else "swap"]
        if self._run("update", key, query, row) == 1:
            return True
        return self._refused(key, token, None)

    def _refused(self, key: str, token: str, conn: Any) -> bool:
        """After ``swap`` on ``token`` updated no row: False (the claim is lost), unless the
        row is still that claim and only its fence (``live``, which no checksum covers)
        disagrees, a StoreError (``check_fence``). A caller that judged the claim abandoned
        could neither halt it nor take it over, and looked again forever (issue 14, review).
        Read only after a refusal: a write that succeeds costs what it did."""
        rows = self._run("update", key, self._sql["fence"], (key,), conn=conn)
        if rows:
            self.check_fence(key, token, rows[0][0], rows[0][1])
        return False

    def release(self, key: str, token: str) -> bool:
        tidy = bool(self._leased) and self._leased.pop(key, None) is not None
        query = self._sql["release_tidy" if tidy else "release"]
        return bool(self._run("release", key, query, {"key": key, "token": token}) == 1)

    def renew(self, entry: Entry, lease: float) -> Entry | None:
        """Extend the lease of the live claim ``entry`` to ``lease`` seconds from now.

        On this store's renewal connection, in a lease row of its own: never waiting for the
        pool, never writing the record's row (see the module's docstring). The lease runs
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
                if conn is None or conn.closed:
                    conn = renewer.conn = self._connect_for_renewals()
                # READ COMMITTED whatever the server's default: a renewal reads the record's
                # row, and must not take part in a SERIALIZABLE body's conflicts.
                with conn.transaction():
                    rows = conn.execute(self._sql["renew"], params).fetchall()
            except self._errors as exc:
                renewer.drop()
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

    def _connect_for_renewals(self) -> psycopg.Connection[Any]:
        """A new connection, configured as the pool's, in READ COMMITTED transactions."""
        import psycopg

        timeout = max(2, math.ceil(self.connect_timeout))  # libpq's: whole seconds, >= 2
        pool = self._given_pool
        if pool is None:
            conninfo, kwargs = self._dsn or "", {}
        else:  # the caller's pool: its connection string, arguments and configure callback
            conninfo = (pool.conninfo() if callable(pool.conninfo) else pool.conninfo) or ""
            kwargs = dict((pool.kwargs() if callable(pool.kwargs) else pool.kwargs) or {})
        given = psycopg.conninfo.conninfo_to_dict(conninfo).keys() | kwargs.keys()
        if psycopg.pq.version() < 120000:  # a libpq before 12 refuses tcp_user_timeout
            given |= {"tcp_user_timeout"}
        kwargs |= {k: v for k, v in _RENEWAL_SILENCE.items() if k not in given}
        kwargs["connect_timeout"] = timeout
        if pool is None:
            conn = psycopg.connect(conninfo, **kwargs)
        else:
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
        if self._leased:
            self._leased.pop(key, None)
        rows = self._run("delete", key, self._sql["delete"], {"key": key, "token": token})
        if not rows:
            return False
        (expires_at,) = rows[0]
        # An expired record counts as absent: removing it is tidying, not forgetting.
        return token is not None or expires_at is None or expires_at > self.time()

    def scan(self, prefix: str = "", *, corrupt: Corrupt | None = None) -> Iterator[Entry]:
        keys = [k for (k,) in self._run("list", prefix or "*", self._sql["keys"], (prefix,))]
        yield from self._entries(keys, corrupt)

    def _entries(self, keys: list[str], corrupt: Corrupt | None) -> Iterator[Entry]:
        for key in keys:  # one row at a time: payloads may be large
            rows = self._run("read", key, self._sql["get"], (key,))
            if rows and (entry := self.decoded(key, rows[0][0], corrupt)) is not None:
                yield self._with_lease(entry) if entry.status == "processing" else entry

    def prune(self) -> int:
        """Remove expired records, and claims whose lease ran out more than their ttl ago.

        One indexed DELETE of expired records (whose two copies of their expiry agree: see
        the module's docstring); then each claim whose lease ran out ttl ago by the server's
        clock, and each finished row whose copies disagree, is judged by its record and the
        engine's rule (``prunable``): a claim whose owner is alive on its machine's monotonic
        clock stays, whatever the wall clocks say. Lease rows no claim holds go too.

        Returns:
            How many records were removed.

        Raises:
            StoreError: The server failed.
        """
        removed = int(self._run("prune", self.table, self._sql["prune"], ()))
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

    def close(self) -> None:
        with self._lock:
            pool, self._pool, self._ready = self._pool, None, False
        if pool is not None and pool is not self._given_pool and self._pid == os.getpid():
            pool.close()
        renewer = self._renewer_here()
        with renewer.lock:
            renewer.drop()


def _still_in(current: _Transaction) -> None:
    """Raise, as a database error of the body's, when the body left the transaction its ok record
    is to be written in: ended it (COMMIT or ROLLBACK on its connection), or let an error it
    caught abort it. Written anyway, the record would commit on its own (issue 14)."""
    import psycopg

    status = current.conn.info.transaction_status
    status_of = psycopg.pq.TransactionStatus
    if status == status_of.INERROR:
        raise psycopg.errors.InFailedSqlTransaction(
            f"the body of key {current.key!r} returned, but a database error it caught had"
            " aborted its transaction: none of its writes commit, nor its ok record. To go on"
            " after a statement that may fail, run it in a savepoint:"
            " `with idemfn.current_connection().transaction(): ...`"
        )
    if status == status_of.IDLE:
        raise psycopg.ProgrammingError(
            f"the body of key {current.key!r} ended its transaction itself (COMMIT or ROLLBACK"
            " on idemfn.current_connection()): its writes did not commit together with its ok"
            " record, which is not written. idemfn commits the transaction when the body"
            " returns; inside it, use a savepoint: `with conn.transaction(): ...`"
        )


def _leases_table(table: str) -> str:
    """The name of ``table``'s lease table: ``<table>_leases``, or for a name too long for that
    (PostgreSQL cuts names at 63 bytes) a cut one made unique by a hash of the whole."""
    name = f"{table}_leases"
    return name if len(name) <= 63 else f"{table[:46]}_{zlib.crc32(table.encode()):08x}_leases"


def _renewed(entry: Entry, until: float | None, mono: float | None) -> Entry:
    """``entry`` with the lease of its live claim's lease row (``until``, ``mono``): each end the
    later of the two, each on its own clock. ``until`` (the server's clock) judges the owner
    from other machines, ``mono`` (its machine's lease clock) on its own: a server clock set
    back since the claim must not hide a renewal from the judges of the owner's machine."""
    later_until = until is not None and (entry.lease_until is None or until > entry.lease_until)
    later_mono = mono is not None and (entry.lease_mono is None or mono > entry.lease_mono)
    if not (later_until or later_mono):
        return entry
    return entry._replace(
        lease_until=until if later_until else entry.lease_until,
        lease_mono=mono if later_mono else entry.lease_mono,
    )


def _statements(table: str, leases: str) -> dict[str, str]:
    t = f'"{table}"'  # checked against _TABLE_NAME: a plain name, safe to quote
    lt = f'"{leases}"'
    now = "extract(epoch from clock_timestamp())"
    return {
        "create": f"CREATE TABLE IF NOT EXISTS {t} (key text PRIMARY KEY, live text, token text"
        " NOT NULL, expires_at float8, drop_at float8, entry bytea NOT NULL)",
        "index": f'CREATE INDEX IF NOT EXISTS "{table}_drop_at" ON {t} (drop_at)'
        " WHERE drop_at IS NOT NULL",
        "create_leases": f"CREATE TABLE IF NOT EXISTS {lt} (key text NOT NULL, token text NOT"
        " NULL, lease_until float8 NOT NULL, lease_mono float8, PRIMARY KEY (key, token))",
        "now": f"SELECT {now}",
        "claim": f"WITH claimed AS (INSERT INTO {t} AS r (key, live, token, expires_at, drop_at,"
        " entry) VALUES (%(key)s, %(live)s, %(token)s, %(expires_at)s, %(drop_at)s, %(entry)s)"
        " ON CONFLICT (key) DO UPDATE SET live = EXCLUDED.live, token = EXCLUDED.token,"
        " expires_at = EXCLUDED.expires_at, drop_at = EXCLUDED.drop_at, entry = EXCLUDED.entry"
        f" WHERE r.expires_at <= {now} AND r.drop_at = r.expires_at RETURNING 1)"
        f" SELECT EXISTS (SELECT 1 FROM claimed), (SELECT entry FROM {t} WHERE key = %(key)s)",
        "get": f"SELECT entry FROM {t} WHERE key = %s",
        "lease": f"SELECT lease_until, lease_mono FROM {lt} WHERE key = %s AND token = %s",
        "swap": f"UPDATE {t} SET live = %(live)s, token = %(token)s, expires_at = %(expires_at)s,"
        " drop_at = %(drop_at)s, entry = %(entry)s WHERE key = %(key)s AND live = %(fence)s",
        "swap_tidy": f"WITH tidied AS (DELETE FROM {lt} WHERE key = %(key)s AND token ="
        f" %(fence)s) UPDATE {t} SET live = %(live)s, token = %(token)s, expires_at ="
        " %(expires_at)s, drop_at = %(drop_at)s, entry = %(entry)s WHERE key = %(key)s AND"
        " live = %(fence)s",
        "release": f"DELETE FROM {t} WHERE key = %(key)s AND live = %(token)s",
        "release_tidy": f"WITH tidied AS (DELETE FROM {lt} WHERE key = %(key)s AND token ="
        f" %(token)s) DELETE FROM {t} WHERE key = %(key)s AND live = %(token)s",
        "delete": f"WITH tidied AS (DELETE FROM {lt} WHERE key = %(key)s AND (%(token)s::text IS"
        f" NULL OR token = %(token)s)) DELETE FROM {t} WHERE key = %(key)s"
        " AND (%(token)s::text IS NULL OR token = %(token)s) RETURNING expires_at",
        "renew": f"INSERT INTO {lt} (key, token, lease_until, lease_mono) SELECT %(key)s::text,"
        f" %(token)s::text, {now} + %(lease)s::float8, %(mono)s::float8 WHERE EXISTS (SELECT"
        f" FROM {t} WHERE key = %(key)s AND live = %(token)s) ON CONFLICT (key, token) DO UPDATE"
        " SET lease_until = EXCLUDED.lease_until, lease_mono = EXCLUDED.lease_mono"
        " RETURNING lease_until",
        "tidy": f"DELETE FROM {lt} WHERE key = %s AND token = %s",
        "keys": f"SELECT key FROM {t} WHERE starts_with(key, %s) ORDER BY key",
        # Both copies compared with now, in the row: a scan of the drop_at index would not
        # read the row's drop_at again. The stale query also reads finished rows whose copies
        # disagree, to judge them by their record.
        "prune": f"DELETE FROM {t} WHERE drop_at IS NOT NULL AND drop_at < {now}"
        f" AND live IS NULL AND drop_at = expires_at AND expires_at < {now}",
        "stale": f"SELECT key FROM {t} WHERE drop_at IS NOT NULL AND drop_at < {now}"
        " AND live IS NOT NULL OR live IS NULL AND drop_at IS DISTINCT FROM expires_at",
        "fence": f"SELECT live, entry FROM {t} WHERE key = %s",
        "delete_row": f"DELETE FROM {t} WHERE key = %s AND entry = %s",
        "prune_leases": f"DELETE FROM {lt} l WHERE l.lease_until < {now} AND NOT EXISTS"
        f" (SELECT FROM {t} r WHERE r.key = l.key AND r.live = l.token)",
        "size": "SELECT pg_total_relation_size(quote_ident(%s))"
        " + pg_total_relation_size(quote_ident(%s))",
    }


def _cause(exc: BaseException) -> str:
    """What a ``StoreError`` says of ``exc``, on one line (libpq adds hints on more)."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, _NoConnection) else f"{type(exc).__name__}: {text}"


def _too_long_for_the_index(exc: StoreError) -> bool:
    """Whether ``exc`` is PostgreSQL refusing a key too long for the primary key's btree."""
    import psycopg

    cause = exc.__cause__
    return isinstance(cause, psycopg.errors.ProgramLimitExceeded) and "index row" in str(cause)


def _describe(info: dict[str, Any]) -> str:
    host = info.get("host") or "localhost"
    port = info.get("port") or "5432"
    user = info.get("user") or ""
    db = info.get("dbname") or user or ""
    where = f"{host}:{port}" if not str(host).startswith("/") else str(host)
    return f"postgresql://{user + '@' if user else ''}{where}/{db}"
