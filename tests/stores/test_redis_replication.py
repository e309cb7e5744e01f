"""RedisStore on a primary with a replica and Sentinel (issue 19): what a failover loses with
each ``replicas=`` setting, and that the store follows the master Sentinel names.

Real processes (``tests/support/deployments/redis_replicated.py``): the primary is SIGKILLed,
Sentinel promotes the replica. Every fault is waited for by condition: a stalled replica cannot
acknowledge however long it is given (so ``replica_timeout`` is short only to be quick), and a
failover is over when Sentinel names the replica and the replica says it is master.

The tests share one deployment per xdist worker, and run on one worker (an ``xdist_group``):
each starts from a healthy deployment (``healthy`` fixture) and uses keys of its own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio.sentinel
import redis.sentinel

from idemfn import OwnershipLost, RedisStore, StoreError, idempotent, open_store
from idemfn._stores import locate
from tests.support.cli import cli_env, idemfn_cli
from tests.support.deployments.redis_replicated import SERVICE, RedisReplicated
from tests.support.records import foreign_entry

pytestmark = [pytest.mark.xdist_group("redis-replication"), pytest.mark.slow]

WAIT = 30.0  # seconds: for a thread's event, on a busy machine


@pytest.fixture
def deployment(redis_replicated: RedisReplicated) -> RedisReplicated:
    redis_replicated.healthy()  # (a test that failed midway may have left it stalled)
    return redis_replicated


def prefix() -> str:
    return f"r:{uuid.uuid4().hex}:"


def counted(store: RedisStore, runs: list[Any], name: str = "f") -> Callable[..., Any]:
    """A function whose every body run is appended to ``runs``."""

    def body(x: int) -> int:
        runs.append(x)
        return x * 10

    return idempotent(store=store, key="{x}", name=name)(body)


def held_in_body(
    store: RedisStore, runs: list[str], x: int
) -> tuple[threading.Thread, threading.Event, threading.Event, list[Any]]:
    """A call of ``x`` in a thread whose body records its run, says it started and waits to be
    let go: (thread, started, let_go, [its result or error])."""
    started, let_go, outcome = threading.Event(), threading.Event(), []

    def body(x: int) -> str:
        runs.append("held")
        started.set()
        assert let_go.wait(WAIT)
        return "held"

    fn = idempotent(store=store, key="{x}", name="f")(body)

    def call() -> None:
        try:
            outcome.append(fn(x))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert started.wait(WAIT)
    return thread, started, let_go, outcome


# (a) The hazard, shown: without replicas=, a claim the replica never got is lost.


def test_without_replicas_a_failover_loses_a_claim_and_the_body_runs_twice(
    deployment: RedisReplicated,
) -> None:
    where = prefix()
    first = RedisStore(deployment.url(), prefix=where)
    runs: list[Any] = []
    deployment.stall()  # from now on, what the primary acknowledges stays on the primary
    thread, _, let_go, outcome = held_in_body(first, runs, 1)  # claimed: the body runs
    deployment.kill_primary()
    deployment.failover()
    # A second caller, on the promoted replica: no record of the claim, so it runs the body.
    second = RedisStore(deployment.url(), prefix=where)
    assert counted(second, runs)(1) == 10
    assert runs == ["held", 1]  # the duplicate this setting allows
    let_go.set()
    thread.join(WAIT)
    assert not thread.is_alive()
    # The first caller's outcome is fenced off: the key is the second's.
    assert [type(error) for error in outcome] == [OwnershipLost]
    assert counted(second, runs)(1) == 10
    assert runs == ["held", 1]
    deployment.rejoin()


# (b) With replicas=1, that claim is refused before the body runs.


def test_with_replicas_an_unacknowledged_claim_is_withdrawn_and_the_body_runs_once(
    deployment: RedisReplicated,
) -> None:
    where = prefix()
    store = RedisStore(deployment.url(replicas=1, replica_timeout=0.2), prefix=where)
    runs: list[Any] = []
    fn = counted(store, runs)

    async def twice(x: int) -> int:
        return x * 10

    afn = idempotent(store=store, key="{x}", name="f")(twice)
    deployment.stall()
    with pytest.raises(StoreError, match=r"only 0 of replicas=1 .*the body did not run"):
        fn(1)
    with pytest.raises(StoreError, match=r"only 0 of replicas=1 .*the body did not run"):
        asyncio.run(afn(2))
    assert runs == []
    with deployment.primary.client() as primary:  # withdrawn from the primary too
        assert primary.exists(f"{where}f:1", f"{where}f:2") == 0
    deployment.kill_primary()
    deployment.failover()
    deployment.rejoin()  # a replica again, to acknowledge
    assert fn(1) == 10  # claimable, once
    assert fn(1) == 10
    assert counted(RedisStore(deployment.url(), prefix=where), runs)(1) == 10
    assert runs == [1]
    assert asyncio.run(afn(2)) == 20


# (c) With replicas=1 and a healthy replica, what was acknowledged survives a failover.


def test_with_replicas_acknowledged_claims_and_outcomes_survive_a_failover(
    deployment: RedisReplicated,
) -> None:
    where = prefix()
    store = RedisStore(deployment.url(replicas=1), prefix=where)
    runs: list[Any] = []
    fn = counted(store, runs)
    for x in range(20):
        assert fn(x) == x * 10
    thread, _, let_go, outcome = held_in_body(store, runs, 99)  # a live, acknowledged claim
    deployment.kill_primary()  # at once: no waiting for the replica to catch up
    deployment.failover()
    other = counted(RedisStore(deployment.url(), prefix=where), runs)
    for x in range(20):
        assert other(x) == x * 10  # every outcome is there, and replays
    assert runs == [*range(20), "held"]
    # The live claim is there too, its owner's: the owner finishes on the new primary.
    let_go.set()
    thread.join(WAIT)
    assert outcome == ["held"]
    assert idempotent(store=store, key="{x}", name="f")(lambda x: "again")(99) == "held"
    assert runs == [*range(20), "held"]
    deployment.rejoin()


def test_with_replicas_an_outcome_short_of_replicas_is_kept_and_logged(
    deployment: RedisReplicated, caplog: pytest.LogCaptureFixture
) -> None:
    # The body has run: failing the call would invite a retry that runs it again. The outcome
    # stands on the primary; a warning says a failover now could lose it.
    store = RedisStore(deployment.url(replicas=1, replica_timeout=0.2), prefix=prefix())

    @idempotent(store=store, key="{x}", name="f")
    def stalls(x: int) -> int:
        deployment.stall()  # after the claim was acknowledged
        return x

    with caplog.at_level(logging.WARNING, logger="idemfn"):
        assert stalls(7) == 7
    assert "update of key 'f:7': only 0 of replicas=1 acknowledged it" in caplog.text
    assert stalls(7) == 7  # recorded (a replay reads first: it never waits for replicas)
    deployment.resume()


def test_with_replicas_an_unacknowledged_takeover_is_withdrawn_before_the_body_runs(
    deployment: RedisReplicated,
) -> None:
    # Taking over an abandoned claim is a claim: its body has not run yet.
    store = RedisStore(deployment.url(replicas=1, replica_timeout=0.2), prefix=prefix())
    runs: list[Any] = []

    def body(x: int) -> int:
        runs.append(x)
        return x

    fn = idempotent(store=store, key="{x}", name="f", on_abandoned="retry")(body)
    afn = idempotent(store=store, key="{x}", name="f", on_abandoned="retry")(_async(body))
    for x in (1, 2):  # claims whose owner's lease ran out a minute ago
        assert store.claim(foreign_entry(fn.key_for(x), "", lease_until=time.time() - 60)) is None
    deployment.stall()
    with pytest.raises(StoreError, match=r"taking over an abandoned claim: only 0 of replicas=1"):
        fn(1)
    with pytest.raises(StoreError, match=r"taking over an abandoned claim: only 0 of replicas=1"):
        asyncio.run(afn(2))
    assert runs == []
    deployment.resume()
    deployment.wait_caught_up()
    assert fn(1) == 1  # withdrawn: claimable again
    assert asyncio.run(afn(2)) == 2
    assert runs == [1, 2]


def _async(body: Callable[[int], int]) -> Callable[[int], Any]:
    async def twin(x: int) -> int:
        return body(x)

    return twin


# (d) The store follows the master Sentinel names, sync and async.


@pytest.mark.parametrize("given", ["url", "client", "async-client"])
def test_the_store_follows_sentinels_new_master(deployment: RedisReplicated, given: str) -> None:
    where = prefix()
    if given == "url":
        store = RedisStore(deployment.url(), prefix=where)
    elif given == "client":
        sentinel = redis.sentinel.Sentinel([deployment.sentinel.address], socket_timeout=WAIT)
        store = RedisStore(sentinel.master_for(SERVICE, password=deployment.password), prefix=where)
    else:  # (the sync client, for sync callers, is made like it)
        asentinel = redis.asyncio.sentinel.Sentinel([deployment.sentinel.address])
        store = RedisStore(
            asentinel.master_for(SERVICE, password=deployment.password), prefix=where
        )
    assert "redis+sentinel://" in store.url
    runs: list[Any] = []
    fn = counted(store, runs)

    async def body(x: int) -> int:
        runs.append(-x)
        return -x

    afn = idempotent(store=store, key="{x}", name="a")(body)

    async def across_a_failover() -> None:
        assert await afn(1) == -1
        assert fn(1) == 10
        await asyncio.to_thread(deployment.wait_caught_up)
        await asyncio.to_thread(deployment.kill_primary)
        await asyncio.to_thread(deployment.failover)
        # The same event loop's client, and the sync one, now reach the promoted replica.
        assert await afn(1) == -1  # replayed from it
        assert await afn(2) == -2
        assert fn(1) == 10
        assert fn(2) == 20

    asyncio.run(across_a_failover())
    assert runs == [-1, 1, -2, 2]
    assert store.client.connection_pool.get_master_address() == deployment.primary.address
    deployment.rejoin()


def test_sentinel_urls_open_a_store(deployment: RedisReplicated) -> None:
    url = deployment.url(replicas=1, replica_timeout=0.5)
    assert locate(url) == ("redis", url)
    assert locate(deployment.url("rediss+sentinel")) == ("redis", deployment.url("rediss+sentinel"))
    store = open_store(url)
    assert isinstance(store, RedisStore)
    assert store.replicas == 1
    assert store._wait == ("WAIT", 1, 500)
    runs: list[Any] = []
    name = f"open-{uuid.uuid4().hex}"
    assert counted(store, runs, name=name)(3) == 30
    # The idemfn command, with IDEMFN_STORE naming the Sentinel.
    listed = idemfn_cli("ls", "-p", name, env=cli_env(url))
    assert f"{name}:3" in listed.stdout.decode()


# (e) The options, checked.


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replicas": -1}, r"replicas=\.\.\.\) must be a whole number >= 0.*not -1"),
        ({"replicas": True}, r"replicas=\.\.\.\) must be a whole number"),
        ({"replicas": 1.0}, r"replicas=\.\.\.\) must be a whole number"),
        ({"replica_timeout": 0}, r"replica_timeout=\.\.\.\) must be a number of seconds > 0"),
        ({"replica_timeout": -1.0}, r"replica_timeout=\.\.\.\) must be"),
        ({"replica_timeout": float("inf")}, r"replica_timeout=\.\.\.\) must be"),
        ({"replica_timeout": "1"}, r"replica_timeout=\.\.\.\) must be"),
    ],
)
def test_bad_replication_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisStore("redis://localhost:1/0", **options)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://localhost:1/0?replicas=one", r"replicas='one' is not a whole number"),
        ("redis://localhost:1/0?replica_timeout=soon", r"replica_timeout='soon' is not a"),
        ("redis://localhost:1/0?replica_timeout=0", r"replica_timeout='0' is not a number"),
        ("redis+sentinel://localhost:26379", r"bad URL .*the path must be /service_name"),
        ("redis+sentinel:///svc", r"bad URL .*no Sentinel address"),
        ("redis+sentinel://h:port/svc", r"bad URL .*bad Sentinel address 'h:port'"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)


def test_the_urls_options_are_the_stores_and_the_rest_redis_pys() -> None:
    store = RedisStore("redis://localhost:1/2?replicas=2&socket_timeout=3&replica_timeout=0.25")
    assert (store.replicas, store._wait) == (2, ("WAIT", 2, 250))
    settings = store.client.connection_pool.connection_kwargs
    assert (settings["socket_timeout"], settings["db"]) == (3.0, 2)
    sentinel = RedisStore(
        "rediss+sentinel://u:secret@h1:1,[::1]:2/svc/3?socket_timeout=4&sentinel_password=s"
    )
    pool = sentinel.client.connection_pool
    assert pool.service_name == "svc"
    assert (pool.connection_kwargs["password"], pool.connection_kwargs["db"]) == ("secret", 3)
    assert "SSL" in pool.connection_class.__name__
    addresses = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
    assert [(a["host"], a["port"], a["password"]) for a in addresses] == [
        ("h1", 1, "s"),
        ("::1", 2, "s"),
    ]
    assert "secret" not in repr(sentinel)


def test_without_replicas_nothing_changes() -> None:
    # The hot path: the same lane for writes, and the claim first (no read before it).
    store = RedisStore("redis://localhost:1/0")
    assert store._writes is store._send
    assert store.claims_first and "claims_first" not in vars(store)
    assert RedisStore("redis://localhost:1/0", replicas=1).claims_first is False
