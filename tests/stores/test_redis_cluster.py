"""RedisStore on a real Redis Cluster of three primaries (issue 19), started by the suite
(``redis_cluster``: tests/support/deployments/redis_cluster.py).

The store contract, claims and wake-ups run on the cluster with every other store
(tests/contract, ``WITH_CLUSTER``). Here: what a cluster changes. Records on every node; the
clock (the median of the primaries', under an injected skew) and expiry on the node that holds
each record; wake-ups across nodes and processes; racing and SIGKILLed processes; ``ls`` and
``prune`` across nodes, from the Store API and the command; a reshard while processes call;
async calls on the async cluster client; the URL form and its errors.

Node clocks cannot be moved on a real server, so a skew is injected where the store reads
them (``_read_node_clock``): the store then stands to the nodes as it would to skewed ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import idemfn
from idemfn import AlreadyRunning, Halted, RedisStore, Status, idempotent, open_store
from idemfn._stores import default_store, locate
from idemfn._stores.redis_cluster import RedisClusterStore
from tests.support.cli import cli_env, idemfn_cli, one_line
from tests.support.concurrency import (
    HELD,
    MIXED,
    HeldElsewhere,
    Spec,
    WatchSpy,
    finish,
    fresh,
    spec_of,
    start,
)
from tests.support.deployments.redis_cluster import RedisClusterServers
from tests.support.records import foreign_entry
from tests.support.servers import RedisServer
from tests.support.stores import StoreClock, overwrite
from tests.support.workers import lines, poll


@pytest.fixture
def cluster(redis_cluster: RedisClusterServers) -> RedisClusterServers:
    return redis_cluster


@pytest.fixture
def store(cluster: RedisClusterServers) -> Iterator[RedisStore]:
    """A store on the cluster, under a prefix of its own (emptied after)."""
    s = RedisStore(cluster.url, prefix=f"test:{uuid.uuid4().hex}:")
    yield s
    _empty(s)
    s.close()


def _empty(store: RedisStore) -> None:
    for name in store.client.scan_iter(match=f"{store.prefix}*"):
        store.client.delete(name)


def _keys_by_node(
    cluster: RedisClusterServers, store: RedisStore, name: str, count: int = 1
) -> list[list[str]]:
    """For each node, ``count`` values of ``k`` whose record (``name:k``) that node holds."""
    return cluster.keys_on_each_node(f"{store.prefix}{name}:", count)


def _ints_on_each_node(cluster: RedisClusterServers, before: str) -> list[int]:
    """For each node, an int ``k`` whose Redis key ``before + str(k)`` it holds."""
    found: dict[int, int] = {}
    k = 0
    while len(found) < len(cluster.nodes):
        found.setdefault(cluster.node_of(f"{before}{k}"), k)
        k += 1
    return [found[n] for n in range(len(cluster.nodes))]


def _holder(cluster: RedisClusterServers, store: RedisStore, name: str, key: str) -> Any:
    """The plain client of the node that holds ``name:key``'s record."""
    return cluster.nodes[cluster.node_of(f"{store.prefix}{name}:{key}")]


def _skewed(store: RedisStore, skews: dict[int, float], monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the store read each node's clock off by ``skews[port]`` seconds (sync and async),
    as it would read nodes whose clocks are off so. (Before the store's first reading.)"""
    assert isinstance(store, RedisClusterStore)
    read, aread = store._read_node_clock, store._aread_node_clock

    def skewed(node: Any) -> tuple[float, float]:
        seconds, when = read(node)
        return seconds + skews.get(int(node.port), 0.0), when

    async def askewed(side: Any, node: Any) -> tuple[float, float]:
        seconds, when = await aread(side, node)
        return seconds + skews.get(int(node.port), 0.0), when

    monkeypatch.setattr(store, "_read_node_clock", skewed)
    monkeypatch.setattr(store, "_aread_node_clock", askewed)


# -- records on every node -----------------------------------------------------------------------


def test_each_record_lives_on_the_node_of_its_key_and_replays_from_every_node(
    cluster: RedisClusterServers, store: RedisStore
) -> None:
    runs: list[str] = []

    @idempotent(store=store, key="{k}", name="t.nodes")
    def fn(k: str) -> str:
        runs.append(k)
        return f"v:{k}"

    @idempotent(store=store, key="{k}", name="t.nodes")
    async def afn(k: str) -> str:  # (the same function: the same records)
        runs.append(k)
        return f"v:{k}"

    async def replays(keys: list[str]) -> list[str]:
        return list(await asyncio.gather(*(afn(k) for k in keys)))

    by_node = _keys_by_node(cluster, store, "t.nodes", 2)
    keys = [k for keys in by_node for k in keys]
    assert [fn(k) for k in keys] == [f"v:{k}" for k in keys]
    assert [fn(k) for k in keys] == [f"v:{k}" for k in keys]  # replays
    assert asyncio.run(replays(keys)) == [f"v:{k}" for k in keys]
    assert runs == keys
    for n, node_keys in enumerate(by_node):
        for k in node_keys:  # on its node (the others answer MOVED for it)
            assert cluster.nodes[n].ask("EXISTS", f"{store.prefix}t.nodes:{k}") == 1


# -- the clock and expiry ------------------------------------------------------------------------


def test_the_clock_is_the_median_of_the_primaries_whatever_one_node_says(
    cluster: RedisClusterServers, store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = [node.port for node in cluster.nodes]
    _skewed(store, {ports[0]: 3600.0, ports[1]: -3600.0, ports[2]: 2.0}, monkeypatch)
    assert abs(store.time() - (time.time() + 2.0)) < 1.0
    assert abs(asyncio.run(store.atime()) - (time.time() + 2.0)) < 1.0


@pytest.mark.parametrize("skew", [-3600.0, 3600.0], ids=["nodes-ahead", "nodes-behind"])
def test_expiry_is_measured_on_the_clock_of_the_node_that_holds_the_record(
    cluster: RedisClusterServers, store: RedisStore, monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    # The store's clock is an hour off every node: as a record's node is an hour off the store.
    # Given absolute times (PEXPIREAT on the store's clock), a node an hour ahead would drop a
    # 10-minute record at once (its body would run again), one behind would keep it 70 minutes.
    _skewed(store, {node.port: skew for node in cluster.nodes}, monkeypatch)
    runs: list[str] = []

    @idempotent(store=store, key="{k}", name="t.ttl", ttl=600)
    def fn(k: str) -> str:
        runs.append(k)
        return k

    keys = [k for (k,) in _keys_by_node(cluster, store, "t.ttl")]
    claims = [k for (k,) in _keys_by_node(cluster, store, "t.claim")]
    for k in keys:
        assert fn(k) == k
    for k in claims:  # an abandoned claim is dropped its ttl after its lease runs out
        entry = foreign_entry(f"t.claim:{k}", "f" * 64, lease_until=store.time() + 30)
        assert store.claim(entry._replace(ttl=600.0)) is None
    for name, ks, lasts in [("t.ttl", keys, 600_000), ("t.claim", claims, 630_000)]:
        for k in ks:
            node = _holder(cluster, store, name, k)
            pttl = node.ask("PTTL", f"{store.prefix}{name}:{k}")
            # Never early; late at most by the command's trip (and this machine's load).
            assert lasts - 30_000 < pttl <= lasts + 1, (name, k, pttl)
    for k in keys:  # "x", which delete compares with the node's TIME, is on the node's clock
        node = _holder(cluster, store, "t.ttl", k)
        x = int(node.ask("HGET", f"{store.prefix}t.ttl:{k}", "x"))
        seconds, micros = node.ask("TIME")
        assert 570_000 < x - (int(seconds) * 1000 + int(micros) // 1000) <= 600_001
        assert fn(k) == k
    assert runs == keys


def test_no_node_skew_hands_a_live_lease_over_nor_keeps_an_abandoned_one(
    cluster: RedisClusterServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two callers' stores, each reading skewed nodes (one an hour ahead, one an hour behind):
    # a clock read from any one node would judge every lease an hour off.
    ports = [node.port for node in cluster.nodes]
    skews = {ports[0]: 3600.0, ports[1]: -3600.0, ports[2]: 0.5}
    prefix = f"test:{uuid.uuid4().hex}:"
    owner, caller = RedisStore(cluster.url, prefix=prefix), RedisStore(cluster.url, prefix=prefix)
    try:
        _skewed(owner, skews, monkeypatch)
        _skewed(caller, skews, monkeypatch)
        runs: list[str] = []

        @idempotent(
            store=caller, key="{k}", name="t.lease", wait=0, fingerprint=False, on_abandoned="retry"
        )
        def fn(k: str) -> str:
            runs.append(k)
            return k

        live = [k for (k,) in _keys_by_node(cluster, owner, "t.lease")]
        gone = [k for (k,) in cluster.keys_on_each_node(f"{prefix}t.lease:", 1, stem="gone")]
        for k in live:  # leases of owners on another machine: judged by the store's clock
            owner.claim(foreign_entry(f"t.lease:{k}", "f" * 64, lease_until=owner.time() + 60))
        for k in gone:
            owner.claim(foreign_entry(f"t.lease:{k}", "f" * 64, lease_until=owner.time() - 30))
        for k in live:
            with pytest.raises(AlreadyRunning):
                fn(k)
        assert [fn(k) for k in gone] == gone  # taken over: their owners are gone
        assert runs == gone
    finally:
        for s in (owner, caller):
            _empty(s)
            s.close()


# -- wake-ups across nodes and processes ---------------------------------------------------------


@pytest.fixture
def slow_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiters look again only a minute after they last looked, unless woken."""
    import idemfn._engine as engine

    monkeypatch.setattr(engine, "_FIRST_POLL", 60.0)
    monkeypatch.setattr(engine, "_MAX_POLL", 60.0)


@pytest.mark.slow
@pytest.mark.usefixtures("slow_polls")
@pytest.mark.parametrize("waiter", ["thread", "task"])
def test_a_waiter_here_is_woken_by_a_settle_on_another_node_in_another_process(
    cluster: RedisClusterServers,
    store: RedisStore,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    waiter: str,
) -> None:
    # A key whose record and whose channel live on different nodes: the settle is published on
    # the record's node, the watch subscribed on the channel's (classic pub/sub reaches all).
    k = next(
        k
        for k in range(1000)
        if cluster.node_of(f"{store.prefix}{HELD['name']}:{k}")
        != cluster.node_of(f"{store.prefix}settled:{HELD['name']}:{k}")
    )
    spy = WatchSpy(store, monkeypatch)
    fn = idempotent(store=store, **HELD, wait=120)(lambda k: f"here:{k}")

    @idempotent(store=store, **HELD, wait=120)
    async def afn(k: int) -> str:
        return f"here:{k}"

    with HeldElsewhere(spec_of(store, request), tmp_path, k) as held:
        outcome: list[Any] = []
        if waiter == "thread":
            call = threading.Thread(target=lambda: outcome.append(fn(k)))
        else:
            call = threading.Thread(target=lambda: outcome.append(asyncio.run(afn(k))))
        call.start()
        spy.wait_for_a_waiter()
        let_go = time.monotonic()
        held.let_go()
        call.join(120)
    assert outcome == [f"held:{k}"]
    assert time.monotonic() - let_go < 30, "not woken: looked again after its minute"
    assert spy.opened == spy.closed >= 1


def test_watches_subscribe_through_the_cluster_clients(store: RedisStore) -> None:
    with store.watch("k") as watch:
        assert watch.hears_others

    async def subscribed() -> bool:
        async with store.awatch("k") as watch:
            return watch.hears_others

    assert asyncio.run(subscribed())


# -- racing and killed processes -----------------------------------------------------------------


def _go(processes: list[Any], directory: Path) -> None:
    poll(
        lambda: (
            len(list(directory.glob("ready-*"))) == len(processes)
            or any(p.poll() is not None for p in processes)
        ),
        "the callers to be ready",
        timeout=120,
    )
    (directory / "go").touch()


@pytest.mark.slow
def test_racing_processes_run_each_key_once_on_every_node(
    store: RedisStore, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    spec: Spec = spec_of(store, request)
    count = 40
    processes = [start("calls", spec, tmp_path, order, str(count)) for order in ["up", "down"] * 2]
    try:
        _go(processes, tmp_path)
    finally:
        for process in processes:
            finish(process, tmp_path)
    runs = Counter(line.split()[0] for line in lines(tmp_path / "runs"))
    assert runs == Counter({str(k): 1 for k in range(count)}), "a body ran twice, or never"
    results = [json.loads(p.read_text()) for p in tmp_path.glob("results-*.json")]
    assert len(results) == len(processes)
    for k in range(count):
        assert len({json.dumps(r[str(k)]) for r in results}) == 1, k  # one outcome each
    fn = idempotent(store=store, **MIXED)(lambda k: pytest.fail("ran again"))
    assert {fn(k)["k"] for k in range(count)} == set(range(count))


@pytest.mark.slow
def test_a_sigkilled_owner_is_seen_crashed_on_every_node(
    cluster: RedisClusterServers,
    store: RedisStore,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    spec = spec_of(store, request)
    keys = _ints_on_each_node(cluster, f"{store.prefix}{HELD['name']}:")
    holders = [start("hold", spec, tmp_path, str(k)) for k in keys]
    try:
        poll(
            lambda: all((tmp_path / f"holding-{k}").exists() for k in keys),
            "the holders' claims",
            timeout=120,
        )
        for holder in holders:
            holder.send_signal(signal.SIGKILL)
            holder.wait(30)
    finally:
        for holder in holders:
            if holder.poll() is None:
                holder.kill()
                holder.wait(30)
    fn = idempotent(store=store, **HELD, wait=0)(lambda k: pytest.fail("ran again"))
    for k, holder in zip(keys, holders, strict=True):
        # wait=0: the dead owner is seen dead at the first look (its lease has long to go).
        with pytest.raises(Halted) as info:
            fn(k)
        assert str(holder.pid) in info.value.reason
        record = fn.status(k)
        assert record is not None and record.status is Status.HALTED


# -- a reshard while processes call --------------------------------------------------------------


def _tags_in(slots: list[int], cluster: RedisClusterServers) -> list[str]:
    """A hash tag for each of ``slots`` (a key ``...{tag}...`` lives in the tag's slot)."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < len(slots):
        tag = f"t{n}"
        slot = cluster.slot_of(tag)
        if slot in slots:
            found.setdefault(slot, tag)
        n += 1
    return [found[slot] for slot in slots]


@pytest.mark.slow
def test_a_reshard_while_processes_call_runs_no_body_twice_and_loses_no_record(
    cluster: RedisClusterServers, store: RedisStore, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Every key the callers use hashes to a slot that moves, twice: from its node to the next,
    # and on to the one after, while four processes call new keys round after round (claims,
    # waits, finishing swaps, replays all meet keys whose slot is moving).
    source = cluster.owner_of_slot(cluster.slot_of("t0"))
    owners = cluster.nodes[0].owners()
    slots = [s for s in range(16384) if owners[s] == cluster.nodes[source].node_id][:24]
    tags = _tags_in(slots, cluster)
    spec = spec_of(store, request)
    processes = [start("rounds", spec, tmp_path, ",".join(tags), "4") for _ in range(4)]
    runs = tmp_path / "runs"
    try:
        _go(processes, tmp_path)
        poll(lambda: len(lines(runs)) >= 20, "calls under way", timeout=120)
        before = len(lines(runs))
        cluster.move_slots(slots, to=(source + 1) % 3)
        cluster.move_slots(slots, to=(source + 2) % 3)
        during = len(lines(runs)) - before
        poll(lambda: len(lines(runs)) >= before + during + 20, "calls after", timeout=120)
        (tmp_path / "stop").touch()
    finally:
        (tmp_path / "stop").touch()
        for process in processes:
            finish(process, tmp_path)
    assert during > 0, "no call ran while the slots moved"
    counts = Counter(line.split()[0] for line in lines(runs))
    assert {k: n for k, n in counts.items() if n != 1} == {}, "a body ran twice"
    results = [json.loads(p.read_text()) for p in tmp_path.glob("results-*.json")]
    called = set().union(*results)
    assert called == set(counts), "a call returned without its body having run once"
    fn = idempotent(store=store, **MIXED)(lambda k: pytest.fail("ran again: record lost"))
    for k in sorted(called):
        recorded = fn(k)  # a replay: its record is there, on the node now serving its slot
        assert all(r[k] == recorded for r in results if k in r), k
    target = cluster.nodes[(source + 2) % 3]
    assert all(
        target.ask("EXISTS", f"{store.prefix}{MIXED['name']}:{k}") for k in sorted(called)[:20]
    )


@pytest.mark.slow
def test_a_reshard_under_concurrent_async_calls_fails_none_and_runs_none_twice(
    cluster: RedisClusterServers, store: RedisStore
) -> None:
    # 60 calls at once on one event loop, round after round, on keys in slots that move. (The
    # async cluster client of redis-py 8.1, left to its defaults, closed every connection of
    # every node on each 5th MOVED reply, under the other tasks' commands: calls failed.)
    source = cluster.owner_of_slot(cluster.slot_of("t0"))
    owners = cluster.nodes[0].owners()
    slots = [s for s in range(16384) if owners[s] == cluster.nodes[source].node_id][:24]
    tags = _tags_in(slots, cluster)
    runs: Counter[str] = Counter()
    failures: list[BaseException] = []
    results: dict[str, str] = {}
    stop = threading.Event()

    @idempotent(store=store, key="{k}", name="t.areshard", wait=60)
    async def fn(k: str) -> str:
        runs[k] += 1
        await asyncio.sleep(0.002)
        return k

    async def rounds() -> None:
        r = 0
        while not stop.is_set():
            keys = [f"{{{tags[(r + n) % len(tags)]}}}-{r}-{n % 20}" for n in range(60)]
            outs = await asyncio.gather(*map(fn, keys), return_exceptions=True)
            for k, out in zip(keys, outs, strict=True):
                if isinstance(out, BaseException):
                    failures.append(out)
                else:
                    results[k] = out
            r += 1

    caller = threading.Thread(target=lambda: asyncio.run(rounds()))
    caller.start()
    try:
        poll(lambda: len(runs) >= 60 or not caller.is_alive(), "calls under way", timeout=120)
        cluster.move_slots(slots, to=(source + 1) % 3)
        cluster.move_slots(slots, to=(source + 2) % 3)
        moved = len(runs)
        poll(lambda: len(runs) >= moved + 60 or not caller.is_alive(), "calls after", timeout=120)
    finally:
        stop.set()
        caller.join(120)
    assert failures == []
    assert {k: n for k, n in runs.items() if n != 1} == {}, "a body ran twice"
    assert set(results) == set(runs)
    assert all(store.get(f"t.areshard:{k}") is not None for k in results), "a record was lost"


# -- ls, prune and stats across nodes ------------------------------------------------------------


def test_scan_and_prune_cover_every_node(
    cluster: RedisClusterServers, store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    @idempotent(store=store, key="{k}", name="t.short", ttl=60)
    def short(k: str) -> str:
        return k

    @idempotent(store=store, key="{k}", name="t.long", ttl=3600)
    def long(k: str) -> str:
        return k

    shorts = [k for keys in _keys_by_node(cluster, store, "t.short", 2) for k in keys]
    longs = [k for keys in _keys_by_node(cluster, store, "t.long", 2) for k in keys]
    for k in shorts:
        short(k)
    for k in longs:
        long(k)
    expected = {f"t.short:{k}" for k in shorts} | {f"t.long:{k}" for k in longs}
    assert {e.key for e in store.scan()} == expected
    assert {e.key for e in store.scan("t.long:")} == {f"t.long:{k}" for k in longs}
    StoreClock(store, monkeypatch).advance(120)  # the short ones expired (on the store's clock)
    assert store.prune() == len(shorts)
    assert {e.key for e in store.scan()} == {f"t.long:{k}" for k in longs}


def test_scan_lists_a_key_that_redis_returns_twice_once(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SCAN may return a key more than once (a reshard, a rehash): ls must not list it twice.
    @idempotent(store=store, key="{k}", name="t.twice")
    def fn(k: int) -> int:
        return k

    fn(1)
    client = store.client
    real = client.scan_iter
    monkeypatch.setattr(client, "scan_iter", lambda **kw: [*real(**kw), *real(**kw)])
    assert [e.key for e in store.scan()] == ["t.twice:1"]


@pytest.mark.slow
def test_the_command_lists_and_prunes_records_of_every_node(
    cluster: RedisClusterServers, tmp_path: Path
) -> None:
    store = RedisStore(cluster.url)  # the command's prefix: the default
    name = fresh("t.cli")
    try:
        fn = idempotent(store=store, key="{k}", name=name, ttl=3600)(lambda k: k)
        by_node = cluster.keys_on_each_node(f"{store.prefix}{name}:", 2)
        for keys in by_node:
            for k in keys:
                fn(k)
        # The first key of each node expired, as a record written without its expiry would be
        # (its fields say so; the server keeps it): what prune is for.
        expired = [keys[0] for keys in by_node]
        for k in expired:
            entry = store.get(f"{name}:{k}")
            assert entry is not None
            stale = entry._replace(expires_at=store.time() - 60)
            overwrite(store, f"{name}:{k}", store.encode(stale))
            store.client.persist(f"{store.prefix}{name}:{k}")
        env = cli_env(cluster.url)
        listed = json.loads(idemfn_cli("ls", "--json", "-a", "-p", name, env=env).stdout)
        assert {row["key"] for row in listed} == {f"{name}:{k}" for ks in by_node for k in ks}
        idemfn_cli("--store", cluster.url, "prune", env=cli_env(tmp_path / "nothing"))
        left = {entry.key for entry in store.scan(name)}
        assert left == {f"{name}:{keys[1]}" for keys in by_node}
    finally:
        for name_ in store.client.scan_iter(match=f"{store.prefix}{name}:*"):
            store.client.delete(name_)
        store.close()


# -- clients, URLs and their errors ---------------------------------------------------------------


@pytest.mark.parametrize("given", ["sync-client", "async-client"])  # (a URL: tests/contract)
def test_async_calls_run_on_each_event_loops_cluster_client(
    cluster: RedisClusterServers, given: str
) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    runs: list[int] = []
    made: list[RedisStore] = []

    def make() -> RedisStore:
        if given == "sync-client":
            return RedisStore(cluster.client(), prefix=prefix)
        return RedisStore(cluster.async_client(), prefix=prefix)  # (on the running loop)

    async def calls() -> list[int]:
        if not made:
            made.append(make())

        @idempotent(store=made[0], key="{x}", name="t.async", wait=60)
        async def fn(x: int) -> int:
            runs.append(x)
            await asyncio.sleep(0.001)
            return x * 2

        return list(await asyncio.gather(*(fn(x % 30) for x in range(90))))  # duplicates

    try:
        assert asyncio.run(calls()) == [x % 30 * 2 for x in range(90)]
        assert sorted(runs) == list(range(30))
        assert asyncio.run(calls()) == [x % 30 * 2 for x in range(90)]  # a new loop's client
        assert len(runs) == 30
        entry = made[0].get("t.async:7")  # the sync client: the same records
        assert entry is not None and entry.status == "ok"
    finally:
        if made:
            _empty(made[0])
            made[0].close()


def test_the_url_opens_a_cluster_store_through_open_store_and_idemfn_store(
    cluster: RedisClusterServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = open_store(cluster.url)
    assert isinstance(opened, RedisClusterStore) and isinstance(opened, RedisStore)
    assert open_store(cluster.url) is opened
    assert repr(opened) == f"RedisStore({cluster.url!r}, prefix='idemfn:')"
    monkeypatch.setenv("IDEMFN_STORE", cluster.url)
    assert default_store() is opened
    name = fresh("t.env")
    fn = idempotent(key="{k}", name=name)(lambda k: os.urandom(8).hex())
    try:
        assert fn(1) == fn(1)
        assert opened.get(f"{name}:1") is not None
    finally:
        opened.delete(f"{name}:1")


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("redis+cluster://h:7000,h:7001", "redis"),
        ("REDISS+CLUSTER://h:7000", "redis"),
        ("./a+b://c", "disk"),  # a path: its "scheme" is no name
        ("a.b://c", "disk"),
        ("~/x+y://z", "disk"),
    ],
)
def test_a_scheme_may_join_names_with_plus_and_odd_paths_stay_paths(text: str, kind: str) -> None:
    # (Schemes used to be names alone: a cluster URL was taken for a directory and created.)
    assert locate(text)[0] == kind


def test_an_unknown_plus_scheme_is_an_error_that_lists_the_schemes() -> None:
    with pytest.raises(ValueError, match="unknown store URL scheme 'redis\\+clustr'") as info:
        locate("redis+clustr://h:7000")
    assert "redis+cluster://, rediss+cluster://" in str(info.value)


def test_a_standalone_store_stays_a_plain_redis_store(redis_server: RedisServer) -> None:
    # The cluster's class is chosen once, when the store is made: a standalone store's calls
    # take the lane they took before (no branch on their way).
    from idemfn._stores.redis import _Lane

    store = RedisStore(redis_server.url)
    try:
        assert type(store) is RedisStore and type(store._send) is _Lane
    finally:
        store.close()


BAD_URLS = [
    ("redis+cluster://", "an empty host"),
    ("redis+cluster://127.0.0.1:7000,,127.0.0.1:7001", "an empty host"),
    ("redis+cluster://127.0.0.1:x", "Port could not be cast"),
    ("redis+cluster://user:s3cret@127.0.0.1:99999", "Port out of range"),
    ("redis+cluster://127.0.0.1:7000/2", "one database, 0"),
    ("rediss+cluster://127.0.0.1:7000?bogus=1", "no option bogus"),
]


@pytest.mark.parametrize(("url", "why"), BAD_URLS)
def test_a_bad_cluster_url_is_a_clear_error_naming_it(url: str, why: str) -> None:
    shown = url.replace("s3cret", "***")
    for make in (RedisStore, open_store):
        with pytest.raises(ValueError, match="bad cluster URL") as info:
            make(url)
        assert shown in str(info.value) and why in str(info.value)
        assert "s3cret" not in str(info.value)


def test_a_bad_redis_url_names_the_cluster_schemes_too() -> None:
    with pytest.raises(ValueError, match="bad URL") as info:
        RedisStore("redis+clustr://h:1")  # (not a cluster's scheme: the one-server store's)
    assert "'redis+clustr://h:1'" in str(info.value)
    assert "redis+cluster://host:port[,host:port...]" in str(info.value)


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("redis+cluster://127.0.0.1:1", {"replicas": 1}),
        ("redis+cluster://127.0.0.1:1?replicas=1", {}),
    ],
)
def test_waiting_for_replicas_is_refused_on_a_cluster(url: str, options: dict[str, int]) -> None:
    # WAIT counts the replicas of the node it reaches: a cluster would need one per key's node.
    with pytest.raises(ValueError, match="replicas"):
        RedisStore(url, **options)


def test_the_command_names_a_bad_cluster_url(tmp_path: Path) -> None:
    bad = "redis+cluster://127.0.0.1:x"
    proc = idemfn_cli("--store", bad, "ls", env=cli_env(tmp_path / "nothing"), status=68)
    assert bad in one_line(proc.stderr) and "--store" in one_line(proc.stderr)


def test_a_cluster_client_that_decodes_responses_is_refused(
    cluster: RedisClusterServers,
) -> None:
    client = cluster.client(decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisStore(client)
    finally:
        client.close()


def test_an_unreachable_cluster_fails_on_first_use_as_a_store_error(
    cluster: RedisClusterServers,
) -> None:
    from tests.support.deployments import free_port

    store = RedisStore(f"redis+cluster://127.0.0.1:{free_port()}?socket_connect_timeout=2")
    with pytest.raises(idemfn.StoreError, match="could not connect to"):
        store.get("k")
