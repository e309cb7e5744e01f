"""A hostile review of issue 19's deployments (Redis Cluster, replicas=/Sentinel, PgBouncer's
transaction pooling, a PostgreSQL failover, prune in batches), on real servers.

Twelve of these tests were findings (each a strict xfail until its fix, all fixed in issue 19:
lost replies resent on Redis, the cluster's clock with a primary down or stalled, prune after a
batch claimed under it, PgBouncer's 08P01, passwords in URL errors, ``?replicas=`` against the
argument, quoted ``transaction_pooling=``); the others are attacks the code withstood, kept as
coverage.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from idemfn import PostgresStore, RedisStore, StoreError, idempotent
from idemfn._stores import redis as redis_module
from idemfn._stores.postgres import pooling
from idemfn._stores.postgres import store as store_module
from tests.support.deployments.pg_standby import PgStandby
from tests.support.deployments.pgbouncer import PgBouncer
from tests.support.deployments.redis_cluster import RedisClusterServers
from tests.support.records import foreign_entry
from tests.support.servers import PostgresServer, RedisServer

SECRET = "s3cret-pw"


# -- options and URLs (no server needed: each store is made, never used) -------------------------


def test_bad_replicas_in_url_does_not_leak_the_password() -> None:
    with pytest.raises(ValueError) as caught:
        RedisStore(f"redis://:{SECRET}@127.0.0.1:6379/0?replicas=two")
    assert "replicas" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_bad_sentinel_url_does_not_leak_the_password() -> None:
    with pytest.raises(ValueError) as caught:
        RedisStore(f"redis+sentinel://:{SECRET}@127.0.0.1:x/mymaster")
    assert "Sentinel" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_sentinel_passwords_stay_out_of_repr_and_url() -> None:
    store = RedisStore(
        f"redis+sentinel://:{SECRET}@127.0.0.1:1/mymaster?sentinel_password={SECRET}2"
        "&replicas=1&replica_timeout=2"
    )
    assert SECRET not in repr(store) and SECRET not in store.url
    assert (store.replicas, store._wait) == (1, ("WAIT", 1, 2000))


def test_conflicting_replicas_in_url_and_argument_are_refused() -> None:
    # A safety option asked for twice, differently: the weaker one wins without a word.
    with pytest.raises(ValueError, match="replicas"):
        RedisStore("redis://127.0.0.1:6379/0?replicas=0", replicas=2)


def test_negative_replicas_in_url_names_the_url() -> None:
    with pytest.raises(ValueError) as caught:
        RedisStore("redis://127.0.0.1:6379/0?replicas=-1")
    assert "RedisStore(replicas=" not in str(caught.value)
    assert "URL" in str(caught.value)


def test_replicas_on_a_cluster_url_is_refused() -> None:
    for url in ("redis+cluster://127.0.0.1:1?replicas=1", "redis+cluster://127.0.0.1:1"):
        with pytest.raises(ValueError, match="replicas"):
            RedisStore(url, replicas=1)
    with pytest.raises(ValueError, match="replicas"):
        RedisStore("redis+cluster://127.0.0.1:1?replicas=0")


def test_transaction_pooling_inside_a_quoted_value_is_left_alone() -> None:
    dsn = "host=db application_name='a transaction_pooling=true' dbname=app"
    assert pooling.split(dsn) == (dsn, False)


def test_transaction_pooling_after_a_quoted_password_holding_the_words() -> None:
    stripped, on = pooling.split(
        "host=db password='p transaction_pooling=false' transaction_pooling=true"
    )
    assert (stripped, on) == ("host=db password='p transaction_pooling=false'", True)


@pytest.mark.parametrize(
    ("dsn", "split"),
    [
        ("host=db transaction_pooling = 'true' dbname=app", ("host=db dbname=app", True)),
        ("host=db dbname=transaction_pooling_db", ("host=db dbname=transaction_pooling_db", False)),
        ("postgresql://u@h/transaction_pooling", ("postgresql://u@h/transaction_pooling", False)),
        ("postgresql://u@h/db?transaction_pooling=off&sslmode=disable", None),
        ("postgresql://u@h/db?sslmode=disable&transaction_pooling=TRUE", None),
    ],
)
def test_transaction_pooling_parameter_forms(dsn: str, split: tuple[str, bool] | None) -> None:
    if split is None:
        split = ("postgresql://u@h/db?sslmode=disable", dsn.endswith("TRUE"))
    assert pooling.split(dsn) == split


# -- Redis Cluster: the clock is every primary's -------------------------------------------------


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A cluster of this test's own, whose nodes it may kill."""
    servers = RedisClusterServers(tmp_path / "cluster")
    try:
        yield servers
    finally:
        servers.stop()


def test_cluster_calls_on_live_nodes_survive_a_dead_primary(
    own_cluster: RedisClusterServers,
) -> None:
    store = RedisStore(own_cluster.url, prefix=f"r:{uuid.uuid4().hex}:")
    runs: list[str] = []

    @idempotent(store=store, key="{k}", name="f")
    def fn(k: str) -> str:
        runs.append(k)
        return k

    live_keys = own_cluster.keys_on_each_node(f"{store.prefix}f:", 2)
    assert fn(live_keys[0][0]) == live_keys[0][0]  # the clock read once, all three up
    own_cluster.nodes[2].stop()  # no replica: its slots are gone, the others' are not
    store._clock.forget()  # the next call reads the clock again (as RESYNC seconds later)
    try:
        assert fn(live_keys[0][1]) == live_keys[0][1]  # a key of node 0, which answers
        assert fn(live_keys[1][0]) == live_keys[1][0]
    finally:
        store.close()


def test_cluster_calls_on_live_nodes_survive_a_stalled_primary(
    own_cluster: RedisClusterServers,
) -> None:
    store = RedisStore(own_cluster.url + "?socket_timeout=1", prefix=f"r:{uuid.uuid4().hex}:")

    @idempotent(store=store, key="{k}", name="f")
    def fn(k: str) -> str:
        return k

    live_keys = own_cluster.keys_on_each_node(f"{store.prefix}f:", 2)
    assert fn(live_keys[0][0]) == live_keys[0][0]
    stalled = own_cluster.nodes[2].process
    assert stalled is not None
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(fn(live_keys[0][1]))
        except Exception as exc:
            outcome.append(exc)

    os.kill(stalled.pid, signal.SIGSTOP)  # a primary stalled (a long fork, a paused VM)
    try:
        store._clock.forget()  # the clock due again (as RESYNC seconds later)
        caller = threading.Thread(target=call)
        caller.start()
        caller.join(30)  # (ends within socket_timeout, 1 s here, today)
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
        store.close()
    assert outcome == [live_keys[0][1]]


# -- PostgresStore.prune in batches: claims made under a batch ------------------------------------


def _prune_under_claims(server: PostgresServer, batch: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Rows a0, a1 (expired two hours ago) and b (an hour ago); a claim of a0 and a1 holds
    their row locks while prune runs (batches of ``batch``), and commits once prune's DELETE
    waits for them. Returns (what prune removed, the keys left)."""
    monkeypatch.setattr(store_module, "_PRUNE_BATCH", batch)
    store = PostgresStore(server.dsn, table=f"t_{uuid.uuid4().hex}")
    store.get("warm-up")  # the tables
    now = store.time()
    t = f'"{store.table}"'
    with psycopg.connect(server.dsn, autocommit=True) as conn, psycopg.connect(server.dsn) as claim:
        for key, at in (("a0", now - 7200), ("a1", now - 7100), ("b", now - 3600)):
            conn.execute(
                f"INSERT INTO {t} (key, live, token, expires_at, drop_at, entry)"
                " VALUES (%s, NULL, 't', %s, %s, '\\x00')",
                (key, at, at),
            )
        # As the claim statement does to an expired row (ON CONFLICT DO UPDATE), uncommitted.
        claim.execute(
            f"UPDATE {t} SET live = 'tok', token = 'tok', expires_at = NULL, drop_at = %s"
            " WHERE key IN ('a0', 'a1')",
            (now + 3600,),
        )
        removed: list[int] = []
        pruner = threading.Thread(target=lambda: removed.append(store.prune()))
        pruner.start()
        deadline = time.monotonic() + 30
        while not conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
            (f"%DELETE FROM {t}%",),
        ).fetchall():
            assert time.monotonic() < deadline, "prune never waited for the claims' locks"
            time.sleep(0.01)
        claim.commit()
        pruner.join(30)
        assert not pruner.is_alive()
        left = sorted(k for (k,) in conn.execute(f"SELECT key FROM {t}"))
    store.close()
    return removed[0], left


def test_prune_leaves_rows_claimed_under_its_batch(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    removed, left = _prune_under_claims(postgres_server, 1000, monkeypatch)
    assert (removed, left) == (1, ["a0", "a1"])


def test_prune_goes_on_after_a_batch_wholly_claimed_under_it(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    removed, left = _prune_under_claims(postgres_server, 2, monkeypatch)
    assert left[:2] == ["a0", "a1"]  # the claims stay (withstood)
    assert (removed, left) == (1, ["a0", "a1"])  # b, expired at the start, goes


# -- PostgresStore: a write sent again after its connection was lost (_resent) --------------------


def _lose_reply(
    store: PostgresStore,
    monkeypatch: pytest.MonkeyPatch,
    query: str,
    before: Any = None,
    lost: type[psycopg.Error] = psycopg.OperationalError,
    why: str = "server closed the connection unexpectedly",
) -> list[str]:
    """The first statement ``query`` runs on the server (after ``before()``, if given), then its
    connection is lost before the reply is read, as psycopg reports it; the actions seen."""
    real = store._run
    seen: list[str] = []

    def run(action: str, key: str | None, sql: str, params: Any, conn: Any = None) -> Any:
        seen.append(action)
        if sql == store._sql[query] and not seen.count("lost"):
            seen.append("lost")
            if before is not None:
                before()
            real(action, key, sql, params, conn)  # landed (or refused), reply lost
            try:
                raise lost(why)
            except psycopg.Error as exc:
                raise store._failed(action, key, exc) from exc
        return real(action, key, sql, params, conn)

    monkeypatch.setattr(store, "_run", run)
    return seen


@pytest.mark.parametrize("query", ["claim", "swap"])
def test_a_write_that_landed_before_its_connection_went_counts_once(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    store = PostgresStore(postgres_server.dsn, table=f"t_{uuid.uuid4().hex}")
    runs: list[int] = []

    @idempotent(store=store, key="{n}", name="f")
    def fn(n: int) -> int:
        runs.append(n)
        return n * 2

    store.get("warm-up")
    seen = _lose_reply(store, monkeypatch, query)
    assert fn(1) == 2 and fn(1) == 2
    assert "lost" in seen and runs == [1]
    record = store.get("f:1")
    assert record is not None and record.status == "ok"
    store.close()


def test_a_refused_settle_lost_under_it_is_not_counted_landed(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another caller took the claim over before the owner's outcome was sent; the refusal's
    reply is lost, the outcome sent again: still refused, and the taker's claim stands."""
    store = PostgresStore(postgres_server.dsn, table=f"t_{uuid.uuid4().hex}")
    store.get("warm-up")
    other = foreign_entry("f:1", "f" * 64, lease_until=store.time() + 600)

    def take_over() -> None:
        store._run(
            "take",
            "f:1",
            f'UPDATE "{store.table}" SET live = %s, token = %s, entry = %s WHERE key = %s',
            (other.token, other.token, store.encode(other), "f:1"),
        )

    @idempotent(store=store, key="{n}", name="f")
    def fn(n: int) -> int:
        return n

    seen = _lose_reply(store, monkeypatch, "swap", take_over)
    try:
        fn(1)
    except Exception:  # (the claim was lost: how the engine reports it is not this test's)
        pass
    assert "lost" in seen
    record = store.get("f:1")
    assert record is not None and record.token == other.token
    store.close()


# -- PostgresStore: idle connections its server dropped (_dropped) -------------------------------


def test_idle_connections_terminated_by_the_server_are_never_used(
    postgres_server: PostgresServer,
) -> None:
    """Every backend of the store (sync pool, spares, an event loop's pool) terminated while
    idle, as a failover or a restart does: the next calls, sync and async, run on new ones."""
    name = f"review_{uuid.uuid4().hex[:12]}"
    store = PostgresStore(
        f"{postgres_server.dsn} application_name={name}", table=f"t_{uuid.uuid4().hex}"
    )
    runs: list[int] = []

    @idempotent(store=store, key="{n}", name="f")
    def fn(n: int) -> int:
        runs.append(n)
        return n

    @idempotent(store=store, key="{n}", name="g")
    async def afn(n: int) -> int:
        runs.append(-n)
        return n

    async def both(n: int) -> list[int]:
        return [await afn(n), await afn(n)]

    loop = asyncio.new_event_loop()
    try:
        assert fn(1) == 1 and loop.run_until_complete(both(1)) == [1, 1]
        with psycopg.connect(postgres_server.dsn, autocommit=True) as admin:
            pids = [
                pid
                for (pid,) in admin.execute(
                    "SELECT pg_terminate_backend(pid)::int * pid FROM pg_stat_activity"
                    " WHERE application_name = %s",
                    (name,),
                )
            ]
            assert pids
            deadline = time.monotonic() + 30
            while admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
            ).fetchall():
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert [fn(2), fn(2), fn(1)] == [2, 2, 1]
        assert loop.run_until_complete(both(2)) == [2, 2]
        assert runs == [1, -1, 2, -2]
    finally:
        loop.run_until_complete(store.aclose())
        loop.close()
        store.close()


# -- RedisStore: a write whose connection was lost after it landed (a Sentinel failover) ----------


def _lose_redis_reply(monkeypatch: pytest.MonkeyPatch, script: str) -> list[str]:
    """The first ``EVALSHA`` of ``script`` (a source of redis.py's) runs on the server, then
    its reply is lost (``ConnectionError``), as when the primary is killed after it ran the
    script and copied it to its replica (``replicas=1``), before its reply was read: a
    Sentinel failover. (redis-py 8.1's default Retry makes no second try.)"""
    import hashlib

    import redis

    sha = hashlib.sha1(script.encode()).hexdigest().encode()
    real = redis_module._ask
    seen: list[str] = []

    def ask(conn: Any, packed: bytes) -> Any:
        reply = real(conn, packed)
        if b"EVALSHA" in packed and sha in packed and not seen:
            seen.append("lost")
            raise redis.ConnectionError("Connection reset by peer (the reply was lost)")
        return reply

    monkeypatch.setattr(redis_module, "_ask", ask)
    return seen


def test_redis_claim_whose_reply_was_lost_leaves_no_orphan_claim(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(redis_server.url, prefix=f"r:{uuid.uuid4().hex}:")
    runs: list[int] = []

    @idempotent(store=store, key="{n}", name="f")
    def fn(n: int) -> int:
        runs.append(n)
        return n

    assert fn(0) == 0  # the scripts loaded
    seen = _lose_redis_reply(monkeypatch, redis_module._CLAIM)
    try:
        assert fn(1) == 1
        assert seen == ["lost"] and runs == [0, 1]
    finally:
        store.close()


def test_redis_outcome_whose_reply_was_lost_counts_landed(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(redis_server.url, prefix=f"r:{uuid.uuid4().hex}:")
    runs: list[int] = []

    @idempotent(store=store, key="{n}", name="f")
    def fn(n: int) -> int:
        runs.append(n)
        return n

    assert fn(0) == 0
    seen = _lose_redis_reply(monkeypatch, redis_module._SWAP)
    try:
        with caplog.at_level("WARNING", logger="idemfn"):
            assert fn(1) == 1
        assert seen == ["lost"] and runs == [0, 1]
        record = store.get("f:1")
        assert record is not None and record.status == "ok"
        assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    finally:
        store.close()


# -- RedisStore(replicas=N) with no replica to acknowledge (a standalone server) -----------------


def test_claims_short_of_replicas_are_withdrawn_sync_and_async(redis_server: RedisServer) -> None:
    """No replica can ever acknowledge (the server has none): every claim, sync or async, is
    withdrawn before its body runs, and leaves the key free. (The timeout always runs out.)"""
    store = RedisStore(redis_server.url, prefix=f"r:{uuid.uuid4().hex}:", replicas=1)
    store._wait = ("WAIT", 1, 20)  # (20 ms: nothing can acknowledge; the test need not wait 1 s)
    store._writes._wait = store._wait
    runs: list[int] = []

    @idempotent(store=store, key="{n}", name="f")
    def fn(n: int) -> int:
        runs.append(n)
        return n

    @idempotent(store=store, key="{n}", name="f")
    async def afn(n: int) -> int:
        runs.append(n)
        return n

    try:
        with pytest.raises(StoreError, match="replicas=1"):
            fn(1)
        with pytest.raises(StoreError, match="replicas=1"):
            asyncio.run(afn(2))
        assert runs == [] and store.get("f:1") is None and store.get("f:2") is None
    finally:
        store.close()


# -- PostgresStore(transaction_pooling=True) given a pool ---------------------------------------


def test_transaction_pooling_refuses_given_pools_that_prepare(
    postgres_server: PostgresServer,
) -> None:
    import psycopg_pool

    for kind in (psycopg_pool.ConnectionPool, psycopg_pool.AsyncConnectionPool):
        preparing = kind(postgres_server.dsn, open=False)
        with pytest.raises(ValueError, match="prepare_threshold"):
            PostgresStore(preparing, transaction_pooling=True)
        fine = kind(postgres_server.dsn, open=False, kwargs={"prepare_threshold": None})
        assert PostgresStore(fine, transaction_pooling=True).transaction_pooling


# -- PostgresStore behind PgBouncer: a server connection that died under a statement -------------


def test_pgbouncer_reports_a_crashed_server_connection_as_08p01(tmp_path: Path) -> None:
    """What PgBouncer tells a client whose server connection died under its statement (the
    primary's machine gone, a backend killed): 08P01 "server conn crashed?", not libpq's
    connection error (sqlstate None) nor the server's goodbye (57P..)."""
    server = PostgresServer()
    bouncer = PgBouncer(server)
    try:
        with psycopg.connect(server.dsn, autocommit=True) as admin:
            admin.execute("CREATE TABLE x (k int PRIMARY KEY, v int)")
            admin.execute("INSERT INTO x VALUES (1, 0)")
            locker = psycopg.connect(server.dsn)
            locker.execute("UPDATE x SET v = 1 WHERE k = 1")  # held: the next UPDATE waits
            client = psycopg.connect(bouncer.dsn, autocommit=True, prepare_threshold=None)
            errors: list[psycopg.Error] = []

            def update() -> None:
                try:
                    client.execute("UPDATE x SET v = 2 WHERE k = 1")
                except psycopg.Error as exc:
                    errors.append(exc)

            waiting = "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            thread = threading.Thread(target=update)
            thread.start()
            deadline = time.monotonic() + 30
            while not (pids := admin.execute(waiting).fetchall()):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(pids[0][0], signal.SIGKILL)
            thread.join(30)
        client.close()
        locker.close()
        assert len(errors) == 1 and errors[0].sqlstate == "08P01", errors
        assert "server conn crashed" in str(errors[0])
    finally:
        bouncer.remove()
        server.remove()


def test_an_outcome_lost_behind_pgbouncer_is_sent_again(
    postgres_server: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = PostgresStore(postgres_server.dsn, table=f"t_{uuid.uuid4().hex}")
    runs: list[int] = []

    @idempotent(store=store, key="{n}", name="f")
    def fn(n: int) -> int:
        runs.append(n)
        return n

    store.get("warm-up")
    seen = _lose_reply(
        store,
        monkeypatch,
        "swap",
        lost=psycopg.errors.ProtocolViolation,  # (08P01, as PgBouncer sends it: the test above)
        why="server conn crashed?",
    )
    try:
        with caplog.at_level("WARNING", logger="idemfn"):
            assert fn(1) == 1
        assert "lost" in seen and runs == [1]
        assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    finally:
        store.close()


# -- PostgresStore across a failover: a claim found landed after its connection went -------------


def test_a_claim_found_landed_is_not_run_before_the_standby_has_it(pg_standby: PgStandby) -> None:
    """The claim commits on the primary, and its wait for the synchronous standby is cut
    (its backend terminated: "committed locally, but might not have been replicated"). Sent
    again, it is refused and the row found holds its token: the body must not run before the
    standby has the claim, or a failover now loses it and a second caller runs the body too."""
    store = PostgresStore(pg_standby.dsn, table=f"t_{uuid.uuid4().hex}")
    runs: list[int] = []

    @idempotent(store=store, key="{n}", name="f")
    def fn(n: int) -> int:
        runs.append(n)
        return n

    store.get("warm-up")  # the tables, on both
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(fn(1))
        except Exception as exc:
            outcome.append(exc)

    def sync_waiters() -> list[int]:
        rows = pg_standby.primary.query(
            "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
        )
        return [int(pid) for (pid,) in rows]

    pg_standby.detach()  # every commit on the primary waits from now on
    caller = threading.Thread(target=call)
    caller.start()
    try:
        deadline = time.monotonic() + 30
        while not (waiting := sync_waiters()):
            assert time.monotonic() < deadline, "the claim's commit never waited"
            time.sleep(0.01)
        pg_standby.primary.query("SELECT pg_terminate_backend(%s)", (waiting[0],))
        # Then the body runs, or a statement of the call waits for the standby again.
        while not runs and not [p for p in sync_waiters() if p != waiting[0]]:
            assert time.monotonic() < deadline, "neither the body ran nor a write waited"
            time.sleep(0.01)
        assert runs == []
    finally:
        pg_standby.reattach()
        caller.join(30)
        store.close()
    assert outcome == [1] and runs == [1]
