"""The store's connections outside its sync pool: the renewals' own connection (``_Renewer``),
the pool's connection attempts (``_Attempts``), each event loop's pool (``_LoopPool``) and
side (``_Side``, closed when its loop shuts down), connections a forked child must leave
alone, the timeouts, and how a ``StoreError`` names a failure and the server.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import select
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

from ..awaiting import within
from . import pooling

if TYPE_CHECKING:
    import asyncio

    import psycopg

    from .listen import _Listener
    from .store import PostgresStore


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


def _dropped(conn: Any) -> bool:
    """Whether the idle connection ``conn`` (sync or async) has been dropped by its server: it
    has input waiting (the server's goodbye, or end of file), which an idle connection never
    has otherwise. A failover, a restart or ``pg_terminate_backend`` drops every connection: a
    statement sent on one failed, and an owner's outcome written on one was not recorded (issue
    19). One ``poll`` (~1 µs), no round trip; a server that vanished without a word is not
    seen (its statement fails, as before)."""
    try:
        probe = select.poll()
        probe.register(conn.pgconn.socket, select.POLLIN)
        return bool(probe.poll(0))
    except Exception:  # no socket: closed, or broken
        return True


def _connection_lost(exc: BaseException) -> bool:
    """Whether the ``StoreError`` ``exc`` came from a connection lost under its statement (the
    server went: a failover, a restart, a terminated backend), not from the statement itself,
    nor from no connection at all: the statement may or may not have landed."""
    import psycopg
    import psycopg_pool

    cause = exc.__cause__
    return (
        isinstance(cause, psycopg.OperationalError)
        and not isinstance(cause, psycopg_pool.PoolTimeout)
        # None: libpq's own (the socket closed); 57P..: the server's goodbye (shut down,
        # crashed, terminated); 08...: a connection exception, which a pooler sends when the
        # server connection died under the statement (PgBouncer: 08P01 "server conn crashed?").
        and (cause.sqlstate is None or cause.sqlstate.startswith(("57P", "08")))
    )


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


class _LoopPool:
    """The connections of one event loop's async callers, made by the store (``connect``).

    Not a ``psycopg_pool.AsyncConnectionPool``: that pool connects in tasks of its own, which
    swallow ``CancelledError`` to keep their count right, and ``asyncio.run`` cancels every task
    as it ends, then waits for each: a loop that ended while its pool was connecting (a first
    call grows the pool as its first connection is made) never returned. Here a connection is
    made in the caller's task, when none is idle and fewer than ``max_size`` exist: a cancelled
    caller cancels its own connect, and the pool owns no task.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        max_size: int,
        busy_wait: float,
        dropped: Callable[[], None] = lambda: None,
    ) -> None:
        self._connect = connect  # a new connection (awaitable), or _NoConnection
        self._dropped = dropped  # called for each idle connection its server dropped
        self.max_size = max_size
        self._busy_wait = busy_wait
        self._idle: list[Any] = []
        # The binary cursor each connection keeps between statements (see _KEPT_BYTES).
        self.cursors: dict[Any, Any] = {}
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
                    if not _dropped(conn):
                        return conn
                    self._dropped()
                _finish(conn)
                self.cursors.pop(conn, None)
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
                given = await within(waiter, max(0.0, give_up - time.monotonic()))
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
            self.cursors.pop(conn, None)
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


def _cause(exc: BaseException) -> str:
    """What a ``StoreError`` says of ``exc``, on one line (libpq adds hints on more)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, _NoConnection):
        return text
    return f"{type(exc).__name__}: {text}{pooling.hint(exc)}"  # (a pooler's lost statement)


def _describe(info: dict[str, Any]) -> str:
    user = info.get("user") or ""
    db = info.get("dbname") or user or ""
    return f"postgresql://{user + '@' if user else ''}{_hosts(info)}/{db}"


def _hosts(info: dict[str, Any]) -> str:
    """``host:port`` (a socket directory alone), comma-separated for a connection string that
    lists several hosts (``host=a,b port=5432,5433``, a primary and its standby: issue 19), each
    with its own port, or the one port given for all, as libpq pairs them."""
    hosts = str(info.get("host") or "localhost").split(",")
    ports = str(info.get("port") or "5432").split(",")
    if len(ports) != len(hosts):
        ports = [ports[0]] * len(hosts)  # libpq: one port for every host
    return ",".join(
        h if h.startswith("/") else f"{h or 'localhost'}:{p or '5432'}"
        for h, p in zip(hosts, ports, strict=True)
    )
