"""Wake-ups through LISTEN/NOTIFY (see the package's docstring): the watches a waiter opens
(``PostgresWatch``, ``PostgresAsyncWatch``), the listener an event loop's async watches share
(``_Listener``), and the statements and limits of a waiter's mark on its key.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any

from ..._wakeups import LocalAsyncWatch, LocalWatch
from .connections import _finish
from .statements import _payload, _table_mark

if TYPE_CHECKING:
    from .store import PostgresStore


#: A watch marks its key within this long, else it polls: a mark waits only for a settle of the
#: key that took the lock first to commit (see the package's docstring).
_MARK_WAIT_MS = 10_000
#: After LISTEN failed, watches poll for this long before they try again (a server that refuses
#: LISTEN, or is down, is not asked again by every waiter).
_RELISTEN = 10.0
#: Idle listening connections a process keeps for its next sync watches.
_IDLE_LISTENERS = 4
_LOCK_TIMEOUT = f"SET lock_timeout = {_MARK_WAIT_MS}"


#: A waiter's mark on a key, taken and let go with (the table's mark, the key): the server
#: hashes the key as each settling write does (``_statements``: their last condition).
_MARK = "SELECT pg_advisory_lock_shared(%s::int4, hashtext(%s))"
_UNMARK = "SELECT pg_advisory_unlock_shared(%s::int4, hashtext(%s))"


class _NoListen(Exception):
    """LISTEN was accepted but a NOTIFY did not come back; the message says so."""


_tasks: set[Any] = set()  # background tasks, kept until done (the loop keeps only weak refs)


def _background(work: Any) -> Any:
    """Run the coroutine ``work`` in a task of the running loop, kept until it ends."""
    import asyncio

    task = asyncio.get_running_loop().create_task(work)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


class _Listener:
    """The two connections a store's async watches on one event loop share (see the package's
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
