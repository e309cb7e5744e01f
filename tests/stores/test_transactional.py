"""PostgreSQL transactional mode (``transactional=True``) against a real server (issue 14).

- The body's own database errors reach the caller and ``retry_on`` as themselves; only
  idemfn's own statements become ``StoreError``.
- A transaction that does not commit (an error at COMMIT) settles the key at once, as the
  body raising that error would: halted with it, or released when it is in ``retry_on``.
- Lease renewals never touch what the body's transaction writes, so a body that outlives a
  renewal commits at every isolation level.
- Renewals never wait for a pooled connection: bodies holding every connection of the pool
  are still renewed, and another process judging them finds them alive.

Nothing waits for a lease to run out: the heartbeat's renewals are awaited as conditions, and
the other process judges the leases on a lease clock the test sets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg_pool
import pytest
from psycopg.errors import IntegrityError, UniqueViolation

import idemfn
from idemfn import Claim, Policy, PostgresStore, Status, StoreError, idempotent
from idemfn._engine import run_in_transaction
from idemfn._stores.postgres import _MAX_CONNECTIONS
from tests.support.postgres_tools import ledger_rows, ledger_table
from tests.support.servers import PostgresServer
from tests.support.stores import age
from tests.support.workers import poll


@pytest.fixture
def table() -> str:
    return f"t_{uuid.uuid4().hex}"


@pytest.fixture
def store(postgres_server: PostgresServer, table: str) -> Iterator[PostgresStore]:
    s = PostgresStore(postgres_server.dsn, table=table)
    yield s
    s.close()


# -- 1. The body's own database errors are the body's --------------------------------------


@pytest.mark.parametrize("transactional", [False, True])
def test_a_database_error_of_the_body_reaches_the_caller_and_retry_on_as_itself(
    postgres_server: PostgresServer, store: PostgresStore, transactional: bool
) -> None:
    ledger = ledger_table(postgres_server, ", UNIQUE (order_id)")
    runs: list[str] = []

    def body(order_id: str) -> int:
        runs.append(order_id)
        with psycopg.connect(postgres_server.dsn) as own:
            conn = idemfn.current_connection() if transactional else own
            conn.execute(f"INSERT INTO {ledger} VALUES (%s, 2)", (order_id,))
        return 2

    retried = idempotent(
        key="r:{order_id}", store=store, transactional=transactional, retry_on=UniqueViolation
    )(body)
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
    assert ledger_rows(postgres_server, ledger) == [("o-1", 1)]


def test_a_transaction_that_cannot_start_releases_the_key_it_never_ran(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[int] = []
    armed: list[bool] = []
    real_transaction, real_checkout = store.transaction, store._checkout

    def transaction(key: str) -> Any:
        armed.append(True)
        return real_transaction(key)

    def checkout(pool: Any) -> Any:  # (a spare connection, else the pool's)
        if armed == [True]:  # the connection of the first transaction only
            armed.append(False)
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return real_checkout(pool)

    monkeypatch.setattr(store, "transaction", transaction)
    monkeypatch.setattr(store, "_checkout", checkout)

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
    ledger = ledger_table(postgres_server, ", UNIQUE (order_id) DEFERRABLE INITIALLY DEFERRED")
    runs: list[str] = []

    @idempotent(
        key="{order_id}", store=store, transactional=True, retry_on=IntegrityError if retry else ()
    )
    def charge(order_id: str) -> int:
        runs.append(order_id)
        idemfn.current_connection().execute(f"INSERT INTO {ledger} VALUES (%s, 2)", (order_id,))
        return 2

    with pytest.raises(UniqueViolation) as info:
        charge("o-1")
    assert "did not commit" in "".join(getattr(info.value, "__notes__", []))
    assert ledger_rows(postgres_server, ledger) == [("o-1", 1)]
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
    assert ledger_rows(postgres_server, ledger) == [("o-1", 1), ("o-2", 2)]


def test_a_commit_whose_answer_is_lost_but_that_committed_returns_the_value(
    postgres_server: PostgresServer,
    store: PostgresStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The connection drops after the server committed, before its answer arrived: the error
    # says the transaction failed, the record says it committed. The record is right.
    ledger = ledger_table(postgres_server)
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
    assert ledger_rows(postgres_server, ledger) == [("o-1", 1), ("o-3", 3)]
    assert "yet its ok record is there" in caplog.text


@pytest.mark.parametrize("ending", ["ROLLBACK", "COMMIT", "a caught error"])
def test_a_body_that_leaves_its_transaction_gets_no_ok_record_outside_it(
    postgres_server: PostgresServer, store: PostgresStore, ending: str
) -> None:
    # The ok record commits with the body's writes or not at all. A body that ended the
    # transaction (COMMIT or ROLLBACK on its connection) had the record written on its own,
    # as if its writes had committed with it: after a ROLLBACK, a recorded value whose writes
    # were gone. One whose transaction a caught error aborted got a StoreError, halted as
    # idemfn's. Neither gets an ok record; each is told what went wrong, and the key halts.
    ledger = ledger_table(postgres_server, ", UNIQUE (order_id)")

    @idempotent(key="{order_id}", store=store, transactional=True)
    def charge(order_id: str) -> int:
        conn = idemfn.current_connection()
        conn.execute(f"INSERT INTO {ledger} VALUES (%s, 7)", (order_id,))
        if ending == "a caught error":
            with contextlib.suppress(UniqueViolation):
                conn.execute(f"INSERT INTO {ledger} VALUES ('o-1', 7)")
        else:
            conn.execute(ending)
        return 7

    expected = (
        psycopg.errors.InFailedSqlTransaction
        if ending == "a caught error"
        else psycopg.ProgrammingError
    )
    with pytest.raises(expected) as info:
        charge("o-7")
    assert type(info.value) is expected
    assert "savepoint" in str(info.value)
    record = charge.status("o-7")
    assert record is not None and record.status is Status.HALTED
    assert record.exc_type == f"{expected.__module__}.{expected.__qualname__}"
    committed = [("o-1", 1), ("o-7", 7)] if ending == "COMMIT" else [("o-1", 1)]
    assert ledger_rows(postgres_server, ledger) == committed
    with pytest.raises(expected):  # a replay: the body does not run again
        charge("o-7")


def test_a_body_that_returns_rq_retry_rolls_its_writes_back(
    postgres_server: PostgresServer, store: PostgresStore
) -> None:
    # A returned rq.Retry releases the key: the job runs the body again. Its writes committed
    # all the same, and the next attempt wrote them again.
    rq_job = pytest.importorskip("rq.job")
    ledger = ledger_table(postgres_server)
    attempts: list[str] = []

    @idempotent(key="{order_id}", store=store, transactional=True)
    def job(order_id: str) -> object:
        idemfn.current_connection().execute(f"INSERT INTO {ledger} VALUES (%s, 8)", (order_id,))
        attempts.append(order_id)
        return rq_job.Retry(max=3) if len(attempts) == 1 else 8

    assert isinstance(job("o-8"), rq_job.Retry)
    assert job.status("o-8") is None  # released: run again
    assert ledger_rows(postgres_server, ledger) == [("o-1", 1)]  # and nothing of it committed
    assert job("o-8") == 8
    assert ledger_rows(postgres_server, ledger) == [("o-1", 1), ("o-8", 8)]


def test_a_nested_call_not_in_the_transaction_cannot_write_in_it(
    postgres_server: PostgresServer, store: PostgresStore
) -> None:
    # A non-transactional idempotent call inside a transactional body got the outer body's
    # connection from current_connection(): its writes rolled back with the outer body, its
    # ok record (outside the transaction) stayed, and the next attempt replayed it without
    # writing anything: the reservation was lost for good.
    ledger = ledger_table(postgres_server)

    @idempotent(key="reserve:{order_id}", store=store)
    def reserve(order_id: str) -> str:
        with pytest.raises(RuntimeError, match=r"reserve:o-9.* not transactional"):
            idemfn.current_connection()
        return "reserved"

    @idempotent(key="order:{order_id}", store=store, transactional=True)
    def order(order_id: str) -> str:
        conn = idemfn.current_connection()
        outcome = reserve(order_id)
        assert idemfn.current_connection() is conn  # the order's own body again
        conn.execute(f"INSERT INTO {ledger} VALUES (%s, 9)", (order_id,))
        return outcome

    assert order("o-9") == "reserved"
    assert ledger_rows(postgres_server, ledger) == [("o-1", 1), ("o-9", 9)]


# -- 3. A renewal never conflicts with the body's transaction ------------------------------


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read", "serializable"])
def test_a_body_renewed_while_it_runs_commits_at_every_isolation_level(
    postgres_server: PostgresServer, table: str, isolation: str
) -> None:
    dsn = psycopg.conninfo.make_conninfo(
        postgres_server.dsn,
        options="-c default_transaction_isolation=" + isolation.replace(" ", "\\ "),
    )
    store = PostgresStore(dsn, table=table)
    ledger = ledger_table(postgres_server)
    renewals: list[float] = []

    # A short lease so that the heartbeat renews it (a third of the way) while the body runs;
    # nobody else judges the claim, so how punctual the heartbeat is does not matter.
    @idempotent(key="{order_id}", store=store, transactional=True, lease=0.6)
    def charge(order_id: str) -> int:
        conn = idemfn.current_connection()
        assert conn.execute("SHOW transaction_isolation").fetchone() == (isolation,)
        conn.execute(f"SELECT count(*) FROM {ledger}")  # the snapshot is taken here

        def renewed() -> bool:
            entry = store.get(charge.key_for(order_id))
            assert entry is not None and entry.status == "processing"
            renewals.append(entry.lease_until)  # type: ignore[arg-type]
            return renewals[-1] != renewals[0]

        poll(renewed, "the heartbeat to renew the lease")
        conn.execute(f"INSERT INTO {ledger} VALUES (%s, 5)", (order_id,))
        return 5

    try:
        assert charge("o-5") == 5
        record = charge.status("o-5")
        assert record is not None and record.status is Status.OK
        assert ledger_rows(postgres_server, ledger) == [("o-1", 1), ("o-5", 5)]
    finally:
        store.close()


# -- 4. Renewals never wait behind the bodies they keep alive ------------------------------

JUDGE = """\
import json, sys
import idemfn
from idemfn import _lease

cfg = json.loads(sys.argv[1])
store = idemfn.PostgresStore(cfg["dsn"], table=cfg["table"])
verdicts = {}
for key, at in cfg["judge_at"].items():
    _lease.clock = lambda at=at: at  # the lease clock of this machine, as the test sets it
    try:
        outcome = idemfn.begin(key, store=store, policy=idemfn.Policy(lease=cfg["lease"]))
    except idemfn.AlreadyRunning:
        verdicts[key] = "alive"
    else:
        verdicts[key] = f"{type(outcome).__name__}: {outcome.record.status.value}"
print(json.dumps(verdicts))
"""


def _judge(server: PostgresServer, table: str, lease: float, at: dict[str, float]) -> Any:
    """What another process makes of each key, its machine's lease clock at ``at[key]``."""
    cfg = {"dsn": server.dsn, "table": table, "lease": lease, "judge_at": at}
    done = subprocess.run(
        [sys.executable, "-c", JUDGE, json.dumps(cfg)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _hold_bodies(
    store: PostgresStore, n: int, lease: float
) -> tuple[Any, list[threading.Thread], threading.Event, list[object]]:
    """``n`` transactional calls on ``store``, each holding its transaction's connection until
    the event is set."""
    entered = threading.Semaphore(0)
    go_on = threading.Event()
    results: list[object] = []

    @idempotent(key="held:{i}", store=store, transactional=True, lease=lease)
    def held(i: int) -> int:
        idemfn.current_connection().execute("SELECT 1")
        entered.release()
        assert go_on.wait(120)
        return i

    threads = [threading.Thread(target=lambda i=i: results.append(held(i))) for i in range(n)]
    for t in threads:
        t.start()
    for _ in range(n):
        assert entered.acquire(timeout=120), "a body did not start"
    return held, threads, go_on, results


def _renewed_leases(reader: PostgresStore, keys: list[str]) -> dict[str, tuple[float, float]]:
    """Each key's lease end on the lease clock before and after a renewal seen from outside."""
    first: dict[str, float] = {}
    for key in keys:
        entry = reader.get(key)
        assert entry is not None and entry.lease_mono is not None
        first[key] = entry.lease_mono
    later: dict[str, float] = {}

    def all_renewed() -> bool:
        for key in keys:
            entry = reader.get(key)
            assert entry is not None and entry.status == "processing"
            if entry.lease_mono != first[key]:
                later[key] = entry.lease_mono  # type: ignore[assignment]
        return len(later) == len(keys)

    poll(all_renewed, "every held body's lease to be renewed")
    return {key: (first[key], later[key]) for key in keys}


def test_bodies_holding_every_pooled_connection_are_still_renewed(
    postgres_server: PostgresServer, store: PostgresStore, table: str
) -> None:
    lease = 1.5
    held, threads, go_on, results = _hold_bodies(store, _MAX_CONNECTIONS, lease)
    reader = PostgresStore(postgres_server.dsn, table=table)  # a pool of its own
    try:
        pool = store._pool
        assert pool is not None
        assert pool.get_stats()["pool_size"] == _MAX_CONNECTIONS  # every one held by a body
        keys = [held.key_for(i) for i in range(_MAX_CONNECTIONS)]
        leases = _renewed_leases(reader, keys)
        # Another process, its lease clock past where each lease ran out before its renewal,
        # finds every owner alive: the renewals it reads are the ones made meanwhile.
        judge_at = {key: (before + after) / 2 for key, (before, after) in leases.items()}
        assert _judge(postgres_server, table, lease, judge_at) == dict.fromkeys(keys, "alive")
    finally:
        go_on.set()
        for t in threads:
            t.join(120)
        reader.close()
    assert sorted(results) == list(range(_MAX_CONNECTIONS))  # type: ignore[type-var]
    for i in range(_MAX_CONNECTIONS):
        record = held.status(i)
        assert record is not None and record.status is Status.OK


def test_a_body_holding_the_only_connection_of_a_given_pool_is_still_renewed(
    postgres_server: PostgresServer, table: str
) -> None:
    configured: list[object] = []
    with psycopg_pool.ConnectionPool(
        postgres_server.dsn,
        min_size=1,
        max_size=1,
        kwargs={"autocommit": True},
        configure=configured.append,
    ) as pool:
        store = PostgresStore(pool, table=table)
        reader = PostgresStore(postgres_server.dsn, table=table)
        held, threads, go_on, results = _hold_bodies(store, 1, lease=1.5)
        try:
            _renewed_leases(reader, [held.key_for(0)])
            # The renewals' connection is configured as the pool's are (search_path, types).
            assert store._renewer.conn is not None and store._renewer.conn in configured
        finally:
            go_on.set()
            threads[0].join(120)
            reader.close()
            store.close()
        assert results == [0]


# -- Lease rows --------------------------------------------------------------------------------


def _lease_rows(store: PostgresStore) -> list[tuple[str, str]]:
    query = f'SELECT key, token FROM "{store._leases}" ORDER BY 1, 2'
    return store._run("read", None, query, ())  # type: ignore[no-any-return]


@pytest.mark.parametrize("transactional", [False, True])
def test_a_renewal_is_read_by_every_judge_and_its_lease_row_ends_with_the_claim(
    store: PostgresStore, transactional: bool
) -> None:
    # A lease the heartbeat does not renew during the test: the test renews it itself.
    claim = idemfn.begin("k", store=store, policy=Policy(lease=300))
    assert isinstance(claim, Claim)

    def body() -> int:
        before = store.get("k")
        assert claim.renew()
        after = store.get("k")
        assert before is not None and after is not None
        assert after.lease_until >= before.lease_until  # type: ignore[operator]
        assert after.lease_mono > before.lease_mono  # type: ignore[operator]
        assert [e for e in store.scan() if e.key == "k"] == [after]  # `idemfn ls`, prune
        assert store.claim(claim.entry._replace(token="other")) == after  # a racing claim
        record = after.record()
        assert record.lease_expires_at is not None
        assert record.lease_expires_at.timestamp() == after.lease_until
        assert _lease_rows(store) == [("k", claim.token)]
        return 1

    if transactional:
        assert run_in_transaction(claim, store.transaction("k"), body) == 1
    else:
        with claim:
            claim.complete(body())
    done = store.get("k")
    assert done is not None and done.status == "ok"
    assert _lease_rows(store) == []  # the claim ended: its lease row went with it


def test_an_aged_renewed_claim_is_judged_on_its_aged_lease(store: PostgresStore) -> None:
    # idemfn.testing's age rewrites a claim's record; its renewal must not outlive that.
    claim = idemfn.begin("k", store=store, policy=Policy(lease=300))
    assert isinstance(claim, Claim) and claim.renew()
    age(store, "k", 600)
    assert _lease_rows(store) == []
    judged = idemfn.begin("k", store=store, policy=Policy(lease=300))
    assert isinstance(judged, idemfn.Finished) and judged.record.status is Status.HALTED
    assert "stopped renewing its lease" in (judged.record.reason or "")
    with pytest.raises(idemfn.OwnershipLost):
        claim.complete(1)


def test_prune_removes_the_lease_rows_no_live_claim_holds(
    store: PostgresStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="idemfn")
    live = idemfn.begin("live", store=store, policy=Policy(lease=300))
    assert isinstance(live, Claim) and live.renew()
    insert = f'INSERT INTO "{store._leases}" VALUES (%s, %s, %s, NULL)'
    now = store.time()
    store._run("write", None, insert, ("live", "ended-before", now - 10))  # run out, not live
    store._run("write", None, insert, ("gone", "crashed", now - 10))
    store._run("write", None, insert, ("gone", "just-renewed", now + 300))  # not run out yet
    # The live claim's own row stays even once run out: its owner is judged, not pruned here.
    store._run(
        "write",
        None,
        f'UPDATE "{store._leases}" SET lease_until = %s WHERE token = %s',
        (now - 10, live.token),
    )
    store.prune()
    assert _lease_rows(store) == [("gone", "just-renewed"), ("live", live.token)]
    live.release()


def test_a_renewal_keeps_a_claim_alive_on_its_machine_whatever_the_servers_wall_clock(
    postgres_server: PostgresServer, store: PostgresStore, table: str
) -> None:
    # The server's wall clock was set back an hour after this process last read it (every
    # RESYNC seconds): a renewal ends earlier by the server's clock than the claim's own lease.
    # A judge on the owner's machine goes by the lease clock, on which the renewal ends later:
    # the owner is alive. (Each end is the later of the two, each on its own clock.)
    claim = idemfn.begin("k", store=store, policy=Policy(lease=300))
    assert isinstance(claim, Claim)
    claimed = claim.entry
    assert claimed.lease_mono is not None
    now = "extract(epoch from clock_timestamp())"
    store._sql["renew"] = store._sql["renew"].replace(now, f"({now} - 3600)")
    renewed = store.renew(claimed, 600)
    assert renewed is not None and renewed.lease_mono is not None
    assert renewed.lease_until < claimed.lease_until  # type: ignore[operator]
    at = claimed.lease_mono + 150  # past the claim's own lease, well within its renewal's
    assert at < renewed.lease_mono
    seen = store.get("k")
    assert seen is not None and seen.lease_mono == renewed.lease_mono
    assert _judge(postgres_server, table, 300, {"k": at}) == {"k": "alive"}
    claim.release()


def _use_and_close(store: PostgresStore) -> None:
    """A forked worker's life: one call on the store, then close it."""
    assert idempotent(key="child", store=store)(lambda: 1)() == 1
    store.close()


def test_a_child_forked_during_a_renewal_can_close_the_store(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The parent's renewal connection, and the lock a renewal holds on it, are not the child's:
    # the child's close() waited for a renewal that runs only in its parent, forever.
    claim = idemfn.begin("k", store=store, policy=Policy(lease=300))
    assert isinstance(claim, Claim)
    entered, go_on = threading.Event(), threading.Event()
    connect = store._connect_for_renewals

    def connecting() -> Any:  # a renewal under way (connecting) when the process forks
        entered.set()
        assert go_on.wait(120)
        return connect()

    monkeypatch.setattr(store, "_connect_for_renewals", connecting)
    renewal = threading.Thread(target=claim.renew)
    renewal.start()
    child = None
    try:
        assert entered.wait(60), "the renewal did not start"
        child = multiprocessing.get_context("fork").Process(target=_use_and_close, args=(store,))
        child.start()
        child.join(60)
        assert child.exitcode == 0, "the forked child did not close the store and exit"
    finally:
        if child is not None and child.exitcode is None:
            child.kill()
            child.join()
        go_on.set()
        renewal.join(60)
    claim.release()
