"""PostgresStore on tables the user made beforehand ``PARTITION BY HASH (key)``, with the recipe
docs/scaling.md gives (read from the page: the tested SQL is the documented SQL).

The store's statements all name one key (claims, swaps, reads, deletes: one partition each) or
none (prune, the listing: every partition); ``INSERT … ON CONFLICT (key)`` works because the
primary key is the partition key. The conformance suite runs on such a table, and the decorator
on top of it, in this process and in four racing ones.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from idemfn import FingerprintMismatch, PostgresStore, Store, idempotent
from idemfn._stores.postgres import store as store_module
from idemfn.testing import StoreContract
from idemfn.testing import _age as age
from tests.support.concurrency import finish, start
from tests.support.servers import PostgresServer
from tests.support.workers import poll

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 16


def recipe(table: str) -> str:
    """docs/scaling.md's SQL for a hash-partitioned store, for ``table``."""
    page = (ROOT / "docs" / "scaling.md").read_text()
    blocks = [b for b in re.findall(r"```sql\n(.*?)```", page, re.DOTALL) if "BY HASH" in b]
    assert len(blocks) == 1, "docs/scaling.md gives one PARTITION BY HASH recipe"
    assert "idemfn_records" in blocks[0] and f"MODULUS {PARTITIONS}" in blocks[0]
    return blocks[0].replace("idemfn_records", table)


def partitioned(server: PostgresServer) -> PostgresStore:
    """A PostgresStore on a table of its own, made by the recipe before the store's first use."""
    table = f"p_{uuid.uuid4().hex}"
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(recipe(table))
    return PostgresStore(server.dsn, table=table)


def _partitions_with_rows(server: PostgresServer, table: str) -> int:
    with psycopg.connect(server.dsn) as conn:
        row = conn.execute(f'SELECT count(DISTINCT tableoid) FROM "{table}"').fetchone()
    assert row is not None
    return int(row[0])


class TestStoreContractOnAPartitionedTable(StoreContract):
    """Every primitive's behaviour, on a table of 16 hash partitions."""

    @pytest.fixture
    def store(self, postgres_server: PostgresServer) -> Iterator[Store]:
        store = partitioned(postgres_server)
        yield store
        store.close()


def test_the_recipe_makes_the_columns_and_keys_the_store_makes(
    postgres_server: PostgresServer,
) -> None:
    """The recipe's tables are the store's own (same columns, types, nullability, primary
    keys), split in 16 partitions; the store adds its prune index to every partition."""
    ours = partitioned(postgres_server)
    theirs = PostgresStore(postgres_server.dsn, table=f"t_{uuid.uuid4().hex}")
    for store in (ours, theirs):
        store.get("warm-up")  # the store makes what is missing (its index, here)

    def shape(table: str) -> list[Any]:
        with psycopg.connect(postgres_server.dsn) as conn:
            columns = conn.execute(
                "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
                " WHERE table_name = %s ORDER BY ordinal_position",
                (table,),
            ).fetchall()
            key = conn.execute(
                "SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_index i JOIN pg_attribute"
                " a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indrelid ="
                " quote_ident(%s)::regclass AND i.indisprimary",
                (table,),
            ).fetchone()
        return [columns, key]

    try:
        for suffix in ("", "_leases"):
            assert shape(ours.table + suffix) == shape(theirs.table + suffix)
        with psycopg.connect(postgres_server.dsn) as conn:
            for table in (ours.table, ours.table + "_leases"):
                (count,) = conn.execute(
                    "SELECT count(*) FROM pg_partition_tree(quote_ident(%s)::regclass)"
                    " WHERE isleaf",
                    (table,),
                ).fetchone() or (0,)
                assert count == PARTITIONS
            indexed = conn.execute(
                "SELECT count(*) FROM pg_indexes WHERE tablename LIKE %s AND indexdef LIKE"
                " '%%(drop_at)%%'",
                (ours.table + "_p%",),
            ).fetchone()
            assert indexed == (PARTITIONS,)
    finally:
        ours.close()
        theirs.close()


def test_calls_replay_mismatch_forget_prune_and_list_across_partitions(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = partitioned(postgres_server)
    runs: list[int] = []

    @idempotent(key="order-{i}", store=store, name="part.charge", ttl=3600)
    def charge(i: int, amount: int = 10) -> dict[str, int]:
        runs.append(i)
        return {"i": i, "amount": amount}

    try:
        assert [charge(i) for i in range(60)] == [{"i": i, "amount": 10} for i in range(60)]
        assert [charge(i) for i in range(60)] == [{"i": i, "amount": 10} for i in range(60)]
        assert runs == list(range(60))  # replayed, each from its own partition
        assert _partitions_with_rows(postgres_server, store.table) > PARTITIONS // 2
        with pytest.raises(FingerprintMismatch):
            charge(7, amount=99)
        assert charge.forget(7)
        assert charge(7, amount=99) == {"i": 7, "amount": 99}
        assert runs[-1] == 7
        assert sorted(e.key for e in store.scan("part.charge")) == sorted(
            charge.key_for(i) for i in range(60)
        )
        used = store.bytes_used()
        assert used is not None and used > 60 * 300  # every partition's, not the parent's 0
        # Twenty records expired an hour ago, pruned in batches of 3 across the partitions.
        for i in range(20):
            age(store, charge.key_for(i), 7200)
        monkeypatch.setattr(store_module, "_PRUNE_BATCH", 3)
        assert store.prune() == 20
        assert store.prune() == 0
        assert len(list(store.scan())) == 40
        assert charge(0) == {"i": 0, "amount": 10}  # pruned: runs again
        assert runs[-1] == 0
    finally:
        store.close()


@pytest.mark.slow
def test_four_racing_processes_run_each_body_once_on_a_partitioned_table(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    store = partitioned(postgres_server)
    store.get("warm-up")  # its index made before the processes race
    store.close()
    count = 40
    spec = {"kind": "postgres", "dsn": postgres_server.dsn, "table": store.table}
    orders = ("up", "down", "up", "down")
    children = [start("calls", spec, tmp_path, order, str(count)) for order in orders]
    try:

        def ready() -> bool:
            for child in children:
                if child.poll() is not None:
                    finish(child, tmp_path)  # raises: it exited before it was ready
            return len(list(tmp_path.glob("ready-*"))) == len(children)

        poll(ready, "the caller processes")
        (tmp_path / "go").touch()
    finally:
        for child in children:
            finish(child, tmp_path)
    runs = [line.split(" ", 1) for line in (tmp_path / "runs").read_text().splitlines()]
    assert sorted(int(k) for k, _ in runs) == list(range(count)), runs  # each body once
    ran_by = {int(k): by for k, by in runs}
    results = [json.loads(p.read_text()) for p in tmp_path.glob("results-*.json")]
    assert len(results) == len(children)
    for result in results:  # every caller got the one run's value
        assert {int(k): v["by"] for k, v in result.items()} == ran_by
    assert _partitions_with_rows(postgres_server, store.table) > PARTITIONS // 2
