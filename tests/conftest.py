"""Shared fixtures: every behaviour test runs against each store, sync and async.

- ``store``: a fresh ``MemoryStore`` or ``DiskStore`` (in a temporary directory).
- ``make``: decorates a plain function with ``@idempotent(store=store, ...)`` either as it is
  or as an ``async def`` twin, and returns a ``Runner`` that calls it synchronously either way,
  so one test body checks both wrappers.
- The default store is redirected to a temporary directory for every test (autouse): no test
  ever touches the user's real state directory.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import idemfn
from idemfn import DiskStore, MemoryStore, Store, idempotent


@pytest.fixture(autouse=True)
def _isolated_default_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDEMFN_STORE", str(tmp_path / "default-store"))


@pytest.fixture(autouse=True)
def _idemfn_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="idemfn")


def make_store(kind: str, directory: Path) -> Store:
    if kind == "memory":
        return MemoryStore()
    if kind == "disk":
        return DiskStore(directory / "store")
    raise AssertionError(kind)


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = make_store(request.param, tmp_path)
    yield s
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


__all__ = ["Make", "Runner", "idemfn", "make_store"]
