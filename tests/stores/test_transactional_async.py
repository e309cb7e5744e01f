"""PostgreSQL transactional mode for ``async def`` bodies (issue 16): the body writes on
``idemfn.current_async_connection()``, and its writes and the key's ``ok`` record commit
together, or neither does, exactly as for a sync body (tests/stores/test_transactional.py)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.errors import IntegrityError, UniqueViolation

import idemfn
from idemfn import PostgresStore, Status, idempotent
from tests.support.postgres_tools import ledger_rows, ledger_table
from tests.support.servers import PostgresServer


@pytest.fixture
def store(postgres_server: PostgresServer) -> Iterator[PostgresStore]:
    s = PostgresStore(postgres_server.dsn, table=f"t_{uuid.uuid4().hex}")
    yield s
    s.close()


def test_the_writes_of_an_async_body_commit_with_its_ok_record(
    postgres_server: PostgresServer, store: PostgresStore
) -> None:
    ledger = ledger_table(postgres_server)
    runs: list[str] = []

    @idempotent(key="{order_id}", store=store, transactional=True)
    async def charge(order_id: str) -> int:
        runs.append(order_id)
        conn = idemfn.current_async_connection()
        assert isinstance(conn, psycopg.AsyncConnection)
        await conn.execute(f"INSERT INTO {ledger} VALUES (%s, 2)", (order_id,))
        return 2

    async def main() -> list[int]:
        return [await charge("o-2"), await charge("o-2")]

    assert asyncio.run(main()) == [2, 2]
    assert asyncio.run(main()) == [2, 2]  # another loop: the record replays, nothing reruns
    assert runs == ["o-2"]
    record = charge.status("o-2")
    assert record is not None and record.status is Status.OK
    assert ledger_rows(postgres_server, ledger) == [("o-1", 1), ("o-2", 2)]


@pytest.mark.parametrize("retry", [False, True])
def test_an_async_body_that_raises_rolls_its_writes_back(
    postgres_server: PostgresServer, store: PostgresStore, retry: bool
) -> None:
    ledger = ledger_table(postgres_server)
    runs: list[str] = []

    @idempotent(
        key="{order_id}", store=store, transactional=True, retry_on=ValueError if retry else ()
    )
    async def charge(order_id: str) -> int:
        runs.append(order_id)
        conn = idemfn.current_async_connection()
        await conn.execute(f"INSERT INTO {ledger} VALUES (%s, 3)", (order_id,))
        raise ValueError("card declined")

    for _ in range(2):
        with pytest.raises(ValueError, match="card declined"):
            asyncio.run(charge("o-3"))
    assert ledger_rows(postgres_server, ledger) == [("o-1", 1)]
    record = charge.status("o-3")
    if retry:
        assert record is None and runs == ["o-3", "o-3"]  # released: each call runs it
    else:
        assert record is not None and record.status is Status.HALTED
        assert runs == ["o-3"]  # the second call replayed the exception


@pytest.mark.parametrize("retry", [False, True])
def test_an_error_at_the_async_commit_settles_the_key_at_once(
    postgres_server: PostgresServer, store: PostgresStore, retry: bool
) -> None:
    ledger = ledger_table(postgres_server, ", UNIQUE (order_id) DEFERRABLE INITIALLY DEFERRED")
    runs: list[str] = []

    @idempotent(
        key="{order_id}", store=store, transactional=True, retry_on=IntegrityError if retry else ()
    )
    async def charge(order_id: str) -> int:
        runs.append(order_id)
        conn = idemfn.current_async_connection()
        await conn.execute(f"INSERT INTO {ledger} VALUES (%s, 2)", (order_id,))
        return 2

    with pytest.raises(UniqueViolation):
        asyncio.run(charge("o-1"))
    assert ledger_rows(postgres_server, ledger) == [("o-1", 1)]
    record = charge.status("o-1")
    if retry:
        assert record is None
    else:
        assert record is not None and record.status is Status.HALTED
        assert record.exc_type == "psycopg.errors.UniqueViolation"
        with pytest.raises(UniqueViolation):  # a replay, not AlreadyRunning
            asyncio.run(charge("o-1"))
        assert runs == ["o-1"]


def test_an_async_commit_whose_answer_is_lost_but_that_committed_returns_the_value(
    postgres_server: PostgresServer,
    store: PostgresStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ledger = ledger_table(postgres_server)
    real_transaction = store.atransaction

    @contextlib.asynccontextmanager
    async def answer_lost(key: str) -> AsyncIterator[Any]:
        async with real_transaction(key) as conn:
            yield conn
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(store, "atransaction", answer_lost)

    @idempotent(key="{order_id}", store=store, transactional=True)
    async def charge(order_id: str) -> int:
        conn = idemfn.current_async_connection()
        await conn.execute(f"INSERT INTO {ledger} VALUES (%s, 3)", (order_id,))
        return 3

    assert asyncio.run(charge("o-3")) == 3
    record = charge.status("o-3")
    assert record is not None and record.status is Status.OK
    assert "yet its ok record is there" in caplog.text


def test_a_cancelled_async_body_rolls_back_and_halts(
    postgres_server: PostgresServer, store: PostgresStore
) -> None:
    ledger = ledger_table(postgres_server)
    inserted = asyncio.Event

    @idempotent(key="{order_id}", store=store, transactional=True, fingerprint=["order_id"])
    async def charge(order_id: str, written: asyncio.Event) -> int:
        conn = idemfn.current_async_connection()
        await conn.execute(f"INSERT INTO {ledger} VALUES (%s, 4)", (order_id,))
        written.set()
        await asyncio.Event().wait()  # until cancelled
        return 4

    async def main() -> None:
        written = inserted()
        task = asyncio.ensure_future(charge("o-4", written))
        await asyncio.wait_for(written.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert ledger_rows(postgres_server, ledger) == [("o-1", 1)]
    record = charge.status("o-4", None)  # type: ignore[arg-type]
    assert record is not None and record.status is Status.HALTED
    assert record.exc_type == "asyncio.exceptions.CancelledError"


def test_current_async_connection_outside_an_async_transactional_body(
    store: PostgresStore,
) -> None:
    with pytest.raises(RuntimeError, match="transactional=True"):
        idemfn.current_async_connection()

    @idempotent(key="k", store=store, transactional=True)
    def sync_body() -> None:
        idemfn.current_async_connection()  # a sync body's is current_connection()

    with pytest.raises(RuntimeError):
        sync_body()


def test_an_async_body_needs_a_store_with_async_transactions(store: PostgresStore) -> None:
    class SyncTransactionsOnly(PostgresStore):
        atransaction = None  # type: ignore[assignment]

    only_sync = SyncTransactionsOnly.__new__(SyncTransactionsOnly)
    only_sync.__dict__.update(store.__dict__)

    async def body() -> None: ...

    with pytest.raises(TypeError, match="async transactions"):
        idempotent(key="k", store=only_sync, transactional=True)(body)
