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

The suite runs in parallel (pytest-xdist, ``-n auto --dist loadgroup`` in pyproject.toml; ``-n 0``
runs it serially), with two workers per CPU (``pytest_xdist_auto_num_workers`` below). Each
worker is a process of its own with its own servers (session fixtures: a redis-server and a
PostgreSQL cluster in temporary directories of its own, on unix sockets), so tests share
nothing but the machine. What must not run beside its like carries an ``xdist_group`` mark, and
loadgroup runs a group's tests on one worker, one after the other:

- ``system-users`` (tests/stores/test_store_path.py): the tests that make the system users
  idemfn-victim and idemfn-attacker (two ``useradd`` at once contend for /etc/passwd).
- ``machine-load`` (tests/tools: the benchmarks, the comparison, the crash storm): each loads
  every core with processes of its own; the crash storm's workers must renew 5 s leases in
  time. One at a time, they never add up (ordinary tests still run beside them).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from idemfn import Store, idempotent
from idemfn._stores.postgres import PostgresStore
from idemfn._stores.redis import RedisStore
from tests.support.stores import STORES, Make, Runner, StoreClock, make_store

# The session's servers (redis_server, postgres_server) are fixtures of tests/support/servers.py.
pytest_plugins = [
    "tests.support.servers",
    "tests.support.deployments.pg_standby",
    "tests.support.deployments.pgbouncer",
    "tests.support.deployments.redis_cluster",
    "tests.support.deployments.redis_replicated",
]

# Hypothesis's defaults time each example (200 ms deadline) and fail a test whose data is slow
# to generate: both measure the machine, not idemfn. Tests that set their own settings keep
# these for what they leave out.
settings.register_profile("idemfn", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("idemfn")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: two workers per CPU this process may use (``PYTEST_XDIST_AUTO_NUM_WORKERS``
    still overrides). About half of a test's time is waiting, not computing: for a subprocess
    or a server to start, a worker to pick a task up, a connect timeout to run out. On 2 cores
    the suite took 3 min 58 s with 2 workers and 2 min 58 s with 4."""
    given = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    if given:
        return int(given)
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None  # not macOS
    # At most 8: each worker starts its own redis-server and PostgreSQL cluster.
    return min(8, 2 * (len(usable) if usable else os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # In an xdist worker (every worker collects the same order, which the controller deals out
    # from): slow tests first, so that the last ones dealt are short and the workers finish
    # together instead of one waiting for the other's long test. A serial run keeps file order.
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _isolated_default_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDEMFN_STORE", str(tmp_path / "default-store"))


@pytest.fixture(autouse=True)
def _idemfn_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="idemfn")


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
