"""What only RedisStore has: a server that can be down, restart, or drop a connection; the
server's clock; server-side expiry; round trips. (Every shared behaviour runs on RedisStore
through the ``store`` fixture.) All against a real redis-server the suite starts."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import idemfn
from idemfn import RedisStore, Status, StoreError, idempotent
from tests.support.concurrency import reads_of_others
from tests.support.servers import RedisServer


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, free to be restarted."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def fresh(server: RedisServer) -> RedisStore:
    return RedisStore(server.url, prefix=f"t:{uuid.uuid4().hex}:")


def counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every command sent on a sync connection, whichever way it goes (the client's
    ``execute_command``, or the store's own packing): a script call is one EVALSHA."""
    sent: list[str] = []
    send = redis.connection.AbstractConnection.send_packed_command

    def send_packed_command(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        packed = command if isinstance(command, bytes) else b"".join(command)
        sent.append(packed.split(b"\r\n")[2].decode())  # *N, $length, the command's name
        return send(self, command, *args, **kwargs)

    monkeypatch.setattr(
        redis.connection.AbstractConnection, "send_packed_command", send_packed_command
    )
    return sent


def test_replay_is_one_round_trip_and_a_first_call_two(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = fresh(redis_server)
    fn = idempotent(key="{x}", store=store)(lambda x: {"x": x})
    store.time()  # the clock is read once when the store is first used, then every 30 s
    sent = counting(monkeypatch)
    assert fn(1) == {"x": 1}
    assert sent == ["EVALSHA", "EVALSHA"]  # claim, complete
    sent.clear()
    assert fn(1) == {"x": 1}
    assert sent == ["EVALSHA"]  # the claim script returns the live record: no write
    assert store.get(fn.key_for(1)) is not None


def test_a_claim_and_an_outcome_sent_again_after_their_answers_were_lost_run_the_body_once(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py sends a command again when its answer is lost to a dropped connection or a
    # timeout (a client's default retry): the script then runs twice. The second claim finds
    # the first's record, its own; the second swap is refused by the first's write, its own.
    # Before, the claim looked taken by a live owner (AlreadyRunning, then the key halted with
    # nothing run), and the swap looked lost (OwnershipLost after the outcome was recorded).
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    import idemfn._stores.redis as redis_module

    client = redis.Redis(unix_socket_path=str(redis_server.socket), retry=Retry(NoBackoff(), 1))
    store = RedisStore(client, prefix=f"t:{uuid.uuid4().hex}:")
    store.time()  # (the clock, and the scripts loaded)
    lose = {store._claim.sha.encode(), store._swap.sha.encode()}  # each one's first answer
    ask = redis_module._ask

    def answer_lost(conn: Any, packed: bytes) -> Any:
        reply = ask(conn, packed)  # the server ran it
        sha = next((sha for sha in lose if sha in packed), None)
        if sha is not None:
            lose.discard(sha)
            raise redis.ConnectionError("the answer was lost")
        return reply

    monkeypatch.setattr(redis_module, "_ask", answer_lost)
    runs: list[int] = []

    @idempotent(key="{x}", store=store, name="t.lost-answers")
    def fn(x: int) -> int:
        runs.append(x)
        return x * 10

    assert fn(1) == 10
    assert not lose  # both answers were lost, and both commands sent again
    assert fn(1) == 10
    assert runs == [1]
    entry = store.get(fn.key_for(1))
    assert entry is not None and entry.status == "ok"


def test_a_deadline_reads_before_it_claims(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import datetime, timedelta, timezone

    store = fresh(redis_server)
    soon = datetime.now(timezone.utc) + timedelta(hours=1)
    fn = idempotent(key="{x}", store=store, deadline=soon)(lambda x: x)
    store.time()
    sent = counting(monkeypatch)
    fn(1)
    assert sent == ["HGET", "EVALSHA", "EVALSHA"]


def test_the_store_clock_is_the_servers_not_this_process(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = fresh(redis_server)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # this host's clock is an hour off
    seconds, micros = redis.Redis(unix_socket_path=str(redis_server.socket)).time()
    # (Bounds far from the hour, and far from how slowly a busy machine gets here.)
    assert abs(store.time() - (seconds + micros / 1e6)) < 60
    fn = idempotent(key="{x}", store=store, ttl=60)(lambda x: x)
    fn(1)
    record = fn.status(1)
    assert record is not None and record.expires_at is not None
    assert abs(record.expires_at.timestamp() - (seconds + 60)) < 60


def test_the_server_expires_finished_records(redis_server: RedisServer) -> None:
    store = fresh(redis_server)
    fn = idempotent(key="{x}", store=store, ttl=30)(lambda x: x)
    forever = idempotent(key="{x}", store=store, ttl=None, name="forever")(lambda x: x)
    fn(1)
    forever(1)
    entry = store.get(fn.key_for(1))
    assert entry is not None and entry.expires_at is not None and entry.finished_at is not None
    assert entry.expires_at == entry.finished_at + 30
    # The server drops the record when it expires (PEXPIRETIME: when, in server milliseconds).
    at = store.client.execute_command("PEXPIRETIME", store.prefix + fn.key_for(1))
    assert at == int(entry.expires_at * 1000)
    assert store.client.pttl(store.prefix + forever.key_for(1)) == -1  # no expiry


def test_a_stopped_server_is_a_store_error_naming_it(own_server: RedisServer) -> None:
    store = fresh(own_server)
    fn = idempotent(key="{x}", store=store)(lambda x: x)
    fn(1)
    own_server.stop()
    for call in (lambda: fn(1), lambda: fn(2), lambda: fn.status(1), lambda: store.prune()):
        with pytest.raises(StoreError) as info:
            call()
        assert str(own_server.socket) in str(info.value)


def test_a_server_restarted_mid_call_is_a_store_error_not_a_lost_race(
    own_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = fresh(own_server)
    entered, release = threading.Event(), threading.Event()
    runs: list[int] = []

    def body(x: int) -> int:
        runs.append(x)
        entered.set()
        assert release.wait(30)
        return x

    fn = idempotent(key="{x}", store=store)(body)
    results: list[object] = []

    def call() -> None:
        try:
            results.append(fn(1))
        except BaseException as exc:
            results.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert entered.wait(10)
    # The claim must be surely older than the server about to start (uptime is in whole
    # seconds): a lower bound on elapsed time, not a wait for something to happen.
    time.sleep(2.1)
    own_server.restart()  # no persistence: the claim's record is lost
    release.set()
    thread.join(30)
    # The body ran: the caller gets its value, and the failure to record it is logged as a
    # StoreError saying the server restarted (not OwnershipLost: no other caller won a race).
    assert results == [1] and runs == [1]
    [logged] = [r for r in caplog.records if "could not be recorded" in r.getMessage()]
    assert "restarted" in logged.getMessage() and str(own_server.socket) in logged.getMessage()


def test_a_dropped_connection_mid_call_never_replays_wrongly(redis_server: RedisServer) -> None:
    store = fresh(redis_server)
    admin = redis.Redis(unix_socket_path=str(redis_server.socket))
    seen: list[object] = []

    def body(x: int) -> int:
        admin.client_kill_filter(_type="normal", skipme=True)  # drop every other connection
        return x * 10

    fn = idempotent(key="{x}", store=store)(body)
    try:
        seen.append(fn(1))
    except StoreError as exc:  # acceptable: says so, names the server
        seen.append(str(exc))
    if seen != [10]:
        assert str(redis_server.socket) in str(seen[0])
    if seen == [10]:
        assert fn(1) == 10
        record = fn.status(1)
        assert record is not None and record.status is Status.OK


def test_an_existing_client_is_used_and_a_decoding_one_refused(
    redis_server: RedisServer,
) -> None:
    client = redis.Redis(unix_socket_path=str(redis_server.socket))
    store = RedisStore(client, prefix=f"t:{uuid.uuid4().hex}:")
    assert store.client is client
    fn = idempotent(key="{x}", store=store)(lambda x: [x])
    assert fn(2) == [2] and fn(2) == [2]
    decoding = redis.Redis(unix_socket_path=str(redis_server.socket), decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStore(decoding)
    with pytest.raises(TypeError, match=r"redis\.Redis"):
        RedisStore(42)  # type: ignore[arg-type]


def test_urls_open_a_redis_store_and_repr_hides_the_password(redis_server: RedisServer) -> None:
    store = idemfn.open_store("redis://user:s3cret@localhost:6390/2")
    assert isinstance(store, RedisStore)
    assert "s3cret" not in repr(store)
    assert "localhost:6390/2" in repr(store)
    assert idemfn.open_store("redis://user:s3cret@localhost:6390/2") is store
    local = idemfn.open_store(redis_server.url)
    assert isinstance(local, RedisStore) and local.prefix == "idemfn:"
    with pytest.raises(ValueError, match="RedisStore"):
        RedisStore("redis://localhost:notaport")


def test_keys_with_glob_characters_are_scanned_literally(redis_server: RedisServer) -> None:
    store = fresh(redis_server)
    make: Callable[[str], Any] = lambda n: idempotent(key="{x}", store=store, name=n)(  # noqa: E731
        lambda x: x
    )
    make("a*b")(1)
    make("a?b")(1)
    make("a[b]")(1)
    make("axb")(1)
    assert [e.key for e in store.scan("a*")] == ["a*b:1"]
    assert [e.key for e in store.scan("a[")] == ["a[b]:1"]
    assert len(list(store.scan())) == 4


def test_the_command_runs_once_and_inspects_records_on_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    import json
    import os
    import subprocess
    import sys

    redis.Redis(unix_socket_path=str(redis_server.socket)).flushdb()
    env = {**os.environ, "IDEMFN_STORE": redis_server.url}
    log = tmp_path / "log"
    cmd = [
        sys.executable,
        "-m",
        "idemfn",
        "run",
        "--key",
        "deploy:1",
        "--",
        "sh",
        "-c",
        f"echo ran >> {log}; echo out",
    ]
    for _ in range(2):
        done = subprocess.run(
            cmd, env=env, capture_output=True, timeout=60, check=True, stdin=subprocess.DEVNULL
        )
        assert done.stdout == b"out\n"
    assert log.read_text() == "ran\n"
    listed = subprocess.run(
        [sys.executable, "-m", "idemfn", "ls", "--json"],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    [record] = json.loads(listed.stdout)
    assert (record["key"], record["status"]) == ("deploy:1", "ok")
    stats = subprocess.run(
        [sys.executable, "-m", "idemfn", "stats", "--json"],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert json.loads(stats.stdout)["by_state"]["ok"] == 1


# The store's commands take connections from the client's pool without redis-py's per-command
# check-out (issue 18): what the pool's check-out guarded must hold all the same.


def test_a_connection_the_server_closed_while_idle_is_connected_again(
    redis_server: RedisServer,
) -> None:
    store = fresh(redis_server)
    fn = idempotent(key="{x}", store=store)(lambda x: x * 10)
    assert fn(1) == 10  # its connection is back in the pool, idle
    admin = redis.Redis(unix_socket_path=str(redis_server.socket))
    admin.client_kill_filter(_type="normal", skipme=True)
    assert fn(1) == 10 and fn(2) == 20  # (a URL's client retries nothing: no retry hides it)
    record = fn.status(2)
    assert record is not None and record.status is Status.OK


def test_a_command_cut_short_leaves_no_reply_for_the_next(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support.records import finished

    store = fresh(redis_server)
    for key in ("a", "b"):
        assert store.claim(finished(key)) is None
    read = redis.connection.AbstractConnection.read_response
    cut = [True]

    def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        if cut.pop() if cut else False:
            raise KeyboardInterrupt  # after the command went, before its reply is read
        return read(self, *args, **kwargs)

    monkeypatch.setattr(redis.connection.AbstractConnection, "read_response", read_response)
    with pytest.raises(KeyboardInterrupt):
        store.get("a")
    # The next command on that connection reads its own reply, not the one left unread.
    for key in ("b", "a", "b"):
        entry = store.get(key)
        assert entry is not None and entry.key == key


def test_threads_never_share_a_connection(redis_server: RedisServer) -> None:
    from tests.support.records import finished

    store = fresh(redis_server)
    keys = [f"k{i}" for i in range(8)]
    for key in keys:
        assert store.claim(finished(key)) is None
    assert reads_of_others(store, keys, 300) == []


def _child_connection_id(store: RedisStore, fn: Any, conn: Any) -> None:
    conn.send((store._send("CLIENT", "ID"), fn(3)))


def test_a_forked_child_never_uses_its_parents_connections(redis_server: RedisServer) -> None:
    import multiprocessing

    store = fresh(redis_server)
    fn = idempotent(key="{x}", store=store)(lambda x: x * 10)
    assert fn(1) == 10
    parents = store._send("CLIENT", "ID")  # the connection idle in the pool at the fork
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    child = context.Process(target=_child_connection_id, args=(store, fn, theirs))
    child.start()
    assert ours.poll(60)
    childs, value = ours.recv()
    child.join(60)
    assert value == 30 and childs != parents
    assert store._send("CLIENT", "ID") == parents and fn(1) == 10  # the parent's, unharmed


def test_the_store_holds_no_connection_between_commands(redis_server: RedisServer) -> None:
    pool = redis.ConnectionPool(
        connection_class=redis.UnixDomainSocketConnection,
        path=str(redis_server.socket),
        max_connections=1,
    )
    client = redis.Redis(connection_pool=pool)
    store = RedisStore(client, prefix=f"t:{uuid.uuid4().hex}:")
    fn = idempotent(key="{x}", store=store)(lambda x: x)
    assert fn(1) == 1 and fn(1) == 1
    assert client.ping()  # the pool's one connection is free again
    assert [entry.key for entry in store.scan()] == [fn.key_for(1)]


def test_a_blocking_pool_lends_its_connections_its_own_way(redis_server: RedisServer) -> None:
    pool = redis.BlockingConnectionPool(
        connection_class=redis.UnixDomainSocketConnection,
        path=str(redis_server.socket),
        max_connections=2,
        timeout=60,
    )
    store = RedisStore(redis.Redis(connection_pool=pool), prefix=f"t:{uuid.uuid4().hex}:")
    fn = idempotent(key="{x}", store=store)(lambda x: x)
    threads = [
        threading.Thread(target=lambda i=i: [fn(i * 100 + n) for n in range(50)]) for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [fn.status(i * 100 + 49) is not None for i in range(4)] == [True] * 4
    # Both connections went back: two are lent at once without waiting (60 s timeout).
    lent = [pool.get_connection(), pool.get_connection()]
    for conn in lent:
        pool.release(conn)


def test_the_store_packs_commands_as_redis_py_does(redis_server: RedisServer) -> None:
    from idemfn._stores.redis import _packer

    for encoding in ("utf-8", "latin-1"):
        client = redis.Redis(unix_socket_path=str(redis_server.socket), encoding=encoding)
        conn = client.connection_pool.make_connection()
        pack = _packer(client.connection_pool.connection_kwargs)
        for command in [
            ("HGET", "idemfn:clé", "e"),
            ("EVALSHA", "0" * 40, 1, "k", "tok-1", b"\x00\xff" * 4000, "", "1700000000000"),
            ("EVAL", "return 1", 0),
        ]:
            assert pack(command) == b"".join(conn.pack_command(*command))
    store = RedisStore(
        redis.Redis(unix_socket_path=str(redis_server.socket), encoding="latin-1"),
        prefix=f"t:{uuid.uuid4().hex}:",
    )
    fn = idempotent(key="{x}", store=store)(lambda x: x)
    assert fn("clé") == "clé" and fn("clé") == "clé"
    assert store.client.exists((store.prefix + fn.key_for("clé")).encode("latin-1"))


def test_a_connection_past_descriptor_1023_is_kept_between_commands(
    redis_server: RedisServer,
) -> None:
    # (select() refuses a descriptor past 1023, which a busy server has: the store's look at
    # an idle connection must not take that for a broken one and connect again each time.)
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip("this process may not open 1,200 files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        store = fresh(redis_server)
        fn = idempotent(key="{x}", store=store)(lambda x: x)
        assert fn(1) == 1
        first = store._send("CLIENT", "ID")
        assert fn(1) == 1 and fn(2) == 2
        assert store._send("CLIENT", "ID") == first  # the same connection all along
        store.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
