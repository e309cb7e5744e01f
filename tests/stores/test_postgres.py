"""What only PostgresStore has: a server that can be down or restart, its clock, its table and
index, connection strings and pools. (Every shared behaviour runs on PostgresStore through the
``store`` fixture.) All against a real PostgreSQL the suite starts."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import pytest

import idemfn
from idemfn import PostgresStore, Status, StoreError, idempotent
from idemfn._stores.postgres import store as store_module
from idemfn.testing import _finished, _processing
from tests.support.forks import fork_and_wait
from tests.support.servers import PostgresServer
from tests.support.stores import age
from tests.support.workers import poll


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A cluster of this test's own, free to be stopped and restarted."""
    server = PostgresServer()
    yield server
    server.remove()


def fresh(server: PostgresServer) -> PostgresStore:
    return PostgresStore(server.dsn, table=f"t_{uuid.uuid4().hex}")


def test_the_table_and_its_prune_index_are_created(postgres_server: PostgresServer) -> None:
    store = fresh(postgres_server)
    fn = idempotent(key="{x}", store=store, ttl=60)(lambda x: x)
    fn(1)
    with psycopg.connect(postgres_server.dsn) as conn:
        indexes = [
            r[0]
            for r in conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE tablename = %s", (store.table,)
            )
        ]
    assert any("drop_at" in i for i in indexes), indexes
    age(store, fn.key_for(1), 120)  # expired a minute ago
    assert store.prune() == 1
    assert store.bytes_used() is not None and store.bytes_used() > 0  # type: ignore[operator]
    store.close()


def test_the_store_clock_is_the_servers(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = fresh(postgres_server)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    with psycopg.connect(postgres_server.dsn) as conn:
        server_now = conn.execute("SELECT extract(epoch from clock_timestamp())").fetchone()
    assert server_now is not None
    assert abs(store.time() - float(server_now[0])) < 60  # the server's, not this host's
    store.close()


def test_a_stopped_server_is_a_store_error_naming_it(own_server: PostgresServer) -> None:
    store = fresh(own_server)
    fn = idempotent(key="{x}", store=store)(lambda x: x)
    fn(1)
    own_server.stop()
    began = time.monotonic()
    with pytest.raises(StoreError) as info:
        fn(2)
    assert str(own_server.socket_dir) in str(info.value)
    assert time.monotonic() - began < 15
    store.close()


# -- an unreachable server: StoreError within connect_timeout (issue 13) ----------------------


@pytest.fixture
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A connection string whose server refuses at once: its socket is bound, never listened
    on (a short directory: socket paths have a length limit)."""
    directory = Path(tempfile.mkdtemp(prefix="idemfn-refuse-"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(directory / ".s.PGSQL.5432"))
    yield f"host={directory} user=nobody dbname=nothing"
    sock.close()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def silent() -> Iterator[str]:
    """A URL whose server never answers: a loopback port that listens, and never accepts
    (the kernel completes the handshake; no startup reply ever comes)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"postgresql://nobody@127.0.0.1:{sock.getsockname()[1]}/nothing"
    sock.close()


def _fails_within(store: PostgresStore, seconds: float) -> str:
    """The ``StoreError`` of a first call on ``store``, which must come within ``seconds``
    (generous: what matters is well under psycopg_pool's 30 s)."""
    fn = idempotent(key="order:{x}", name="shop.charge", store=store)(lambda x: x)
    began = time.monotonic()
    with pytest.raises(StoreError) as info:
        fn(7)
    took = time.monotonic() - began
    assert took < seconds, f"StoreError after {took:.1f} s: {info.value}"
    message = str(info.value)
    assert repr(store) in message and "'shop.charge:order:7'" in message, message
    assert "\n" not in message, message
    return message


def test_a_refusing_server_fails_the_call_within_the_default_connect_timeout(
    refusing: str,
) -> None:
    store = PostgresStore(refusing, table=f"t_{uuid.uuid4().hex}")
    assert store.connect_timeout == 5.0
    message = _fails_within(store, 20)
    assert "could not connect within 5 s" in message and "Connection refused" in message
    # A later call waits as long again (the pool is kept: no pool, and threads, per call).
    _fails_within(store, 20)
    store.close()


def test_a_silent_server_fails_within_connect_timeout_from_the_option_or_the_url(
    silent: str,
) -> None:
    by_option = PostgresStore(silent, table="t", connect_timeout=1.5)
    by_url = idemfn.open_store(f"{silent}?connect_timeout=2")
    assert isinstance(by_url, PostgresStore) and by_url.connect_timeout == 2.0
    assert "could not connect within 1.5 s" in _fails_within(by_option, 15)
    assert "could not connect within 2 s" in _fails_within(by_url, 15)
    # The option wins over the URL's parameter.
    assert PostgresStore(f"{silent}?connect_timeout=9", connect_timeout=3).connect_timeout == 3
    by_option.close()
    by_url.close()


# A network of two namespaces joined by a veth link: this end (the store's), and the server's,
# where a proxy passes TCP on to the test server's unix socket. Taking the server's end of the
# link down makes the server vanish from the network: packets are dropped, nothing answers or
# resets, as when a server's host or address goes away (a half-open connection).
SERVER_SIDE = """\
import socket, subprocess, sys, threading
sockdir = sys.argv[1]
print("unshared", flush=True)  # running: in its own namespace, where its end of the link goes
sys.stdin.readline()  # its end of the link is here
for cmd in ("ip link set lo up", "ip addr add 10.77.0.2/24 dev idemfn_b",
            "ip link set idemfn_b up"):
    subprocess.run(cmd.split(), check=True)
listener = socket.create_server(("10.77.0.2", 5432))
print("listening", flush=True)

def pump(a, b):
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass

while True:
    conn, _ = listener.accept()
    server = socket.socket(socket.AF_UNIX)
    server.connect(sockdir + "/.s.PGSQL.5432")
    threading.Thread(target=pump, args=(conn, server), daemon=True).start()
    threading.Thread(target=pump, args=(server, conn), daemon=True).start()
"""

SILENCED = """\
import json, os, subprocess, sys, threading, time
import idemfn

cfg = json.loads(sys.argv[1])
def run(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)
try:
    run("ip", "link", "set", "lo", "up")
    run("ip", "link", "add", "idemfn_a", "type", "veth", "peer", "name", "idemfn_b")
except (OSError, subprocess.CalledProcessError) as exc:
    print(json.dumps({"skip": f"no veth link: {exc}"}))
    sys.exit(0)
side = subprocess.Popen(["unshare", "-n", sys.executable, "-c", cfg["server_side"],
                         cfg["sockdir"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
# Not before it has unshared: moved into the namespace unshare has not made yet, the link would
# stay here, and the server side would not find it (seen on a busy machine).
assert side.stdout.readline().strip() == "unshared"
run("ip", "link", "set", "idemfn_b", "netns", str(side.pid))
side.stdin.write("go\\n")
side.stdin.flush()
run("ip", "addr", "add", "10.77.0.1/24", "dev", "idemfn_a")
run("ip", "link", "set", "idemfn_a", "up")
assert side.stdout.readline().strip() == "listening"
link = ["nsenter", "-t", str(side.pid), "-n", "ip", "link", "set", "idemfn_b"]

store = idemfn.PostgresStore("host=10.77.0.2 port=5432 user=postgres dbname=postgres",
                             table=cfg["table"])
claim = idemfn.begin("k", store=store, policy=idemfn.Policy(lease=300))
assert store.renew(claim.entry, 300) is not None  # the renewals' connection is open
run(*link, "down")  # the server vanishes
outcome = []
def renew():
    began = time.monotonic()
    try:
        store.renew(claim.entry, 300)
        outcome.append("renewed")
    except idemfn.StoreError as exc:
        outcome.append(f"StoreError after {time.monotonic() - began:.0f} s")
renewal = threading.Thread(target=renew, daemon=True)
renewal.start()
renewal.join(cfg["wait"])
silent = outcome[0] if outcome else f"still waiting after {cfg['wait']} s"
run(*link, "up")  # it is back: the next renewal connects again
try:
    after = "renewed" if store.renew(claim.entry, 300) is not None else "lost"
except idemfn.StoreError as exc:
    after = f"StoreError: {exc}"
print(json.dumps({"silent": silent, "after": after}), flush=True)
side.kill()
os._exit(0)
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(c) for c in ("unshare", "nsenter", "ip")),
    reason="needs root, unshare, nsenter and ip, for network namespaces",
)
def test_a_renewal_on_a_connection_gone_silent_gives_up_and_the_next_connects_again(
    postgres_server: PostgresServer,
) -> None:
    # TCP alone keeps retransmitting to a vanished server for ~15 minutes, and the renewal
    # waited as long, holding up every renewal of the store: its live claims' leases ran out.
    cfg = {
        "server_side": SERVER_SIDE,
        "sockdir": str(postgres_server.socket_dir),
        "table": f"t_{uuid.uuid4().hex}",
        "wait": 60,
    }
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", SILENCED, json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["silent"].startswith("StoreError after"), result
    assert result["after"] == "renewed", result


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "5"])
def test_connect_timeout_must_be_a_positive_number(bad: object) -> None:
    with pytest.raises(ValueError, match=r"PostgresStore\(connect_timeout=\.\.\.\) must be"):
        PostgresStore("host=/nowhere", connect_timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="connect_timeout parameter of the connection string"):
        PostgresStore("postgresql://db.example/app?connect_timeout=0")


def test_a_pool_of_your_own_keeps_its_timeout_unless_connect_timeout(
    postgres_server: PostgresServer,
) -> None:
    with psycopg_pool.ConnectionPool(
        postgres_server.dsn, min_size=1, open=False, timeout=12.0
    ) as pool:
        assert PostgresStore(pool).connect_timeout == 12.0
        assert PostgresStore(pool, connect_timeout=2).connect_timeout == 2.0


def test_a_busy_pool_waits_for_a_free_connection_past_connect_timeout(
    postgres_server: PostgresServer,
) -> None:
    # Every connection of the pool held by a transactional body, the server answering: a
    # call waits for one to be free (load), it does not fail as if the server were down.
    store = PostgresStore(postgres_server.dsn, table=f"t_{uuid.uuid4().hex}", connect_timeout=1)
    with contextlib.ExitStack() as held:
        for i in range(16):
            held.enter_context(store.transaction(f"held:{i}"))
        outcome: list[object] = []

        def call() -> None:
            try:
                outcome.append(store.get("k"))
            except StoreError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        pool = store._pool
        assert pool is not None
        poll(lambda: pool.get_stats().get("requests_waiting"), "the call to wait for a connection")
        # A lower bound, not a race: past the moment a down server would have failed the call.
        time.sleep(1.5)
        assert outcome == []
    thread.join(30)
    assert outcome == [None]
    store.close()


def test_a_server_restarted_mid_call_never_replays_wrongly(
    own_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = fresh(own_server)
    entered, release = threading.Event(), threading.Event()

    def body(x: int) -> int:
        entered.set()
        assert release.wait(30)
        return x * 10

    fn = idempotent(key="{x}", store=store)(body)
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(fn(1))
        except StoreError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert entered.wait(10)
    own_server.restart()
    release.set()
    thread.join(60)
    # The body ran: the caller gets its value, whether or not the store could record it (a
    # failure to record is logged, naming the server).
    assert outcome == [10]
    record = poll(lambda: _readable_status(fn), "the store to answer again")
    if record.status is not Status.OK:
        assert record.status is Status.PROCESSING
        assert str(own_server.socket_dir) in caplog.text and "could not be recorded" in caplog.text
    store.close()


def _readable_status(fn: Any) -> Any:
    try:
        return fn.status(1)
    except StoreError:  # a pooled connection from before the restart
        return None


def test_an_existing_pool_is_used(postgres_server: PostgresServer) -> None:
    with psycopg_pool.ConnectionPool(postgres_server.dsn, min_size=1, open=True) as pool:
        store = PostgresStore(pool, table=f"t_{uuid.uuid4().hex}")
        fn = idempotent(key="{x}", store=store)(lambda x: [x])
        assert fn(3) == [3] and fn(3) == [3]
        store.close()  # the caller's pool stays open
        assert not pool.closed


def _backends(store: PostgresStore) -> list[int]:
    """The backend pids of ``store``'s spare connections (kept out of its pool between calls)."""
    return [conn.info.backend_pid for conn, _, _, _ in store._spares]


def test_spare_connections_are_the_processs_own_and_close_with_the_store(
    postgres_server: PostgresServer,
) -> None:
    store = fresh(postgres_server)
    fn = idempotent(key="{x}", store=store)(lambda x: [x])
    assert fn(1) == [1]
    spares = [conn for conn, _, _, _ in store._spares]
    assert spares and len(spares) <= store_module._SPARES

    def child() -> int:
        # Its own connections: the parent's spares are neither used nor closed here.
        assert fn(2) == [2] and fn(1) == [1]
        assert not set(_backends(store)) & {conn.info.backend_pid for conn in spares}
        store.close()
        return 0

    def closing_child() -> int:
        store.close()  # (its first call: the spares it holds are its parent's)
        return 0

    for forked in (child, closing_child):
        assert fork_and_wait(forked) == 0
        # The parent's spares still work (a child that closed them would have ended their
        # sessions).
        assert fn(3) == [3] and fn(2) == [2]
        assert [conn for conn, _, _, _ in store._spares] == spares
    store.close()
    assert all(conn.closed for conn in spares) and not store._spares


def test_a_spare_connection_goes_back_to_the_pool_after_a_while(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = fresh(postgres_server)
    assert store.get("k") is None
    assert len(store._spares) == 1
    pool = store._pool
    assert pool is not None
    pool.wait(timeout=60)  # (its first fill, in its own threads, done: counted once, here)
    idle = pool.get_stats()["pool_available"]
    monkeypatch.setattr(store_module, "_SPARE_FOR", 0.0)  # (every one is out too long)
    assert store.get("k") is None
    assert not store._spares  # back in the pool, whose upkeep reaches it again
    assert pool.get_stats()["pool_available"] == idle + 1
    store.close()


def test_a_spare_connection_keeps_no_cursor_that_holds_a_long_value(
    postgres_server: PostgresServer,
) -> None:
    store = fresh(postgres_server)
    fn = idempotent(key="{n}", store=store)(lambda n: "v" * n)

    def kept() -> list[bool]:
        return [cur is not None for _, cur, _, _ in store._spares]

    assert fn(10) == "v" * 10
    assert kept() == [True]  # (a cursor is ~6 µs a statement)
    long = 4 * store_module._KEPT_BYTES
    assert fn(long) == "v" * long  # its record went out as the last statement's parameter
    assert kept() == [False]
    assert fn(long) == "v" * long  # and came back as its result (a replay)
    assert kept() == [False]
    assert fn(10) == "v" * 10
    assert kept() == [True]
    store.close()


def test_bad_arguments_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="table="):
        PostgresStore("host=/nowhere", table="records; DROP TABLE x")
    with pytest.raises(TypeError, match="connection string"):
        PostgresStore(42)  # type: ignore[arg-type]
    store = idemfn.open_store("postgresql://user:s3cret@db.example:5433/app")
    assert isinstance(store, PostgresStore)
    assert "s3cret" not in repr(store) and "db.example:5433/app" in repr(store)


@pytest.mark.parametrize("column", ["expires_at", "drop_at"])
def test_a_record_expired_by_itself_whose_copies_of_its_expiry_disagree_goes(
    postgres_server: PostgresServer, column: str
) -> None:
    # SQL alone replaces or removes a row only when expires_at and drop_at agree (issue 14,
    # review); a row whose copies disagree is judged by its record. Here the record expired a
    # minute ago, and one copy says an hour from now: the claim and prune still remove it,
    # that exact row, instead of replaying an expired record or keeping it forever.
    store = fresh(postgres_server)
    key = "pay:17"

    def expired_with_one_copy_off() -> None:
        assert store.claim(_finished(store, key, "old", expires_in=-60)) is None
        query = f'UPDATE "{store.table}" SET {column} = {column} + 3600 WHERE key = %s'
        assert store._run("overwrite", key, query, (key,)) == 1

    expired_with_one_copy_off()
    assert store.get(key) is None  # expired, by its record
    assert store.claim(_processing(store, key, "new")) is None  # won: the expired row went
    found = store.get(key)
    assert found is not None and found.token == "new"
    store.delete(key)

    expired_with_one_copy_off()
    assert store.prune() == 1
    assert store._run("read", key, f'SELECT key FROM "{store.table}"', ()) == []

    # A live record whose copies disagree stays, through both.
    assert store.claim(_finished(store, key, "live", expires_in=3600)) is None
    query = f'UPDATE "{store.table}" SET {column} = {column} - 7200 WHERE key = %s'
    assert store._run("overwrite", key, query, (key,)) == 1
    assert store.prune() == 0
    found = store.claim(_processing(store, key, "racing"))
    assert found is not None and found.token == "live"
    store.close()


# -- transactional mode ------------------------------------------------------------------------


@pytest.fixture
def ledger(postgres_server: PostgresServer) -> Iterator[tuple[PostgresStore, str]]:
    """A store, and a table the bodies write to in the same database."""
    store = fresh(postgres_server)
    table = f"ledger_{uuid.uuid4().hex}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (order_id text, cents int)")
    yield store, table
    store.close()


def rows(server: PostgresServer, table: str) -> list[tuple[str, int]]:
    with psycopg.connect(server.dsn) as conn:
        return conn.execute(f"SELECT order_id, cents FROM {table} ORDER BY 1").fetchall()


def test_the_body_writes_and_the_ok_record_commit_together(
    postgres_server: PostgresServer, ledger: tuple[PostgresStore, str]
) -> None:
    store, table = ledger
    seen_inside: list[object] = []

    @idempotent(key="{order_id}", store=store, transactional=True)
    def charge(order_id: str, cents: int) -> int:
        conn = idemfn.current_connection()
        conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (order_id, cents))
        # Not committed yet: another connection sees neither the row nor the ok record.
        seen_inside.append((rows(postgres_server, table), store.get(charge.key_for(order_id, 0))))
        return cents

    assert charge("o-1", 250) == 250
    [(outside_rows, outside_entry)] = seen_inside
    assert outside_rows == []
    assert outside_entry is not None and outside_entry.status == "processing"
    assert rows(postgres_server, table) == [("o-1", 250)]
    record = charge.status("o-1", 250)
    assert record is not None and record.status is Status.OK
    assert charge("o-1", 250) == 250  # a replay: the body does not run, no second row
    assert rows(postgres_server, table) == [("o-1", 250)]


def test_a_raising_body_rolls_its_writes_back_and_halts(
    postgres_server: PostgresServer, ledger: tuple[PostgresStore, str]
) -> None:
    store, table = ledger

    @idempotent(
        key="{order_id}",
        store=store,
        transactional=True,
        retry_on=TimeoutError,
        fingerprint=["order_id"],
    )
    def charge(order_id: str, error: type[Exception]) -> None:
        idemfn.current_connection().execute(f"INSERT INTO {table} VALUES (%s, 1)", (order_id,))
        raise error("the provider said no")

    with pytest.raises(ValueError, match="said no"):
        charge("o-2", ValueError)
    assert rows(postgres_server, table) == []  # rolled back
    record = charge.status("o-2", ValueError)
    assert record is not None and record.status is Status.HALTED  # recorded all the same
    with pytest.raises(ValueError, match="said no"):
        charge("o-2", ValueError)  # replayed
    with pytest.raises(TimeoutError):
        charge("o-3", TimeoutError)
    assert charge.status("o-3", TimeoutError) is None  # retry_on: released
    assert rows(postgres_server, table) == []


def test_a_lost_claim_rolls_the_body_back(
    postgres_server: PostgresServer, ledger: tuple[PostgresStore, str]
) -> None:
    store, table = ledger

    @idempotent(key="{order_id}", store=store, transactional=True)
    def charge(order_id: str) -> None:
        idemfn.current_connection().execute(f"INSERT INTO {table} VALUES (%s, 1)", (order_id,))
        assert store.delete(charge.key_for(order_id))  # `idemfn forget --force` meanwhile

    with pytest.raises(idemfn.OwnershipLost):
        charge("o-4")
    assert rows(postgres_server, table) == []


def test_transactional_is_refused_where_it_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="PostgresStore"):
        idempotent(key="k", store=idemfn.DiskStore(tmp_path / "s"), transactional=True)
    with pytest.raises(TypeError, match="True or False"):
        idempotent(key="k", store=idemfn.MemoryStore(), transactional="yes")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="transactional=True"):
        idemfn.current_connection()
