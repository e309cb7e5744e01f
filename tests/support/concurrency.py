"""Callers of one key from several places at once, and what the engine does while they wait.

- ``Spec`` names a test's store so that another process can open the same one, and
  ``python -m tests.support.concurrency`` is that process: it calls a key's function from sync
  code there (``calls``; ``rounds``: new keys until told to stop) or holds a key until the
  test lets it go (``hold``).
- ``WatchSpy`` counts the watches a store opens for waiters, their waits and their closes.
- ``docs_store_class`` is the store of docs/stores/custom.md, which has only sync primitives.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from idemfn import DiskStore, Store, idempotent
from idemfn._stores.postgres import PostgresStore
from idemfn._stores.redis import RedisStore
from idemfn._wakeups import AsyncWatch, Watch

from .workers import ROOT, poll

__all__ = [
    "HELD",
    "MIXED",
    "HeldElsewhere",
    "Spec",
    "WatchSpy",
    "append_line",
    "docs_store_class",
    "finish",
    "fresh",
    "spec_of",
    "start",
]

# The function the mixed callers share, on both sides: its name makes the stored keys one.
MIXED: dict[str, Any] = {"name": "concurrency.mixed", "key": "{k}", "wait": 120}
HELD: dict[str, Any] = {"name": "concurrency.held", "key": "{k}"}

Spec = dict[str, str]

_MODULE = "tests.support.concurrency"  # (run as __main__ in the other process)


def spec_of(store: Store, request: pytest.FixtureRequest) -> Spec:
    """How another process opens ``store`` (a ``store`` fixture's disk, redis or postgres)."""
    if isinstance(store, DiskStore):
        return {"kind": "disk", "directory": str(store.directory)}
    if isinstance(store, RedisStore) and "+cluster://" in store.url:  # (issue 19)
        return {"kind": "redis", "url": store.url, "prefix": store.prefix}
    if isinstance(store, RedisStore):
        url = request.getfixturevalue("redis_server").url
        return {"kind": "redis", "url": url, "prefix": store.prefix}
    if isinstance(store, PostgresStore):
        dsn = request.getfixturevalue("postgres_server").dsn
        return {"kind": "postgres", "dsn": dsn, "table": store.table}
    raise AssertionError(f"{store!r} is not shared by processes")


def _open(spec: Spec) -> Store:
    if spec["kind"] == "disk":
        return DiskStore(spec["directory"])
    if spec["kind"] == "redis":
        return RedisStore(spec["url"], prefix=spec["prefix"])
    return PostgresStore(spec["dsn"], table=spec["table"])


def fresh(name: str) -> str:
    """``name`` made unique to a test: watches are kept by key for the whole process, and a
    test that fails must not leave its waiters on the next test's keys."""
    return f"{name}.{uuid.uuid4().hex[:8]}"


def append_line(path: Path, line: str) -> None:
    """Append ``line`` to ``path`` in one write: lines of several processes never mix."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def start(mode: str, spec: Spec, directory: Path, *args: str) -> subprocess.Popen[bytes]:
    """``python -m tests.support.concurrency mode spec directory args...``; its output goes to
    ``directory/<mode>-<pid>.log``."""
    log = (directory / f"{mode}-{time.monotonic_ns()}.log").open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", _MODULE, mode, json.dumps(spec), str(directory), *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    finally:
        log.close()


def finish(process: subprocess.Popen[bytes], directory: Path) -> None:
    """Wait for ``process`` (120 s at most, then SIGKILL) and fail unless it exited 0."""
    try:
        code = process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)
        code = -9
    if code != 0:
        logs = "\n".join(path.read_text() for path in sorted(directory.glob("*.log")))
        raise AssertionError(f"a caller process exited {code}:\n{logs}")


class HeldElsewhere:
    """A process that calls ``HELD``'s function for ``k`` and keeps the key claimed until
    ``let_go()`` (or the block's end); its body then returns ``"held:<k>"``."""

    def __init__(self, spec: Spec, directory: Path, k: int) -> None:
        self.directory = directory
        self.k = k
        self.process = start("hold", spec, directory, str(k))
        poll(lambda: (directory / f"holding-{k}").exists() or self._exited(), "the holder's claim")

    def _exited(self) -> bool:
        if self.process.poll() is not None:
            finish(self.process, self.directory)
        return False

    def let_go(self) -> None:
        (self.directory / f"let-go-{self.k}").touch()

    def __enter__(self) -> HeldElsewhere:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.let_go()
        finish(self.process, self.directory)


class WatchSpy:
    """Counts the watches ``store`` opens for waiters (sync and async), the waits on them, and
    how many were closed; ``waiting`` is set at each wait. Installed on the store object (the
    engine calls ``store.watch`` and ``store.awatch``), undone by ``monkeypatch``."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened = 0
        self.closed = 0
        self.waits = 0
        self.waiting = threading.Event()
        self._lock = threading.Lock()
        real_watch, real_awatch = store.watch, store.awatch
        monkeypatch.setattr(store, "watch", lambda key: _SpiedWatch(real_watch(key), self))
        monkeypatch.setattr(store, "awatch", lambda key: _SpiedAsyncWatch(real_awatch(key), self))

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)
        if what == "waits":
            self.waiting.set()

    def wait_for_a_waiter(self) -> None:
        """Until a waiter waits on its watch (60 s at most)."""
        assert self.waiting.wait(60), "no caller waited on a watch"

    async def await_a_waiter(self) -> None:
        """``wait_for_a_waiter``, from a coroutine: never blocks its loop."""
        give_up = time.monotonic() + 60
        while not self.waiting.is_set():
            assert time.monotonic() < give_up, "no caller waited on a watch"
            await asyncio.sleep(0.001)


class _SpiedWatch(Watch):
    def __init__(self, watch: Watch, spy: WatchSpy) -> None:
        self.watch = watch
        self.spy = spy
        spy._count("opened")

    @property  # type: ignore[override]  # read through: a store may turn it off (pub/sub failed)
    def hears_others(self) -> bool:
        return self.watch.hears_others

    def wait(self, seconds: float) -> None:
        self.spy._count("waits")
        self.watch.wait(seconds)

    def __enter__(self) -> Watch:
        self.watch.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.spy._count("closed")
        self.watch.__exit__(exc_type, exc, tb)


class _SpiedAsyncWatch(AsyncWatch):
    def __init__(self, watch: AsyncWatch, spy: WatchSpy) -> None:
        self.watch = watch
        self.spy = spy
        spy._count("opened")

    @property  # type: ignore[override]  # read through, as _SpiedWatch's
    def hears_others(self) -> bool:
        return self.watch.hears_others

    async def wait(self, seconds: float) -> None:
        self.spy._count("waits")
        await self.watch.wait(seconds)

    async def __aenter__(self) -> AsyncWatch:
        await self.watch.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.spy._count("closed")
        await self.watch.__aexit__(exc_type, exc, tb)


def docs_store_class() -> type[Store]:
    """``DictStore``, the store that docs/stores/custom.md writes (its first Python block): a
    third-party store with only the sync primitives."""
    page = (ROOT / "docs" / "stores" / "custom.md").read_text()
    block = re.search(r"```python\n(.*?)```", page, re.DOTALL)
    assert block is not None and "class DictStore(Store)" in block[1], "the page's store moved"
    namespace: dict[str, Any] = {"__name__": "docs_stores_custom"}
    exec(compile(block[1], "docs/stores/custom.md", "exec"), namespace)
    store_class: type[Store] = namespace["DictStore"]
    return store_class


# -- the other process ---------------------------------------------------------------------------


def _calls(store: Store, directory: Path, order: str, count: int) -> None:
    """Call ``MIXED``'s function from sync code for keys 0 to ``count - 1``, in ``order`` ("up"
    or "down"), once ``directory/go`` exists; write what each call returned to
    ``results-<pid>.json``."""

    @idempotent(store=store, **MIXED)
    def mixed(k: int) -> dict[str, Any]:
        append_line(directory / "runs", f"{k} {os.getpid()} sync")
        time.sleep(0.005)  # (widens the window in which other callers find the key running)
        return {"k": k, "by": f"{os.getpid()} sync"}

    keys = list(range(count))
    if order == "down":
        keys.reverse()
    (directory / f"ready-{os.getpid()}").touch()
    poll(lambda: (directory / "go").exists(), "the go file", timeout=120)
    results = {k: mixed(k) for k in keys}
    (directory / f"results-{os.getpid()}.json").write_text(json.dumps(results))


def _rounds(store: Store, directory: Path, tags: list[str], per_round: int) -> None:
    """Call ``MIXED``'s function for new keys round after round, once ``directory/go`` exists,
    until ``directory/stop`` does: round ``r``'s keys are ``{tag}-r-n`` (``n < per_round``),
    their tags taken in turn from ``tags`` (on a Redis Cluster, a hash tag names the key's
    slot). Every process calls the same keys in the same order; each writes what its calls
    returned to ``results-<pid>.json``."""

    @idempotent(store=store, **MIXED)
    def mixed(k: str) -> dict[str, Any]:
        append_line(directory / "runs", f"{k} {os.getpid()} sync")
        time.sleep(0.005)  # (widens the window in which other callers find the key running)
        return {"k": k, "by": f"{os.getpid()} sync"}

    (directory / f"ready-{os.getpid()}").touch()
    poll(lambda: (directory / "go").exists(), "the go file", timeout=120)
    results: dict[str, Any] = {}
    n = 0
    while not (directory / "stop").exists():
        for _ in range(per_round):
            key = f"{{{tags[n % len(tags)]}}}-{n // per_round}-{n % per_round}"
            results[key] = mixed(key)
            n += 1
    (directory / f"results-{os.getpid()}.json").write_text(json.dumps(results))


def _hold(store: Store, directory: Path, k: int) -> None:
    @idempotent(store=store, **HELD)
    def held(k: int) -> str:
        (directory / f"holding-{k}").touch()
        poll(lambda: (directory / f"let-go-{k}").exists(), "the let-go file", timeout=120)
        return f"held:{k}"

    held(k)


def main(argv: list[str]) -> int:
    mode, spec, directory = argv[0], json.loads(argv[1]), Path(argv[2])
    with _open(spec) as store:
        if mode == "calls":
            _calls(store, directory, argv[3], int(argv[4]))
        elif mode == "hold":
            _hold(store, directory, int(argv[3]))
        elif mode == "rounds":
            _rounds(store, directory, argv[3].split(","), int(argv[4]))
        else:
            raise AssertionError(mode)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def reads_of_others(store: Store, keys: list[str], reads: int) -> list[tuple[str, object]]:
    """Each of ``keys`` read ``reads`` times by a thread of its own, all at once (each key must
    hold a finished record): what a thread read that was not its own key's record (a reply
    handed to the wrong caller), which should be nothing."""
    wrong: list[tuple[str, object]] = []
    start = threading.Barrier(len(keys))

    def reader(key: str) -> None:
        start.wait(60)
        for _ in range(reads):
            entry = store.get(key)
            if entry is None or entry.key != key:
                wrong.append((key, entry))

    threads = [threading.Thread(target=reader, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return wrong
