"""A hostile review of the server stores' fast paths (issue 18): RedisStore sending its
commands on connections it takes from the pool's own lists, PostgresStore keeping spare
connections and their cursors out of its pool. Each test runs against a real server. The
three bugs the review found are fixed: a caller waiting in the pool never given a connection
that became a spare, a close racing a check-in, a handshake's reply left unread for the next
command."""

from __future__ import annotations

import asyncio
import sys
import threading
import uuid
from typing import Any

import psycopg
import pytest
import redis
import redis.asyncio.connection

from idemfn import PostgresStore, RedisStore, StoreError, idempotent
from idemfn._stores.postgres import store as store_module
from tests.support.concurrency import reads_of_others
from tests.support.records import finished
from tests.support.servers import PostgresServer, RedisServer
from tests.support.workers import poll

# RedisStore


def _in_handshake() -> bool:
    """Whether the running read is a connection's handshake (HELLO, AUTH, SELECT...)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name.startswith("on_connect"):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def test_an_async_command_cancelled_before_its_reply_leaves_no_reply_for_the_next(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The async lane takes a connection from the loop's pool without its check-out: a
    # cancellation after the command went and before its reply was read must not hand the
    # unread reply to the loop's next command (a claim answered with another key's record).
    store = RedisStore(redis_server.url, prefix=f"t:{uuid.uuid4().hex}:")
    for key in ("a", "b"):
        assert store.claim(finished(key)) is None
    read = redis.asyncio.connection.AbstractConnection.read_response

    async def main() -> list[str | None]:
        sent = asyncio.Event()
        hold = [True]

        async def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
            if hold and not _in_handshake():  # (a command's reply, on a connection made)
                hold.pop()
                sent.set()  # the command went: its reply waits on the socket
                await asyncio.Event().wait()  # until cancelled
            return await read(self, *args, **kwargs)

        monkeypatch.setattr(
            redis.asyncio.connection.AbstractConnection, "read_response", read_response
        )
        task = asyncio.create_task(store.aget("a"))
        await asyncio.wait_for(sent.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pool = store._side().client.connection_pool
        assert not pool._in_use_connections  # given back to the pool
        keys = []
        for key in ("b", "a", "b"):
            entry = await store.aget(key)
            keys.append(None if entry is None else entry.key)
        return keys

    assert asyncio.run(main()) == ["b", "a", "b"]


def test_a_call_cancelled_while_its_connection_says_hello_leaves_no_reply_behind(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import select

    store = RedisStore(redis_server.url, prefix=f"t:{uuid.uuid4().hex}:")
    for key in ("a", "b"):
        assert store.claim(finished(key)) is None
    read = redis.asyncio.connection.AbstractConnection.read_response

    async def main() -> list[str | None]:
        held: list[Any] = []
        saying_hello = asyncio.Event()

        async def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not held and _in_handshake():
                held.append(self)
                # (The reply stays in the socket, as when it comes after the cancellation.)
                self._writer.transport.pause_reading()
                saying_hello.set()
                await asyncio.Event().wait()  # until cancelled
            return await read(self, *args, **kwargs)

        monkeypatch.setattr(
            redis.asyncio.connection.AbstractConnection, "read_response", read_response
        )
        task = asyncio.create_task(store.aget("a"))
        await asyncio.wait_for(saying_hello.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        [conn] = held
        sock = conn._writer.transport.get_extra_info("socket")
        poll(  # the HELLO reply has come: in the socket, or (read before the hold) the stream
            lambda: conn._reader._buffer or select.select([sock.fileno()], [], [], 0)[0],
            "the HELLO reply",
        )
        if conn._reader._buffer:  # (a loop turn came between HELLO and its read: rare)
            pytest.skip("the HELLO reply was read before the hold: the race was not set up")
        conn._writer.transport.resume_reading()
        found = []
        for key in ("b", "a"):
            try:
                entry = await store.aget(key)
                found.append(None if entry is None else entry.key)
            except StoreError as exc:
                found.append(str(exc)[-60:])
        return found

    assert asyncio.run(main()) == ["b", "a"]


def test_a_command_that_fails_gives_its_connection_back_to_a_pool_of_one(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pool accounting when the store's own check-out meets an error, a Ctrl-C or a lost
    # connection: a connection left counted in use would exhaust a pool of one for good.
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    pool = redis.ConnectionPool(
        connection_class=redis.UnixDomainSocketConnection,
        path=str(redis_server.socket),
        max_connections=1,
        retry=Retry(NoBackoff(), 0),
    )
    client = redis.Redis(connection_pool=pool)
    store = RedisStore(client, prefix=f"t:{uuid.uuid4().hex}:")
    assert store.claim(finished("a")) is None
    send = redis.connection.AbstractConnection.send_packed_command
    failures: list[BaseException] = [KeyboardInterrupt(), redis.ConnectionError("lost")]

    def send_packed_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return send(self, *args, **kwargs)

    monkeypatch.setattr(
        redis.connection.AbstractConnection, "send_packed_command", send_packed_command
    )
    with pytest.raises(StoreError):
        store.get("a")  # ConnectionError
    with pytest.raises(KeyboardInterrupt):
        store.get("a")
    assert not pool._in_use_connections and len(pool._available_connections) == 1
    assert client.ping()  # the pool's one connection is free
    entry = store.get("a")
    assert entry is not None and entry.key == "a"


def test_a_resp3_client_is_served_by_the_stores_own_packing(redis_server: RedisServer) -> None:
    # The store reads replies unparsed (no response callbacks): RESP3's reply types (TIME,
    # INFO's verbatim string, HMGET, null) must read as RESP2's do, sync and async.
    client = redis.Redis(unix_socket_path=str(redis_server.socket), protocol=3)
    store = RedisStore(client, prefix=f"t:{uuid.uuid4().hex}:")
    assert b"resp=3" in store._send("CLIENT", "INFO")
    runs: list[int] = []

    @idempotent(key="{x}", store=store)
    def fn(x: int) -> int:
        runs.append(x)
        return x * 10

    assert fn(1) == 10 and fn(1) == 10 and runs == [1]
    assert store.time() > 0
    assert store.get("missing") is None
    from idemfn._stores.redis import _uptime

    assert _uptime(store._send("INFO", "server")) == float(
        client.info("server")["uptime_in_seconds"]
    )

    async def main() -> Any:
        return await store.aget(fn.key_for(1))

    entry = asyncio.run(main())
    assert entry is not None and entry.status == "ok"


def test_the_packer_honours_the_clients_encoding_errors(redis_server: RedisServer) -> None:
    from idemfn._stores.redis import _packer

    client = redis.Redis(
        unix_socket_path=str(redis_server.socket), encoding_errors="surrogateescape"
    )
    conn = client.connection_pool.make_connection()
    pack = _packer(client.connection_pool.connection_kwargs)
    command = ("HGET", "idemfn:k\udcff", "e", 7, b"\x00" * 70_000)
    assert pack(command) == b"".join(conn.pack_command(*command))
    store = RedisStore(client, prefix=f"t:{uuid.uuid4().hex}:")
    assert store.claim(finished("k\udcff")) is None
    entry = store.get("k\udcff")
    assert entry is not None and entry.key == "k\udcff"


def test_a_client_closed_by_its_user_serves_the_store_again(redis_server: RedisServer) -> None:
    # client.close() disconnects the pool's connections under the store: the next command
    # connects again instead of writing on a closed socket.
    client = redis.Redis(unix_socket_path=str(redis_server.socket))
    store = RedisStore(client, prefix=f"t:{uuid.uuid4().hex}:")
    assert store.claim(finished("a")) is None
    client.close()
    client.connection_pool.disconnect()
    entry = store.get("a")
    assert entry is not None and entry.key == "a"


# PostgresStore


def _store_blocked_on(admin: Any, table: str) -> bool:
    """Whether a statement of the store waits for a lock on ``table`` (held by the test)."""
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
        (f"%{table}%",),
    ).fetchone()
    return bool(row and row[0] > 0)


def test_a_caller_waiting_for_the_pool_gets_a_connection_that_becomes_a_spare(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pool of one (standing for a pool whose other connections long transactional bodies
    # hold): caller A runs a statement on it; caller B finds no spare and waits in the pool;
    # A finishes and keeps its connection as a spare instead of giving it back, so B waits
    # until the pool's timeout and fails, with the connection idle beside it.
    monkeypatch.setattr(store_module, "_MAX_CONNECTIONS", 1)
    monkeypatch.setattr(store_module, "BUSY_POOL_WAIT", 20.0)
    store = PostgresStore(postgres_server.dsn, table=f"t_{uuid.uuid4().hex}", connect_timeout=5.0)
    try:
        assert store.claim(finished("a")) is None and store.claim(finished("b")) is None
        assert len(store._spares) == 1  # the pool's one connection, kept
        admin = psycopg.connect(postgres_server.dsn, autocommit=True)
        locker = psycopg.connect(postgres_server.dsn)
        locker.execute(f"LOCK TABLE {store.table} IN ACCESS EXCLUSIVE MODE")
        outcomes: dict[str, Any] = {}

        def call(key: str) -> None:
            try:
                entry = store.get(key)
                outcomes[key] = None if entry is None else entry.key
            except BaseException as exc:  # (reported by the assertion below)
                outcomes[key] = exc

        first = threading.Thread(target=call, args=("a",))
        first.start()
        poll(lambda: _store_blocked_on(admin, store.table), "caller A blocked on the lock")
        second = threading.Thread(target=call, args=("b",))
        second.start()
        assert store._pool is not None
        pool = store._pool
        poll(lambda: pool.get_stats().get("requests_waiting", 0) >= 1, "B waiting in the pool")
        locker.commit()  # A's statement runs, and its connection is free again
        first.join(60)
        second.join(60)
        assert outcomes["a"] == "a"
        assert outcomes["b"] == "b", outcomes["b"]
        locker.close()
        admin.close()
    finally:
        store.close()


def test_a_spare_whose_server_connection_died_is_not_kept(
    postgres_server: PostgresServer,
) -> None:
    # A spare skips the pool's check-out: one whose backend was terminated (a server restart,
    # idle_session_timeout, an administrator, a failover) is seen dropped before any statement
    # is sent on it (issue 19: it failed the statement once), closed and replaced, never kept.
    store = PostgresStore(postgres_server.dsn, table=f"t_{uuid.uuid4().hex}")
    try:
        assert store.claim(finished("a")) is None
        [(conn, _, _, _)] = store._spares
        with psycopg.connect(postgres_server.dsn, autocommit=True) as admin:
            # (With a timeout, it returns once the backend has gone.)
            admin.execute("SELECT pg_terminate_backend(%s, 60000)", (conn.info.backend_pid,))
        entry = store.get("a")
        assert entry is not None and entry.key == "a"
        assert conn.closed
        assert conn not in [spare for spare, _, _, _ in store._spares]
        entry = store.get("a")
        assert entry is not None and entry.key == "a"
    finally:
        store.close()


def test_a_given_pool_never_lends_spares_and_gets_every_connection_back(
    postgres_server: PostgresServer,
) -> None:
    import psycopg_pool

    pool = psycopg_pool.ConnectionPool(postgres_server.dsn, min_size=1, max_size=2, open=True)
    try:
        store = PostgresStore(pool, table=f"t_{uuid.uuid4().hex}")
        fn = idempotent(key="{x}", store=store)(lambda x: x)
        assert fn(1) == 1 and fn(1) == 1
        with store.transaction(fn.key_for(2)):
            pass
        assert not store._spares
        stats = pool.get_stats()
        assert stats["pool_available"] == stats["pool_size"]  # none kept out of it
        store.close()
    finally:
        pool.close()


def test_threads_on_spare_connections_each_read_their_own_rows(
    postgres_server: PostgresServer,
) -> None:
    store = PostgresStore(postgres_server.dsn, table=f"t_{uuid.uuid4().hex}")
    keys = [f"k{i}" for i in range(8)]
    try:
        for key in keys:
            assert store.claim(finished(key)) is None
        assert reads_of_others(store, keys, 100) == []
        assert len(store._spares) <= store_module._SPARES
        backends = [conn.info.backend_pid for conn, _, _, _ in store._spares]
        assert len(set(backends)) == len(backends)  # no connection kept twice
    finally:
        store.close()


def test_an_idle_connection_with_bytes_nobody_asked_for_is_connected_again(
    redis_server: RedisServer,
) -> None:
    # The store's look at an idle connection (poll on its socket, or the async can_read) must
    # see a reply left waiting, and connect again: else the next command reads that reply.
    import select

    store = RedisStore(redis_server.url, prefix=f"t:{uuid.uuid4().hex}:")
    for key in ("a", "b"):
        assert store.claim(finished(key)) is None
    [conn] = store.client.connection_pool._available_connections
    conn.send_command("ECHO", "a stray reply")  # its reply is never read
    assert select.select([conn._sock], [], [], 60)[0]  # it has arrived
    for key in ("b", "a"):
        entry = store.get(key)
        assert entry is not None and entry.key == key

    async def main() -> list[str | None]:
        assert await store.aget("a") is not None  # this loop's pool has an idle connection
        [aconn] = store._side().client.connection_pool._available_connections
        await aconn.send_command("ECHO", "a stray reply")
        give_up = asyncio.get_running_loop().time() + 60
        while not aconn._reader._buffer:  # until it has arrived
            assert asyncio.get_running_loop().time() < give_up, "the stray reply never came"
            await asyncio.sleep(0.01)
        found = []
        for key in ("b", "a"):
            entry = await store.aget(key)
            found.append(None if entry is None else entry.key)
        return found

    assert asyncio.run(main()) == ["b", "a"]


def test_a_read_timed_out_is_sent_again_on_a_new_connection_and_reads_its_own_reply(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client that retries (retry=): the store's retry must disconnect the connection whose
    # reply was not read, so that the command sent again reads its own reply, not that one.
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis(unix_socket_path=str(redis_server.socket), retry=Retry(NoBackoff(), 1))
    store = RedisStore(client, prefix=f"t:{uuid.uuid4().hex}:")
    for key in ("a", "b"):
        assert store.claim(finished(key)) is None
    read = redis.connection.AbstractConnection.read_response
    late = [True]

    def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        if late.pop() if late else False:
            raise redis.TimeoutError("Timeout reading from socket")  # the reply still comes
        return read(self, *args, **kwargs)

    monkeypatch.setattr(redis.connection.AbstractConnection, "read_response", read_response)
    entry = store.get("a")
    assert not late and entry is not None and entry.key == "a"
    entry = store.get("b")
    assert entry is not None and entry.key == "b"


def test_racing_claims_and_deletes_never_let_two_callers_hold_the_key(
    postgres_server: PostgresServer,
) -> None:
    # A refused claim now reads the row in a second statement: a row removed or claimed
    # between them must make it claim again or report the new owner, never win twice without
    # a removal in between, and never return another key's record.
    from tests.support.records import processing

    store = PostgresStore(postgres_server.dsn, table=f"t_{uuid.uuid4().hex}")
    wins: list[str] = []
    removed: list[bool] = []
    wrong: list[object] = []
    start = threading.Barrier(4)
    try:

        def claimer(n: int) -> None:
            start.wait(60)
            for i in range(60):
                token = f"c{n}-{i}"
                found = store.claim(processing("k", token))
                if found is None:
                    wins.append(token)
                elif found.key != "k" or found.status != "processing":
                    wrong.append(found)

        def deleter() -> None:
            start.wait(60)
            for _ in range(120):
                removed.append(store.delete("k"))

        threads = [threading.Thread(target=claimer, args=(n,)) for n in range(3)]
        threads.append(threading.Thread(target=deleter))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert not any(thread.is_alive() for thread in threads)
        assert wrong == []
        assert 1 <= len(wins) <= sum(removed) + 1
    finally:
        store.close()


def test_a_statement_checked_in_while_the_store_closes_leaves_no_connection_open(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PostgresStore(postgres_server.dsn, table=f"t_{uuid.uuid4().hex}")
    assert store.claim(finished("a")) is None
    [(conn, _, _, _)] = store._spares
    real = store_module.time
    armed = [True]

    class ClosingClock:
        """``time`` for the store module whose next ``monotonic()`` (the check-in's look at
        how long its connection has been out) first closes the store, as another thread's
        ``close()`` would at that moment."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def monotonic(self) -> float:
            if armed and sys._getframe(1).f_code.co_name == "_checkin":
                armed.pop()
                store.close()
            return real.monotonic()

    monkeypatch.setattr(store_module, "time", ClosingClock())
    assert store.claim(finished("b")) is None  # on the spare; closed as it is checked in
    monkeypatch.setattr(store_module, "time", real)
    assert not armed and store._pool is None  # closed, and not used since
    assert conn.closed, "a connection of the closed store's pool is still open, kept as a spare"
