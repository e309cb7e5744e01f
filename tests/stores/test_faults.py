"""A store that fails under a call: disk full, a read-only file system, a server out of memory.

The faults are real: ``RLIMIT_FSIZE`` (the kernel refuses to grow a file: what SQLite sees on a
full disk), a read-only bind mount, Redis's ``maxmemory``, and a PostgreSQL trigger raising
SQLSTATE 53100 (``disk_full``). On each of claim, complete, halt and heartbeat:

- a failed claim raises ``StoreError`` and the body does not run;
- a body that ran keeps its outcome: its value is returned (its exception raised), and the
  failure to record it is logged, with the way the key will end;
- a failed heartbeat is logged and retried, and the call goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from idemfn import DiskStore, Halted, StoreError, idempotent
from idemfn._stores.postgres import PostgresStore
from idemfn._stores.redis import RedisStore
from tests.support.servers import PostgresServer, RedisServer

# Run in a child: RLIMIT_FSIZE and a lost claim must not reach the test process. SIGXFSZ is
# ignored, so that a write past the limit fails with EFBIG instead of killing the process.
PRELUDE = """
import logging, resource, signal, sys, time
from idemfn import DiskStore, Halted, StoreError, idempotent
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
store = DiskStore(sys.argv[1])
store.get("warm")  # open the store before any fault
def disk_full():
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
def disk_back():
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
"""


def child(store: Path, code: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code), str(store)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    store = DiskStore(tmp_path / "store")

    @idempotent(key="warm", store=store)
    def warm() -> None:  # the database exists, with its tables, before the fault
        pass

    warm()
    store.close()
    return tmp_path / "store"


def test_disk_full_at_claim_runs_nothing_and_records_nothing(store_dir: Path) -> None:
    done = child(
        store_dir,
        """
        @idempotent(key="pay:{n}", name="shop", store=store)
        def pay(n):
            print("RAN")
        disk_full()
        try:
            pay(1)
        except StoreError as exc:
            print("StoreError:", exc)
    """,
    )
    assert "RAN" not in done.stdout
    assert "StoreError: DiskStore(" in done.stdout and "could not claim 'shop:pay:1'" in done.stdout
    # SQLite's own words for a write the kernel refused (EFBIG), or a full disk (ENOSPC).
    cause = done.stdout.partition("could not claim 'shop:pay:1': ")[2]
    assert cause.startswith(("disk I/O error", "database or disk is full")), done.stdout
    assert DiskStore(store_dir).get("shop:pay:1") is None


def test_disk_full_at_complete_returns_the_value_and_logs_the_failure(store_dir: Path) -> None:
    done = child(
        store_dir,
        """
        @idempotent(key="pay:{n}", name="shop", store=store)
        def pay(n):
            disk_full()  # the body ran: its side effect happened
            return {"receipt": n}
        print("RETURNED", pay(7))
    """,
    )
    assert "RETURNED {'receipt': 7}" in done.stdout
    assert "ERROR idemfn: the outcome of key 'shop:pay:7' could not be recorded" in done.stderr
    assert "the value is returned" in done.stderr
    # The child is gone: its claim is abandoned, and the next call halts it, never re-runs it.
    runs: list[int] = []

    @idempotent(key="pay:{n}", name="shop", store=DiskStore(store_dir))
    def pay(n: int) -> None:
        runs.append(n)

    with pytest.raises(Halted, match=r"abandoned.*died"):
        pay(7)
    assert runs == []


def test_disk_full_at_halt_raises_the_bodys_exception_with_a_note(store_dir: Path) -> None:
    done = child(
        store_dir,
        """
        @idempotent(key="pay:{n}", name="shop", store=store)
        def pay(n):
            disk_full()
            raise ValueError("card declined")
        try:
            pay(7)
        except ValueError as exc:
            print("RAISED", exc, exc.__notes__)
    """,
    )
    assert "RAISED card declined" in done.stdout
    assert "could not be recorded" in done.stdout  # the note on the exception
    assert "its ValueError is raised" in done.stderr


def test_disk_full_during_heartbeats_is_logged_and_the_call_goes_on(store_dir: Path) -> None:
    done = child(
        store_dir,
        """
        failed = []
        class Failures(logging.Handler):
            def emit(self, record):
                if "could not renew" in record.getMessage():
                    failed.append(record)
        logging.getLogger("idemfn").addHandler(Failures())

        def until(what, condition):
            give_up = time.monotonic() + 60
            while not condition():
                if time.monotonic() > give_up:
                    sys.exit(f"timed out waiting for {what}")
                time.sleep(0.01)

        @idempotent(key="pay:{n}", name="shop", store=store, lease=0.6)
        def pay(n):
            disk_full()
            until("a renewal to fail", lambda: failed)  # renewals every 0.2 s fail, retried
            disk_back()
            lease = store.get("shop:pay:3").lease_until
            until("a renewal to work", lambda: store.get("shop:pay:3").lease_until != lease)
            return n
        print("RETURNED", pay(3))
        print("STATUS", pay.status(3).status.value)
    """,
    )
    assert "RETURNED 3" in done.stdout and "STATUS ok" in done.stdout
    assert "could not renew the lease of 'shop:pay:3' (will retry)" in done.stderr


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` as a read-only bind mount of itself (needs root, or skips)."""
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("a read-only bind mount needs root")
    done = subprocess.run([mount, "--bind", str(directory), str(directory)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount --bind is not allowed here: {done.stderr!r}")
    try:
        subprocess.run([mount, "-o", "remount,ro,bind", str(directory)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


def test_a_read_only_store_refuses_the_claim_and_the_body_does_not_run(store_dir: Path) -> None:
    runs: list[int] = []
    with read_only(store_dir):
        store = DiskStore(store_dir)

        @idempotent(key="{n}", name="ro", store=store)
        def job(n: int) -> None:
            runs.append(n)

        with pytest.raises(
            StoreError,
            match=r"could not (claim 'ro:1'|open the store for '[^']*'):"
            r" (attempt to write a readonly database|unable to open database file)",
        ):
            job(1)
        store.close()
    assert runs == []


def test_a_store_going_read_only_mid_call_returns_the_value(
    store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = DiskStore(store_dir)
    mounted: list[contextlib.AbstractContextManager[None]] = []

    @idempotent(key="{n}", name="ro", store=store)
    def job(n: int) -> str:
        mounted.append(read_only(store_dir))
        mounted[0].__enter__()
        # Open files keep writing through the old mount: the store's next connection sees it.
        store.close()
        return f"done {n}"

    try:
        assert job(1) == "done 1"
    finally:
        if mounted:
            mounted[0].__exit__(None, None, None)
    assert "the outcome of key 'ro:1' could not be recorded" in caplog.text
    assert "attempt to write a readonly database" in caplog.text
    # Looked at from another process: SQLite shares open files between the connections of
    # one process, and this one may still hold the read-only descriptor of the failed open.
    done = child(store_dir, 'print("STATUS", store.get("ro:1").status)')
    assert "STATUS processing" in done.stdout  # halts once its lease ends


# --- server stores: Redis out of memory, PostgreSQL out of disk --------------------------------


@contextlib.contextmanager
def redis_full(store: RedisStore) -> Iterator[None]:
    """Redis refuses writes: maxmemory below what it uses, and no eviction."""
    before = store.client.config_get("maxmemory")["maxmemory"]
    policy = store.client.config_get("maxmemory-policy")["maxmemory-policy"]
    store.client.config_set("maxmemory-policy", "noeviction")
    store.client.config_set("maxmemory", 1)
    try:
        yield
    finally:
        store.client.config_set("maxmemory", before)
        store.client.config_set("maxmemory-policy", policy)


@contextlib.contextmanager
def postgres_full(store: PostgresStore, on: str) -> Iterator[None]:
    """``on`` (INSERT or UPDATE) fails as a full disk does: SQLSTATE 53100."""
    table, name = store.table, f"full_{uuid.uuid4().hex}"
    store._run(
        "fault",
        table,
        f"""
        CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
            RAISE EXCEPTION 'could not extend file: No space left on device'
                USING ERRCODE = 'disk_full';
        END $$""",
        (),
    )
    store._run(
        "fault",
        table,
        f'CREATE TRIGGER {name} BEFORE {on} ON "{table}" FOR EACH ROW EXECUTE FUNCTION {name}()',
        (),
    )
    try:
        yield
    finally:
        store._run("fault", table, f'DROP TRIGGER {name} ON "{table}"', ())
        store._run("fault", table, f"DROP FUNCTION {name}()", ())


@pytest.fixture(params=["redis", "postgres"])
def server_store(request: pytest.FixtureRequest) -> Iterator[RedisStore | PostgresStore]:
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        store: Any = RedisStore(redis.url, prefix=f"faults:{uuid.uuid4().hex}:")
    else:
        pg: PostgresServer = request.getfixturevalue("postgres_server")
        store = PostgresStore(pg.dsn, table=f"faults_{uuid.uuid4().hex}")
        store.get("create the table")
    yield store
    store.close()


def full(store: RedisStore | PostgresStore, on: str) -> contextlib.AbstractContextManager[None]:
    return redis_full(store) if isinstance(store, RedisStore) else postgres_full(store, on)


def test_a_full_server_refuses_the_claim_and_the_body_does_not_run(
    server_store: RedisStore | PostgresStore,
) -> None:
    runs: list[int] = []

    @idempotent(key="{n}", name="srv", store=server_store)
    def job(n: int) -> None:
        runs.append(n)

    with full(server_store, "INSERT"), pytest.raises(StoreError, match=r"'srv:1'") as caught:
        job(1)
    assert "memory" in str(caught.value) or "No space left" in str(caught.value)
    assert runs == [] and server_store.get("srv:1") is None
    job(1)  # the store is back: the call runs
    assert runs == [1]


def test_a_full_server_at_complete_returns_the_value_and_logs(
    server_store: RedisStore | PostgresStore, caplog: pytest.LogCaptureFixture
) -> None:
    faults: list[contextlib.AbstractContextManager[None]] = []

    @idempotent(key="{n}", name="srv", store=server_store, lease=0.5)
    def job(n: int) -> str:
        faults.append(full(server_store, "UPDATE"))
        faults[0].__enter__()
        return f"done {n}"

    try:
        assert job(1) == "done 1"
    finally:
        faults[0].__exit__(None, None, None)
    assert "the outcome of key 'srv:1' could not be recorded" in caplog.text
    entry = server_store.get("srv:1")
    assert entry is not None and entry.status == "processing"
    # Its lease runs out (no heartbeat renews a settled claim): the next call halts it.
    caplog.set_level(logging.ERROR)
    from tests.support.workers import poll

    poll(lambda: job.status(1) is None or _halts(job), "the abandoned claim to halt", timeout=60)


def _halts(job: Any) -> bool:
    try:
        job(1)
    except Halted:
        return True
    except Exception:
        return False
    raise AssertionError("the body ran again")


def test_a_transactional_body_whose_ok_record_fails_raises_and_rolls_back(
    postgres_server: PostgresServer,
) -> None:
    """The ok record is written in the body's transaction: its failure aborts the transaction,
    so the caller must get the error, never a value whose writes were rolled back."""
    import psycopg

    import idemfn

    store = PostgresStore(postgres_server.dsn, table=f"faults_{uuid.uuid4().hex}")
    store.get("create the table")
    ledger = f"ledger_{uuid.uuid4().hex}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {ledger} (order_id text)")

    @idempotent(key="{order_id}", store=store, transactional=True)
    def charge(order_id: str) -> str:
        idemfn.current_connection().execute(f"INSERT INTO {ledger} VALUES (%s)", (order_id,))
        return f"charged {order_id}"

    with postgres_full(store, "UPDATE"), pytest.raises(StoreError, match="No space left"):
        charge("o-1")
    with psycopg.connect(postgres_server.dsn) as conn:
        assert conn.execute(f"SELECT count(*) FROM {ledger}").fetchone() == (0,)  # rolled back
    store.close()


def test_a_failing_cull_after_a_won_claim_does_not_fail_the_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from idemfn._stores import disk

    monkeypatch.setattr(disk, "_CULL_EVERY", 1)
    monkeypatch.setattr(disk, "_CULL", "DELETE FROM NoSuchTable")  # fails like a full disk
    runs: list[int] = []

    @idempotent(key="{n}", store=DiskStore(tmp_path / "s"))
    def job(n: int) -> int:
        runs.append(n)
        return n

    assert job(1) == 1 and job(1) == 1 and runs == [1]
    assert "could not remove expired records" in caplog.text


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux's prlimit")
def test_idemfn_run_says_the_command_ran_when_its_outcome_cannot_be_recorded(
    store_dir: Path,
) -> None:
    """The command lowers its runner's file size limit (prlimit on the parent of $PPID, the
    process supervising it): the disk is full for the runner from then on. Its output goes
    through pipes, which no limit touches."""
    command = "prlimit --pid $(ps -o ppid= -p $PPID) --fsize=1: && echo charged && exit 3"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "idemfn",
            "--store",
            str(store_dir),
            "run",
            "--key",
            "pay:1",
            "--",
            "sh",
            "-c",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3 and done.stdout == "charged\n"  # the command's own status
    assert "ran and exited 3, but its outcome could not be recorded" in done.stderr
    assert "DiskStore(" in done.stderr and "'pay:1'" in done.stderr
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "idemfn",
            "--store",
            str(store_dir),
            "run",
            "--key",
            "pay:1",
            "--",
            "sh",
            "-c",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.stdout == "" and again.returncode == 69  # halted, never run again
