"""Stores and callers the tests share: a fresh store of each kind, a record's raw bytes, and a
runner that calls a decorated function synchronously whether it is sync or async.

Imported by the tests and by ``tests/conftest.py`` (whose fixtures build on it); nothing imports
the conftest.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from idemfn import DiskStore, MemoryStore, Store
from idemfn._stores.postgres import PostgresStore
from idemfn._stores.redis import RedisStore
from idemfn.testing import _age as age

from .deployments.redis_cluster import RedisClusterServers
from .servers import PostgresServer, RedisServer

if TYPE_CHECKING:
    from .deployments.pgbouncer import PgBouncer

STORES = ["memory", "disk", "redis", "postgres", "postgres-pgbouncer"]
# The conformance tests that also run on a Redis Cluster (issue 19): the store contract, claims
# and wake-ups. Not every test of STORES: the cluster's calls cost more, and the suite's time
# is budgeted (tests/stores/test_redis_cluster.py tests the rest of what a cluster changes).
WITH_CLUSTER = [*STORES, "redis-cluster"]


def make_store(
    kind: str, directory: Path, request: pytest.FixtureRequest | None = None, **options: Any
) -> Store:
    """A new, empty store of ``kind``; ``options`` go to its constructor (not memory's)."""
    if kind == "memory":
        return MemoryStore()
    if kind == "disk":
        return DiskStore(directory / "store", **options)
    if kind == "redis":
        assert request is not None
        server: RedisServer = request.getfixturevalue("redis_server")
        # One server for the session; a prefix of its own keeps each test's records apart.
        return RedisStore(server.url, prefix=f"test:{uuid.uuid4().hex}:", **options)
    if kind == "redis-cluster":
        assert request is not None
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        # One cluster for the session (three primaries); a prefix of its own for each test.
        return RedisStore(cluster.url, prefix=f"test:{uuid.uuid4().hex}:", **options)
    if kind == "postgres":
        assert request is not None
        pg: PostgresServer = request.getfixturevalue("postgres_server")
        # One cluster for the session; a table of its own for each test.
        return PostgresStore(pg.dsn, table=f"t_{uuid.uuid4().hex}", **options)
    if kind == "postgres-pgbouncer":
        assert request is not None
        bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
        # Through PgBouncer in transaction mode, in front of the worker's cluster (issue 19).
        return PostgresStore(
            bouncer.dsn, table=f"t_{uuid.uuid4().hex}", transaction_pooling=True, **options
        )
    raise AssertionError(kind)


def stored_bytes(store: Store, key: str) -> bytes:
    """``key``'s bytes as the backend holds them, read behind the store's back."""
    if isinstance(store, DiskStore):
        with contextlib.closing(sqlite3.connect(store.directory / "cache.db")) as db:
            row = db.execute("SELECT value FROM Cache WHERE key = ?", (key,)).fetchone()
    elif isinstance(store, RedisStore):
        row = (store.client.hget(store.prefix + key, "e"),)
    elif isinstance(store, PostgresStore):
        query = f'SELECT entry FROM "{store.table}" WHERE key = %s'
        row = store._run("read", key, query, (key,))[0]
    else:
        raise AssertionError(f"cannot read {store!r}'s bytes")
    assert row is not None and row[0] is not None, key
    return bytes(row[0])


def overwrite(store: Store, key: str, data: bytes) -> None:
    """Store ``data`` as ``key``'s record behind the store's back (the record must exist)."""
    if isinstance(store, DiskStore):
        with contextlib.closing(sqlite3.connect(store.directory / "cache.db")) as db, db:
            assert db.execute("UPDATE Cache SET value = ? WHERE key = ?", (data, key)).rowcount
    elif isinstance(store, RedisStore):
        assert store.client.exists(store.prefix + key)
        store.client.hset(store.prefix + key, "e", data)
    elif isinstance(store, PostgresStore):
        store._run(
            "overwrite", key, f'UPDATE "{store.table}" SET entry = %s WHERE key = %s', (data, key)
        )
    else:
        raise AssertionError(f"cannot overwrite {store!r}'s bytes")


class Runner:
    """Calls a decorated function synchronously, whether it is sync or async."""

    def __init__(self, fn: Any, is_async: bool) -> None:
        self.fn = fn
        self.is_async = is_async

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_async:
            return asyncio.run(self.fn(*args, **kwargs))
        return self.fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # key_for, status, forget, store
        return getattr(self.fn, name)


Make = Callable[..., Runner]


class StoreClock:
    """Moves ``store.time()`` on, and with it the engine's clock for the store: record times,
    expiry checks, deadlines and the leases of owners on other machines. (A server store's own
    expiry, on the server's clock, does not move: ``age`` a record for that.)"""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = 0.0
        real = store.time
        monkeypatch.setattr(store, "time", lambda: real() + self.offset)

        async def atime() -> float:  # (the store's sync clock: a test's server is never stalled)
            return real() + self.offset

        monkeypatch.setattr(store, "atime", atime)

    def advance(self, seconds: float) -> None:
        self.offset += seconds


__all__ = [
    "STORES",
    "WITH_CLUSTER",
    "Make",
    "Runner",
    "StoreClock",
    "age",
    "make_store",
    "overwrite",
    "stored_bytes",
]
