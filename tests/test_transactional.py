"""PostgreSQL transactional mode (``transactional=True``) against a real server (issue 14).

- The body's own database errors reach the caller and ``retry_on`` as themselves; only
  idemfn's own statements become ``StoreError``.
- A transaction that does not commit (an error at COMMIT) settles the key at once, as the
  body raising that error would: halted with it, or released when it is in ``retry_on``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.errors import IntegrityError, UniqueViolation

import idemfn
from idemfn import PostgresStore, Status, StoreError, idempotent

from .servers import PostgresServer


@pytest.fixture
def table() -> str:
    return f"t_{uuid.uuid4().hex}"


@pytest.fixture
def store(postgres_server: PostgresServer, table: str) -> Iterator[PostgresStore]:
    s = PostgresStore(postgres_server.dsn, table=table)
    yield s
    s.close()


def _ledger(server: PostgresServer, constraint: str = "") -> str:
    """A table the bodies write to, in the store's database, with one row ('o-1', 1)."""
    name = f"ledger_{uuid.uuid4().hex}"
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (order_id text, cents int{constraint})")
        conn.execute(f"INSERT INTO {name} VALUES ('o-1', 1)")
    return name


def _rows(server: PostgresServer, name: str) -> list[tuple[str, int]]:
    with psycopg.connect(server.dsn) as conn:
        return conn.execute(f"SELECT order_id, cents FROM {name} ORDER BY 1, 2").fetchall()


# -- 1. The body's own database errors are the body's --------------------------------------


@pytest.mark.parametrize("transactional", [False, True])
def test_a_database_error_of_the_body_reaches_the_caller_and_retry_on_as_itself(
    postgres_server: PostgresServer, store: PostgresStore, transactional: bool
) -> None:
    ledger = _ledger(postgres_server, ", UNIQUE (order_id)")
    runs: list[str] = []

    def body(order_id: str) -> int:
        runs.append(order_id)
        with psycopg.connect(postgres_server.dsn) as own:
            conn = idemfn.current_connection() if transactional else own
            conn.execute(f"INSERT INTO {ledger} VALUES (%s, 2)", (order_id,))
        return 2

    retried = idempotent(key="r:{order_id}", store=store, transactional=transactional,
                         retry_on=UniqueViolation)(body)  # fmt: skip
    with pytest.raises(UniqueViolation):
        retried("o-1")
    assert retried.status("o-1") is None  # released, as for any exception in retry_on
    with pytest.raises(UniqueViolation):
        retried("o-1")
    assert runs == ["o-1", "o-1"]

    halting = idempotent(key="h:{order_id}", store=store, transactional=transactional)(body)
    with pytest.raises(UniqueViolation):
        halting("o-1")
    record = halting.status("o-1")
    assert record is not None and record.status is Status.HALTED
    assert record.exc_type == "psycopg.errors.UniqueViolation"
    with pytest.raises(UniqueViolation):  # replayed as itself; the body does not run again
        halting("o-1")
    assert runs == ["o-1", "o-1", "o-1"]
    assert _rows(postgres_server, ledger) == [("o-1", 1)]


def test_a_transaction_that_cannot_start_releases_the_key_it_never_ran(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[int] = []
    armed: list[bool] = []
    real_transaction, real_getconn = store.transaction, store._getconn

    def transaction(key: str) -> Any:
        armed.append(True)
        return real_transaction(key)

    def getconn(pool: Any) -> Any:
        if armed == [True]:  # the connection of the first transaction only
            armed.append(False)
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return real_getconn(pool)

    monkeypatch.setattr(store, "transaction", transaction)
    monkeypatch.setattr(store, "_getconn", getconn)

    @idempotent(key="k", store=store, transactional=True)
    def body() -> int:
        runs.append(1)
        return 1

    with pytest.raises(StoreError, match=r"could not start the transaction of '[^']*:k'"):
        body()
    assert runs == []
    assert body.status() is None  # nothing ran: the next call runs it
    assert body() == 1 and runs == [1]


# -- 2. A transaction that does not commit settles the key at once ---------------------------


@pytest.mark.parametrize("retry", [False, True])
def test_an_error_at_commit_settles_the_key_at_once(
    postgres_server: PostgresServer, store: PostgresStore, retry: bool
) -> None:
    # A deferred constraint: the body's INSERT passes, COMMIT fails. Nothing was committed,
    # neither the body's row nor the ok record.
    ledger = _ledger(postgres_server, ", UNIQUE (order_id) DEFERRABLE INITIALLY DEFERRED")
    runs: list[str] = []

    @idempotent(key="{order_id}", store=store, transactional=True,
                retry_on=IntegrityError if retry else ())  # fmt: skip
    def charge(order_id: str) -> int:
        runs.append(order_id)
        idemfn.current_connection().execute(f"INSERT INTO {ledger} VALUES (%s, 2)", (order_id,))
        return 2

    with pytest.raises(UniqueViolation) as info:
        charge("o-1")
    assert "did not commit" in "".join(getattr(info.value, "__notes__", []))
    assert _rows(postgres_server, ledger) == [("o-1", 1)]
    record = charge.status("o-1")
    if retry:
        assert record is None  # released: the next call runs the body again
        with pytest.raises(UniqueViolation):
            charge("o-1")
        assert runs == ["o-1", "o-1"]
    else:
        # Halted with the real reason, at once: not processing until a lease runs out.
        assert record is not None and record.status is Status.HALTED
        assert record.exc_type == "psycopg.errors.UniqueViolation"
        with pytest.raises(UniqueViolation):  # a replay, not AlreadyRunning
            charge("o-1")
        assert runs == ["o-1"]
    assert charge("o-2") == 2  # a body that commits records ok as before
    assert _rows(postgres_server, ledger) == [("o-1", 1), ("o-2", 2)]


def test_a_commit_whose_answer_is_lost_but_that_committed_returns_the_value(
    postgres_server: PostgresServer,
    store: PostgresStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The connection drops after the server committed, before its answer arrived: the error
    # says the transaction failed, the record says it committed. The record is right.
    ledger = _ledger(postgres_server)
    real_transaction = store.transaction

    @contextlib.contextmanager
    def answer_lost(key: str) -> Iterator[Any]:
        with real_transaction(key) as conn:
            yield conn
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(store, "transaction", answer_lost)

    @idempotent(key="{order_id}", store=store, transactional=True)
    def charge(order_id: str) -> int:
        idemfn.current_connection().execute(f"INSERT INTO {ledger} VALUES (%s, 3)", (order_id,))
        return 3

    assert charge("o-3") == 3
    record = charge.status("o-3")
    assert record is not None and record.status is Status.OK
    assert _rows(postgres_server, ledger) == [("o-1", 1), ("o-3", 3)]
    assert "yet its ok record is there" in caplog.text
