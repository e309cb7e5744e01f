"""Real processes against a real ``DiskStore``: races, crashes, stopped owners, fork, hash seeds.

Nothing here is mocked. Child processes are either ``subprocess`` children running a small script
written to ``tmp_path`` (``CHILD_SCRIPT``), ``multiprocessing`` children of the ``fork`` context,
or bare ``os.fork()`` children. Every test polls for the state it needs instead of sleeping for a
fixed time, and kills and reaps its children in ``finally`` blocks.

The parent side of a subprocess test decorates its own ``work(key, arg=None)`` with the same
``name=`` and ``key=`` as the child's, so both map to one stored key with one fingerprint; a body
that runs appends ``"<label> <pid> <key>"`` to a shared log, which is how the tests count runs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

import idemfn
from idemfn import DiskStore, MemoryStore, Status, Store, _lease, idempotent
from tests.support.deployments.pgbouncer import PgBouncer
from tests.support.forks import fork_and_wait
from tests.support.records import processing
from tests.support.servers import PostgresServer, RedisServer

FORK = multiprocessing.get_context("fork")

CHILD_SCRIPT = '''\
"""One @idempotent call in its own process (written by tests/contract/test_processes.py)."""
import json
import os
import signal
import sys
import time

import idemfn

# A test runner started in the background ignores SIGINT, and children inherit that: restore
# Python's handler so that SIGINT raises KeyboardInterrupt here, as in a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)

cfg = json.loads(sys.argv[1])


def append(path, line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@idemfn.idempotent(
    key="{key}",
    name=cfg["name"],
    store=idemfn.open_store(cfg["store"]),
    lease=cfg["lease"],
    wait=cfg["wait"],
    on_abandoned=cfg["on_abandoned"],
)
def work(key, arg=None):
    append(cfg["log"], f"{cfg['label']} {os.getpid()} {key}\\n")
    append(cfg["started"], f"{os.getpid()}\\n")
    if cfg.get("fail"):
        raise ValueError(cfg["fail"])
    if cfg.get("release"):  # runs until the test says (or 120 s, not to outlive a broken test)
        give_up = time.monotonic() + 120
        while not os.path.exists(cfg["release"]) and time.monotonic() < give_up:
            time.sleep(0.005)
    else:
        time.sleep(cfg["sleep"])
    return {"by": cfg["label"], "pid": os.getpid(), "key": key, "nonce": os.urandom(8).hex()}


def report(outcome):
    tmp = cfg["result"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(outcome, f)
    os.replace(tmp, cfg["result"])


try:
    value = work(cfg["key"])
except idemfn.IdempotencyError as exc:
    report({"error": type(exc).__name__, "message": str(exc)})
    sys.exit(3)
report({"value": value})
'''

HASHSEED_SCRIPT = '''\
"""Calls ship() with set and dict arguments whose iteration order follows PYTHONHASHSEED."""
import json
import os
import sys

import idemfn

store_dir, log, result = sys.argv[1:4]


@idemfn.idempotent(key="{order}", name="procs.hashseed", store=idemfn.DiskStore(store_dir))
def ship(order, tags, weights, nested):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{os.getpid()}\\n".encode())
    finally:
        os.close(fd)
    return {"order": order, "pid": os.getpid(), "tags": len(tags)}


tags = {f"tag-{n}" for n in range(40)}
weights = {tag: len(tag) for tag in tags}  # insertion order = this process's set order
nested = {"all": frozenset(tags), "sets": [set(tags), {1.5, "x", b"y"}], "w": weights}
outcome = {"iteration_order": list(tags), "pid": os.getpid()}
try:
    outcome["value"] = ship("o-1", tags, weights, nested)
except idemfn.IdempotencyError as exc:
    outcome["error"] = f"{type(exc).__name__}: {exc}"
with open(result, "w") as f:
    json.dump(outcome, f)
'''


# -- helpers -------------------------------------------------------------------------------------


def _append(path: Path | str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _poll(condition: Callable[[], object], what: str, timeout: float = 60.0) -> Any:
    """Return ``condition()`` once it is truthy; fail after ``timeout`` seconds."""
    give_up = time.monotonic() + timeout
    delay = 0.002
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc (R, S, T, Z, ...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    return raw.rpartition(")")[2].split()[0]


def _make_work(
    store: Store,
    *,
    name: str,
    label: str,
    log: Path,
    sleep: float = 0.0,
    **options: Any,
) -> Any:
    """This process's twin of ``CHILD_SCRIPT``'s ``work``: same name, key and signature."""

    def work(key: str, arg: object = None) -> dict[str, Any]:
        _append(log, f"{label} {os.getpid()} {key}\n")
        time.sleep(sleep)
        return {"by": label, "pid": os.getpid(), "key": key, "nonce": os.urandom(8).hex()}

    return idempotent(key="{key}", name=name, store=store, **options)(work)


def _runs(log: Path, label: str) -> list[str]:
    return [line for line in _lines(log) if line.split()[0] == label]


def _child_cfg(
    tmp_path: Path,
    *,
    name: str,
    key: str,
    label: str = "child",
    lease: float = 30.0,
    wait: float = 0.0,
    on_abandoned: str = "halt",
    sleep: float = 60.0,
    fail: str = "",
    store: str | None = None,
    release: Path | None = None,
) -> dict[str, Any]:
    return {
        "release": "" if release is None else str(release),
        "fail": fail,
        "store": store or str(tmp_path / "store"),
        "log": str(tmp_path / "log"),
        "started": str(tmp_path / f"{label}.started"),
        "result": str(tmp_path / f"{label}.json"),
        "name": name,
        "key": key,
        "label": label,
        "lease": lease,
        "wait": wait,
        "on_abandoned": on_abandoned,
        "sleep": sleep,
    }


def _start_child(
    tmp_path: Path, cfg: dict[str, Any], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    script = tmp_path / "idemfn_child.py"
    if not script.exists():
        script.write_text(CHILD_SCRIPT)
    with open(tmp_path / f"{cfg['label']}.stderr", "wb") as err:
        return subprocess.Popen(
            [sys.executable, str(script), json.dumps(cfg)],
            stdout=err,
            stderr=err,
            cwd=tmp_path,
            env=env,
            # Stopped by tests (SIGSTOP): out of the suite's process group, which the kernel
            # continues when an `idemfn run` command in it exits (see RedisServer.start).
            start_new_session=True,
        )


def _stderr(tmp_path: Path, label: str) -> str:
    path = tmp_path / f"{label}.stderr"
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_started(proc: subprocess.Popen[bytes], cfg: dict[str, Any], tmp_path: Path) -> None:
    """Wait until the child's body runs (its marker exists); fail at once if it died."""
    marker = Path(cfg["started"])

    def started() -> bool:
        if marker.exists():
            return True
        if proc.poll() is not None:
            raise AssertionError(
                f"the child exited ({proc.returncode}) before its body started:\n"
                + _stderr(tmp_path, cfg["label"])
            )
        return False

    _poll(started, f"the body of {cfg['label']} to start")


def _result(cfg: dict[str, Any]) -> dict[str, Any]:
    return json.loads(Path(cfg["result"]).read_text())  # type: ignore[no-any-return]


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    """Kill (also a stopped or zombie child) and reap."""
    for proc in procs:
        if proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _join(procs: Iterable[Any], timeout: float) -> None:
    give_up = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, give_up - time.monotonic()))


def _kill_mp(procs: Iterable[Any]) -> None:
    for proc in procs:
        if proc.pid is not None and proc.is_alive():
            proc.kill()
        if proc.pid is not None:
            proc.join(10)


def _write_json(path: str, obj: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


@pytest.fixture(params=["disk", "redis", "postgres", "postgres-pgbouncer"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store every process opens with ``idemfn.open_store(where)``: a directory, or the
    suite's redis-server or PostgreSQL (emptied first), directly or through PgBouncer in
    transaction mode (``?transaction_pooling=true``)."""
    if request.param == "disk":
        return str(tmp_path / "store")
    if request.param.startswith("postgres"):
        pg: PostgresServer = request.getfixturevalue("postgres_server")
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS idemfn_records")
        if request.param == "postgres-pgbouncer":
            bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
            return f"{bouncer.url}&transaction_pooling=true"
        return f"postgresql://postgres@/postgres?host={pg.socket_dir}"
    server: RedisServer = request.getfixturevalue("redis_server")
    redis.Redis(unix_socket_path=str(server.socket)).flushdb()
    return server.url


# -- 1. racing processes x threads on the same keys ---------------------------------------------

N_PROCS, N_THREADS, N_KEYS = 8, 4, 200


def _race_worker(
    store_dir: str, name: str, wait: float, log: str, result: str, barrier: Any, seed: int
) -> None:
    """A forked worker: N_THREADS threads each call every key once, in their own order."""

    def body(i: int) -> dict[str, int]:
        _append(log, f"{i}\n")
        time.sleep(0.001)  # widen the in-flight window so that callers really collide
        return {"i": i, "pid": os.getpid()}

    fn = idempotent(key="k:{i}", name=name, store=idemfn.open_store(store_dir), wait=wait)(body)
    outcomes: list[list[Any]] = []
    lock = threading.Lock()

    def caller(t: int) -> None:
        keys = list(range(N_KEYS))
        random.Random(seed * 1000 + t).shuffle(keys)
        mine: list[list[Any]] = []
        barrier.wait(timeout=60)
        for i in keys:
            out: Any
            try:
                out = fn(i)
            except idemfn.AlreadyRunning:
                out = "AlreadyRunning"
            except Exception as exc:
                out = f"UNEXPECTED {type(exc).__name__}: {exc}"
            mine.append([i, out])
        with lock:
            outcomes.extend(mine)

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(N_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _write_json(result, {"pid": os.getpid(), "outcomes": outcomes})


@pytest.mark.slow
@pytest.mark.parametrize("wait", [0.0, 30.0], ids=["wait0", "wait30"])
def test_racing_processes_and_threads_run_each_key_once(
    tmp_path: Path, wait: float, where: str
) -> None:
    store_dir = where
    log = tmp_path / "bodies.log"
    name = f"procs.race.{int(wait)}"
    barrier = FORK.Barrier(N_PROCS * N_THREADS + 1)
    results = [tmp_path / f"worker-{w}.json" for w in range(N_PROCS)]
    procs = [
        FORK.Process(
            target=_race_worker,
            args=(store_dir, name, wait, str(log), str(results[w]), barrier, w),
            daemon=True,
        )
        for w in range(N_PROCS)
    ]
    try:
        for proc in procs:
            proc.start()
        barrier.wait(timeout=60)  # everyone is ready: go
        _join(procs, timeout=240)
        assert [p.exitcode for p in procs] == [0] * N_PROCS
    finally:
        _kill_mp(procs)
    worker_pids = {p.pid for p in procs}

    # Exactly one body run per key, across all processes and threads.
    counts = Counter(_lines(log))
    assert {line: n for line, n in counts.items() if n != 1} == {}, "a body ran twice"
    assert sorted(counts, key=int) == [str(i) for i in range(N_KEYS)]

    store = idemfn.open_store(store_dir)
    parent_log = tmp_path / "parent.log"

    def body(i: int) -> dict[str, int]:
        _append(parent_log, f"{i}\n")
        return {"i": i, "pid": os.getpid()}

    fn = idempotent(key="k:{i}", name=name, store=store)(body)
    try:
        for i in range(N_KEYS):
            record = fn.status(i)
            assert record is not None, i
            assert record.status is Status.OK, record
            assert record.attempt == 1
        recorded = {i: fn(i) for i in range(N_KEYS)}
    finally:
        store.close()
    assert not parent_log.exists(), "a finished key ran its body again in the parent"

    # Every caller saw the one recorded value of its key, or (only with wait=0) AlreadyRunning.
    calls = 0
    busy = 0
    for path in results:
        report = json.loads(path.read_text())
        for i, out in report["outcomes"]:
            calls += 1
            if out == "AlreadyRunning":
                busy += 1
                continue
            assert out == recorded[i], (i, out, recorded[i])
    assert calls == N_PROCS * N_THREADS * N_KEYS
    if wait:
        assert busy == 0, f"{busy} callers got AlreadyRunning despite wait={wait}"
    for i, value in recorded.items():
        assert value["i"] == i
        assert value["pid"] in worker_pids


# -- 2. a killed owner: halt --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_killed_owner_halts_the_key_at_once(tmp_path: Path, reap: bool, where: str) -> None:
    name, key = "procs.crash_halt", "order-1"
    cfg = _child_cfg(tmp_path, name=name, key=key, on_abandoned="halt", sleep=60.0, store=where)
    log = Path(cfg["log"])
    store = idemfn.open_store(where)
    # wait=0: were the dead owner not seen as dead at the first look, this call would raise
    # AlreadyRunning (its lease has 30 s to go).
    fn = _make_work(store, name=name, label="parent", log=log, lease=30.0, wait=0.0)
    proc = _start_child(tmp_path, cfg)
    try:
        _wait_started(proc, cfg, tmp_path)
        claim = fn.status(key)
        assert claim is not None
        assert claim.status is Status.PROCESSING
        assert f"/{proc.pid}/" in claim.owner

        proc.send_signal(signal.SIGKILL)
        if reap:
            proc.wait(timeout=10)
            assert _proc_state(proc.pid) is None
        else:
            # Wait for the death but leave the child unreaped: a zombie still has a /proc entry.
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            assert _proc_state(proc.pid) == "Z"

        with pytest.raises(idemfn.Halted) as info:
            fn(key)
        assert info.value.key == fn.key_for(key)
        assert claim.owner in info.value.reason
        assert str(proc.pid) in info.value.reason
        if not reap:
            assert _proc_state(proc.pid) == "Z"  # it really was a zombie throughout

        record = fn.status(key)
        assert record is not None
        assert record.status is Status.HALTED
        assert record.owner == claim.owner
        assert record.token == claim.token
        assert record.reason is not None
        assert claim.owner in record.reason

        with pytest.raises(idemfn.Halted) as again:  # a replay: still halted, body not run
            fn(key)
        assert again.value.reason == info.value.reason
        assert fn.status(key) == record
        assert _runs(log, "parent") == []
        assert len(_runs(log, "child")) == 1
    finally:
        _stop(proc)
        store.close()


# -- 2b. a caller already waiting when the owner dies; an interrupted owner; a recorded error --


@pytest.mark.slow
def test_a_waiting_caller_sees_the_crash_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, key = "procs.crash_wait", "order-5"
    # The owner's lease (600 s) outlasts the waiter's wait (60 s): a waiter that waited for the
    # lease instead of seeing the process die would give up with AlreadyRunning.
    cfg = _child_cfg(tmp_path, name=name, key=key, lease=600.0, on_abandoned="retry", sleep=120.0)
    log = Path(cfg["log"])
    store = DiskStore(tmp_path / "store")
    fn = _make_work(
        store, name=name, label="parent", log=log, lease=30.0, wait=60.0, on_abandoned="retry"
    )
    outcome: dict[str, Any] = {}
    looks: list[str] = []  # what the waiter found each time it looked at the key
    get = store.get

    def looked(k: str) -> Any:
        entry = get(k)
        looks.append("none" if entry is None else entry.status)
        return entry

    monkeypatch.setattr(store, "get", looked)

    def waiter() -> None:
        try:
            outcome["value"] = fn(key)
        except Exception as exc:
            outcome["error"] = exc

    proc = _start_child(tmp_path, cfg)
    thread = threading.Thread(target=waiter, daemon=True)
    try:
        _wait_started(proc, cfg, tmp_path)
        thread.start()
        # Waiting: it found the live owner's claim, slept, and looked again.
        _poll(lambda: looks.count("processing") >= 2 or not thread.is_alive(), "the waiter")
        assert thread.is_alive(), outcome
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        thread.join(60)
        assert not thread.is_alive(), "the waiter did not notice its owner died"
    finally:
        _stop(proc)
        store.close()
    assert "error" not in outcome, outcome
    assert outcome["value"]["by"] == "parent"
    assert len(_runs(log, "parent")) == 1
    assert len(_runs(log, "child")) == 1


@pytest.mark.slow
def test_an_interrupted_owner_records_halted_and_never_replays_the_interrupt(
    tmp_path: Path,
) -> None:
    name, key = "procs.sigint", "order-6"
    cfg = _child_cfg(tmp_path, name=name, key=key, sleep=60.0)
    log = Path(cfg["log"])
    store = DiskStore(tmp_path / "store")
    fn = _make_work(store, name=name, label="parent", log=log)
    proc = _start_child(tmp_path, cfg)
    try:
        _wait_started(proc, cfg, tmp_path)
        proc.send_signal(signal.SIGINT)  # KeyboardInterrupt inside the body
        proc.wait(timeout=60)
        assert proc.returncode != 0
        record = fn.status(key)
        assert record is not None
        assert record.status is Status.HALTED, record
        assert record.exc_type is not None
        assert "KeyboardInterrupt" in record.exc_type
        assert f"/{proc.pid}/" in record.owner
        replayed: BaseException | None = None
        try:
            fn(key)
        except KeyboardInterrupt:  # never let it reach pytest: it would end the session
            raise AssertionError("a replay raised KeyboardInterrupt") from None
        except Exception as exc:
            replayed = exc
        assert isinstance(replayed, idemfn.Halted), replayed
        assert "KeyboardInterrupt" in str(replayed)
    finally:
        _stop(proc)
        store.close()
    assert _runs(log, "parent") == []


@pytest.mark.slow
def test_an_exception_recorded_in_a_child_replays_in_the_parent(tmp_path: Path) -> None:
    name, key = "procs.error", "order-7"
    cfg = _child_cfg(tmp_path, name=name, key=key, fail="card declined")
    log = Path(cfg["log"])
    proc = _start_child(tmp_path, cfg)
    store = DiskStore(tmp_path / "store")
    fn = _make_work(store, name=name, label="parent", log=log)
    try:
        proc.wait(timeout=60)
        assert "ValueError: card declined" in _stderr(tmp_path, "child")
        record = fn.status(key)
        assert record is not None
        assert record.status is Status.HALTED
        with pytest.raises(ValueError, match="card declined") as info:
            fn(key)
        assert any(fn.key_for(key) in note for note in getattr(info.value, "__notes__", []))
    finally:
        _stop(proc)
        store.close()
    assert _runs(log, "parent") == []
    assert len(_runs(log, "child")) == 1


# -- 3. a killed owner: retry, by racing processes ----------------------------------------------


def _retry_worker(store_dir: str, name: str, key: str, log: str, result: str, barrier: Any) -> None:
    fn = _make_work(
        idemfn.open_store(store_dir),
        name=name,
        label="retry",
        log=Path(log),
        sleep=0.2,
        lease=30.0,
        wait=120.0,
        on_abandoned="retry",
    )
    barrier.wait(timeout=60)
    try:
        outcome: dict[str, Any] = {"value": fn(key)}
    except Exception as exc:
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
    _write_json(result, outcome)


@pytest.mark.slow
def test_killed_owner_is_retried_exactly_once_by_racing_processes(
    tmp_path: Path, where: str
) -> None:
    name, key = "procs.crash_retry", "order-2"
    cfg = _child_cfg(tmp_path, name=name, key=key, on_abandoned="retry", sleep=60.0, store=where)
    log = Path(cfg["log"])
    proc = _start_child(tmp_path, cfg)
    try:
        _wait_started(proc, cfg, tmp_path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        _stop(proc)

    n = 6
    barrier = FORK.Barrier(n + 1)
    results = [tmp_path / f"retry-{w}.json" for w in range(n)]
    procs = [
        FORK.Process(
            target=_retry_worker,
            args=(cfg["store"], name, key, str(log), str(results[w]), barrier),
            daemon=True,
        )
        for w in range(n)
    ]
    try:
        for p in procs:
            p.start()
        barrier.wait(timeout=60)
        _join(procs, timeout=200)
        assert [p.exitcode for p in procs] == [0] * n
    finally:
        _kill_mp(procs)

    outcomes = [json.loads(path.read_text()) for path in results]
    assert all("value" in o for o in outcomes), outcomes
    values = [o["value"] for o in outcomes]
    assert all(v == values[0] for v in values), values
    assert values[0]["by"] == "retry"
    assert values[0]["pid"] in {p.pid for p in procs}

    assert len(_runs(log, "child")) == 1
    retries = _runs(log, "retry")
    assert len(retries) == 1, f"the abandoned key was run again {len(retries)} times"
    assert retries[0].split()[1] == str(values[0]["pid"])

    store = idemfn.open_store(cfg["store"])
    fn = _make_work(store, name=name, label="parent", log=log, on_abandoned="retry")
    try:
        record = fn.status(key)
        assert record is not None
        assert record.status is Status.OK
        assert record.attempt == 2
        assert f"/{values[0]['pid']}/" in record.owner
        assert fn(key) == values[0]
    finally:
        store.close()
    assert _runs(log, "parent") == []


# -- 4. a stopped owner whose lease ran out, taken over, then resumed ---------------------------


def _sigstop_outside_a_write(pid: int, store_dir: Path) -> None:
    """SIGSTOP ``pid`` at a moment it holds no SQLite write lock (else every writer would block
    on the stopped process until the busy timeout, which is SQLite's limit, not idemfn's)."""
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        _poll(lambda: _proc_state(pid) in ("T", "t"), f"process {pid} to stop", timeout=10)
        con = sqlite3.connect(store_dir / "cache.db", timeout=0.2, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            pass  # stopped mid-write: let it finish, then try again
        finally:
            con.close()
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError(f"could not stop process {pid} outside a write")


@pytest.mark.slow
def test_late_owner_loses_ownership_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, key = "procs.late_owner", "order-3"
    release = tmp_path / "release-A"
    cfg = _child_cfg(
        tmp_path, name=name, key=key, label="A", lease=30.0, on_abandoned="retry", release=release
    )
    log = Path(cfg["log"])
    store = DiskStore(tmp_path / "store")
    fn = _make_work(store, name=name, label="parent", log=log, lease=30.0, on_abandoned="retry")
    proc = _start_child(tmp_path, cfg)
    try:
        _wait_started(proc, cfg, tmp_path)
        _sigstop_outside_a_write(proc.pid, tmp_path / "store")

        # A is stopped, so its heartbeat cannot renew. Its lease runs out: this process's
        # clocks move an hour on (this machine's leases are timed on the lease clock, others'
        # on the store's), instead of this test waiting for them.
        claim = fn.status(key)
        assert claim is not None
        assert claim.status is Status.PROCESSING
        assert claim.attempt == 1
        assert claim.lease_expires_at is not None
        real_lease_clock, real_store_time = _lease.clock, store.time
        monkeypatch.setattr(_lease, "clock", lambda: real_lease_clock() + 3600)
        monkeypatch.setattr(store, "time", lambda: real_store_time() + 3600)

        value = fn(key)  # takes the abandoned claim over and runs the body
        assert value["by"] == "parent"
        assert value["pid"] == os.getpid()
        assert len(_runs(log, "parent")) == 1
        taken = fn.status(key)
        assert taken is not None
        assert taken.status is Status.OK
        assert taken.attempt == 2
        assert taken.token != claim.token
        assert taken.owner != claim.owner

        release.touch()  # A's body returns as soon as it runs again
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=60)
        outcome = _result(cfg)
        assert outcome.get("error") == "OwnershipLost", (outcome, _stderr(tmp_path, "A"))
        assert proc.returncode == 3

        final = fn.status(key)
        assert final == taken, "the late owner changed the record"
        assert fn(key) == value
        assert len(_runs(log, "parent")) == 1
        assert len(_runs(log, "A")) == 1
    finally:
        if proc.returncode is None:
            try:
                os.kill(proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        _stop(proc)
        store.close()


# -- 5. the heartbeat keeps a slow live owner ---------------------------------------------------


@pytest.mark.slow
def test_heartbeat_keeps_a_slow_owner_from_being_taken_over(tmp_path: Path) -> None:
    # The child's body runs until its lease was renewed twice (the parent then releases it),
    # and the parent keeps calling meanwhile: none of its calls may take the key over. The
    # lease is renewed every 2 s and runs out 6 s after a renewal, so the child's heartbeat
    # may fall 4 s behind on a busy machine before the parent could take over; a heartbeat
    # that does not renew (lease_until and lease_mono) never gets the body released.
    name, key = "procs.heartbeat", "order-4"
    lease = 6.0
    release = tmp_path / "release"
    cfg = _child_cfg(
        tmp_path, name=name, key=key, lease=lease, on_abandoned="retry", release=release
    )
    log = Path(cfg["log"])
    store = DiskStore(tmp_path / "store")
    fn = _make_work(store, name=name, label="parent", log=log, lease=lease, on_abandoned="retry")
    proc = _start_child(tmp_path, cfg)
    try:
        _wait_started(proc, cfg, tmp_path)
        give_up = time.monotonic() + 120
        busy = 0
        owners = set()
        lease_ends: set[tuple[float | None, float | None]] = set()
        while True:
            try:
                value = fn(key)
                break
            except idemfn.AlreadyRunning as exc:
                busy += 1
                owners.add(exc.owner)
            entry = store.get(fn.key_for(key))
            if entry is not None and entry.status == "processing":
                lease_ends.add((entry.lease_until, entry.lease_mono))
            if len(lease_ends) >= 3:
                release.touch()
            assert time.monotonic() < give_up, f"the child never finished: {lease_ends}"
            time.sleep(0.05)
        proc.wait(timeout=60)
        assert proc.returncode == 0, _stderr(tmp_path, "child")
    finally:
        _stop(proc)
        store.close()

    assert _runs(log, "parent") == [], "a live owner's key was taken over"
    assert value == _result(cfg)["value"]
    assert value["by"] == "child"
    assert busy >= 3
    assert len(owners) == 1
    assert f"/{proc.pid}/" in owners.pop()
    # Each renewal moved both ends on (a renewal of only one would let the key be taken over).
    assert len({until for until, _ in lease_ends}) == len({mono for _, mono in lease_ends}) >= 3
    record = fn.status(key)
    assert record is not None
    assert record.status is Status.OK
    assert record.attempt == 1


# -- 6. fork after the store is open ------------------------------------------------------------


def _forked_child(
    fn: Any, fn_wait: Any, c: int, parent_value: dict[str, int], results: Path
) -> int:
    for i in range(1000 * (c + 1), 1000 * (c + 1) + 20):
        value = fn(i)
        assert value == {"i": i, "pid": os.getpid()}, value
        assert fn(i) == value  # and its own replay
    assert fn(0) == parent_value  # the parent's record, replayed from the child
    shared = fn_wait(999)  # one key raced by every child
    _write_json(str(results / f"child-{c}.json"), {"pid": os.getpid(), "shared": shared})
    return 0


@pytest.mark.slow
def test_fork_after_the_store_is_open(tmp_path: Path) -> None:
    log = tmp_path / "bodies.log"
    store = DiskStore(tmp_path / "store")

    def body(i: int) -> dict[str, int]:
        _append(log, f"{os.getpid()} {i}\n")
        time.sleep(0.01 if i == 999 else 0)
        return {"i": i, "pid": os.getpid()}

    fn = idempotent(key="k:{i}", name="procs.fork", store=store)(body)
    fn_wait = idempotent(key="k:{i}", name="procs.fork", store=store, wait=120.0)(body)
    parent_value = fn(0)  # the store's SQLite connection is open now
    assert parent_value == {"i": 0, "pid": os.getpid()}

    n = 4
    children: dict[int, int] = {}  # pid -> child number
    statuses: dict[int, int] = {}
    try:
        for c in range(n):
            pid = os.fork()
            if pid == 0:  # the child: never return into pytest
                code = 70
                try:
                    code = _forked_child(fn, fn_wait, c, parent_value, tmp_path)
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            children[pid] = c
        # The parent keeps using its own connection while the children run.
        for i in range(100, 110):
            assert fn(i) == {"i": i, "pid": os.getpid()}

        def all_exited() -> bool:
            for pid in children:
                if pid not in statuses:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        statuses[pid] = os.waitstatus_to_exitcode(status)
            return len(statuses) == n

        _poll(all_exited, "the forked children to exit", timeout=180)
        assert statuses == dict.fromkeys(children, 0)
    finally:
        for pid in children:
            if pid not in statuses:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)

    try:
        lines = _lines(log)
        tokens = []
        for i in (0, 999, *range(100, 110)):
            record = fn.status(i)
            assert record is not None
            tokens.append(record.token)
        for pid, c in children.items():
            for i in range(1000 * (c + 1), 1000 * (c + 1) + 20):
                record = fn.status(i)
                assert record is not None
                assert record.status is Status.OK
                assert f"/{pid}/" in record.owner
                assert fn(i) == {"i": i, "pid": pid}  # replayed in the parent
                tokens.append(record.token)
        # Claim tokens fence every write: forked children must not draw their parent's tokens.
        assert len(set(tokens)) == len(tokens), "two claims got the same token"
        shared = [json.loads((tmp_path / f"child-{c}.json").read_text()) for c in range(n)]
        assert all(s["shared"] == shared[0]["shared"] for s in shared), shared
        assert shared[0]["shared"]["pid"] in children
        assert fn(999) == shared[0]["shared"]
        assert fn(0) == parent_value
        assert len(_lines(log)) == len(lines), "a replay in the parent ran the body"
        keys = Counter(line.split()[1] for line in lines)
        assert {k: v for k, v in keys.items() if v != 1} == {}, "a body ran twice"
        assert len(keys) == 1 + 10 + n * 20 + 1
    finally:
        store.close()


@pytest.mark.slow
def test_fork_while_other_threads_are_calling(tmp_path: Path) -> None:
    """Threads keep making calls while the main thread forks children that make one call each.

    Without the store's fork guard about half of the forks land while some thread is inside a
    SQLite transaction, and such a child never gets its store open (it inherits the parent's
    lock state). 100 forks, stopping at the first stuck child, make that failure certain.
    """
    store = DiskStore(tmp_path / "store")

    def body(i: int) -> int:
        return i

    fn = idempotent(key="k:{i}", name="procs.fork_busy", store=store)(body)
    fn(0)
    stop = threading.Event()

    def hammer(t: int) -> None:
        n = 0
        while not stop.is_set():
            fn(t * 10**6 + n)
            n += 1

    threads = [threading.Thread(target=hammer, args=(t,), daemon=True) for t in range(3)]
    for thread in threads:
        thread.start()
    stuck: list[int] = []
    live: int | None = None
    try:
        for r in range(100):
            pid = os.fork()
            if pid == 0:  # the child: one call, then out, never back into pytest
                code = 70
                try:
                    code = 0 if fn(10**9 + r) == 10**9 + r else 1
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            live = pid
            give_up = time.monotonic() + 60.0  # a stuck child never finishes: generous
            status: int | None = None
            while time.monotonic() < give_up:
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = os.waitstatus_to_exitcode(raw)
                    break
                time.sleep(0.005)
            if status is None:
                stuck.append(r)
                break
            live = None
            assert status == 0, f"forked child {r} failed"
    finally:
        if live is not None:
            os.kill(live, signal.SIGKILL)
            os.waitpid(live, 0)
        stop.set()
        for thread in threads:
            thread.join(30)
        store.close()
    assert stuck == [], f"forked child {stuck[0]}'s one call did not finish within 60 s"


# A forked child never uses its parent's SQLite connection
def test_forked_child_opens_its_own_disk_connection(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "s")
    store.get("k")
    parent_cache = store.cache
    assert fork_and_wait(lambda: 0 if store.cache is not parent_cache else 1) == 0


# A MemoryStore stays usable in a child forked while another thread holds its lock
def test_memory_store_usable_in_a_child_forked_while_locked() -> None:
    store = MemoryStore()
    store._lock.acquire()  # as if another thread were inside a store operation at fork time
    try:
        assert fork_and_wait(lambda: 0 if store.claim(processing("k")) is None else 1) == 0
    finally:
        store._lock.release()


# -- 7. fingerprints agree across PYTHONHASHSEED ------------------------------------------------


@pytest.mark.slow
def test_fingerprints_agree_across_hash_seeds(tmp_path: Path) -> None:
    script = tmp_path / "hashseed.py"
    script.write_text(HASHSEED_SCRIPT)
    store_dir = tmp_path / "store"
    log = tmp_path / "bodies.log"
    outcomes = []
    for seed in ("1", "2"):
        result = tmp_path / f"seed-{seed}.json"
        done = subprocess.run(
            [sys.executable, str(script), str(store_dir), str(log), str(result)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=tmp_path,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        outcomes.append(json.loads(result.read_text()))
    first, second = outcomes
    assert first["iteration_order"] != second["iteration_order"], "the seeds gave one set order"
    assert "error" not in first, first
    assert "error" not in second, second
    assert second["value"] == first["value"]
    assert first["value"]["pid"] == first["pid"]
    assert _lines(log) == [str(first["pid"])], "the body ran again under another hash seed"

    # This process (a third, random seed) replays the same record too.
    def ship(order: str, tags: object, weights: object, nested: object) -> None:
        raise AssertionError("the body ran again in the parent")

    store = DiskStore(store_dir)
    try:
        fn = idempotent(key="{order}", name="procs.hashseed", store=store)(ship)
        tags = {f"tag-{n}" for n in range(40)}
        weights = {tag: len(tag) for tag in sorted(tags, reverse=True)}
        nested = {"all": frozenset(tags), "sets": [set(tags), {b"y", "x", 1.5}], "w": weights}
        assert fn("o-1", tags, weights, nested) == first["value"]
        record = fn.status("o-1", tags, weights, nested)
        assert record is not None
        assert record.status is Status.OK
        with pytest.raises(idemfn.FingerprintMismatch):  # the fingerprint does see the values
            fn("o-1", tags | {"tag-40"}, weights, nested)
    finally:
        store.close()
