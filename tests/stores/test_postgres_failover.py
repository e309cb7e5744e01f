"""PostgresStore across a failover to a streaming standby (issue 19): a primary stopped hard
(``pg_ctl -m immediate``), its standby promoted, and stores that reach whichever node is the
primary through a connection string naming both (``target_session_attrs=read-write``).

- Synchronous replication loses nothing acknowledged: every outcome a call returned is replayed
  on the new primary, and a claim whose body still runs (in another process) keeps its key
  there: a second caller gets ``AlreadyRunning``, and the owner's outcome lands, fenced by its
  token. No body runs twice.
- Asynchronous replication loses what the standby had not received: the test cuts the standby
  off (its WAL receiver stopped), acknowledges records the standby never sees, and asserts that
  they are gone after the promotion, and that their bodies then run again. It documents the
  hazard, and counts it.
- The store's clock is the new primary's after the failover, not the old one's reading.

Every step waits for a condition (an LSN replayed, ``pg_is_in_recovery()`` false, a line from a
child), never for a time.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from idemfn import AlreadyRunning, PostgresStore, Status, StoreError, idempotent
from tests.support.deployments.pg_standby import PgStandby
from tests.support.servers import PostgresServer

pytestmark = pytest.mark.slow

#: Seconds anything is waited for (a child's line, a store reaching the new primary).
PATIENCE = 60.0

# A process that claims "failover:held" and runs its body until told to finish: it prints
# "started" from the body (the claim is acknowledged), reads a line, appends the key to the runs
# file and returns; then prints "done <value>", "unrecorded" when its outcome could not be written,
# or "lost" (OwnershipLost) when the fence refused it: another caller holds the key.
HOLDER = textwrap.dedent("""
    import logging, sys
    from idemfn import OwnershipLost, PostgresStore, idempotent

    dsn, table, runs = sys.argv[1:4]
    unrecorded = []

    class Told(logging.Handler):
        def emit(self, record):
            if "could not be recorded" in record.getMessage():
                unrecorded.append(record.getMessage())

    logging.getLogger("idemfn").addHandler(Told())

    @idempotent(key="held", name="failover", store=PostgresStore(dsn, table=table), lease=600)
    def hold():
        print("started", flush=True)
        sys.stdin.readline()
        with open(runs, "a") as f:
            f.write("held\\n")
        return "held-value"

    try:
        value = hold()
    except OwnershipLost:
        print("lost", flush=True)
    else:
        print("unrecorded" if unrecorded else f"done {value}", flush=True)
""")


class Holder:
    """The HOLDER process, started and holding its claim."""

    def __init__(self, dsn: str, table: str, runs: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, dsn, table, str(runs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.line() == "started"

    def line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()  # (a dead child: "", at once)

    def finish(self) -> str:
        """Let the body return; what the child says of its outcome."""
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        said = self.line()
        self.process.wait(PATIENCE)
        return said

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def holders() -> Iterator[Callable[[str, str, Path], Holder]]:
    started: list[Holder] = []

    def start(dsn: str, table: str, runs: Path) -> Holder:
        holder = Holder(dsn, table, runs)
        started.append(holder)
        return holder

    yield start
    for holder in started:
        holder.kill()


def recorder(store: PostgresStore, runs: Path) -> Callable[[int], int]:
    """``failover.n(i)``: returns ``i * 2``, each run of its body appended to ``runs``."""

    @idempotent(key="{i}", name="failover", store=store)
    def n(i: int) -> int:
        with runs.open("a") as f:
            f.write(f"{i}\n")
        return i * 2

    return n


def body_runs(runs: Path) -> list[str]:
    return runs.read_text().split() if runs.exists() else []


def until_reached(call: Callable[[], Any]) -> tuple[Any, int]:
    """``call()``'s result once it reaches the new primary, and how many times it failed first
    (a pooled connection to the dead primary fails the statement it carries)."""
    failures = 0
    while True:
        try:
            return call(), failures
        except StoreError:
            failures += 1
            if failures > 20:
                raise


def test_synchronous_replication_loses_no_acknowledged_claim_or_outcome(
    pg_standby: PgStandby, holders: Callable[[str, str, Path], Holder], tmp_path: Path
) -> None:
    table, runs = f"t_{uuid.uuid4().hex}", tmp_path / "runs"
    before = PostgresStore(pg_standby.dsn, table=table)
    n = recorder(before, runs)
    assert [n(i) for i in range(20)] == [i * 2 for i in range(20)]  # acknowledged outcomes
    holder = holders(pg_standby.dsn, table, runs)  # an acknowledged claim, its body running

    pg_standby.fail()  # no wait for the standby: what was acknowledged is there already
    pg_standby.promote()

    after = PostgresStore(pg_standby.dsn, table=table)  # a caller that comes after
    again = recorder(after, runs)
    assert [again(i) for i in range(20)] == [i * 2 for i in range(20)]  # replayed
    assert sorted(body_runs(runs), key=int) == [str(i) for i in range(20)]  # none ran again

    @idempotent(key="held", name="failover", store=after)
    def hold() -> str:
        raise AssertionError("the held claim's body ran a second time")

    with pytest.raises(AlreadyRunning):
        hold()
    # The owner's outcome goes to the new primary, fenced by its token.
    assert holder.finish() == "done held-value"
    assert hold() == "held-value"
    assert body_runs(runs).count("held") == 1

    # The store used before the failover reaches the new primary at its first call: the
    # connections its pool kept to the old one are seen dropped, and not used.
    assert until_reached(lambda: n(20)) == (40, 0)
    assert again(20) == 40 and body_runs(runs).count("20") == 1
    before.close()
    after.close()


def test_asynchronous_replication_loses_what_the_standby_had_not_received(
    pg_standby: PgStandby, holders: Callable[[str, str, Path], Holder], tmp_path: Path
) -> None:
    pg_standby.set_synchronous(False)
    table, runs = f"t_{uuid.uuid4().hex}", tmp_path / "runs"
    store = PostgresStore(pg_standby.dsn, table=table)
    n = recorder(store, runs)
    kept = [n(i) for i in range(10)]
    pg_standby.caught_up()  # these reached the standby
    pg_standby.detach()  # from now on, nothing does
    lost = [n(i) for i in range(10, 20)]  # acknowledged all the same
    holder = holders(pg_standby.dsn, table, runs)  # a claim acknowledged, body running
    assert store.get("failover:held") is not None

    pg_standby.fail()
    pg_standby.promote()

    after = PostgresStore(pg_standby.dsn, table=table)
    again = recorder(after, runs)
    assert [again(i) for i in range(10)] == kept
    gone = [i for i in range(10, 20) if after.get(f"failover:{i}") is None]
    assert gone == list(range(10, 20)), "the standby had these: was it cut off?"
    assert after.get("failover:held") is None  # the live claim is lost too
    # The hazard, counted: every lost outcome's body runs again, and so does the held claim's
    # while its first owner still runs it.
    assert [again(i) for i in range(10, 20)] == lost

    @idempotent(key="held", name="failover", store=after)
    def hold() -> str:
        with runs.open("a") as f:
            f.write("held\n")
        return "second"

    assert hold() == "second"
    duplicates = {k: c for k in set(body_runs(runs)) if (c := body_runs(runs).count(k)) > 1}
    assert duplicates == {str(i): 2 for i in range(10, 20)}
    # The first owner's outcome is refused by the fence (OwnershipLost): the second run's stands.
    assert holder.finish() == "lost"
    assert body_runs(runs).count("held") == 2
    entry = after.get("failover:held")
    assert entry is not None and entry.status == Status.OK.value
    store.close()
    after.close()


def server_now(pair: PgStandby) -> float:
    return float(pair.primary.query("SELECT extract(epoch from clock_timestamp())")[0][0])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_store_clock_is_the_new_primarys_after_a_failover(
    pg_standby: PgStandby, mode: str
) -> None:
    # One machine has one clock: the old primary's is made to read an hour behind in the store's
    # last reading, as another machine's could. Kept after the failover (RESYNC is 30 s), it
    # would judge the new primary's leases and expiries an hour off.
    store = PostgresStore(pg_standby.dsn, table=f"t_{uuid.uuid4().hex}")
    loop = asyncio.new_event_loop()
    try:
        if mode == "sync":

            def reading() -> float:
                return store.time()

            def statement() -> object:
                return store.get("k")

        else:

            def reading() -> float:
                return loop.run_until_complete(store.atime())

            def statement() -> object:
                return loop.run_until_complete(store.aget("k"))

        statement()
        assert abs(reading() - server_now(pg_standby)) < PATIENCE
        synced = store._clock._synced
        assert synced is not None
        store._clock._synced = (synced[0] - 3600, synced[1])
        assert reading() < server_now(pg_standby) - 3000  # the old primary's skewed reading

        pg_standby.fail()
        pg_standby.promote()

        assert until_reached(statement)[1] == 0
        assert abs(reading() - server_now(pg_standby)) < PATIENCE
    finally:
        loop.run_until_complete(store.aclose())
        loop.close()
        store.close()


def test_a_connection_string_naming_a_primary_and_its_standby() -> None:
    store = PostgresStore(
        "postgresql://app@db1:5432,db2:5433/orders?target_session_attrs=read-write"
    )
    assert store.server == "postgresql://app@db1:5432,db2:5433/orders"
    assert repr(store) == (
        "PostgresStore('postgresql://app@db1:5432,db2:5433/orders', table='idemfn_records')"
    )
    one_port = PostgresStore("host=db1,db2 port=6432 user=app dbname=orders")
    assert one_port.server == "postgresql://app@db1:6432,db2:6432/orders"
    sockets = PostgresStore("host=/run/a,/run/b user=app dbname=orders")
    assert sockets.server == "postgresql://app@/run/a,/run/b/orders"


# A statement whose connection is lost under it (the server went: a failover, a restart) is
# sent once more on a connection that reaches a server now; refused then, it had landed if the
# row is exactly what it wrote. Before, the owner's outcome was "not recorded" (its key halted
# once its lease ran out, or with on_abandoned="retry" ran again), and a claim failed. Each
# case is made deterministic: the statement waits (on a row lock, or for the synchronous
# standby) until its backend is terminated, which ends its connection as a failover does.


def backend(dsn: str, *, waiting_on: str, query: str, other_than: int = 0) -> int:
    """The pid of a backend running ``query`` (a LIKE pattern) that waits on ``waiting_on``
    (a wait event type or name), once there is one."""
    import psycopg

    give_up = time.monotonic() + PATIENCE
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND pid <> %s"
                " AND (wait_event_type = %s OR wait_event = %s)",
                (query, other_than, waiting_on, waiting_on),
            ).fetchall()
            if rows:
                return int(rows[0][0])
            assert time.monotonic() < give_up, f"no backend waiting on {waiting_on}: {query}"
            time.sleep(0.01)


def terminate(dsn: str, pid: int) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:  # (returns once the backend is gone)
        assert conn.execute("SELECT pg_terminate_backend(%s, 60000)", (pid,)).fetchone() == (True,)


def test_an_outcome_whose_connection_is_lost_before_it_lands_is_written_again(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    import psycopg

    dsn, table = postgres_server.dsn, f"t_{uuid.uuid4().hex}"
    store = PostgresStore(dsn, table=table)
    locker = psycopg.connect(dsn)  # holds the record's row while the outcome is written
    done = threading.Event()

    def lose_the_first_write() -> None:
        first = backend(dsn, waiting_on="Lock", query=f'%UPDATE "{table}" %')
        terminate(dsn, first)
        backend(dsn, waiting_on="Lock", query=f'%UPDATE "{table}" %', other_than=first)
        locker.rollback()  # the write sent again goes through
        done.set()

    loser: list[threading.Thread] = []

    @idempotent(key="k", name="lost", store=store)
    def body() -> str:
        locker.execute(f"SELECT 1 FROM {table} WHERE key = 'lost:k' FOR UPDATE")
        loser.append(threading.Thread(target=lose_the_first_write, daemon=True))
        loser[0].start()
        return "value"

    try:
        with caplog.at_level(logging.ERROR, logger="idemfn"):
            assert body() == "value"
        # (The write goes through as the rollback is processed, before the rollback returns
        # in the thread: wait for it, then close the locker.)
        loser[0].join(PATIENCE)
        assert done.is_set()
        assert "could not be recorded" not in caplog.text
        entry = store.get("lost:k")
        assert entry is not None and entry.status == Status.OK.value  # recorded, not halted
    finally:
        locker.close()
        store.close()


def test_a_claim_whose_connection_is_lost_before_it_lands_is_made_again(
    postgres_server: PostgresServer,
) -> None:
    import psycopg

    dsn, table = postgres_server.dsn, f"t_{uuid.uuid4().hex}"
    store = PostgresStore(dsn, table=table)
    store.get("made")  # the table
    rival = psycopg.connect(dsn)  # an insert of the key, uncommitted: the claim waits for it
    rival.execute(f"INSERT INTO {table} (key, live, token, entry) VALUES ('lost:k', 'x', 'x', '')")

    def lose_the_first_claim() -> None:
        first = backend(dsn, waiting_on="Lock", query=f'%INSERT INTO "{table}" %')
        terminate(dsn, first)
        backend(dsn, waiting_on="Lock", query=f'%INSERT INTO "{table}" %', other_than=first)
        rival.rollback()

    runs = []

    @idempotent(key="k", name="lost", store=store)
    def body() -> str:
        runs.append(1)
        return "value"

    helper = threading.Thread(target=lose_the_first_claim, daemon=True)
    helper.start()
    try:
        assert body() == "value" and runs == [1]  # claimed (before: StoreError)
        helper.join(PATIENCE)
        assert body() == "value" and runs == [1]
    finally:
        rival.close()
        store.close()


def test_an_outcome_that_landed_as_its_connection_was_lost_is_not_written_twice(
    pg_standby: PgStandby, caplog: pytest.LogCaptureFixture
) -> None:
    # Synchronous replication: a commit waits for the standby; cut off, the outcome's UPDATE
    # has committed on the primary and waits. Its backend terminated, the client hears only
    # that the connection went: the write is sent again, refused by the fence (the claim is
    # finished), and counted as landed since the row holds exactly the entry it wrote, once
    # the standby has it (that reading waits for the standby, as a write does).
    table = f"t_{uuid.uuid4().hex}"
    store = PostgresStore(pg_standby.dsn, table=table)
    dsn = pg_standby.primary.dsn

    def lose_the_answer() -> None:
        try:
            terminate(dsn, backend(dsn, waiting_on="SyncRep", query=f'%UPDATE "{table}" %'))
            # The write sent again finds it landed, and waits until the standby has it.
            backend(dsn, waiting_on="SyncRep", query="%SET entry = entry%")
        finally:
            pg_standby.reattach()  # (also when the above failed: the caller waits till then)

    helper = threading.Thread(target=lose_the_answer, daemon=True)

    @idempotent(key="k", name="landed", store=store)
    def body() -> str:
        pg_standby.detach()  # from now on, every commit waits
        helper.start()
        return "value"

    try:
        with caplog.at_level(logging.ERROR, logger="idemfn"):
            assert body() == "value"
        helper.join(PATIENCE)
        assert not helper.is_alive()
        assert "could not be recorded" not in caplog.text
        rows = pg_standby.primary.query(f"SELECT live FROM {table} WHERE key = 'landed:k'")
        assert rows == [(None,)]  # finished
        pg_standby.caught_up()
        assert pg_standby.standby is not None
        rows = pg_standby.standby.query(f"SELECT live FROM {table} WHERE key = 'landed:k'")
        assert rows == [(None,)]  # and on the standby
    finally:
        store.close()
