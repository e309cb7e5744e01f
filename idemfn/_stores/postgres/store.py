"""``PostgresStore``: records in one PostgreSQL table, shared by every machine that reaches it.

Over 1,000 lines on purpose: one adapter behind one interface. Its statements, its connections
(the pools, the renewals' own connection, the listeners, fork handling and event loops), the
transactional mode and the wake-ups share the table's layout and the store's state, and each
part is read against the others.

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

Async callers (issue 16) run the same statements on connections of the event loop they run on
(an async connection belongs to its loop): a ``_LoopPool`` per loop, made on the loop's first
call from the connection string (or the given ``ConnectionPool``'s settings) and closed when
the loop shuts down (``_closed_at_shutdown``), or the ``AsyncConnectionPool`` the store was
given, on its one loop. Each primitive is written once, as a generator of the statements it runs
(``_Query``) and of its readings of the store's clock (``_NOW``): ``_drive`` runs them on the
calling thread, ``_adrive`` on the loop. An ``async def`` body with ``transactional=True`` runs
in ``atransaction(key)`` and writes on ``current_async_connection()``.

Wake-ups (issue 16). A waiter watches a busy key (``watch``, ``awatch``) on a connection that
LISTENs on the table's channel, and marks the key watched by holding a shared advisory lock on
it (``_MARK``: session level, for as long as it watches). Each settling write (a finished
record, a release, a delete) tries, in its own statement, to take that lock for its transaction:
when it cannot, someone watches, and it NOTIFYs (payload: the key); when it can, nobody does, and
it sends nothing. NOTIFY takes a global lock at COMMIT that serialises every transaction that
notified: a first call that nobody waits for must not pay for it. No race: a waiter marks before
it looks at the key again, and a settle that took the lock first holds it until it commits, so
the mark waits for that commit and the look sees the settle. A lock, not a row: a row the waiter
writes would be read through the settle's snapshot (a REPEATABLE READ body's ok write would never
see one written during the body), and the record's own row must never be written by a reader
(see above). A watch whose LISTEN fails (refused, the connection lost, or a probe NOTIFY that never
comes back, as behind a pooler in transaction mode) waits as the default watch does, polled by
its caller, and says so once in the log.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import hashlib
import inspect
import logging
import math
import os
import re
import reprlib
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

from .. import _lease
from .._errors import StoreError
from .._record import Entry
from .._signing import SigningKey
from .._wakeups import LocalAsyncWatch, LocalWatch
from .base import Corrupt, Store, prunable, removable_at, remove_judged, skip_corrupt
from .clock import ServerClock

if TYPE_CHECKING:
    import asyncio

    import psycopg
    import psycopg_pool

__all__ = [
    "PostgresAsyncWatch",
    "PostgresStore",
    "PostgresWatch",
    "current_async_connection",
    "current_connection",
]

logger = logging.getLogger("idemfn")

T = TypeVar("T")


class _Transaction:
    """The transaction of the transactional call running in this context."""

    __slots__ = ("conn", "fence", "is_async", "key", "running", "store")

    def __init__(
        self, store: PostgresStore, key: str, conn: Any, *, is_async: bool = False
    ) -> None:
        from .._engine import _running  # (the engine imports the stores)

        self.store = store
        self.key = key
        self.conn = conn
        self.is_async = is_async  # conn is a psycopg.AsyncConnection (atransaction)
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
    together when the body raises; neither is written when the commit fails. An ``async def``
    body writes on ``current_async_connection()`` instead.

    Returns:
        The body's ``psycopg.Connection``, inside its transaction. Do not commit or roll it
        back: use a savepoint (``with conn.transaction():``) for a statement that may fail.

    Raises:
        RuntimeError: Outside the body of a function decorated with
            ``@idempotent(..., store=<PostgresStore>, transactional=True)``, in the body of an
            ``async def`` one (its connection is async: ``current_async_connection()``), or in
            an idempotent call nested in it that is not transactional itself (its own record
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
    return _current(is_async=False).conn  # type: ignore[no-any-return]


def current_async_connection() -> psycopg.AsyncConnection[Any]:
    """The connection of the transaction an ``async def`` ``transactional=True`` body runs in.

    ``current_connection()`` for ``async def`` bodies: the body's writes on it commit together
    with the key's ``ok`` record, or roll back together when the body raises; neither is
    written when the commit fails.

    Returns:
        The body's ``psycopg.AsyncConnection``, inside its transaction. Do not commit or roll
        it back: use a savepoint (``async with conn.transaction():``) for a statement that may
        fail.

    Raises:
        RuntimeError: Outside the body of an ``async def`` function decorated with
            ``@idempotent(..., store=<PostgresStore>, transactional=True)`` (a sync body's
            connection is ``current_connection()``), or in an idempotent call nested in it
            that is not transactional itself.

    Examples:
        ```python
        @idempotent(key="credit:{transfer_id}", store=db, transactional=True)
        async def credit(transfer_id: str, account: str, cents: int) -> None:
            await current_async_connection().execute(
                "UPDATE accounts SET balance = balance + %s WHERE id = %s", (cents, account)
            )
        ```
    """
    return _current(is_async=True).conn  # type: ignore[no-any-return]


def _current(*, is_async: bool) -> _Transaction:
    """The transaction of the body running in this context, for ``current_connection()``
    (``is_async`` False) or ``current_async_connection()``; else ``RuntimeError`` saying why."""
    name = "current_async_connection" if is_async else "current_connection"
    current = _transaction.get()
    if current is None:
        kind = "an async def function" if is_async else "a function"
        raise RuntimeError(
            f"idemfn.{name}() is only available inside the body of {kind} decorated with"
            " @idempotent(..., store=<PostgresStore>, transactional=True)"
        )
    if current.is_async != is_async:
        # An AsyncConnection handed out as a sync one would take `conn.execute(...)` without
        # `await`: the write would never run, while the ok record commits.
        other, kind = (
            ("current_connection", "a sync def")
            if current.is_async is False
            else ("current_async_connection", "an async def")
        )
        raise RuntimeError(
            f"idemfn.{name}() was called in the transactional body of key {current.key!r},"
            f" {kind}: its connection is idemfn.{other}()"
        )
    from .._engine import _running

    nested = _running.get() - current.running
    if nested:
        # Its writes would roll back with the outer body while its own ok record, written
        # outside the transaction, stays: replayed later, with its writes gone (issue 14).
        raise RuntimeError(
            f"idemfn.{name}() was called in the body of key"
            f" {', '.join(map(repr, sorted(nested)))}, an idempotent call nested in the"
            f" transactional body of key {current.key!r} but not transactional itself: its ok"
            " record would not commit with its writes. Make it transactional=True (it then"
            " runs in a transaction of its own), or call a plain function (its writes then"
            " commit with the outer key's record)"
        )
    return current


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
#: A watch marks its key within this long, else it polls: a mark waits only for a settle of the
#: key that took the lock first to commit (see the module's docstring).
_MARK_WAIT_MS = 10_000
#: After LISTEN failed, watches poll for this long before they try again (a server that refuses
#: LISTEN, or is down, is not asked again by every waiter).
_RELISTEN = 10.0
#: Idle listening connections a process keeps for its next sync watches.
_IDLE_LISTENERS = 4
_LOCK_TIMEOUT = f"SET lock_timeout = {_MARK_WAIT_MS}"
#: A key longer than this (in characters) is NOTIFYed as its SHA-256: NOTIFY's payload must be
#: shorter than 8000 bytes (less on a server built with smaller pages), 4 bytes a character.
_PAYLOAD_CHARS = 1000
#: A waiter's mark on a key, taken and let go with (the table's mark, the key): the server
#: hashes the key as each settling write does (``_statements``: their last condition).
_MARK = "SELECT pg_advisory_lock_shared(%s::int4, hashtext(%s))"
_UNMARK = "SELECT pg_advisory_unlock_shared(%s::int4, hashtext(%s))"


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


class _NoListen(Exception):
    """LISTEN was accepted but a NOTIFY did not come back; the message says so."""


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


class _LoopPool:
    """The connections of one event loop's async callers, made by the store (``connect``).

    Not a ``psycopg_pool.AsyncConnectionPool``: that pool connects in tasks of its own, which
    swallow ``CancelledError`` to keep their count right, and ``asyncio.run`` cancels every task
    as it ends, then waits for each: a loop that ended while its pool was connecting (a first
    call grows the pool as its first connection is made) never returned. Here a connection is
    made in the caller's task, when none is idle and fewer than ``max_size`` exist: a cancelled
    caller cancels its own connect, and the pool owns no task.
    """

    def __init__(self, connect: Callable[[], Any], max_size: int, busy_wait: float) -> None:
        self._connect = connect  # a new connection (awaitable), or _NoConnection
        self.max_size = max_size
        self._busy_wait = busy_wait
        self._idle: list[Any] = []
        self._size = 0  # connections made and not yet closed: idle, or in use
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.made: weakref.WeakSet[Any] = weakref.WeakSet()

    async def getconn(self) -> Any:
        """An idle connection, else a new one, else (``max_size`` in use) the first one given
        back within ``busy_wait`` seconds, else ``_NoConnection``."""
        import asyncio

        give_up = time.monotonic() + self._busy_wait
        while True:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
                self._size -= 1
            if self._size < self.max_size:
                self._size += 1
                try:
                    conn = await self._connect()
                except BaseException:
                    self._size -= 1
                    self._pass_on(None)
                    raise
                self.made.add(conn)
                return conn
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                given = await asyncio.wait_for(waiter, max(0.0, give_up - time.monotonic()))
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():  # handed over as it gave up
                    self._pass_on(waiter.result())
                if not isinstance(exc, asyncio.TimeoutError):
                    raise
                raise _NoConnection(
                    f"found no free connection within {self._busy_wait:g} s: all"
                    f" {self.max_size} connections of this event loop were in use (give"
                    " PostgresStore a psycopg_pool.AsyncConnectionPool with a larger max_size)"
                ) from None
            finally:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(waiter)
            if given is not None:
                return given
            # None: a connection was closed, and this caller may make one.

    async def putconn(self, conn: Any) -> None:
        """Take ``conn`` back: idle again if it is idle and open, else closed."""
        import psycopg

        if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            _finish(conn)  # broken, or left mid-statement by a cancelled caller
            self._size -= 1
            self._pass_on(None)
        else:
            self._pass_on(conn)

    def _pass_on(self, conn: Any) -> None:
        """Give ``conn`` (None: a place for a new one) to the first caller still waiting, else
        keep it idle."""
        if not self._wake_one(conn) and conn is not None:
            self._idle.append(conn)

    def _wake_one(self, conn: Any) -> bool:
        """Hand ``conn`` (None: a free place) to the first caller still waiting."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False


class _Query(NamedTuple):
    """A step of a primitive (see ``_drive``): run ``query`` with ``params`` (on ``conn``, else
    a pooled connection); its rows, or its row count, are sent back. Errors name ``key``."""

    action: str
    key: str | None
    query: str
    params: Any
    conn: Any = None


#: A step of a primitive: read the store's clock (``time()``, or ``await atime()``).
_NOW = object()

#: A primitive, written once: a generator of ``_Query`` and ``_NOW`` steps, which returns the
#: primitive's result. ``_drive`` runs it for sync callers, ``_adrive`` for async ones.
_Steps = Generator[Any, Any, T]


class _Side:
    """A store's connections on one event loop, in the process that made them: the async pool
    (opened on the loop's first call, and the table made if need be: ``ready``), and the
    listener its async watches share (see ``_Listener``)."""

    __slots__ = (
        "closer",
        "listen_lock",
        "listener",
        "loop",
        "pid",
        "pool",
        "quiet_until",
        "ready",
        "start_lock",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import asyncio

        self.loop = loop
        self.pid = os.getpid()
        self.pool: Any = None  # a _LoopPool, or the given psycopg_pool.AsyncConnectionPool
        self.ready = False
        self.start_lock = asyncio.Lock()
        self.listener: _Listener | None = None
        self.listen_lock = asyncio.Lock()
        self.quiet_until = 0.0  # LISTEN failed: watches poll until then (monotonic)
        self.closer: AsyncGenerator[None, None] | None = None

    def close_with_loop(self, store: PostgresStore) -> None:
        """Dispose of this side when its loop shuts down. asyncio's one hook for that: a loop's
        ``shutdown_asyncgens`` (``asyncio.run``, ``asyncio.Runner``) closes every async
        generator first iterated on it, which runs its ``finally`` on the loop, still open."""
        closer = self.closer = _closed_at_shutdown(weakref.ref(store), self)
        try:
            closer.asend(None).send(None)  # to its yield, now: the loop's hook tracks it from here
        except StopIteration:
            pass

    def dispose(self) -> None:
        """Close this side's connections (not those of a given pool), from any thread: when its
        loop shuts down, or the store closes. Idempotent."""
        self.ready = False
        listener, self.listener = self.listener, None
        conns: list[Any] = list(self.pool.made) if isinstance(self.pool, _LoopPool) else []
        if self.pid != os.getpid():
            # A parent's connections: closed by this child, they would end the parent's
            # sessions; dropped, psycopg would warn. Kept, untouched, for good.
            _not_ours.extend(conns)
            if listener is not None:
                _not_ours.extend([listener.conn, listener.marks])
            return
        for conn in conns:
            _finish(conn)
        if listener is not None:
            _on_its_thread(self.loop, listener.close)


#: Connections a forked child inherited from its parent, which it must neither close nor drop.
_not_ours: list[Any] = []


def _finish(conn: Any) -> None:
    """Close ``conn`` (sync or async) now, from any thread or loop: libpq's ``finish``, which is
    what closing an async connection does once awaited."""
    with contextlib.suppress(Exception):
        if not conn.closed:
            conn.pgconn.finish()


def _on_its_thread(loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
    """Call ``fn`` on ``loop``'s thread when the loop runs in another thread; else now (a loop
    that does not run does nothing meanwhile)."""
    import asyncio

    try:
        here = asyncio.get_running_loop() is loop
    except RuntimeError:
        here = False
    if loop.is_running() and not here:
        try:
            loop.call_soon_threadsafe(fn)
            return
        except RuntimeError:  # closed meanwhile
            pass
    fn()


_tasks: set[Any] = set()  # background tasks, kept until done (the loop keeps only weak refs)


def _background(work: Any) -> Any:
    """Run the coroutine ``work`` in a task of the running loop, kept until it ends."""
    import asyncio

    task = asyncio.get_running_loop().create_task(work)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


async def _closed_at_shutdown(
    store: weakref.ReferenceType[PostgresStore], side: _Side
) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        owner = store()
        if owner is not None:
            owner._drop_side(side)
        else:
            side.dispose()


class _Listener:
    """The two connections a store's async watches on one event loop share (see the module's
    docstring): ``conn`` LISTENs, and each notification it receives goes to the watches of its
    key; ``marks`` holds their marks. ``broken`` once either failed: its watches poll from then
    on. No task and no async generator read ``conn``: the loop calls ``_read`` when its socket
    is readable, and libpq parses what came. (A task left waiting in psycopg's ``notifies()``
    when a loop shuts down had that generator closed under it by ``shutdown_asyncgens``.)"""

    def __init__(self, store: PostgresStore, conn: Any, marks: Any) -> None:
        import asyncio

        self.conn = conn
        self.marks = marks
        self.watches: dict[str, set[PostgresAsyncWatch]] = {}
        self.broken = False
        self._store = weakref.ref(store)
        self._encoding = conn.info.encoding
        self._fd = conn.pgconn.socket
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._read)

    def _read(self) -> None:
        pgconn = self.conn.pgconn
        try:
            pgconn.consume_input()
            while (note := pgconn.notifies()) is not None:
                for watch in list(self.watches.get(note.extra.decode(self._encoding), ())):
                    watch._wake()
        except Exception as exc:  # the connection was lost
            store = self._store()
            if store is not None and not self.broken:
                store._cannot_listen(exc)
            self._stop_reading()
            self._break()

    def _stop_reading(self) -> None:
        if not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)

    def _break(self) -> None:
        """Wake every watch: it looks again, and polls from now on (a settle may have gone
        unheard, and marks are gone with their connection)."""
        self.broken = True
        watches = [watch for some in self.watches.values() for watch in some]
        self.watches.clear()
        for watch in watches:
            watch._lost()

    def add(self, payload: str, watch: PostgresAsyncWatch) -> None:
        self.watches.setdefault(payload, set()).add(watch)

    def discard(self, payload: str, watch: PostgresAsyncWatch) -> None:
        watches = self.watches.get(payload)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self.watches[payload]

    async def mark(self, store: PostgresStore, mark: tuple[int, str]) -> bool:
        """Hold ``mark``; False when it could not be taken (logged)."""
        import asyncio

        taking = _background(self._execute(store, _MARK, mark))
        try:
            return bool(await asyncio.shield(taking))
        except asyncio.CancelledError:
            # Cancelled while the lock was being taken: once it is, let go of it (a mark kept
            # would make every settle of the key NOTIFY until the connection closes).
            taking.add_done_callback(lambda done: self._taken_for_nothing(store, done, mark))
            raise

    def _taken_for_nothing(self, store: PostgresStore, done: Any, mark: tuple[int, str]) -> None:
        if not done.cancelled() and done.result():
            self.unmark(store, mark)

    def unmark(self, store: PostgresStore, mark: tuple[int, str]) -> None:
        """Let go of ``mark``, in the background (a watch's exit never waits, nor fails)."""
        if not self.broken:
            _background(self._execute(store, _UNMARK, mark))

    async def _execute(self, store: PostgresStore, query: str, mark: tuple[int, str]) -> bool:
        try:
            await self.marks.execute(query, mark)
        except Exception as exc:
            if not self.broken:  # (closed with its loop or store meanwhile: nothing to say)
                store._cannot_listen(exc)
                if self.marks.closed:
                    self._break()
            return False
        return True

    def close(self) -> None:
        """Stop reading, and close both connections (on the listener's loop's thread when the
        loop runs: a socket must leave the loop's selector before it is closed)."""
        self.broken = True
        self._stop_reading()
        _finish(self.conn)
        _finish(self.marks)


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
    (``current_connection()``, or ``current_async_connection()`` in an ``async def`` body).

    Async callers never block their event loop: the awaitable primitives run on connections
    of each event loop's own, at most 16 a loop (a script that calls ``asyncio.run`` twice
    gets two sets, each closed as its loop shuts down). A caller waiting for a busy key is
    woken through ``LISTEN``/``NOTIFY`` as soon as its owner settles it, on any machine; a
    settle that nobody waits for sends no ``NOTIFY``.

    Args:
        dsn_or_pool: A connection string or URL (``postgresql://…``); or a
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

    Attributes:
        table: The table's name.
        server: Where the server is, without a password.
        connect_timeout: The connection timeout in effect, in seconds.

    Raises:
        ImportError: psycopg 3 or psycopg_pool is not installed
            (``pip install 'idemfn[postgres]'``).
        TypeError: ``dsn_or_pool`` is neither a str nor a ``psycopg_pool.ConnectionPool`` or
            ``AsyncConnectionPool``, or an ``AsyncConnectionPool`` whose ``conninfo`` or
            ``kwargs`` is an async function (sync connections could not call it).
        ValueError: A bad connection string, table name or ``connect_timeout``.
    """

    def __init__(
        self,
        dsn_or_pool: str | psycopg_pool.ConnectionPool | psycopg_pool.AsyncConnectionPool,
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
        self._given_pool: psycopg_pool.ConnectionPool | None = None
        self._given_apool: psycopg_pool.AsyncConnectionPool | None = None
        given: psycopg_pool.ConnectionPool | psycopg_pool.AsyncConnectionPool | None = None
        if isinstance(dsn_or_pool, str):
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
            conninfo = given.conninfo
            info = psycopg.conninfo.conninfo_to_dict(conninfo if isinstance(conninfo, str) else "")
            self._conninfo, self._kwargs = conninfo or "", given.kwargs or {}
        else:
            raise TypeError(
                "PostgresStore() takes a connection string, a psycopg_pool.ConnectionPool or an"
                f" AsyncConnectionPool, not {type(dsn_or_pool).__name__}"
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
        self._lock = threading.Lock()
        self._renewer = _Renewer()
        # key -> token of the claims this process renewed: the lease row a transactional
        # body's commit leaves behind is removed after it.
        self._leased: dict[str, str] = {}
        self._pool: psycopg_pool.ConnectionPool | None = None
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
            rest = self._longer(pool, self._attempts)
        try:
            return pool.getconn(timeout=rest)
        except self._pool_timeout:
            raise self._none_free(pool, rest, "ConnectionPool") from None

    async def _agetconn(self, pool: Any) -> Any:
        """``_getconn`` for this loop's pool (a ``_LoopPool``, or a given async pool)."""
        if isinstance(pool, _LoopPool):
            return await pool.getconn()
        try:
            return await pool.getconn(timeout=self.connect_timeout)
        except self._pool_timeout:
            rest = self._longer(pool, None)
        try:
            return await pool.getconn(timeout=rest)
        except self._pool_timeout:
            raise self._none_free(pool, rest, "AsyncConnectionPool") from None

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
        ours = {"autocommit": True, "connect_timeout": max(2, math.ceil(self.connect_timeout))}
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
                    side.pool = _LoopPool(self._aconnect, _MAX_CONNECTIONS, BUSY_POOL_WAIT)
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
                return await asyncio.wait_for(
                    psycopg.AsyncConnection.connect(conninfo, **kwargs),
                    max(give_up - time.monotonic(), 0.001),
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
            with contextlib.nullcontext(conn) if conn is not None else self._connection() as c:
                cur = c.execute(query, params, binary=True)  # bytea as bytes, not hex text
                if cur.description is None:
                    return cur.rowcount
                return cur.fetchall()
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
                if isinstance(pool, _LoopPool):  # in autocommit
                    return await _result(await c.execute(query, params, binary=True))
                async with c:  # commit, or roll back on an error, as pool.connection() does
                    return await _result(await c.execute(query, params, binary=True))
            finally:
                await pool.putconn(c)
        except self._errors as exc:
            raise self._failed(action, key, exc) from exc

    def _failed(self, action: str, key: str | None, exc: BaseException) -> StoreError:
        if key is None:
            return StoreError(f"{self!r} could not {action}: {_cause(exc)}")
        return self.error(action, key, _cause(exc))

    def _drive(self, steps: _Steps[T]) -> T:
        """Run the primitive ``steps`` for a sync caller: each ``_Query`` on a pooled
        connection (or its own), each ``_NOW`` with ``time()``."""
        reply: Any = None
        try:
            while True:
                step = steps.send(reply)
                reply = self.time() if step is _NOW else self._run(*step)
        except StopIteration as done:
            return cast(T, done.value)

    async def _adrive(self, steps: _Steps[T]) -> T:
        """``_drive`` for an async caller: on this event loop's pool, with ``atime()``."""
        reply: Any = None
        try:
            while True:
                step = steps.send(reply)
                reply = await (self.atime() if step is _NOW else self._arun(*step))
        except StopIteration as done:
            return cast(T, done.value)

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
            [(won, found)] = yield _Query("claim", entry.key, self._sql["claim"], row)
            if won:
                return None
            if found is not None:
                live = self.decode(entry.key, found)
                if live.status == "processing":
                    return (yield from self._lease_of(live))
                if not live.is_expired((yield _NOW)):
                    return live
                # Expired by its own clock, yet not replaced: the row's two copies of its expiry
                # disagree (see the module's docstring), or it expired after the statement. Remove
                # it, but only the row looked at: another caller that read it too may have
                # removed it and claimed since, and deleting that claim would let two run.
                yield _Query("claim", entry.key, self._sql["delete_row"], (entry.key, found))
                continue
            # Neither: a row committed by another caller after this statement's snapshot was
            # taken (or removed since). Look again.

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
            if (yield _Query("update", key, self._sql["take"], row)) == 1:
                return True
            return (yield from self._refused(key, token, None))
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
        if (yield _Query("update", key, self._sql["swap_tidy" if tidy else "swap"], row)) == 1:
            return True
        return (yield from self._refused(key, token, None))

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

    # Wake-ups (see the module's docstring).
    def watch(self, key: str) -> PostgresWatch:
        """A sync waiter's watch on ``key``, woken by a settle of it on any machine.

        Args:
            key: The stored key.

        Returns:
            A ``PostgresWatch``: marked and listening when this returns (so that the caller's
            next look sees any settle it is not woken for), polling if LISTEN fails.
        """
        return PostgresWatch(self, key)

    def awatch(self, key: str) -> PostgresAsyncWatch:
        """An async waiter's watch on ``key``, woken by a settle of it on any machine.

        Args:
            key: The stored key.

        Returns:
            A ``PostgresAsyncWatch``, marked and listening once entered (``async with``).
        """
        return PostgresAsyncWatch(self, key)

    def _cannot_listen(self, exc: BaseException) -> None:
        """Say once that waiters poll, since LISTEN/NOTIFY failed with ``exc``."""
        if self._told_polling:
            logger.debug("idemfn: %r: LISTEN/NOTIFY failed again: %s", self, _cause(exc))
            return
        self._told_polling = True
        logger.warning(
            "idemfn: %r cannot wake waiters through LISTEN/NOTIFY (%s): a caller waiting for a"
            " busy key looks at it again now and then instead, and may wake later than its"
            " owner settles it",
            self,
            _cause(exc),
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
            sides = list(self._sides.values())
            self._sides.clear()
            idle = self._idle if self._listen_pid == os.getpid() else []
            self._idle = []
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


def _still_in(current: _Transaction) -> None:
    """Raise, as a database error of the body's, when the body left the transaction its ok record
    is to be written in: ended it (COMMIT or ROLLBACK on its connection), or let an error it
    caught abort it. Written anyway, the record would commit on its own (issue 14)."""
    import psycopg

    status = current.conn.info.transaction_status
    status_of = psycopg.pq.TransactionStatus
    conn, block = (
        ("current_async_connection()", "async with")
        if current.is_async
        else ("current_connection()", "with")
    )
    if status == status_of.INERROR:
        raise psycopg.errors.InFailedSqlTransaction(
            f"the body of key {current.key!r} returned, but a database error it caught had"
            " aborted its transaction: none of its writes commit, nor its ok record. To go on"
            " after a statement that may fail, run it in a savepoint:"
            f" `{block} idemfn.{conn}.transaction(): ...`"
        )
    if status == status_of.IDLE:
        raise psycopg.ProgrammingError(
            f"the body of key {current.key!r} ended its transaction itself (COMMIT or ROLLBACK"
            f" on idemfn.{conn}): its writes did not commit together with its ok"
            " record, which is not written. idemfn commits the transaction when the body"
            f" returns; inside it, use a savepoint: `{block} conn.transaction(): ...`"
        )


def _did_not_commit(exc: BaseException, key: str) -> None:
    """Note on ``exc``, raised by a transactional body's COMMIT, what did not happen."""
    from .._engine import _add_note  # (the engine imports the stores)

    _add_note(
        exc,
        f"idemfn: the transaction of key {key!r} did not commit: neither the body's"
        " writes nor its ok record were written",
    )


class PostgresWatch(LocalWatch):
    """A sync waiter's watch on one key of a ``PostgresStore``: ``wait(seconds)`` returns when
    a settle of the key (by any process, on any machine) is notified, or after ``seconds``.

    Made on a connection of its own that LISTENs on the table's channel (one the process kept
    from an earlier watch, or a new one), which holds the key's mark until ``close``: a settle
    of the key NOTIFYs while it is held, and one that came first has committed by the time it
    is taken (see ``idemfn._stores.postgres``). If LISTEN fails, it logs once, sets
    ``hears_others`` to False and waits as the default watch does (this process's settles wake
    it; others are seen by looking again); it never raises.
    """

    hears_others = True

    def __init__(self, store: PostgresStore, key: str) -> None:
        super().__init__(key)
        self._store = store
        self._mark = (_table_mark(store.table), key)
        self._payload = _payload(key)
        self._conn = store._listening(self._mark)
        if self._conn is None:
            self.hears_others = False

    def wait(self, seconds: float) -> None:
        """Block until the key may have settled, or for ``seconds``; never raises."""
        conn = self._conn
        if conn is None:
            super().wait(seconds)
            return
        try:
            with contextlib.closing(conn.notifies(timeout=max(seconds, 0.0))) as notes:
                for note in notes:
                    if note.payload == self._payload:
                        return
        except self._store._psycopg_error as exc:  # lost: it polls from now on
            self._conn = None
            self.hears_others = False
            _finish(conn)
            self._store._cannot_listen(exc)
            # Returns now, as woken: the caller looks again (a settle may have gone unheard).

    def close(self) -> None:
        """Stop watching: let go of the mark, and keep the connection for the next watch."""
        super().close()
        conn, self._conn = self._conn, None
        if conn is not None:
            self._store._unlisten(conn, self._mark)


class PostgresAsyncWatch(LocalAsyncWatch):
    """An async waiter's watch on one key of a ``PostgresStore``: ``await wait(seconds)``
    returns when a settle of the key (by any process, on any machine) is notified, or after
    ``seconds``, never blocking the event loop.

    Entering it (``async with``) marks the key, through the two connections the store keeps
    for this event loop's watches (one LISTENs and hands each notification to the watches of
    its key; the other holds their marks). If LISTEN fails, it logs once, sets
    ``hears_others`` to False and waits as the default watch does; ``wait`` never raises but
    ``CancelledError``.
    """

    hears_others = True

    def __init__(self, store: PostgresStore, key: str) -> None:
        super().__init__(key)
        self._store = store
        self._mark = (_table_mark(store.table), key)
        self._payload = _payload(key)
        self._listener: _Listener | None = None
        self._started = self._marked = False

    async def __aenter__(self) -> PostgresAsyncWatch:
        await self._start()
        return self

    async def _start(self) -> None:
        self._started = True
        try:
            listener = await self._store._alistener()
            if listener is not None:
                listener.add(self._payload, self)
                self._listener = listener
                self._marked = await listener.mark(self._store, self._mark)
        except BaseException:  # cancelled (a mark taken meanwhile is let go: Listener.mark)
            await self.aclose()
            raise
        if not self._marked:
            self._leave()
            self.hears_others = False

    async def wait(self, seconds: float) -> None:
        """Wait until the key may have settled, or for ``seconds``."""
        if not self._started:  # (used without ``async with``)
            await self._start()
        await super().wait(seconds)

    def _lost(self) -> None:
        """Its listener broke: hear this process's settles only, and look again now (a settle
        may have gone unheard)."""
        self._listener = None
        self._marked = False  # (gone with their connection)
        self.hears_others = False
        self._wake()

    def _leave(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.discard(self._payload, self)
            if self._marked:
                listener.unmark(self._store, self._mark)
        self._marked = False

    async def aclose(self) -> None:
        """Stop watching: let go of the mark (in the background: an exit never waits)."""
        self._leave()
        await super().aclose()


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
    # The last condition of each settling write (see the module's docstring): true, and a
    # NOTIFY when the key is watched, that is when its transaction cannot take the key's mark.
    # Last: PostgreSQL evaluates a row's conditions cheapest first and stops at the first false,
    # so it runs on the row written only (were it not, a waiter would be woken for nothing).
    # Computed by the server from the row's key: the write takes no more parameters than it did.
    payload = (
        f"CASE WHEN length({t}.key) <= {_PAYLOAD_CHARS} THEN {t}.key ELSE 'sha256:' ||"
        f" encode(sha256(convert_to({t}.key, 'UTF8')), 'hex') END"
    )
    wake = (
        f"CASE WHEN pg_try_advisory_xact_lock({_table_mark(table)}, hashtext({t}.key)) THEN true"
        f" ELSE pg_notify('{_channel(table)}', {payload}) IS NOT NULL END"
    )
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
        # A takeover (a claim written over a claim): its lease row goes, nobody is woken.
        "take": f"WITH tidied AS (DELETE FROM {lt} WHERE key = %(key)s AND token ="
        f" %(fence)s) UPDATE {t} SET live = %(live)s, token = %(token)s, expires_at ="
        " %(expires_at)s, drop_at = %(drop_at)s, entry = %(entry)s WHERE key = %(key)s AND"
        f" live = %(fence)s",
        # The settling writes, which wake the key's watchers (wake).
        "swap": f"UPDATE {t} SET live = %(live)s, token = %(token)s, expires_at = %(expires_at)s,"
        f" drop_at = %(drop_at)s, entry = %(entry)s WHERE key = %(key)s AND live = %(fence)s"
        f" AND {wake}",
        "swap_tidy": f"WITH tidied AS (DELETE FROM {lt} WHERE key = %(key)s AND token ="
        f" %(fence)s) UPDATE {t} SET live = %(live)s, token = %(token)s, expires_at ="
        " %(expires_at)s, drop_at = %(drop_at)s, entry = %(entry)s WHERE key = %(key)s AND"
        f" live = %(fence)s AND {wake}",
        "release": f"DELETE FROM {t} WHERE key = %(key)s AND live = %(token)s AND {wake}",
        "release_tidy": f"WITH tidied AS (DELETE FROM {lt} WHERE key = %(key)s AND token ="
        f" %(token)s) DELETE FROM {t} WHERE key = %(key)s AND live = %(token)s AND {wake}",
        "delete": f"WITH tidied AS (DELETE FROM {lt} WHERE key = %(key)s AND (%(token)s::text IS"
        f" NULL OR token = %(token)s)) DELETE FROM {t} WHERE key = %(key)s"
        f" AND (%(token)s::text IS NULL OR token = %(token)s) AND {wake} RETURNING expires_at",
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
        "listen": f'LISTEN "{_channel(table)}"',
    }


def _channel(table: str) -> str:
    """The channel the settles of ``table``'s keys are notified on: ``<table>_settled``, or for
    a name too long for that (a channel is a name: 63 bytes) a cut one made unique by a hash."""
    name = f"{table}_settled"
    return name if len(name) <= 63 else f"{table[:45]}_{zlib.crc32(table.encode()):08x}_settled"


def _table_mark(table: str) -> int:
    """The first half of the advisory locks that mark ``table``'s keys watched (the second is
    the key's ``hashtext``): its CRC-32 as an int4. Two int4, a space apart from the one-bigint
    locks applications most often take, and from the tables' own. Keys whose hashes collide
    only wake each other's waiters."""
    crc = zlib.crc32(table.encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


def _payload(key: str) -> str:
    """What a settle of ``key`` NOTIFYs, as the server computes it (``_statements``)."""
    if len(key) <= _PAYLOAD_CHARS:
        return key
    return f"sha256:{hashlib.sha256(key.encode()).hexdigest()}"


async def _result(cur: Any) -> Any:
    """An async cursor's rows, or its row count when the statement returns none (told by its
    result's fields: ``cur.description`` builds a list of columns, ~2 µs a call)."""
    if not cur.pgresult.nfields:
        return cur.rowcount
    return await cur.fetchall()


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
