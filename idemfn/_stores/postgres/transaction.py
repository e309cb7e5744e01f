"""The transactional mode: the transaction a ``transactional=True`` body runs in, and what
its body reaches it by (``current_connection()``, ``current_async_connection()``).

``PostgresStore.transaction``/``atransaction`` open it; ``_swap`` writes the ok record in it
after ``_still_in`` checked the body left it open.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

    from .store import PostgresStore


class _Transaction:
    """The transaction of the transactional call running in this context."""

    __slots__ = ("conn", "fence", "is_async", "key", "running", "store")

    def __init__(
        self, store: PostgresStore, key: str, conn: Any, *, is_async: bool = False
    ) -> None:
        from ..._engine import _running  # (the engine imports the stores)

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
    from ..._engine import _running

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
    from ..._engine import _add_note  # (the engine imports the stores)

    _add_note(
        exc,
        f"idemfn: the transaction of key {key!r} did not commit: neither the body's"
        " writes nor its ok record were written",
    )
