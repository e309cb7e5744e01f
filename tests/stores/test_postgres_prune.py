"""PostgresStore's prune at scale: batches, each its own transaction, found through the drop_at
index (docs/scaling.md).

One DELETE of every expired row held the lock of each row it removed until it committed (a
claim of an expired key waited for the whole prune) and wrote one transaction as large as the
table's expired part; and its ``clock_timestamp()``, volatile, kept the planner off the index:
every prune read the whole table.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from idemfn import PostgresStore, idempotent
from idemfn._stores.postgres import store as store_module
from idemfn.testing import _age as age
from tests.support.servers import PostgresServer


def fresh(server: PostgresServer) -> PostgresStore:
    return PostgresStore(server.dsn, table=f"t_{uuid.uuid4().hex}")


def fill(server: PostgresServer, store: PostgresStore, live: int, expired: int) -> None:
    """``live`` finished rows expiring in a day and ``expired`` ones expired an hour ago, as the
    store writes finished rows (drop_at = expires_at); prune's SQL never reads their records."""
    store.get("warm-up")  # the tables and the index
    now = store.time()
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        for name, count, at in (("live", live, now + 86400), ("expired", expired, now - 3600)):
            conn.execute(
                f'INSERT INTO "{store.table}" (key, live, token, expires_at, drop_at, entry)'
                " SELECT %s || g, NULL, 't' || g, %s, %s, '\\x00' FROM generate_series(1, %s) g",
                (f"{name}:", at, at, count),
            )
        conn.execute(f'ANALYZE "{store.table}"')


def spy(store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """The (query, params) of every statement prune runs."""
    seen: list[tuple[str, Any]] = []
    real = store._run

    def run(action: str, key: str | None, query: str, params: Any, conn: Any = None) -> Any:
        if action == "prune":
            seen.append((query, params))
        return real(action, key, query, params, conn)

    monkeypatch.setattr(store, "_run", run)
    return seen


def test_prune_removes_expired_rows_in_batches_each_a_statement_of_its_own(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = fresh(postgres_server)
    try:
        fill(postgres_server, store, live=30, expired=50)
        monkeypatch.setattr(store_module, "_PRUNE_BATCH", 7, raising=False)
        statements = spy(store, monkeypatch)
        assert store.prune() == 50
        deletes = [q for q, _ in statements if q.startswith("WITH picked AS")]
        assert len(deletes) >= 50 // 7 + 1, deletes  # (one DELETE of them all, before)
        keys = {k for (k,) in store._run("list", None, f'SELECT key FROM "{store.table}"', ())}
        assert keys == {f"live:{i}" for i in range(1, 31)}
        assert store.prune() == 0
    finally:
        store.close()


def test_prune_finds_expired_rows_through_the_drop_at_index(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 100 M records a whole-table scan per prune reads every record to remove a few."""
    store = fresh(postgres_server)
    try:
        fill(postgres_server, store, live=20_000, expired=100)
        statements = spy(store, monkeypatch)
        assert store.prune() == 100
        deletes = [(q, p) for q, p in statements if q.startswith("WITH picked AS")]
        assert deletes
        with psycopg.connect(postgres_server.dsn) as conn:
            for query, params in deletes:
                plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {query}", params))
                assert f'Seq Scan on "{store.table}"' not in plan
                assert f"Seq Scan on {store.table}" not in plan, plan
                assert f"{store.table}_drop_at" in plan, plan
    finally:
        store.close()


def test_claims_of_expired_keys_while_prune_runs_are_never_removed(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that takes an expired row's place after a batch's subquery read the row: the
    DELETE checks the row's conditions again on its newest version, and leaves the claim."""
    store = fresh(postgres_server)
    runs: list[int] = []

    def raw(i: int) -> int:
        runs.append(i)
        return i

    body = idempotent(key="k:{i}", store=store, name="prune.race", ttl=3600)(raw)

    try:
        fill(postgres_server, store, live=0, expired=0)
        count = 600
        for i in range(count):
            body(i)
        for i in range(count):
            age(store, body.key_for(i), 7200)  # expired an hour ago
        runs.clear()
        monkeypatch.setattr(store_module, "_PRUNE_BATCH", 2, raising=False)
        stop = threading.Event()
        claimed: list[int] = []

        errors: list[BaseException] = []

        other = PostgresStore(postgres_server.dsn, table=store.table)
        again = idempotent(key="k:{i}", store=other, name="prune.race", ttl=3600)(raw)
        other.get("warm-up")  # connected before prune starts

        def claimer() -> None:
            try:
                for i in reversed(range(count)):  # from the end, which prune reaches last
                    if stop.is_set():
                        break
                    assert again(i) == i
                    claimed.append(i)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=claimer)
        thread.start()
        try:
            removed = store.prune()
        finally:
            stop.set()
            thread.join(60)
            other.close()
        assert not errors, errors
        survivors = {k for (k,) in store._run("list", None, f'SELECT key FROM "{store.table}"', ())}
        assert sorted(runs) == sorted(claimed)  # each ran its body: a first call, not a replay
        for i in claimed:  # each claim made during prune is still there
            assert body.key_for(i) in survivors, i
        assert removed + len(claimed) >= count  # each row pruned, or claimed before it was
        assert removed <= count
    finally:
        store.close()


def test_prune_stops_at_the_time_it_started(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows expiring while prune runs are the next prune's: at 50 k first calls a second,
    rows expire as fast as a prune removes them, and it must end."""
    store = fresh(postgres_server)
    try:
        fill(postgres_server, store, live=0, expired=10)
        statements = spy(store, monkeypatch)
        started = store.time()
        store.prune()
        times = {p["until"] for _, p in statements if isinstance(p, dict) and "until" in p}
        assert len(times) == 1
        assert started - 5 < times.pop() <= time.time() + 5
    finally:
        store.close()
