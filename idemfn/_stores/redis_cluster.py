"""``RedisStore`` on a Redis Cluster (issue 19): what ``RedisStore(cluster_client)`` and
``RedisStore("redis+cluster://host:port,...")`` make.

Records, scripts and fences are ``RedisStore``'s own (see ``redis.py``); what differs:

- **Routing.** Every script touches one key, ``prefix + key``, so each record lives on the node
  that serves the key's slot, and each transition is atomic there. Commands go through the
  cluster client's own routing (``execute_command``: the slot's node, following ``MOVED`` and
  ``ASK`` while slots move), not through ``RedisStore``'s lane, which takes connections from one
  server's pool.
- **The clock.** The nodes' clocks differ, and the store's clock (``time()``, which stamps every
  lease and expiry the engine writes and judges them) has no key to pick a node by. It is the
  *median* of the primaries' ``TIME``, read together (every ``clock.RESYNC`` seconds, as a
  standalone server's): every process reads the same nodes, so all judge leases on one clock,
  and one node whose clock is off, by any amount, moves it by nothing (a majority of primaries
  in step bounds it between theirs). Moving slots does not change it (unlike "the node serving
  slot N", whose clock would jump by the skew when the slot moves).
- **A primary down or stalled.** Each primary is asked on its own connection, all at once
  (sync: a daemon thread each; async: tasks on the loop), and a reading waits at most
  ``_CLOCK_LIMIT`` (1 s, less with a shorter ``socket_timeout``) for all: the clock is the
  median of those that answered (the others logged once at WARNING on ``idemfn``, until they
  answer again), so calls on the nodes that answer go on. It fails (a ``StoreError``) only
  when none answered, after waiting up to ``socket_timeout`` for the first. What a missing
  node costs: the median of the rest, and of two that is their mean, so one skewed node
  among them moves the clock by half its skew; processes that see different nodes answer
  may judge leases on clocks as far apart as the answering nodes' clocks are. A sync reading
  does not ask again a node its last reading still waits for (at most one thread per stalled
  node); a stalled node costs each reading that asks it the 1 s wait (every ``RESYNC`` s).
- **Expiry on the holding node's own clock.** A standalone store hands the server absolute
  times (``PEXPIREAT``, and ``x``, the expiry ``delete`` compares with ``TIME``) on the server's
  own clock. On a cluster those times are on the store's clock, and the node holding the record
  may be skewed from it: absolute, a node N seconds ahead would drop records N seconds early
  (a finished record replayed as absent: its body runs again), and one behind would keep them
  N seconds too long. So the cluster's claim and swap scripts take *milliseconds from now* on
  the store's clock and turn them into the node's own time with its ``TIME``, in the script: a
  record is dropped after the duration it was given, measured by the node that holds it, never
  before its expiry on the store's clock, and at most the command's one-way trip after it.
  (A reshard moves a record with its remaining time to live: ``MIGRATE`` sends durations.)

Wake-ups: every settle publishes on the key's channel (classic ``PUBLISH``, which a cluster
broadcasts to every node), so a watch subscribed on any node hears it: sync watches subscribe
through ``RedisCluster.pubsub()``, and each event loop's subscriber through the async cluster
client's. If pub/sub fails, waiters poll (``RedisWatch``'s documented fallback).

``scan`` (``idemfn ls``, ``stats``, ``prune``) walks every primary (``RedisCluster.scan_iter``).
A reshard while it runs may list a moving key twice (read once) or miss it (the next prune
takes it).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import math
import os
import statistics
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .._logs import CLOCK_PARTIAL, no_key
from .._record import Entry
from .._signing import SigningKey
from .._steps import arun, run
from .base import removable_at
from .clock import ServerClock
from .redis import (
    _ASYNC_CALLS,
    _CLAIM,
    _DELETE,
    _PLAIN,
    _RELEASE,
    _SHARED_OBJECTS,
    _SWAP,
    RedisStore,
    _Hub,
    _LoopSide,
    _Read,
    _resolved_driver_info,
    _retry_like,
    _Script,
)

if TYPE_CHECKING:
    import redis.asyncio.cluster
    import redis.cluster

__all__ = ["RedisClusterStore"]

logger = logging.getLogger("idemfn")

_FORM = "redis+cluster://[user:password@]host:port[,host:port...][?option=value...]"


def _relative(source: str, *argv: int) -> str:
    """``source``, run after turning its ``ARGV[i]`` (milliseconds from now on the store's
    clock, or "" for none) into this node's own time, from its ``TIME``."""
    indices = ", ".join(str(i) for i in argv)
    return (
        "local clock = redis.call('TIME')\n"
        "local node_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)\n"
        f"for _, i in ipairs({{{indices}}}) do\n"
        "  if ARGV[i] ~= '' then ARGV[i] = string.format('%.0f', node_ms + tonumber(ARGV[i])) end\n"
        "end\n" + source
    )


# The claim's drop-at and finished-expiry (ARGV 3, 4) and the swap's (ARGV 5, 6), in ms from
# now; release and delete take no times (delete compares "x" with the node's TIME, and "x" was
# written on the node's clock).
_CLUSTER_CLAIM = _relative(_CLAIM, 3, 4)
_CLUSTER_SWAP = _relative(_SWAP, 5, 6)
# The uptime a refused swap reads (did the server restart since the claim?), from the node
# that holds the key: a keyless INFO would go to any node.
_UPTIME = "return redis.call('INFO', 'server')"
_CLUSTER_SCRIPTS = (_CLUSTER_CLAIM, _CLUSTER_SWAP, _RELEASE, _DELETE, _UPTIME)


class RedisClusterStore(RedisStore):
    """A ``RedisStore`` on a Redis Cluster: made by ``RedisStore(...)`` when given a
    ``redis.cluster.RedisCluster``, a ``redis.asyncio.cluster.RedisCluster`` or a
    ``redis+cluster://`` (``rediss+cluster://``) URL.

    Each record lives on the node that serves its key's slot; every transition is one script
    there, routed by the cluster client (which follows ``MOVED`` and ``ASK`` while slots
    move). The store's clock is the median of the primaries' ``TIME`` (of those that answer
    within a second: one down or stalled fails no call on the others); a record's expiry is
    measured on the clock of the node that holds it (see the module's notes). ``scan``,
    ``prune`` and ``idemfn ls`` cover every primary. Nothing is sent until the first use.

    Args:
        url_or_client: ``redis+cluster://host:port[,host:port...]`` (any nodes of the
            cluster: the client finds the others; ``user:password@`` and redis-py's
            ``?option=value`` as in a ``redis://`` URL), or a cluster client made without
            ``decode_responses``: a sync one (each event loop's async clients are then made
            with its nodes and connection settings), or an async one (it serves the first
            event loop that uses the store; a sync client made with its settings serves sync
            callers, lease renewals and the ``idemfn`` command). The async clients the store
            makes have ``reinitialize_steps=0``: redis-py 8.1's default closes every
            connection on each 5th ``MOVED`` reply, under other tasks' commands, which then
            fail; make an async cluster client you give so too.
        prefix: As ``RedisStore``'s.
        signing_key: As ``RedisStore``'s.

        replicas: Must be 0: waiting for replicas (``RedisStore``'s ``replicas=``) is not
            available on a cluster yet.
        replica_timeout: Unused (``replicas`` is 0).

    Raises:
        ValueError: A bad cluster URL (the message names it, without its password), a
            client made with ``decode_responses=True``, or ``replicas`` other than 0.
    """

    def __init__(
        self,
        url_or_client: str | redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster,
        *,
        prefix: str = "idemfn:",
        signing_key: SigningKey | None = None,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        if replicas:
            # WAIT counts the replicas of the node it is sent to: each write would need its own
            # WAIT on its key's node, in one round trip with it, across MOVED and ASK replies.
            raise ValueError(
                "RedisStore(replicas=...) is not available on a Redis Cluster yet: give"
                " replicas=0 (a cluster's failover can lose the last writes of a primary, see"
                " the docs' Replication and failover), or use Sentinel or PostgreSQL with a"
                " synchronous standby where a duplicate run is never acceptable"
            )
        try:
            import redis
            import redis.asyncio.cluster
            import redis.cluster
        except ImportError:  # pragma: no cover - the extra is installed in the tests
            raise ImportError("RedisStore needs redis-py: pip install 'idemfn[redis]'") from None
        if not isinstance(prefix, str):
            raise TypeError(f"RedisStore(prefix=...) must be a str, not {type(prefix).__name__}")
        self._given = None
        self._sync: redis.cluster.RedisCluster | None = None
        self._sync_lock = threading.Lock()
        self._sync_pid = os.getpid()
        new_sync: Callable[[], redis.cluster.RedisCluster]
        if isinstance(url_or_client, str):
            nodes, settings = _parse_url(url_or_client)
            new_sync = functools.partial(_new_cluster, redis.cluster, nodes, settings)
            new_async = functools.partial(_new_cluster, redis.asyncio.cluster, nodes, settings)
            self.url = _describe(url_or_client.partition("://")[0].lower(), nodes)
        elif isinstance(
            url_or_client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)
        ):
            given: Any = url_or_client
            if _settings_of(given).get("decode_responses"):
                raise ValueError(
                    f"RedisStore needs a {_kind_name(given)} made without decode_responses=True:"
                    " records are bytes"
                )
            new_sync = functools.partial(_cluster_like, given, redis.cluster)
            new_async = functools.partial(_cluster_like, given, redis.asyncio.cluster)
            if isinstance(given, redis.cluster.RedisCluster):
                self._sync = given
            else:
                self._given = given
            scheme = "rediss+cluster" if _tls(_settings_of(given)) else "redis+cluster"
            self.url = _describe(scheme, _addresses(given))
        else:  # (RedisStore.__new__ sends only cluster clients and URLs here)
            raise TypeError(
                "RedisStore() on a cluster takes a redis+cluster:// URL, a"
                " redis.cluster.RedisCluster or a redis.asyncio.cluster.RedisCluster, not"
                f" {type(url_or_client).__name__}"
            )
        self._new_sync = new_sync
        self._new_async = new_async
        self._send = _ClusterLane(self)  # type: ignore[assignment]  # (the client's routing)
        self.replicas, self._writes = 0, self._send
        self.prefix = prefix
        self.sign_with(signing_key)
        self._errors = (redis.RedisError, redis.exceptions.RedisClusterException)
        missing = redis.exceptions.NoScriptError
        self._claim, self._swap, self._release, self._delete, self._uptime = (
            _Script(script, missing) for script in _CLUSTER_SCRIPTS
        )
        self._clock = ServerClock(self._read_clock)
        self._asking: set[str] = set()  # the primaries a sync clock reading still waits for
        self._asking_pid = os.getpid()
        self._silent: set[str] = set()  # the primaries that did not answer the last reading
        self._loops = weakref.WeakKeyDictionary()
        self._loops_lock = threading.Lock()
        self._pubsub_warned = False
        self._pubsub_paused_until = 0.0

    @property  # type: ignore[override]  # (a cluster client, made on first use)
    def client(self) -> redis.cluster.RedisCluster:
        """The ``redis.cluster.RedisCluster`` used by sync callers (made on first use: a
        cluster client connects when it is made)."""
        client = self._sync
        if client is None:
            if self._sync_pid != os.getpid():
                # A child forked while another thread made the client inherits the lock held.
                self._sync_lock, self._sync_pid = threading.Lock(), os.getpid()
            with self._sync_lock:
                client = self._sync
                if client is None:
                    try:
                        client = self._sync = self._new_sync()
                    except self._errors as exc:
                        raise self._failed("connect to", "the cluster", exc) from exc
        return client

    @client.setter
    def client(self, client: redis.cluster.RedisCluster) -> None:
        self._sync = client

    # The clock: the median of the primaries' TIME that answered (see the module's notes).
    # ServerClock pairs a reading with the middle of the call that made it: each node's TIME is
    # moved to the middle of this call. Each primary is asked on its own (its own connection,
    # not the cluster's routing, whose retries would refresh the topology), all at once, and
    # those that have not answered within _clock_limit are left out: one primary down or
    # stalled fails no call whose key lives on another.

    def _read_clock(self, first: bool) -> float:
        start = time.monotonic()
        client: Any = self.client
        if self._asking_pid != os.getpid():  # (a child has none of its parent's threads)
            self._asking, self._asking_pid = set(), os.getpid()
        primaries = client.get_primaries()
        answers: dict[str, tuple[float, float] | BaseException] = {}
        done = threading.Condition()

        def ask(node: Any) -> None:
            try:
                if first:  # load the scripts now, so that no call pays for it
                    for script in _CLUSTER_SCRIPTS:
                        _node_client(node).execute_command("SCRIPT", "LOAD", script)
                answer: tuple[float, float] | BaseException = self._read_node_clock(node)
            except Exception as exc:
                answer = exc
            with done:
                answers[node.name] = answer
                self._asking.discard(node.name)
                done.notify_all()

        with done:
            for node in primaries:
                if node.name in self._asking:  # still asked by an earlier reading: stalled
                    answers[node.name] = TimeoutError("still asked by an earlier reading")
                    continue
                self._asking.add(node.name)
                # A daemon thread: one on a stalled node blocks until socket_timeout (or for
                # ever without one) and must never hold up the process's exit.
                threading.Thread(target=ask, args=(node,), daemon=True).start()
            limit, patience = _clock_limit(client)
            done.wait_for(lambda: len(answers) == len(primaries), limit)
            if not _any_reading(answers):  # none in time: wait for the first, as long as any
                done.wait_for(
                    lambda: _any_reading(answers) or len(answers) == len(primaries),
                    max(patience - (time.monotonic() - start), 0.0),
                )
            found = dict(answers)
        for node in primaries:
            found.setdefault(node.name, TimeoutError(f"no answer within {limit:g} s"))
        return self._median_of(primaries, found, start)

    def _read_node_clock(self, node: Any) -> tuple[float, float]:
        """One primary's ``TIME``: (its seconds, this process's monotonic clock then)."""
        before = time.monotonic()
        seconds, micros = _node_client(node).execute_command("TIME")
        return float(seconds) + float(micros) / 1e6, (before + time.monotonic()) / 2

    async def _aread_clock(self, first: bool) -> float:
        start = time.monotonic()
        side = self._side()
        client: Any = side.client
        await self._acall(side, "connect to", "the cluster", client.initialize)
        primaries = client.get_primaries()
        tasks = {
            asyncio.ensure_future(self._aask(side, node, first)): node.name for node in primaries
        }
        limit, patience = _clock_limit(client)
        try:
            if tasks:
                _, waiting = await asyncio.wait(tasks, timeout=limit)
                while waiting and not any(_answered(task) for task in tasks):
                    left = patience - (time.monotonic() - start)
                    if left <= 0:
                        break
                    _, waiting = await asyncio.wait(
                        waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED
                    )
        finally:
            for task in tasks:
                task.cancel()  # (a TIME cut short disconnects its connection: redis-py's)
        found: dict[str, tuple[float, float] | BaseException] = {}
        for task, name in tasks.items():
            if task.done() and not task.cancelled():
                error = task.exception()
                found[name] = task.result() if error is None else error
            else:
                found[name] = TimeoutError(f"no answer within {limit:g} s")
        return self._median_of(primaries, found, start)

    async def _aask(self, side: _LoopSide, node: Any, first: bool) -> tuple[float, float]:
        if first:
            for script in _CLUSTER_SCRIPTS:
                await node.execute_command("SCRIPT", "LOAD", script)
        return await self._aread_node_clock(side, node)

    async def _aread_node_clock(self, side: _LoopSide, node: Any) -> tuple[float, float]:
        """``_read_node_clock`` through this event loop's cluster client's node."""
        before = time.monotonic()
        seconds, micros = await node.execute_command("TIME")
        return float(seconds) + float(micros) / 1e6, (before + time.monotonic()) / 2

    def _median_of(
        self,
        primaries: list[Any],
        answers: dict[str, tuple[float, float] | BaseException],
        start: float,
    ) -> float:
        """The median of the primaries' clocks that answered; the others logged (once, until
        they answer again). Raises a ``StoreError`` when none answered."""
        readings: list[tuple[float, float]] = []
        failed: list[str] = []
        for node in primaries:
            answer = answers.get(node.name)
            if isinstance(answer, tuple):
                readings.append(answer)
                self._silent.discard(node.name)
                continue
            failed.append(f"{node.name}: {type(answer).__name__}: {answer}")
            if node.name not in self._silent:
                self._silent.add(node.name)
                logger.warning(
                    "RedisStore: the cluster's primary %s did not answer for the store's clock"
                    " (%s: %s); the clock is the median of the primaries that answer, until it"
                    " does again",
                    node.name,
                    type(answer).__name__,
                    answer,
                    extra=no_key(CLOCK_PARTIAL),
                )
        if not readings:
            raise self.error(
                "read the clock for",
                "TIME",
                "no primary answered: " + ("; ".join(failed) or "the cluster has none"),
            )
        return _median(readings, start, time.monotonic())

    # The primitives that hand the node times: in ms from now (see _relative).

    def _claim_args_at(self, entry: Entry, now: float) -> tuple[list[str], list[str | bytes]]:
        drop_in, expires_in = _from_now(entry, now)
        token = entry.token if entry.status == "processing" else ""
        return [self.prefix + entry.key], [token, self.encode(entry), drop_in, expires_in]

    def claim(self, entry: Entry) -> Entry | None:
        args = self._claim_args_at(entry, self.time())
        found = self._call("claim", entry.key, self._claim, self._send, *args)
        return None if found is None else self.decode(entry.key, found)

    async def aclaim(self, entry: Entry) -> Entry | None:
        side = self._side()
        args = self._claim_args_at(entry, await self.atime())
        found = await self._acall(side, "claim", entry.key, self._claim.acall, side.send, *args)
        return None if found is None else self.decode(entry.key, found)

    def _swap_args_at(
        self, key: str, token: str, entry: Entry, now: float
    ) -> tuple[list[str], list[Any]]:
        drop_in, expires_in = _from_now(entry, now)
        live = entry.token if entry.status == "processing" else ""
        channel = "" if live else self._channel(key)  # a finished entry settles the key
        data = self.encode(entry)
        return [self.prefix + key], [token, live, entry.token, data, drop_in, expires_in, channel]

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        args = self._swap_args_at(key, token, entry, self.time())
        done = self._call("update", key, self._swap, self._send, *args)
        return bool(done == 1) or run(
            self._refused(key, token, entry, done), RedisClusterStore._read, self
        )

    async def aswap(self, key: str, token: str, entry: Entry) -> bool:
        side = self._side()
        args = self._swap_args_at(key, token, entry, await self.atime())
        done = await self._acall(side, "update", key, self._swap.acall, side.send, *args)
        return bool(done == 1) or await arun(
            self._refused(key, token, entry, done), self._aread, side
        )

    def _read(self, step: _Read | None) -> Any:
        if step is not None and step.command[0] == "INFO":  # from the key's node
            keys = [self.prefix + step.key]
            return self._call(step.action, step.key, self._uptime, self._send, keys, [])
        return super()._read(step)

    async def _aread(self, side: _LoopSide, step: _Read | None) -> Any:
        if step is not None and step.command[0] == "INFO":
            keys = [self.prefix + step.key]
            uptime = self._uptime.acall
            return await self._acall(side, step.action, step.key, uptime, side.send, keys, [])
        return await super()._aread(side, step)

    # Each event loop's async cluster client.

    def _new_side(self, client: Any) -> _LoopSide:
        return _ClusterLoopSide(client, self._pubsub_failed)

    def close(self) -> None:
        """Close the sync cluster client's connections now (each event loop's close when it
        shuts down, as ``RedisStore``'s). Used again, the store opens new ones."""
        client, self._sync = self._sync, None
        if client is not None:
            client.close()
        with self._loops_lock:
            self._forget_closed_loops()


def _node_client(node: Any) -> Any:
    """A sync cluster client's node's own ``Redis`` client (its connections, no routing)."""
    client = node.redis_connection
    if client is None:  # (the cluster client makes one for each node it knows)
        raise _connection_error()(f"no connection to {node.name}")
    return client


def _answered(task: asyncio.Future[tuple[float, float]]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _any_reading(answers: dict[str, tuple[float, float] | BaseException]) -> bool:
    return any(isinstance(answer, tuple) for answer in answers.values())


def _clock_limit(client: Any) -> tuple[float, float]:
    """(how long a clock reading waits for every primary, how long for at least one): the
    client's ``socket_timeout``, at most ``_CLOCK_LIMIT`` seconds for the first."""
    timeout = _settings_of(client).get("socket_timeout")
    patience = float(timeout) if timeout else _CLOCK_PATIENCE
    return min(patience, _CLOCK_LIMIT), max(patience, _CLOCK_LIMIT)


# A clock reading waits this long (seconds) for every primary's TIME, then takes the median of
# those that answered; if none did, it waits for the first up to the client's socket_timeout
# (_CLOCK_PATIENCE without one). A primary answers TIME in well under a millisecond: one that
# takes a second is stalled (a long fork, a paused VM) or unreachable.
_CLOCK_LIMIT = 1.0
_CLOCK_PATIENCE = 5.0


class _ClusterLane:
    """The store's commands, through the sync cluster client's routing: ``lane(*command)``;
    ``lane.many(commands)`` sends them one after the other (each may go to another node)."""

    __slots__ = ("_store",)

    def __init__(self, store: RedisClusterStore) -> None:
        self._store = store

    def __call__(self, *args: Any) -> Any:
        client: Any = self._store.client
        return client.execute_command(*args)

    def many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        return [self(*command) for command in commands]


class _AsyncClusterLane:
    """``_ClusterLane`` for one event loop's async cluster client. Each command first waits
    until the client knows the cluster's slots (at once, once it does): redis-py's async
    cluster client sends the commands of a new client to any node until it has asked, and
    50 of them at once drew MOVED replies, topology refreshes, and connections closed under
    other commands (redis-py 8.1: ``'NoneType' object has no attribute 'writelines'``)."""

    __slots__ = ("_client",)

    def __init__(self, client: Any) -> None:
        self._client = client

    async def __call__(self, *args: Any) -> Any:
        client = self._client
        await client.initialize()  # (one task asks; the others wait for its answer)
        try:
            return await client.execute_command(*args)
        except AttributeError as exc:
            # A connection closed under this command by the client's own topology refresh
            # (redis-py 8.1, see _new_cluster): a failed command (a StoreError), never a crash.
            raise _connection_error()(f"the cluster client closed the connection: {exc}") from exc

    async def many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        return [await self(*command) for command in commands]


class _ClusterLoopSide(_LoopSide):
    """One event loop's async cluster client and subscriber (through its ``pubsub()``)."""

    def __init__(self, client: Any, failed: Callable[[BaseException], None]) -> None:
        self.client = client
        self.send = _AsyncClusterLane(client)  # type: ignore[assignment]
        self.writes = self.send  # (no replicas= on a cluster)
        self.turns = asyncio.Semaphore(_ASYNC_CALLS)  # (connections are per node, 100 each)
        self.failed = failed
        self.hub = None
        self.closed = False
        self._closer = None

    def subscriber(self) -> _Hub:
        hub = self.hub
        if hub is None:
            hub = self.hub = _ClusterHub(self)
        return hub


class _ClusterHub(_Hub):
    """An event loop's subscriber on a cluster: ``_Hub``, through the async cluster client's
    ``pubsub()``, which subscribes on the node serving the first channel's slot (a classic
    ``PUBLISH`` on any node reaches every node). It first waits until the client knows the
    cluster's slots: before, its ``pubsub()`` fails (redis-py 8.1: a ``KeyError`` on the
    slot)."""

    async def _send(self, command: Callable[[bytes], Any], channel: bytes) -> None:
        try:
            await self._side.client.initialize()
        except Exception as exc:
            self._fail(exc)
            return
        await super()._send(command, channel)


def _connection_error() -> type[Exception]:
    import redis

    return redis.ConnectionError


def _from_now(entry: Entry, now: float) -> tuple[str, str]:
    """(when the node may drop the record, when it counts as expired), in ms from ``now``
    (the store's clock), or "": rounded up, so that no node drops a record early."""
    at = removable_at(entry)
    if at is None:
        return "", ""
    ms = math.ceil((at - now) * 1000)
    if entry.expires_at is not None:
        return str(ms), str(ms)
    return str(ms + 1), ""  # an abandoned claim: strictly after lease + ttl


def _median(readings: Iterable[tuple[float, float]], start: float, end: float) -> float:
    """The median of the nodes' clocks, as it stood in the middle of the reading (``start``
    to ``end`` on the monotonic clock): each node's reading is moved to that instant first."""
    middle = (start + end) / 2
    found = [seconds + (middle - when) for seconds, when in readings]
    if not found:
        raise ValueError("the cluster has no primary to read a clock from")
    return float(statistics.median(found))


# -- URLs and clients ----------------------------------------------------------------------------


def _parse_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """A cluster URL's nodes [(host, port)] and connection settings (redis-py's names).

    Raises ``ValueError`` naming the URL (its password hidden) and what is wrong with it.
    """
    from redis.connection import parse_url

    shown = _without_password(url)
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    where, _, query = rest.partition("?")
    netloc, _, path = where.partition("/")
    user, at, hosts = netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for part in hosts.split(","):
        part = part.strip()
        if not part:
            raise ValueError(
                f"RedisStore: bad cluster URL {shown!r}: an empty host; expected {_FORM}"
            )
        try:
            split = urllib.parse.urlsplit(f"//{part}")
            host, port = split.hostname, split.port
        except ValueError as exc:
            raise ValueError(
                f"RedisStore: bad cluster URL {shown!r}: {part!r}: {exc}; expected {_FORM}"
            ) from None
        if not host:
            raise ValueError(f"RedisStore: bad cluster URL {shown!r}: no host in {part!r}")
        nodes.append((host, 6379 if port is None else port))
    if path.strip("/") not in ("", "0"):
        raise ValueError(
            f"RedisStore: bad cluster URL {shown!r}: a cluster has one database, 0, not"
            f" {path.strip('/')!r}"
        )
    host, port = nodes[0]
    host = f"[{host}]" if ":" in host else host  # (IPv6)
    standalone = f"{scheme.partition('+')[0]}://{user}{at}{host}:{port}/"
    try:
        settings: dict[str, Any] = parse_url(  # type: ignore[no-untyped-call]
            standalone + ("?" + query if query else "")
        )
    except ValueError as exc:
        raise ValueError(f"RedisStore: bad cluster URL {shown!r}: {exc}") from None
    for name in ("host", "port", "db"):
        settings.pop(name, None)
    if settings.pop("connection_class", None) is not None:  # rediss: the TLS connection's
        settings["ssl"] = True
    import redis.asyncio.cluster
    import redis.cluster

    taken = _accepted(redis.cluster) & _accepted(redis.asyncio.cluster)
    unknown = sorted(name for name in settings if name not in taken)
    if unknown:
        raise ValueError(
            f"RedisStore: bad cluster URL {shown!r}: a cluster client takes no option"
            f" {', '.join(unknown)}"
        )
    return nodes, settings


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    user, at, hosts = netloc.rpartition("@")
    if at and ":" in user:
        user = user.partition(":")[0] + ":***"
    return f"{scheme}{sep}{user}{at}{hosts}{slash}{tail}"


def _describe(scheme: str, nodes: Iterable[tuple[str, int]]) -> str:
    """A cluster's nodes, for messages (never a password)."""
    return f"{scheme}://" + ",".join(f"{host}:{port}" for host, port in nodes)


def _kind_name(client: Any) -> str:
    module = type(client).__module__
    return (
        "redis.asyncio.cluster.RedisCluster"
        if "asyncio" in module
        else "redis.cluster.RedisCluster"
    )


def _settings_of(client: Any) -> dict[str, Any]:
    """A cluster client's connection settings (those its nodes' connections are made with)."""
    return dict(client.nodes_manager.connection_kwargs)


def _tls(settings: dict[str, Any]) -> bool:
    """Whether connection settings make TLS connections (``ssl=True``, or an SSL class)."""
    made_by = settings.get("connection_class")
    return bool(settings.get("ssl")) or "SSL" in getattr(made_by, "__name__", "")


def _addresses(client: Any) -> list[tuple[str, int]]:
    """The nodes a cluster client knows (all it found, or those it was given)."""
    nodes = client.get_nodes() or list(client.nodes_manager.startup_nodes.values())
    return sorted({(node.host, int(node.port)) for node in nodes})


def _new_cluster(kind: Any, nodes: list[tuple[str, int]], settings: dict[str, Any]) -> Any:
    """A new cluster client of ``kind`` (``redis.cluster`` or ``redis.asyncio.cluster``) for
    ``nodes`` with ``settings``. (A sync one connects now; an async one on first use.)"""
    chosen = dict(settings)
    if kind.__name__ == "redis.asyncio.cluster":
        # redis-py 8.1's async cluster client closes every connection of every node on each
        # 5th MOVED reply (its reinitialize_steps), under the commands of other tasks, which
        # then fail ("'NoneType' object has no attribute 'writelines'"); a reshard sends many.
        # With 0, each MOVED moves its slot in the client's table, and nothing is closed.
        chosen.setdefault("reinitialize_steps", 0)
    if "driver_info" in _accepted(kind) and "driver_info" not in chosen:
        chosen |= _resolved_driver_info()
    startup = [kind.ClusterNode(host, port) for host, port in nodes]
    return kind.RedisCluster(startup_nodes=startup, **chosen)


@functools.cache
def _accepted(kind: Any) -> frozenset[str]:
    """The connection settings a cluster client of ``kind`` takes."""
    if kind.__name__ == "redis.cluster":
        from redis.cluster import KWARGS_DISABLED_KEYS, REDIS_ALLOWED_KEYS

        allowed = frozenset(REDIS_ALLOWED_KEYS) - set(KWARGS_DISABLED_KEYS)
        return (allowed | {"retry", "address_remap"}) - {
            "connection_class",
            "connection_pool",
            "connection_pool_class",
            "redis_connect_func",
            "nodes_flag",
            "unix_socket_path",
        }
    return frozenset(inspect.signature(kind.RedisCluster.__init__).parameters) - {
        "self",
        "host",
        "port",
        "startup_nodes",
        "path",
        "db",
    }


# Settings a client makes for itself, or that hold objects of one kind: never copied.
_OWN = ("response_callbacks", "himport", "maint", "redis_connect_func", "connection_class", "cache")


def _cluster_like(client: Any, kind: Any) -> Any:
    """A new cluster client of ``kind`` that reaches ``client``'s nodes with its connection
    settings (credentials, TLS, timeouts, encoding, its retries' count)."""
    accepted = _accepted(kind)
    settings: dict[str, Any] = {}
    for name, value in _settings_of(client).items():
        if name not in accepted or name.startswith(_OWN):
            continue
        if not isinstance(value, _PLAIN) and name not in _SHARED_OBJECTS:
            continue  # a parser, an encoder, an event dispatcher: the kind's own default
        settings[name] = value
    if _tls(_settings_of(client)):
        settings["ssl"] = True
    standalone = importlib.import_module(kind.__name__.rpartition(".")[0])  # its Retry's module
    retry = _retry_like(client.retry, standalone) if getattr(client, "retry", None) else None
    if retry is not None:
        settings["retry"] = retry
    remap = getattr(client.nodes_manager, "address_remap", None)
    if remap is not None:
        settings["address_remap"] = remap
    return _new_cluster(kind, _addresses(client), settings)
