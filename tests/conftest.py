"""Shared fixtures: every behaviour test runs against each store, sync and async.

- ``store``: a fresh ``MemoryStore``, ``DiskStore`` (in a temporary directory) or
  ``RedisStore`` (on a ``redis-server`` the suite starts, under a prefix of its own) or
  ``PostgresStore`` (on a PostgreSQL cluster the suite starts, in a table of its own).
- ``make``: decorates a plain function with ``@idempotent(store=store, ...)`` either as it is
  or as an ``async def`` twin, and returns a ``Runner`` that calls it synchronously either way,
  so one test body checks both wrappers.
- The default store is redirected to a temporary directory for every test (autouse): no test
  ever touches the user's real state directory.

No test waits for time to pass (a busy machine makes any such wait too short): ``age`` rewrites a
record as it will stand later, ``store_clock`` moves a store's clock on, and processes and
threads wait on conditions with generous timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import idemfn
from idemfn import DiskStore, MemoryStore, Store, idempotent
from idemfn._stores.postgres import PostgresStore
from idemfn._stores.redis import RedisStore
from idemfn.testing import _age as age

from .servers import PostgresServer, RedisServer, postgres_server, redis_server

# Hypothesis's defaults time each example (200 ms deadline) and fail a test whose data is slow
# to generate: both measure the machine, not idemfn. Tests that set their own settings keep
# these for what they leave out.
settings.register_profile("idemfn", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("idemfn")


@pytest.fixture(autouse=True)
def _isolated_default_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDEMFN_STORE", str(tmp_path / "default-store"))


@pytest.fixture(autouse=True)
def _idemfn_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="idemfn")


STORES = ["memory", "disk", "redis", "postgres"]


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
    if kind == "postgres":
        assert request is not None
        pg: PostgresServer = request.getfixturevalue("postgres_server")
        # One cluster for the session; a table of its own for each test.
        return PostgresStore(pg.dsn, table=f"t_{uuid.uuid4().hex}", **options)
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


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = make_store(request.param, tmp_path, request)
    yield s
    if isinstance(s, RedisStore):
        for name in s.client.scan_iter(match=f"{s.prefix}*"):
            s.client.delete(name)
    if isinstance(s, PostgresStore):
        s._run("drop", s.table, f'DROP TABLE IF EXISTS "{s.table}"', ())
    s.close()


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

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def store_clock(store: Store, monkeypatch: pytest.MonkeyPatch) -> StoreClock:
    """The ``store``'s clock, which the test moves on with ``store_clock.advance(seconds)``."""
    return StoreClock(store, monkeypatch)


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make(store: Store, mode: str) -> Make:
    def make(body: Callable[..., Any], **options: Any) -> Runner:
        options.setdefault("store", store)
        options.setdefault("name", f"test.{body.__name__}")
        if mode == "sync":
            return Runner(idempotent(**options)(body), is_async=False)

        @functools.wraps(body)
        async def twin(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0)
            return body(*args, **kwargs)

        assert inspect.iscoroutinefunction(twin)
        return Runner(idempotent(**options)(twin), is_async=True)

    return make


@pytest.fixture
def counter() -> Callable[..., Any]:
    """A body that counts its runs (``body.runs``) and returns its arguments."""

    def body(x: Any, y: Any = None) -> Any:
        body.runs += 1  # type: ignore[attr-defined]
        return {"x": x, "y": y}

    body.runs = 0  # type: ignore[attr-defined]
    return body


__all__ = [
    "STORES",
    "Make",
    "Runner",
    "StoreClock",
    "age",
    "idemfn",
    "make_store",
    "postgres_server",
    "redis_server",
]
