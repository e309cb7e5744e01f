"""PostgresStore for async callers, and its wake-ups (issue 16): the async primitives on
connections of each event loop's own, the async transaction of a transactional body, and
watches woken through LISTEN/NOTIFY by the settles of any process, which NOTIFY only when a
waiter watches. All against real PostgreSQL servers: the suite's, or a test's own where the test
stops it or counts its sessions.

Async tests are plain functions that call ``asyncio.run``; they wait on conditions with generous
timeouts, and the only timing assertions are generous upper bounds on a wait that a wake-up ends
(against its far longer timeout) and lower bounds on a wait nothing ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import pytest

from idemfn import StoreError, idempotent
from idemfn._stores.postgres import (
    PostgresAsyncWatch,
    PostgresStore,
    PostgresWatch,
    _LoopPool,
    _payload,
    current_async_connection,
    current_connection,
    listen,
)
from idemfn._stores.postgres import store as store_module
from idemfn._wakeups import settled
from tests.support.forks import fork_and_wait
from tests.support.postgres_tools import Heard, marks, named_dsn, sessions, stopped
from tests.support.records import finished, processing
from tests.support.servers import PostgresServer
from tests.support.settler import go, settler
from tests.support.workers import poll

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A cluster of this test's own, free to be stopped or stalled."""
    server = PostgresServer()
    yield server
    server.remove()


def fresh(server: PostgresServer, dsn: str | None = None, **options: Any) -> PostgresStore:
    return PostgresStore(dsn or server.dsn, table=f"ta_{uuid.uuid4().hex}", **options)


def expired(key: str) -> Any:
    """A finished record of ``key`` that expired ten seconds ago."""
    entry = finished(key, "t1")
    return entry._replace(finished_at=entry.finished_at - 70, expires_at=time.time() - 10)


async def until(what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# -- the async primitives ----------------------------------------------------------------------


async def _story(store: PostgresStore, run: Callable[..., Awaitable[Any]]) -> list[object]:
    """The same calls through ``await run(name, *args)``: sync primitives, or their async twins.
    What each returned, as comparable values (entries by what a caller reads of them)."""

    def seen(value: object) -> object:
        if value is None or isinstance(value, bool):
            return value
        return (value.key, value.status, value.token)  # type: ignore[attr-defined]

    claim = processing("k", "t1")
    out: list[object] = [await run("claim", claim)]
    out.append(seen(await run("claim", processing("k", "t2"))))  # the live claim, unchanged
    renewed = store.renew(claim, 300)  # (renewals are sync: the heartbeat's thread)
    assert renewed is not None
    # A claim is read with its lease row: its latest renewal.
    out.append((await run("get", "k")).lease_until == renewed.lease_until)
    out.append((await run("claim", processing("k", "t2"))).lease_until == renewed.lease_until)
    out.append(await run("swap", "k", "wrong", finished("k", "t1")))  # fenced: nothing written
    out.append(await run("swap", "k", "t1", finished("k", "t1")))
    out.append(seen(await run("get", "k")))
    out.append(seen(await run("claim", processing("k", "t3"))))  # a live finished record
    out.append(await run("delete", "k", "other-token"))
    out.append(await run("delete", "k"))
    out.append(await run("get", "k"))
    out.append(await run("claim", expired("x")))  # written expired
    out.append(await run("get", "x"))  # ...which counts as absent
    out.append(await run("delete", "x"))  # and removing it is tidying, not forgetting
    out.append(await run("claim", expired("x")))
    out.append(await run("claim", processing("x", "t4")))  # an expired record is replaced
    out.append(await run("release", "x", "wrong"))
    out.append(await run("release", "x", "t4"))
    out.append(await run("get", "x"))
    out.append(abs(await run("time") - store.time()) < 60)
    return out


def test_each_async_primitive_does_what_the_sync_one_does(postgres_server: PostgresServer) -> None:
    sync_store, async_store = fresh(postgres_server), fresh(postgres_server)

    async def sync(name: str, *args: Any) -> Any:
        return getattr(sync_store, name)(*args)

    async def asynchronous(name: str, *args: Any) -> Any:
        return await getattr(async_store, "a" + name)(*args)

    expected = asyncio.run(_story(sync_store, sync))
    assert expected == [
        None,
        ("k", "processing", "t1"),
        True,
        True,
        False,
        True,
        ("k", "ok", "t1"),
        ("k", "ok", "t1"),
        False,
        True,
        None,
        None,
        None,
        False,
        None,
        None,
        False,
        True,
        None,
        True,
    ]
    assert asyncio.run(_story(async_store, asynchronous)) == expected


def test_what_one_path_writes_the_other_reads_as_it_was_written(
    postgres_server: PostgresServer,
) -> None:
    store = fresh(postgres_server)

    async def main() -> None:
        claim = processing("a")
        assert await store.aclaim(claim) is None
        assert store.get("a") == claim  # (the very entry: decoded from the bytes written)
        assert store.claim(processing("b")) is None
        assert await store.aget("b") == store.get("b")
        assert await store.aswap("a", "t1", finished("a"))
        assert store.get("a") == await store.aget("a")
        assert abs(await store.atime() - store.time()) < 60

    asyncio.run(main())


def test_a_corrupt_record_a_damaged_fence_and_a_too_long_key_fail_as_on_the_sync_path(
    postgres_server: PostgresServer,
) -> None:
    from tests.support.stores import overwrite

    store = fresh(postgres_server)
    assert store.claim(processing("bad")) is None
    overwrite(store, "bad", b"not a record")
    assert store.claim(processing("fence")) is None
    store._run(
        "flip", "fence", f'UPDATE "{store.table}" SET live = %s WHERE key = %s', ("t2", "fence")
    )
    long_key = os.urandom(8000).hex()  # (random: PostgreSQL compresses what it indexes)

    def errors(sync: Callable[[], object], asynchronous: Callable[[], Awaitable[object]]) -> None:
        with pytest.raises((StoreError, ValueError)) as first:
            sync()

        async def main() -> None:
            with pytest.raises(type(first.value)) as second:
                await asynchronous()
            assert str(second.value) == str(first.value)

        asyncio.run(main())

    errors(lambda: store.get("bad"), lambda: store.aget("bad"))
    fenced = finished("fence", "t1")
    errors(lambda: store.swap("fence", "t1", fenced), lambda: store.aswap("fence", "t1", fenced))
    too_long = processing(long_key)
    errors(lambda: store.claim(too_long), lambda: store.aclaim(too_long))


# -- event loops ----------------------------------------------------------------------------


def test_asyncio_run_twice_on_one_store(postgres_server: PostgresServer) -> None:
    store = fresh(postgres_server)
    runs: list[int] = []

    @idempotent(key="{x}", store=store)
    async def double(x: int) -> int:
        runs.append(x)
        return 2 * x

    async def main(x: int) -> Any:
        assert await double(x) == 2 * x and await double(x) == 2 * x
        assert await double(1) == 2  # recorded by the first loop, replayed by this one
        return store._side().pool

    first = asyncio.run(main(1))
    second = asyncio.run(main(2))
    assert isinstance(first, _LoopPool) and first is not second  # a connection is its loop's
    assert runs == [1, 2]
    assert store.get(double.key_for(2)) is not None  # and the sync path reads what they wrote
    # A loop's connections were closed as it shut down, and it is forgotten by the next loop.
    assert first.made and all(conn.closed for conn in [*first.made, *second.made])
    asyncio.run(main(3))
    assert len(store._sides) == 0
    store.close()
    assert asyncio.run(main(4)) is not None  # closed, the store opens new connections
    store.close()


def test_no_session_outlives_its_event_loop(postgres_server: PostgresServer) -> None:
    dsn, name = named_dsn(postgres_server)
    store = fresh(postgres_server, dsn)
    counted: list[int] = []

    async def main() -> None:
        await asyncio.gather(*(store.aclaim(processing(f"k{i}")) for i in range(20)))
        async with store.awatch("k0") as watch:  # (the loop's two listening sessions)
            await watch.wait(0)
        counted.append(sessions(postgres_server, name))

    asyncio.run(main())
    assert counted[0] >= 3
    poll(lambda: sessions(postgres_server, name) == 0, "the loop's sessions to end")


# Run in a child with every warning an error: a connection left open when its loop ends would
# warn when collected, and the hook reports what __del__ raised.
NO_LEAKS = """
import asyncio, gc, logging, sys
problems = []
# -X dev's debug loops log any step slower than 100 ms: how busy the machine is, not a leak.
logging.getLogger("asyncio").addFilter(lambda r: not r.getMessage().startswith("Executing <"))
sys.unraisablehook = lambda u: problems.append(f"{u.exc_type.__name__}: {u.exc_value}")
from idemfn import idempotent
from idemfn._stores.postgres import PostgresStore

store = PostgresStore(sys.argv[1], table=sys.argv[2])

@idempotent(key="{x}", store=store, name="leaks.double")
async def double(x):
    return 2 * x

async def main(x):
    async with store.awatch("watched") as watch:
        await watch.wait(0)
        return await double(x) + await double(x)

for x in (1, 2, 3):
    print(asyncio.run(main(x)), flush=True)
    gc.collect()
loop = asyncio.new_event_loop()  # closed without shutting down its async generators
print(loop.run_until_complete(double(4)) * 2, flush=True)
loop.close()
print(asyncio.run(main(5)), flush=True)
loop = asyncio.new_event_loop()  # shut down as some services do: no task cancelled first
print(loop.run_until_complete(main(6)), flush=True)
loop.run_until_complete(loop.shutdown_asyncgens())
loop.close()
store.close()
del store, double, loop
gc.collect()
print("problems:", problems)
"""


def test_no_connection_outlives_its_loop_and_nothing_warns(postgres_server: PostgresServer) -> None:
    where = [postgres_server.dsn, f"ta_{uuid.uuid4().hex}"]
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", NO_LEAKS, *where],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n") == ["4", "8", "12", "16", "20", "24", "problems: []", ""]
    assert done.stderr == ""  # no warning, no error logged (a watch's listener closed under it)


# A server that accepts a connection and never answers: the loop ends while its call connects.
ENDS_WHILE_CONNECTING = """
import asyncio, socket, sys
from idemfn._stores.postgres import PostgresStore

server = socket.create_server(("127.0.0.1", 0))
store = PostgresStore(f"postgresql://nobody@127.0.0.1:{server.getsockname()[1]}/nothing",
                      table="t", connect_timeout=120)

async def main():
    calling = asyncio.ensure_future(store.aget("k"))
    server.setblocking(False)
    client, _ = await asyncio.get_running_loop().sock_accept(server)  # it connects...
    return calling  # ...and the loop ends, cancelling it

asyncio.run(main())
print("ended", flush=True)
"""


def test_a_loop_that_ends_while_a_call_connects_ends() -> None:
    # psycopg_pool's AsyncConnectionPool connects in tasks of its own, which swallow the
    # CancelledError that asyncio.run sends every task as it ends, then waits for: it never
    # ended. The loop's connections are made in the caller's task instead.
    done = subprocess.run(
        [sys.executable, "-c", ENDS_WHILE_CONNECTING],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0 and done.stdout == "ended\n", done.stderr


def test_a_loop_closed_without_shutting_down_is_forgotten_with_its_connections(
    postgres_server: PostgresServer,
) -> None:
    store = fresh(postgres_server)
    loop = asyncio.new_event_loop()
    assert loop.run_until_complete(store.aclaim(processing("k"))) is None
    pool = store._sides[loop].pool
    loop.close()
    del loop

    async def main() -> None:
        assert await store.aget("k") == store.get("k")
        gc.collect()

    asyncio.run(main())
    assert all(conn.closed for conn in pool.made)  # closed by the next loop's first call
    assert len(store._sides) == 0


def test_two_threads_each_running_a_loop_share_one_store(postgres_server: PostgresServer) -> None:
    store = fresh(postgres_server)
    both = threading.Barrier(2, timeout=60)
    pools: dict[int, Any] = {}

    def thread(n: int) -> None:
        async def main() -> None:
            both.wait()  # (both loops at once)
            for i in range(20):
                assert await store.aclaim(processing(f"{n}:{i}")) is None
                assert await store.aswap(f"{n}:{i}", "t1", finished(f"{n}:{i}"))
            pools[n] = store._side().pool

        asyncio.run(main())

    threads = [threading.Thread(target=thread, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert pools[1] is not pools[2]
    assert all(store.get(f"{n}:{i}") is not None for n in (1, 2) for i in range(20))


def test_a_forked_child_makes_its_own_connections_and_leaves_its_parents_alone(
    postgres_server: PostgresServer,
) -> None:
    store = fresh(postgres_server)
    loop = asyncio.new_event_loop()  # a parent's loop, running in a thread as a service's does
    thread = threading.Thread(target=loop.run_forever)
    thread.start()

    def on_the_loop(work: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(work, loop).result(60)  # type: ignore[arg-type]

    try:
        assert on_the_loop(store.aclaim(processing("k"))) is None
        parents = store._sides[loop]

        def child() -> int:
            # Its own loop and connections; closing the store leaves the parent's sessions.
            entry = asyncio.run(store.aget("k"))
            assert entry is not None and entry.token == "t1"
            assert store._sides.get(loop) is parents
            store.close()
            return 0

        assert fork_and_wait(child) == 0
        assert on_the_loop(store.aswap("k", "t1", finished("k")))  # its connection still works
        assert all(not conn.closed for conn in parents.pool.made)
    finally:
        on_the_loop(store.aclose())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(60)
        loop.close()
    assert all(conn.closed for conn in parents.pool.made)  # aclose closed them


def test_a_connection_keeps_no_cursor_that_holds_a_long_value(
    postgres_server: PostgresServer,
) -> None:
    store = fresh(postgres_server)

    async def body(n: int) -> str:
        return "v" * n

    fn = idempotent(key="{n}", store=store)(body)
    long = 4 * store_module._KEPT_BYTES

    async def main() -> None:
        def kept() -> int:
            return len(store._side().pool.cursors)

        assert await fn(10) == "v" * 10
        assert kept() == 1  # (a cursor is ~6 µs a statement)
        assert await fn(long) == "v" * long  # its record went out as the last statement's
        assert kept() == 0
        assert await fn(long) == "v" * long  # and came back as its result (a replay)
        assert kept() == 0
        assert await fn(10) == "v" * 10
        assert kept() == 1

    asyncio.run(main())


def test_two_hundred_concurrent_calls_share_at_most_sixteen_connections(
    postgres_server: PostgresServer,
) -> None:
    dsn, name = named_dsn(postgres_server)
    store = fresh(postgres_server, dsn)
    most: list[int] = []

    async def main() -> None:
        async def call(i: int) -> None:
            assert await store.aclaim(processing(f"k{i}")) is None
            most.append(sessions(postgres_server, name))  # (blocking, on purpose: calls pile up)
            assert await store.aswap(f"k{i}", "t1", finished(f"k{i}"))

        await asyncio.gather(*(call(i) for i in range(200)))

    asyncio.run(main())
    assert max(most) <= 16
    assert all(store.get(f"k{i}") is not None for i in range(200))


# -- a server that fails or stalls ------------------------------------------------------------


def test_async_calls_on_a_stopped_server_raise_store_errors_naming_the_key(
    own_server: PostgresServer,
) -> None:
    store = fresh(own_server, connect_timeout=1)
    unused = fresh(own_server, connect_timeout=1)  # its clock was never read
    warm = fresh(own_server, connect_timeout=1)
    asyncio.run(warm.aget("warm"))  # (a connection that the stop breaks: kept by no loop)
    own_server.stop()
    with pytest.raises(StoreError, match=r"could not read 'k0': "):
        asyncio.run(warm.aget("k0"))
    calls: list[tuple[str | None, Callable[[], Awaitable[object]]]] = [
        ("k1", lambda: store.aclaim(processing("k1"))),
        ("k2", lambda: store.aget("k2")),
        ("k3", lambda: store.aswap("k3", "t1", finished("k3"))),
        ("k4", lambda: store.arelease("k4", "t1")),
        ("k5", lambda: store.adelete("k5")),
        (None, lambda: unused.atime()),
    ]

    async def main() -> None:
        for key, call in calls:
            began = time.monotonic()
            with pytest.raises(StoreError) as info:
                await call()
            assert time.monotonic() - began < 30  # within connect_timeout, give or take
            message = str(info.value)
            assert info.value.key == (key or "") and "\n" not in message
            assert message.startswith(repr(store if key else unused) + " could not ")
            assert (repr(key) if key else "read the server's clock") in message
            assert "could not connect within 1 s (connect_timeout=1): OperationalError" in message
            assert str(own_server.socket_dir) in message  # libpq's words name the server

    asyncio.run(main())


@contextlib.contextmanager
def disk_full(store: PostgresStore, on: str) -> Iterator[None]:
    """``on`` (INSERT, UPDATE or DELETE) of the store's table fails as on a full disk."""
    name = f"full_{uuid.uuid4().hex}"
    store._run(
        "fault",
        None,
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION"
        " 'could not extend file: No space left on device' USING ERRCODE = 'disk_full'; END $$",
        (),
    )
    trigger = f'CREATE TRIGGER {name} BEFORE {on} ON "{store.table}" FOR EACH ROW'
    store._run("fault", None, f"{trigger} EXECUTE FUNCTION {name}()", ())
    try:
        yield
    finally:
        store._run("fault", None, f'DROP TRIGGER {name} ON "{store.table}"', ())
        store._run("fault", None, f"DROP FUNCTION {name}()", ())


def test_a_failing_statement_is_a_store_error_naming_the_key_as_on_the_sync_path(
    postgres_server: PostgresServer,
) -> None:
    store = fresh(postgres_server)
    assert store.claim(processing("held")) is None

    async def main() -> None:
        for on, call in (
            ("INSERT", lambda: store.aclaim(processing("new"))),
            ("UPDATE", lambda: store.aswap("held", "t1", finished("held"))),
            ("DELETE", lambda: store.arelease("held", "t1")),
        ):
            with disk_full(store, on), pytest.raises(StoreError) as info:
                await call()
            assert str(info.value).startswith(f"{store!r} could not ")
            assert "DiskFull: could not extend file: No space left on device" in str(info.value)
            assert isinstance(info.value.__cause__, psycopg.errors.DiskFull)
        held = await store.aget("held")
        assert await store.aget("new") is None and held is not None and held.status == "processing"

    asyncio.run(main())


def test_async_calls_never_block_the_loop_on_a_stalled_server(own_server: PostgresServer) -> None:
    # Connections that wait for the server as long as it takes: the stall is the test's.
    store = fresh(own_server, connect_timeout=120)
    newcomer = PostgresStore(own_server.dsn, table=store.table, connect_timeout=120)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert await store.aclaim(processing("held", "t1")) is None
        await newcomer.aget("warm")  # (the table made; its clock read again below)
        newcomer._clock._synced = None
        lags: list[float] = []
        ticking = True

        async def ticker() -> None:
            while ticking:
                before = loop.time()
                await asyncio.sleep(0.01)
                lags.append(loop.time() - before - 0.01)

        tick = loop.create_task(ticker())
        with stopped(own_server) as resume:
            calls = [
                loop.create_task(store.aget("held")),  # on the loop's connection
                loop.create_task(store.aclaim(processing("other", "t2"))),  # on new ones
                loop.create_task(store.aswap("held", "t1", finished("held", "t1"))),
                loop.create_task(newcomer.atime()),
                loop.create_task(newcomer.aget("held")),
            ]
            ticks = len(lags)
            await until("100 ticks while the server is stalled", lambda: len(lags) >= ticks + 100)
            # The loop ran on while the calls waited: no tick came late by anything like it.
            assert max(lags) < 0.5, max(lags)
            assert not any(call.done() for call in calls)  # they wait for the server...
            resume()
            results: list[Any] = await asyncio.wait_for(asyncio.gather(*calls), 60)  # ...then end
        ticking = False
        await tick
        held, other, swapped, now, seen = results  # (in whichever order the server ran them)
        assert held.key == seen.key == "held" and held.token == seen.token == "t1"
        assert other is None and swapped is True and now > 0
        assert max(lags) < 0.5, max(lags)

    asyncio.run(main())


# -- async transactions -------------------------------------------------------------------------


@pytest.fixture
def ledger(postgres_server: PostgresServer) -> str:
    name = f"ledger_{uuid.uuid4().hex}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id text UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    return name


def _rows(server: PostgresServer, table: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(server.dsn) as conn:
        return conn.execute(f"SELECT id FROM {table} ORDER BY id").fetchall()


def test_an_async_transaction_commits_the_bodys_writes_with_the_ok_record(
    postgres_server: PostgresServer, ledger: str
) -> None:
    store = fresh(postgres_server)

    async def main() -> None:
        assert await store.aclaim(processing("k")) is None
        async with store.atransaction("k") as conn:
            assert current_async_connection() is conn
            await conn.execute(f"INSERT INTO {ledger} VALUES ('k')")
            assert await store.aswap("k", "t1", finished("k"))  # (the engine's complete)
            assert store.get("k").status == "processing"  # type: ignore[union-attr]  # not yet
            assert _rows(postgres_server, ledger) == []
        assert (await store.aget("k")).status == "ok"  # type: ignore[union-attr]
        with pytest.raises(RuntimeError, match="only available inside"):
            current_async_connection()

    asyncio.run(main())
    assert _rows(postgres_server, ledger) == [("k",)]


def test_an_async_transaction_rolls_back_the_bodys_writes_when_it_raises(
    postgres_server: PostgresServer, ledger: str
) -> None:
    store = fresh(postgres_server)

    async def declined() -> None:
        async with store.atransaction("k") as conn:
            await conn.execute(f"INSERT INTO {ledger} VALUES ('k')")
            raise ValueError("declined")

    async def deferred_violation() -> None:
        async with store.atransaction("k") as conn:
            await conn.execute(f"INSERT INTO {ledger} VALUES ('k'), ('dup')")
            assert await store.aswap("k", "t1", finished("k"))

    async def committed_by_the_body() -> None:
        async with store.atransaction("k") as conn:
            await conn.execute("COMMIT")
            await store.aswap("k", "t1", finished("k"))

    async def status() -> str:
        entry = await store.aget("k")
        assert entry is not None
        return entry.status

    async def main() -> None:
        assert await store.aclaim(processing("k")) is None
        with pytest.raises(ValueError, match="declined"):
            await declined()
        assert await status() == "processing"
        # A COMMIT that fails (a deferred constraint) is raised as itself, saying so.
        await store._arun("write", None, f"INSERT INTO {ledger} VALUES ('dup')", ())
        with pytest.raises(psycopg.errors.UniqueViolation) as info:
            await deferred_violation()
        notes = getattr(info.value, "__notes__", [])
        assert any(
            "did not commit: neither the body's writes nor its ok record" in n for n in notes
        )
        assert await status() == "processing"
        # A body that ends its transaction itself: its ok record is refused.
        with pytest.raises(psycopg.ProgrammingError, match="current_async_connection"):
            await committed_by_the_body()
        assert await status() == "processing"

    asyncio.run(main())
    assert _rows(postgres_server, ledger) == [("dup",)]


def test_each_kind_of_body_gets_its_own_kind_of_connection(postgres_server: PostgresServer) -> None:
    store = fresh(postgres_server)
    assert store.claim(processing("sync")) is None
    with store.transaction("sync") as conn:
        assert current_connection() is conn
        with pytest.raises(RuntimeError, match=r"its connection is idemfn.current_connection\(\)"):
            current_async_connection()

    async def main() -> None:
        assert await store.aclaim(processing("async")) is None
        async with store.atransaction("async") as conn:
            assert isinstance(conn, psycopg.AsyncConnection)
            # Handed out as a sync connection, `conn.execute(...)` without await would write
            # nothing while the ok record commits.
            with pytest.raises(
                RuntimeError, match=r"its connection is idemfn.current_async_connection\(\)"
            ):
                current_connection()

    asyncio.run(main())


# -- given pools ---------------------------------------------------------------------------------


def test_a_given_async_pool_serves_its_loop_and_sync_calls_connect_on_their_own(
    postgres_server: PostgresServer,
) -> None:
    table = f"ta_{uuid.uuid4().hex}"

    async def main() -> PostgresStore:
        pool = psycopg_pool.AsyncConnectionPool(postgres_server.dsn, min_size=1, open=False)
        async with pool:
            store = PostgresStore(pool, table=table)
            assert await store.aclaim(processing("k")) is None
            assert store._side().pool is pool
            assert pool.get_stats().get("requests_num", 0) >= 1
            assert store.get("k") == await store.aget("k")  # sync: a pool of its own
            assert await store.aswap("k", "t1", finished("k"))
            return store

    store = asyncio.run(main())
    with pytest.raises(StoreError, match="serves the event loop it was first used on") as info:
        asyncio.run(store.aget("k"))
    assert info.value.key == "k"
    assert store.get("k").status == "ok"  # type: ignore[union-attr]
    store.close()

    async def from_a_function() -> str:
        return postgres_server.dsn

    with pytest.raises(TypeError, match="conninfo or kwargs is an async function"):
        PostgresStore(psycopg_pool.AsyncConnectionPool(from_a_function, open=False))


def test_a_given_sync_pool_lends_its_settings_to_the_loops_connections(
    postgres_server: PostgresServer,
) -> None:
    dsn, name = named_dsn(postgres_server)
    with psycopg_pool.ConnectionPool(dsn, min_size=1, open=True) as pool:
        store = PostgresStore(pool, table=f"ta_{uuid.uuid4().hex}")

        async def main() -> int:
            assert await store.aclaim(processing("k")) is None
            return len(store._side().pool.made)

        assert asyncio.run(main()) == 1
        assert store.get("k") is not None
        store.close()
    poll(lambda: sessions(postgres_server, name) == 0, "the sessions to end")


# -- wake-ups -----------------------------------------------------------------------------------


def test_a_settle_notifies_only_when_a_waiter_watches_the_key(
    postgres_server: PostgresServer, ledger: str
) -> None:
    store = fresh(postgres_server)
    heard = Heard(postgres_server, store)

    def settles(run: Callable[..., Any], p: str) -> None:
        """Every write that settles a key: a finished record, a halt, a release, a delete."""
        assert run("claim", processing(f"{p}a")) is None
        assert run("swap", f"{p}a", "t1", finished(f"{p}a"))
        assert run("claim", processing(f"{p}b")) is None
        assert run("swap", f"{p}b", "t1", finished(f"{p}b")._replace(status="halted"))
        assert run("claim", processing(f"{p}c")) is None
        assert run("release", f"{p}c", "t1")
        assert run("delete", f"{p}a")

    def sync(name: str, *args: Any) -> Any:
        return getattr(store, name)(*args)

    def asynchronous(name: str, *args: Any) -> Any:
        return asyncio.run(getattr(store, "a" + name)(*args))

    runs: list[int] = []

    @idempotent(key="{n}", store=store, name="first")
    def first(n: int) -> int:
        runs.append(n)
        return n

    @idempotent(key="{n}", store=store, name="transactional", transactional=True)
    def in_transaction(n: int) -> int:
        current_connection().execute(f"INSERT INTO {ledger} VALUES (%s)", (str(n),))
        return n

    # First calls, replays, transactional bodies and forgets nobody waits for: no NOTIFY.
    assert first(1) == 1 and first(1) == 1 and runs == [1]
    assert in_transaction(2) == 2
    settles(sync, "s")
    settles(asynchronous, "a")
    first.forget(1)
    assert heard.since() == []
    # Watched, each settle of the key (and only of the key) does.
    with contextlib.ExitStack() as watching:
        for key in ("wa", "wb", "wc", "xa", "xb", "xc"):
            watching.enter_context(store.watch(key))
        settles(sync, "w")
        assert heard.since() == ["wa", "wb", "wc", "wa"]
        settles(asynchronous, "x")
        assert heard.since() == ["xa", "xb", "xc", "xa"]
        # Claims, renewals, takeovers and refused writes settle nothing.
        assert store.claim(processing("wa")) is None
        assert store.renew(processing("wa"), 60) is not None
        assert store.swap("wa", "t1", processing("wa", "t2"))
        assert not store.swap("wa", "t1", finished("wa"))
        assert not store.release("wa", "t1")
        assert heard.since() == []
    # A settle in a transactional body notifies as it commits.
    with store.watch("transactional:3"):
        assert in_transaction(3) == 3
        assert heard.since() == ["transactional:3"]
    # Unwatched again: silent.
    settles(sync, "u")
    assert heard.since() == []
    heard.close()


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_watch_begun_as_a_settle_commits_looks_after_it(
    postgres_server: PostgresServer, path: str
) -> None:
    # The race: a settle whose statement found the key unwatched sends no NOTIFY; a watch that
    # begins before it commits must then see it in its next look. The settle holds the key's
    # mark until it commits, so that the watch waits for the commit.
    store = fresh(postgres_server)
    assert store.claim(processing("k")) is None
    looks: list[Any] = []

    def watcher() -> None:
        if path == "sync":
            with store.watch("k"):
                looks.append(store.get("k"))
            return

        async def main() -> None:
            async with store.awatch("k"):
                looks.append(await store.aget("k"))

        asyncio.run(main())

    with psycopg.connect(postgres_server.dsn) as settle:  # (in a transaction)
        row = store._row(finished("k")) | {"fence": "t1"}
        assert settle.execute(store._sql["swap"], row).rowcount == 1  # not yet committed
        thread = threading.Thread(target=watcher)
        thread.start()
        poll(lambda: marks(postgres_server, store, granted=False) == 1, "the mark to wait")
        assert looks == []
        settle.commit()
    thread.join(60)
    assert [entry.status for entry in looks] == ["ok"]


def test_a_sync_watch_wakes_when_another_process_settles_the_key(
    postgres_server: PostgresServer,
) -> None:
    store = fresh(postgres_server)
    assert store.claim(processing("k", "t1")) is None
    with settler(store, postgres_server.dsn, "k", "complete") as child, store.watch("k") as watch:
        assert isinstance(watch, PostgresWatch) and watch.hears_others
        go(child)
        began = time.monotonic()
        watch.wait(60)
        waited = time.monotonic() - began
        settled_entry = store.get("k")  # read at once: the wait ended because the key settled
    assert settled_entry is not None and settled_entry.status == "ok"
    assert waited < 30  # woken, not timed out (60 s)


def test_an_async_watch_wakes_when_another_process_settles_the_key(
    postgres_server: PostgresServer,
) -> None:
    store = fresh(postgres_server)
    assert store.claim(processing("k", "t1")) is None

    async def main() -> float:
        with settler(store, postgres_server.dsn, "k", "release") as child:
            async with store.awatch("k") as watch:
                assert isinstance(watch, PostgresAsyncWatch) and watch.hears_others
                go(child)
                began = time.monotonic()
                await watch.wait(60)
                waited = time.monotonic() - began
                assert await store.aget("k") is None  # released: the wait ended on the settle
        return waited

    assert asyncio.run(main()) < 30  # woken, not timed out (60 s)


def test_a_key_too_long_for_a_notify_is_notified_by_its_hash(
    postgres_server: PostgresServer,
) -> None:
    store = fresh(postgres_server)
    key = "é" * 2500  # 5000 bytes: a NOTIFY of the key itself would do; of 8000, would fail
    assert _payload(key).startswith("sha256:")
    assert store.claim(processing(key, "t1")) is None
    with settler(store, postgres_server.dsn, key, "complete") as child, store.watch(key) as watch:
        go(child)
        began = time.monotonic()
        watch.wait(60)  # the server's hash of the key is the one the watch listens for
        assert time.monotonic() - began < 30


def test_a_wait_runs_out_when_nothing_settles(postgres_server: PostgresServer) -> None:
    store = fresh(postgres_server)
    claim = processing("k", "t1")
    assert store.claim(claim) is None
    with store.watch("k") as watch:
        assert store.renew(claim, 60) is not None  # a renewal settles nothing
        assert store.claim(processing("k", "t2")) is not None  # nor a claim that lost
        began = time.monotonic()
        watch.wait(0.5)
        assert time.monotonic() - began >= 0.5

    async def main() -> None:
        async with store.awatch("k") as watch:
            assert await store.aswap("k", "t1", processing("k", "t1"))  # nor a takeover
            began = time.monotonic()
            await watch.wait(0.5)
            assert time.monotonic() - began >= 0.49  # (the loop's clock rounds its timers)

    asyncio.run(main())
    assert store.get("k").status == "processing"  # type: ignore[union-attr]


def test_the_watches_of_one_loop_share_two_sessions_and_a_settle_wakes_its_own(
    postgres_server: PostgresServer,
) -> None:
    dsn, name = named_dsn(postgres_server)
    store = fresh(postgres_server, dsn)

    async def main() -> None:
        assert await store.aclaim(processing("k7", "t1")) is None
        pool = store._side().pool
        async with contextlib.AsyncExitStack() as stack:
            watches = await asyncio.gather(
                *(stack.enter_async_context(store.awatch(f"k{i}")) for i in range(200)),
                stack.enter_async_context(store.awatch("k0")),  # two watches on one key
            )
            assert all(watch.hears_others for watch in watches)
            assert sessions(postgres_server, name) == len(pool.made) + 2  # LISTEN, marks
            assert marks(postgres_server, store) == 200  # (two on k0: one lock, taken twice)
            waits = [asyncio.ensure_future(watch.wait(60)) for watch in watches]
            await asyncio.sleep(0)  # (every wait is waiting)
            assert await store.arelease("k7", "t1")
            done, pending = await asyncio.wait(waits, timeout=30, return_when="FIRST_COMPLETED")
            assert done == {waits[7]}
            for wait in pending:  # cancelled waits: the watches leave all the same
                wait.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await until("the marks to go", lambda: marks(postgres_server, store) == 0)

    asyncio.run(main())


def test_a_watch_cancelled_as_it_marks_its_key_lets_go_of_the_mark(
    postgres_server: PostgresServer,
) -> None:
    store = fresh(postgres_server)
    heard = Heard(postgres_server, store)

    async def main() -> None:
        async def waiter() -> None:
            async with store.awatch("k") as watch:
                await watch.wait(60)

        await store.aget("warm")
        async with store.awatch("warm"):  # (the loop's listener is made)
            pass
        for steps in range(20):  # cancelled at each step of entering and waiting in turn
            task = asyncio.ensure_future(waiter())
            for _ in range(steps + 1):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # The cancelled watches' marks and unmarks still queued run first: a mark taken after
        # an earlier unmark left none held would otherwise make the count 0 for a moment.
        await until("the watches' background marks and unmarks", lambda: not listen._tasks)
        assert marks(postgres_server, store) == 0
        assert await store.aclaim(processing("k")) is None
        assert await store.arelease("k", "t1")

    asyncio.run(main())
    assert heard.since() == []  # nobody watches k any more: its release was silent
    heard.close()


@pytest.mark.parametrize("how", ["refused", "lost"])
def test_a_listen_that_fails_leaves_the_watches_polling_and_says_so_once(
    postgres_server: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    store = fresh(postgres_server, connect_timeout=1)
    if how == "refused":  # as a hot standby refuses LISTEN
        monkeypatch.setitem(
            store._sql,
            "listen",
            "DO $$ BEGIN RAISE EXCEPTION 'cannot execute LISTEN during recovery'; END $$",
        )
        said = "cannot execute LISTEN during recovery"
    else:  # accepted, but notifications never come back (as behind a pooler)
        monkeypatch.setattr(store, "_channel", "elsewhere")
        said = "did not come back within 1 s"
    assert store.claim(processing("k", "t1")) is None
    with store.watch("k") as watch:
        assert not watch.hears_others
        began = time.monotonic()
        watch.wait(0.3)  # never raises: sleeps...
        assert time.monotonic() - began >= 0.3
        threading.Timer(0.1, settled, ("k",)).start()
        began = time.monotonic()
        watch.wait(60)  # ...or wakes when this process settles the key
        assert time.monotonic() - began < 30

    async def main() -> None:
        async with store.awatch("k") as watch:
            assert not watch.hears_others
            began = time.monotonic()
            await watch.wait(0.3)
            assert time.monotonic() - began >= 0.29
            asyncio.get_running_loop().call_later(0.1, settled, "k")
            await asyncio.wait_for(watch.wait(60), 30)

    asyncio.run(main())
    # The settles themselves are untouched.
    assert store.swap("k", "t1", finished("k")) and store.delete("k")
    failures = [r for r in caplog.records if "cannot wake waiters through LISTEN" in r.message]
    assert failures and failures[0].levelno == logging.WARNING and said in failures[0].message
    assert [r.levelno for r in failures[1:]] == [logging.DEBUG] * (len(failures) - 1)


def test_a_listener_lost_mid_wait_wakes_its_watches_which_then_poll(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    dsn, name = named_dsn(postgres_server)
    store = fresh(postgres_server, dsn)
    assert store.claim(processing("k", "t1")) is None

    def kill_sessions() -> None:
        with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (name,),
            )

    with store.watch("k") as watch:
        assert watch.hears_others
        killer = threading.Timer(0.2, kill_sessions)
        killer.start()
        began = time.monotonic()
        watch.wait(60)  # returns when its connection dies: a settle may have gone unheard
        assert time.monotonic() - began < 30
        killer.join()
        assert not watch.hears_others
        watch.wait(0.1)  # polls from now on

    async def main() -> None:
        store._side().quiet_until = 0.0  # (try LISTEN again at once)
        async with store.awatch("k") as watch:
            assert watch.hears_others
            waiting = asyncio.ensure_future(watch.wait(60))
            await asyncio.sleep(0)
            await asyncio.get_running_loop().run_in_executor(None, kill_sessions)
            await asyncio.wait_for(waiting, 30)
            assert not watch.hears_others
            began = time.monotonic()
            await watch.wait(0.2)
            assert time.monotonic() - began >= 0.19

    asyncio.run(main())
    failures = [r for r in caplog.records if "cannot wake waiters through LISTEN" in r.message]
    assert [r.levelno for r in failures][:1] == [logging.WARNING]


def test_a_call_cancelled_as_a_pooled_connection_is_handed_to_it_is_cancelled(
    postgres_server: PostgresServer,
) -> None:
    # Before Python 3.12, asyncio.wait_for returned a result that arrived with the caller's
    # cancellation and dropped the cancellation (CPython gh-86296): a call cancelled while it
    # waited for one of its loop's 16 busy connections went on to claim its key and run its
    # body, and asyncio.timeout() never raised (issue 16, review).
    store = fresh(postgres_server)
    ran: list[int] = []

    @idempotent(key="k{n}", name="t", store=store)
    async def job(n: int) -> int:
        ran.append(n)
        return n

    async def main() -> None:
        pool = await store._apool()
        held = [await pool.getconn() for _ in range(pool.max_size)]  # every connection busy
        task = asyncio.ensure_future(job(1))
        deadline = time.monotonic() + 60
        while not pool._waiting:  # until the call waits for a connection
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        await pool.putconn(held.pop())  # one is handed to it...
        task.cancel()  # ...as it is cancelled, before it can run
        with pytest.raises(asyncio.CancelledError):
            await task
        for conn in held:
            await pool.putconn(conn)

    asyncio.run(main())
    assert ran == []
    assert store.get("t:k1") is None
    store.close()
