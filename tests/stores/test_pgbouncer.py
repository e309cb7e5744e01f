"""PostgresStore behind PgBouncer in transaction pooling mode (issue 19).

The conformance suite runs through PgBouncer too (store kind ``postgres-pgbouncer``, and racing
processes through ``?transaction_pooling=true`` in tests/contract/test_processes.py). Here:

- ``transaction_pooling`` is on from the argument or the connection string's parameter, which
  libpq never sees; a given pool whose connections prepare statements is refused.
- Without it, session state stays on PgBouncer's server connections: psycopg's prepared
  statements (and the error a pooler gives them names the option), a waiter's LISTEN and its
  session advisory lock; and the LISTEN probe is fooled, so only the option can tell.
- With it, a burst of every kind of call (first calls, replays, waits sync and async, renewals,
  transactional bodies, prune) leaves nothing on any server connection.
- Waiters get their outcome by polling, sync and async, from an owner in another process.
- The transactional mode commits (or rolls back) the body's writes with its ok record.

Each test that inspects server connections runs on a PgBouncer of its own (``bouncer``): state a
test left behind must not be seen by the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg_pool
import pytest

import idemfn
from idemfn import PostgresStore, StoreError, idempotent
from idemfn._stores.postgres import current_async_connection, current_connection
from idemfn._stores.postgres.connections import _cause
from tests.support.cli import cli_env, idemfn_cli
from tests.support.deployments.pgbouncer import PgBouncer
from tests.support.postgres_tools import ledger_rows, ledger_table
from tests.support.servers import PostgresServer
from tests.support.workers import poll


@pytest.fixture
def bouncer(postgres_server: PostgresServer) -> Iterator[PgBouncer]:
    """A PgBouncer of this test's own (its server connections close with it)."""
    b = PgBouncer(postgres_server)
    yield b
    b.remove()


def _table() -> str:
    return f"t_{uuid.uuid4().hex}"


@contextlib.contextmanager
def _closing(*stores: PostgresStore) -> Iterator[None]:
    try:
        yield
    finally:
        for store in stores:
            store.close()


@contextlib.contextmanager
def _holding_the_last_server_connection(bouncer: PgBouncer) -> Iterator[int]:
    """Hold the server connection PgBouncer lent last (it lends the most recently returned
    first) in a transaction of another client: a session's next transaction runs on another."""
    with psycopg.connect(bouncer.dsn, prepare_threshold=None) as holder:
        row = holder.execute("SELECT pg_backend_pid()").fetchone()  # (BEGIN: held until exit)
        assert row is not None
        yield int(row[0])


# -- 1. The option, and the connection string's parameter --------------------------------------


@pytest.mark.parametrize(
    ("suffix", "on"),
    [
        ("&transaction_pooling=true", True),
        ("&transaction_pooling=1", True),
        ("&transaction_pooling=false", False),
        ("", False),
    ],
)
def test_the_url_parameter_sets_the_option_and_never_reaches_libpq(
    pgbouncer: PgBouncer, suffix: str, on: bool
) -> None:
    store = PostgresStore(pgbouncer.url + suffix, table=_table())
    with _closing(store):
        assert store.transaction_pooling is on
        assert ("transaction_pooling=True" in repr(store)) is on
        assert store.get("absent") is None  # libpq took the connection string


def test_the_cli_reaches_the_store_through_pgbouncer_with_the_parameter(
    pgbouncer: PgBouncer,
) -> None:
    url = f"{pgbouncer.url}&transaction_pooling=true"
    store = PostgresStore(url)  # (not open_store's: another test may drop its table)
    key = f"cli-{uuid.uuid4().hex}"
    with _closing(store):
        idempotent(key=key, store=store, name="cli")(lambda: "done")()
    listed = idemfn_cli("ls", env=cli_env(url)).stdout.decode()
    assert f"cli:{key}" in listed


def test_the_keyword_form_and_the_argument_set_the_option_too(pgbouncer: PgBouncer) -> None:
    keyword = PostgresStore(f"{pgbouncer.dsn} transaction_pooling=on", table=_table())
    argument = PostgresStore(pgbouncer.dsn, table=_table(), transaction_pooling=True)
    with _closing(keyword, argument):
        for store in (keyword, argument):
            assert store.transaction_pooling
            assert store.get("absent") is None


def test_a_bad_value_of_the_parameter_is_refused_naming_it(pgbouncer: PgBouncer) -> None:
    with pytest.raises(ValueError, match=r"transaction_pooling parameter .* true or false"):
        PostgresStore(pgbouncer.url + "&transaction_pooling=maybe")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_given_pool_must_not_prepare_statements(pgbouncer: PgBouncer, kind: str) -> None:
    cls: Any = psycopg_pool.ConnectionPool if kind == "sync" else psycopg_pool.AsyncConnectionPool
    preparing = cls(pgbouncer.dsn, open=False, kwargs={"autocommit": True})
    with pytest.raises(ValueError, match="prepare_threshold': None"):
        PostgresStore(preparing, transaction_pooling=True)
    if kind == "async":
        return
    with cls(pgbouncer.dsn, kwargs={"autocommit": True, "prepare_threshold": None}) as pool:
        store = PostgresStore(pool, table=_table(), transaction_pooling=True)
        with _closing(store):
            fn = idempotent(key="k{i}", store=store)(lambda i: i * 2)
            assert [fn(i % 3) for i in range(12)] == [i % 3 * 2 for i in range(12)]


# -- 2. Without the option: session state stays on server connections -------------------------


def test_without_the_option_a_pooler_losing_a_prepared_statement_names_the_option(
    bouncer: PgBouncer,
) -> None:
    """Two clients each prepare ``_pg3_0`` (psycopg, after a statement's 5th execution) on the
    same server connection: PgBouncer 1.18 passes the second Parse through, and PostgreSQL
    says it already exists. The StoreError says what to do."""
    table = _table()
    first, second = PostgresStore(bouncer.dsn, table=table), PostgresStore(bouncer.dsn, table=table)
    with _closing(first, second):
        for _ in range(6):
            first.get("a")
        for _ in range(5):
            second.get("b")
        with pytest.raises(StoreError, match=r"_pg3_0.*transaction_pooling=True") as raised:
            second.get("b")  # its 6th: prepared
        assert "?transaction_pooling=true" in str(raised.value)
    assert any("_pg3_0" in b.prepared for b in bouncer.backends())


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.InvalidSqlStatementName('prepared statement "_pg3_2" does not exist'),
        psycopg.errors.DuplicatePreparedStatement('prepared statement "_pg3_0" already exists'),
    ],
)
def test_both_errors_of_a_lost_prepared_statement_name_the_option(error: Exception) -> None:
    assert "transaction_pooling=True" in _cause(error)
    assert "transaction_pooling" not in _cause(psycopg.errors.UniqueViolation("_pg3_0"))


def test_without_the_option_a_waiters_listen_and_lock_stay_on_a_server_connection(
    bouncer: PgBouncer,
) -> None:
    """Why the option is explicit: the LISTEN probe succeeds through PgBouncer (its NOTIFY runs
    on the server connection that LISTENs), then the watch's mark and LISTEN stay on that
    connection when its UNLISTEN and unlock run on another."""
    store = PostgresStore(bouncer.dsn, table=_table())
    with _closing(store):
        store.get("k")  # the table made
        watch = store.watch("k")
        assert watch.hears_others  # fooled: it believes it will be woken
        with _holding_the_last_server_connection(bouncer) as held:
            watch.close()
    left = {b.pid: b for b in bouncer.backends()}[held]
    assert left.listening and left.advisory, left


# -- 3. With it: nothing stays ------------------------------------------------------------------


def _burst(store: PostgresStore, server: PostgresServer, bouncer: PgBouncer) -> None:
    """Every kind of call, each statement run more than psycopg's prepare_threshold times on
    each connection, from several threads and an event loop; and the watch of test 2."""
    runs: list[int] = []

    @idempotent(key="b{i}", store=store, name="burst", wait=60)  # collisions wait, polling
    def body(i: int) -> int:
        runs.append(i)
        return i

    def caller(offset: int) -> None:
        for i in range(40):
            body((offset + i) % 25)  # first calls, replays, and collisions

    threads = [threading.Thread(target=caller, args=(n * 7,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(runs) == list(range(25))

    @idempotent(key="a{i}", store=store, name="aburst")
    async def abody(i: int) -> int:
        await asyncio.sleep(0)
        return i

    async def acalls() -> None:
        for _ in range(3):
            assert await asyncio.gather(*(abody(i) for i in range(10))) == list(range(10))

    asyncio.run(acalls())

    # Renewals, on their own connection.
    claim = idemfn.begin("renewed", store=store)
    assert isinstance(claim, idemfn.Claim)
    for _ in range(7):
        assert claim.renew()
    claim.complete("done")

    # Transactional bodies, sync and async.
    ledger = ledger_table(server)

    @idempotent(key="t{i}", store=store, transactional=True, name="tx")
    def credit(i: int) -> int:
        current_connection().execute(f"INSERT INTO {ledger} VALUES (%s, %s)", (f"t{i}", i))
        return i

    @idempotent(key="at{i}", store=store, transactional=True, name="atx")
    async def acredit(i: int) -> int:
        conn = current_async_connection()
        await conn.execute(f"INSERT INTO {ledger} VALUES (%s, %s)", (f"at{i}", i))
        return i

    for i in range(7):
        assert credit(i) == i
        assert asyncio.run(acredit(i)) == i
    store.prune()

    # A watch, closed while the server connection it last used is held by another client.
    watch = store.watch("b1")
    with _holding_the_last_server_connection(bouncer):
        watch.close()


def test_with_the_option_no_session_state_stays_on_any_server_connection(
    postgres_server: PostgresServer, bouncer: PgBouncer
) -> None:
    store = PostgresStore(bouncer.dsn, table=_table(), transaction_pooling=True)
    with _closing(store):
        _burst(store, postgres_server, bouncer)
        assert not store.watch("k").hears_others

        async def awatched() -> bool:
            async with store.awatch("k") as watch:
                return watch.hears_others

        assert not asyncio.run(awatched())  # (its listener would LISTEN on a server connection)
        backends = bouncer.backends()
    assert len(backends) == bouncer.pool_size
    assert all(b.clean for b in backends), [b for b in backends if not b.clean]
    with psycopg.connect(postgres_server.dsn) as direct:
        held = direct.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        assert held.fetchone() == (0,)


# -- 4. Waiters poll, and get the outcome -------------------------------------------------------


def _own_for_a_while(url: str, key: str, started: Any, go: Any) -> None:
    """Another process: claims ``key``, says so, and finishes once told to."""

    def body() -> str:
        started.set()
        assert go.wait(60)
        return "from the owner"

    idempotent(key=key, store=idemfn.open_store(url), name="owned")(body)()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_waiter_gets_the_outcome_of_another_process_by_polling(
    pgbouncer: PgBouncer, mode: str
) -> None:
    url = f"{pgbouncer.url}&transaction_pooling=true"
    key = f"w{uuid.uuid4().hex}"
    context = multiprocessing.get_context("spawn")
    started, go = context.Event(), context.Event()
    owner = context.Process(target=_own_for_a_while, args=(url, key, started, go))
    owner.start()
    store = PostgresStore(url)  # (not open_store's: another test may drop its table)
    try:
        assert started.wait(60)
        assert store.transaction_pooling
        waiting: list[object] = []

        def body() -> str:
            return "ran here"

        def wait_sync() -> None:
            waiting.append(idempotent(key=key, store=store, name="owned", wait=60)(body)())

        async def wait_async() -> None:
            async def abody() -> str:
                return "ran here"

            fn = idempotent(key=key, store=store, name="owned", wait=60)(abody)
            waiting.append(await fn())

        waiter = threading.Thread(
            target=wait_sync if mode == "sync" else lambda: asyncio.run(wait_async())
        )
        waiter.start()
        poll(lambda: _watched(key), "the waiter to watch the key")
        go.set()
        waiter.join(60)
        assert waiting == ["from the owner"]
    finally:
        go.set()
        owner.join(60)
        store.close()
    assert owner.exitcode == 0


def _watched(key: str) -> bool:
    """Whether a waiter of this process watches ``key`` (the default watch: polled), stored
    under the function's name."""
    from idemfn import _wakeups

    return f"owned:{key}" in _wakeups._watchers


# -- 5. The transactional mode ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_transactional_body_commits_or_rolls_back_with_its_record(
    postgres_server: PostgresServer, pgbouncer: PgBouncer, mode: str
) -> None:
    store = PostgresStore(pgbouncer.dsn, table=_table(), transaction_pooling=True)
    ledger = ledger_table(postgres_server)

    def write(order: str, fail: bool) -> str:
        current_connection().execute(f"INSERT INTO {ledger} VALUES (%s, 5)", (order,))
        if fail:
            raise RuntimeError("after the write")
        return order

    async def awrite(order: str, fail: bool) -> str:
        await current_async_connection().execute(f"INSERT INTO {ledger} VALUES (%s, 5)", (order,))
        if fail:
            raise RuntimeError("after the write")
        return order

    fn: Any = idempotent(key="{order}", store=store, transactional=True, name="tx")(
        write if mode == "sync" else awrite
    )

    def call(*args: Any) -> Any:
        return fn(*args) if mode == "sync" else asyncio.run(fn(*args))

    with _closing(store):
        for i in range(8):  # more than psycopg's prepare_threshold, on the same connections
            assert call(f"o-{i + 2}", False) == f"o-{i + 2}"
            assert call(f"o-{i + 2}", False) == f"o-{i + 2}"  # replayed: not written again
        with pytest.raises(RuntimeError, match="after the write"):
            call("lost", True)
        assert store.get("tx:lost") is not None  # halted, its write rolled back
    expected = sorted([("o-1", 1)] + [(f"o-{i + 2}", 5) for i in range(8)])
    assert ledger_rows(postgres_server, ledger) == expected


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_a_transactional_body_renewed_while_it_runs_commits(
    postgres_server: PostgresServer, pgbouncer: PgBouncer, isolation: str
) -> None:
    """The renewals' own connection goes through PgBouncer too, and never conflicts with the
    body's transaction (PgBouncer refuses a startup ``options``: the level is set in it)."""
    store = PostgresStore(pgbouncer.dsn, table=_table(), transaction_pooling=True)
    ledger = ledger_table(postgres_server)
    renewals: list[float] = []

    # A short lease so that the heartbeat renews it while the body runs; nobody else judges
    # the claim, so how punctual the heartbeat is does not matter.
    @idempotent(key="{order_id}", store=store, transactional=True, lease=0.6)
    def charge(order_id: str) -> int:
        conn = current_connection()
        conn.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation.upper()}")
        conn.execute(f"SELECT count(*) FROM {ledger}")  # the snapshot is taken here

        def renewed() -> bool:
            entry = store.get(charge.key_for(order_id))
            assert entry is not None and entry.status == "processing"
            renewals.append(entry.lease_until)  # type: ignore[arg-type]
            return renewals[-1] != renewals[0]

        poll(renewed, "the heartbeat to renew the lease")
        conn.execute(f"INSERT INTO {ledger} VALUES (%s, 5)", (order_id,))
        return 5

    with _closing(store):
        assert charge("o-5") == 5
        record = charge.status("o-5")
        assert record is not None and record.status.value == "ok"
    assert ledger_rows(postgres_server, ledger) == [("o-1", 1), ("o-5", 5)]
