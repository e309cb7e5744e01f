"""``RedisStore``: records in Redis, shared by every machine that reaches the server.

Each record is a hash under ``prefix + key``:

- ``e``: the encoded entry (what a replay reads: one ``HGET``, one round trip);
- ``t``: the token of a live claim, ``""`` once finished: the fence of every later write;
- ``k``: the entry's token, whatever its status (``delete`` on a token compares it);
- ``x``: when a finished record expires, in server milliseconds (``""``: never); only
  ``delete`` reads it, to tell forgetting a record from tidying an expired one.

Only ``e`` is covered by the record's checksum: a field beside it that is damaged never removes
or replaces a record (the server's own expiry does that), and a fence that no longer matches its
claim is reported as a corrupt record instead of passing for a lost claim (issue 14, review).

Every transition is one Lua script, atomic on the server: no read-then-write from the client.
Expiry is the server's (``PEXPIREAT``), and the store's clock is the server's ``TIME`` (see
``clock.ServerClock``), so neither a skewed nor a jumping client clock moves a lease.

Async callers (issue 16) run the same scripts through ``redis.asyncio``, on a client of each
event loop's own (a ``redis.asyncio`` connection belongs to the loop that opened it). Every write
that ends a claim (a swap to a finished entry, a release, a delete) publishes on the key's
channel, ``prefix + "settled:" + key``, in the same script; the store's watches subscribe to it,
so that a waiter on any machine wakes as soon as the key settles.

Nearly 1,000 lines on purpose, for now: the store, the clients of each event loop and the
pub/sub watches share the scripts and the connection settings. The watches (``RedisWatch``,
``RedisAsyncWatch`` and the shared subscriber) are the seam to split along, as PostgresStore's
were (``postgres/listen.py``).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import inspect
import logging
import math
import os
import select
import socket
import sys
import threading
import time
import urllib.parse
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Generator, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from .._errors import StoreError
from .._logs import UNREPLICATED, WATCH_FAILED, no_key
from .._record import Entry
from .._signing import SigningKey
from .._steps import arun, run
from .._wakeups import LocalAsyncWatch, LocalWatch
from ..events import log_fields
from .base import Corrupt, Store, removable_at
from .clock import ServerClock

if TYPE_CHECKING:
    import asyncio

    import redis
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.cluster

__all__ = ["RedisAsyncWatch", "RedisStore", "RedisWatch"]

logger = logging.getLogger("idemfn")

# KEYS[1] record; ARGV: token, data, expire-at ms ("" = none), finished-expiry ms ("" = none).
# Inserts unless a record is there; returns its entry, or nothing when this claim won. A record
# past its expiry is gone: the server drops it at its PEXPIREAT, and a script never sees a key
# past it. (The claim used to compare "x" with the server's TIME too, and delete the record:
# one flipped bit in "x", which no checksum covers, made a live record look expired, and its
# body ran again. Issue 14, review.)
_CLAIM = """
local found = redis.call('HGET', KEYS[1], 'e')
if found then return found end
redis.call('HSET', KEYS[1], 'e', ARGV[2], 't', ARGV[1], 'k', ARGV[1], 'x', ARGV[4])
if ARGV[3] ~= '' then redis.call('PEXPIREAT', KEYS[1], ARGV[3]) end
return false
"""

# Each settle publishes on the key's channel (issue 16). With redis.pcall, not redis.call: a user
# whose ACL may not publish (Redis 7 gives a new ACL user no channels) must still settle, and
# its waiters look again at intervals instead. A PUBLISH nobody listens to costs the server a
# dictionary lookup.

# KEYS[1]; ARGV: fence token, live token of the new entry ("" when finished), its token, data,
# expire-at ms, finished-expiry ms, channel ("" when the new entry is a claim: nothing settled).
# Replaces the record only if its live claim is the fence; returns 1 if it did, 0 if another
# claim or a finished record is there, -1 if none is.
_SWAP = """
local live = redis.call('HGET', KEYS[1], 't')
if live == false then return -1 end
if live ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'e', ARGV[4], 't', ARGV[2], 'k', ARGV[3], 'x', ARGV[6])
if ARGV[5] == '' then redis.call('PERSIST', KEYS[1])
else redis.call('PEXPIREAT', KEYS[1], ARGV[5]) end
if ARGV[7] ~= '' then redis.pcall('PUBLISH', ARGV[7], '') end
return 1
"""

# KEYS[1]; ARGV: fence token, channel. Removes the record only if its live claim is the fence.
_RELEASE = """
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.pcall('PUBLISH', ARGV[2], '')
return 1
"""

# KEYS[1]; ARGV: token ("" = any), channel. Returns 1 if a live record was removed, 2 if an
# expired one was (tidying, not forgetting), 0 if nothing was.
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local found = redis.call('HMGET', KEYS[1], 'k', 'x')
if ARGV[1] ~= '' and found[1] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.pcall('PUBLISH', ARGV[2], '')
local x = found[2]
if x == false or x == '' then return 1 end
local t = redis.call('TIME')
if tonumber(x) > tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) then return 1 end
return 2
"""

_SCRIPTS = (_CLAIM, _SWAP, _RELEASE, _DELETE)

# How many of an event loop's calls run at once (each on a connection of its own); the others
# wait for their turn without blocking the loop. redis.asyncio's default pool refuses calls past
# its 100 connections ("Too many connections"), and 200 concurrent calls are ordinary. (Its
# BlockingConnectionPool waits too, but costs every call about 20% more CPU.) One connection of
# the pool is left for the loop's subscriber.
_ASYNC_CALLS = 50

# How long a new watch waits for the server to confirm its subscription before the caller looks
# at the key again: a settle between that look and the subscription would go unheard. A slow
# server only delays the look, which waits on the same server.
_CONFIRM = 2.0
# How long an async subscriber's read waits for a message before it reads again.
_LISTEN = 30.0
# After pub/sub failed, how long a store's new watches poll before they try it again (a server
# that refuses SUBSCRIBE, such as an ACL without channels, is asked again that often).
_PUBSUB_PAUSE = 5.0


def _names_a_cluster(given: object) -> bool:
    """Whether ``RedisStore(given)`` is a store on a Redis Cluster: a ``redis+cluster://`` or
    ``rediss+cluster://`` URL, or a cluster client of redis-py (sync or async)."""
    if isinstance(given, str):
        scheme, sep, _ = given.partition("://")
        return bool(sep) and scheme.lower() in ("redis+cluster", "rediss+cluster")
    try:
        import redis.asyncio.cluster
        import redis.cluster
    except ImportError:  # (RedisStore() says what to install)
        return False
    return isinstance(given, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster))


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class _Read(NamedTuple):
    """A read that a refused swap needs: a ``command`` (its words) for the store's lane."""

    action: str
    key: str
    command: tuple[Any, ...]


#: What ``RedisStore._refused`` yields: a read, or None for the store's time.
_Steps = Generator[_Read | None, Any, bool]


class RedisStore(Store):
    """Records in Redis (extra ``idemfn[redis]``), shared by every process on every machine
    that reaches the server.

    Each transition is one Lua script, atomic on the server; expiry is the server's own, and
    the store's clock is the server's ``TIME``. Nothing is sent until the first use.

    Async callers (``aclaim``, ``aget``, ...) never block their event loop: they use a
    ``redis.asyncio`` client, one per event loop (a script that calls ``asyncio.run`` twice, or
    a test suite that makes a loop per test, works), each closed when its loop shuts down
    (``asyncio.run`` does that). A loop's calls run 50 at a time, each on a connection of its
    own; the others wait their turn without blocking the loop. A caller waiting for a busy key
    is woken by the server as soon as the key settles, on any machine (``watch``, ``awatch``:
    Redis pub/sub).

    Args:
        url_or_client: A URL (``redis://``, ``rediss://``, ``unix://``; or
            ``redis+sentinel://host:port[,host:port...]/service_name[/db]``, and
            ``rediss+sentinel://`` for TLS, for the master that Sentinel names, followed
            through failovers), or a client the caller already has, made without
            ``decode_responses``: a ``redis.Redis`` (the async clients are then made with its
            connection settings; one from ``Sentinel.master_for()`` follows the master too), or
            a ``redis.asyncio.Redis``. The latter serves the async calls of the first event
            loop that uses the store (a ``redis.asyncio`` client is bound to the loop it is
            used on; other loops get clients of their own made with its connection
            settings), and a ``redis.Redis`` made with its connection settings serves sync
            callers, lease renewals (the heartbeat thread) and the ``idemfn`` command. A URL
            may carry ``replicas=`` and ``replica_timeout=`` as query parameters (given
            both there and as arguments, they must agree: ``ValueError`` otherwise). Error
            messages show a URL without its passwords. On a Redis Cluster: a
            ``redis+cluster://host:port[,host:port...]`` URL (``rediss+cluster://``: TLS), or
            a ``redis.cluster.RedisCluster`` or ``redis.asyncio.cluster.RedisCluster`` (see
            ``redis_cluster.RedisClusterStore``, the class then made).
        prefix: Put before every stored key to make the Redis key. Default ``"idemfn:"``.
        signing_key: Keys to sign and verify records with (as ``idempotent``'s
            ``signing_key``): one that fails its check is never loaded. Default None:
            ``IDEMFN_SIGNING_KEY`` when set.
        replicas: How many replicas must acknowledge each write (Redis ``WAIT``, sent in the
            same round trip as the write). Default 0: none, as plain Redis. With N > 0 a
            claim that fewer than N replicas acknowledged within ``replica_timeout`` is
            withdrawn and the call raises ``StoreError`` before its body runs; a later write
            (the outcome, a renewal, a release) that falls short is kept and logged as a
            warning (the body has run: failing the call would only invite a retry). A call
            then reads the key before it claims it, so that a replay never waits for
            replicas. It narrows the window in which a failover loses a claim; it is not
            consensus: see the docs' "Replication and failover".
        replica_timeout: Seconds a write waits for ``replicas`` acknowledgements. Default 1.

    Attributes:
        client: The ``redis.Redis`` used by sync callers (a ``redis.cluster.RedisCluster`` on
            a cluster).
        prefix: The ``prefix`` given.
        replicas: The ``replicas`` given (0: writes do not wait for replicas).
        url: Where the server is, without a password.

    Raises:
        ImportError: redis-py is not installed (``pip install 'idemfn[redis]'``).
        TypeError: ``url_or_client`` is neither a str nor a ``redis.Redis``,
            ``redis.asyncio.Redis`` or cluster client, or ``prefix`` not a str.
        ValueError: A bad URL, a client made with ``decode_responses=True``, or a bad
            ``replicas``/``replica_timeout`` (the message names it).
    """

    claims_first = True  # the claim script returns a live record as cheaply as a read

    def __new__(cls, *args: Any, **kwargs: Any) -> RedisStore:
        # A Redis Cluster (issue 19) is a store of its own class (redis_cluster.py), chosen
        # here once: a standalone store's calls take no branch for it.
        given = args[0] if args else kwargs.get("url_or_client")
        if cls is RedisStore and _names_a_cluster(given):
            from .redis_cluster import RedisClusterStore

            return super().__new__(RedisClusterStore)
        return super().__new__(cls)

    def __init__(
        self,
        url_or_client: str
        | redis.Redis
        | redis.asyncio.Redis
        | redis.cluster.RedisCluster
        | redis.asyncio.cluster.RedisCluster,
        *,
        prefix: str = "idemfn:",
        signing_key: SigningKey | None = None,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        try:
            import redis
            import redis.asyncio
        except ImportError:  # pragma: no cover - the extra is installed in the tests
            raise ImportError("RedisStore needs redis-py: pip install 'idemfn[redis]'") from None
        if not isinstance(prefix, str):
            raise TypeError(f"RedisStore(prefix=...) must be a str, not {type(prefix).__name__}")
        # The user's async client, kept for the first event loop that uses the store.
        self._given: redis.asyncio.Redis | None = None
        new_async: Callable[[], redis.asyncio.Redis]
        client: redis.Redis
        if isinstance(url_or_client, str):
            url, replicas, replica_timeout = _replication_query(
                url_or_client, replicas, replica_timeout
            )
            try:
                if _is_sentinel_url(url):
                    client = _sentinel_client(url, redis)
                    new_async = functools.partial(_sentinel_client, url, redis.asyncio)
                else:
                    client = redis.Redis.from_url(url)
                    new_async = functools.partial(
                        redis.asyncio.Redis.from_url, url, **_resolved_driver_info()
                    )
            except ValueError as exc:
                raise ValueError(
                    f"RedisStore: bad URL {_shown(url_or_client)!r}: {exc} (a Redis Cluster:"
                    " redis+cluster://host:port[,host:port...], rediss+cluster:// for TLS)"
                ) from None
        elif isinstance(url_or_client, (redis.Redis, redis.asyncio.Redis)):
            if url_or_client.connection_pool.connection_kwargs.get("decode_responses"):
                kind = (
                    "redis.Redis"
                    if isinstance(url_or_client, redis.Redis)
                    else "redis.asyncio.Redis"
                )
                raise ValueError(
                    f"RedisStore needs a {kind} made without decode_responses=True: records are"
                    " bytes"
                )
            given = url_or_client
            new_async = functools.partial(_like, given, redis.asyncio)
            if isinstance(given, redis.Redis):
                client = given
            else:
                client, self._given = _like(given, redis), given
        else:
            raise TypeError(
                "RedisStore() takes a redis:// or redis+cluster:// URL, a redis.Redis, a"
                " redis.asyncio.Redis or a (sync or async) redis.cluster.RedisCluster, not"
                f" {type(url_or_client).__name__}"
            )
        self.client = client
        self._send = _Lane(client)  # the store's commands (see _Lane)
        # The lane of the writes: the same one, or one that WAITs for replicas after each.
        self.replicas, self._wait = _replication(replicas, replica_timeout)
        self._writes: Any = self._send
        if self.replicas:
            self._writes = _Acked(self._send, self._wait)
            # Read first: a replay must never wait for replicas (with fewer than N connected
            # each WAIT lasts replica_timeout). (The instance's own value: the engine reads
            # the class's otherwise, and that costs nothing when replicas=0.)
            vars(self)["claims_first"] = False
        self.prefix = prefix
        self.sign_with(signing_key)
        self.url = _where(client)  # never a password
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError,)
        self._claim, self._swap, self._release, self._delete = (
            _Script(script, redis.exceptions.NoScriptError) for script in _SCRIPTS
        )
        self._clock = ServerClock(self._read_clock)
        self._new_async = new_async
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopSide] = (
            weakref.WeakKeyDictionary()
        )
        self._loops_lock = threading.Lock()  # held for dictionary work only, never for I/O
        self._pubsub_warned = False
        self._pubsub_paused_until = 0.0

    def __repr__(self) -> str:
        more = f", replicas={self.replicas}" if self.replicas else ""
        return f"RedisStore({self.url!r}, prefix={self.prefix!r}{more})"

    # Errors: every backend error is a StoreError naming the store, the action and the key.

    def _call(self, action: str, key: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self._errors as exc:
            raise self._failed(action, key, exc) from exc

    async def _acall(self, side: _LoopSide, action: str, key: str, fn: Any, *args: Any) -> Any:
        seen = _cancels_seen() if _LOSES_CANCELS else None
        try:
            async with side.turns:
                reply = await fn(*args)
        except self._errors as exc:
            _raise_if_cancelled_since(seen)
            raise self._failed(action, key, exc) from exc
        _raise_if_cancelled_since(seen)
        return reply

    def _failed(self, action: str, key: str, exc: BaseException) -> BaseException:
        return self.error(action, key, f"{type(exc).__name__}: {exc}")

    # The clock: the server's TIME (see clock.ServerClock).

    def time(self) -> float:
        return self._clock.now()

    async def atime(self) -> float:
        now = self._clock.cached()
        return now if now is not None else await self._clock.anow(self._aread_clock)

    def _read_clock(self, first: bool) -> float:
        reading = _clock_reading(first)
        return _seconds(self._call("read the clock for", "TIME", self._send.many, reading))

    async def _aread_clock(self, first: bool) -> float:
        side = self._side()
        reading = _clock_reading(first)
        return _seconds(
            await self._acall(side, "read the clock for", "TIME", side.send.many, reading)
        )

    # The primitives: each builds its script's arguments and reads its answer once, for the
    # sync client and for this event loop's async one.

    @staticmethod
    def _expiry(entry: Entry) -> tuple[str, str]:
        """(when the server may drop the record, when it counts as expired), in ms, or ""."""
        at = removable_at(entry)
        if at is None:
            return "", ""
        if entry.expires_at is not None:
            ms = str(int(at * 1000))
            return ms, ms
        return str(int(at * 1000) + 1), ""  # an abandoned claim: strictly after lease + ttl

    def _claim_args(self, entry: Entry) -> tuple[list[str], list[str | bytes]]:
        drop_at, expires = self._expiry(entry)
        token = entry.token if entry.status == "processing" else ""
        return [self.prefix + entry.key], [token, self.encode(entry), drop_at, expires]

    # A claim is won when the script inserted its record (None), or found exactly the record
    # it writes: its first send landed before its connection was lost (_sent), or redis-py
    # sent it again; the entry holds this call's token, which no other caller writes.

    def claim(self, entry: Entry) -> Entry | None:
        keys, args = self._claim_args(entry)
        try:
            found = self._sent("claim", entry.key, self._claim, self._writes, keys, args)
        except _Unacknowledged as short:
            found = short.reply
            if found is None or found == args[1]:
                # Won, but too few replicas have it: withdrawn, body not run. (The WAIT after
                # a second try counts the first's write too.)
                self._withdraw(entry.key, entry.token, short.acked, "")
        if found is None or found == args[1]:
            return None
        return self.decode(entry.key, found)

    async def aclaim(self, entry: Entry) -> Entry | None:
        side = self._side()
        claim, (keys, args) = self._claim.acall, self._claim_args(entry)
        try:
            found = await self._asent(side, "claim", entry.key, claim, side.writes, keys, args)
        except _Unacknowledged as short:
            found = short.reply
            if found is None or found == args[1]:
                await self._awithdraw(side, entry.key, entry.token, short.acked, "")
        if found is None or found == args[1]:
            return None
        return self.decode(entry.key, found)

    def _sent(self, action: str, key: str, script: Any, lane: Any, *words: Any) -> Any:
        """``script`` run on ``lane``, and sent once more when its connection was lost under
        it (see ``_connection_lost``): the caller tells from the answer whether the first had
        landed."""
        try:
            return self._call(action, key, script, lane, *words)
        except StoreError as exc:
            if not _connection_lost(exc):
                raise
        return self._call(action, key, script, lane, *words)

    async def _asent(
        self, side: _LoopSide, action: str, key: str, script: Any, lane: Any, *words: Any
    ) -> Any:
        """``_sent`` on this event loop's ``side``."""
        try:
            return await self._acall(side, action, key, script, lane, *words)
        except StoreError as exc:
            if not _connection_lost(exc):
                raise
        return await self._acall(side, action, key, script, lane, *words)

    # Replicas (issue 19): with replicas=N, each write is followed by WAIT N in its round trip.

    def _short_of(self, acked: int) -> str:
        return (
            f"only {acked} of replicas={self.replicas} acknowledged it within"
            f" replica_timeout={self._wait[2] / 1000:g} s"
        )

    def _withdraw(self, key: str, token: str, acked: int, what: str) -> None:
        """Withdraw the claim ``token`` that too few replicas acknowledged (release it, on the
        primary), and raise the ``StoreError`` that says so: its body did not run."""
        try:
            self._call("release", key, self._release, self._send, *self._release_args(key, token))
        except StoreError as exc:
            raise self._unacknowledged_claim(key, acked, what, exc) from None
        raise self._unacknowledged_claim(key, acked, what, None) from None

    async def _awithdraw(
        self, side: _LoopSide, key: str, token: str, acked: int, what: str
    ) -> None:
        release, args = self._release.acall, self._release_args(key, token)
        try:
            await self._acall(side, "release", key, release, side.send, *args)
        except StoreError as exc:
            raise self._unacknowledged_claim(key, acked, what, exc) from None
        raise self._unacknowledged_claim(key, acked, what, None) from None

    def _unacknowledged_claim(
        self, key: str, acked: int, what: str, withdrawal: BaseException | None
    ) -> StoreError:
        """The error of a claim that too few replicas acknowledged: the body did not run.
        ``what`` comes first (``""`` for a claim)."""
        if withdrawal is None:
            after = "the claim was withdrawn"
        else:
            after = (
                f"withdrawing the claim failed too ({withdrawal}): it stays until its lease"
                " runs out"
            )
        return self.error(
            "claim",
            key,
            f"{what}{self._short_of(acked)}; {after} and the body did not run (a failover"
            " now could lose the claim and let a second caller run the body). Check the"
            " replicas (INFO replication), or lower replicas=/raise replica_timeout=",
        )

    def _unacknowledged(self, action: str, key: str, short: _Unacknowledged) -> Any:
        """A write after the claim that too few replicas acknowledged: kept, and logged (the
        body has run; failing the call would only invite a retry that runs it again). Not
        when the script wrote nothing (refused, or nothing to remove): nothing to lose."""
        if isinstance(short.reply, int) and short.reply > 0:
            self._kept_short(action, key, short)
        return short.reply

    def _kept_short(self, action: str, key: str, short: _Unacknowledged) -> None:
        """Log a write that was done but that too few replicas acknowledged."""
        logger.warning(
            "idemfn: %r: %s of key %r: %s; the write stands on the primary, but a failover"
            " before the replicas copy it would lose it",
            self,
            action,
            key,
            self._short_of(short.acked),
            extra=log_fields(key, UNREPLICATED),
        )

    def get(self, key: str) -> Entry | None:
        data = self._call("read", key, self._send, "HGET", self.prefix + key, "e")
        if data is None:
            return None
        entry = self.decode(key, data)
        return None if entry.is_expired(self.time()) else entry

    async def aget(self, key: str) -> Entry | None:
        side = self._side()
        data = await self._acall(side, "read", key, side.send, "HGET", self.prefix + key, "e")
        if data is None:
            return None
        entry = self.decode(key, data)
        return None if entry.is_expired(await self.atime()) else entry

    def _swap_args(self, key: str, token: str, entry: Entry) -> tuple[list[str], list[Any]]:
        drop_at, expires = self._expiry(entry)
        live = entry.token if entry.status == "processing" else ""
        channel = "" if live else self._channel(key)  # a finished entry settles the key
        data = self.encode(entry)
        return [self.prefix + key], [token, live, entry.token, data, drop_at, expires, channel]

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        keys, args = self._swap_args(key, token, entry)
        short: _Unacknowledged | None = None
        try:
            # (Sent once more after a lost connection: refused then, _refused tells whether
            # the first landed: the record is this swap's entry.)
            done = self._sent("update", key, self._swap, self._writes, keys, args)
        except _Unacknowledged as caught:
            short, done = caught, caught.reply
        if done != 1 and not run(self._refused(key, token, entry, done), RedisStore._read, self):
            return False
        if short is not None:  # done, too few replicas have it (the WAIT counts a first try)
            if entry.status == "processing" and entry.token != token:  # a takeover: withdrawn
                self._withdraw(key, entry.token, short.acked, _TAKING_OVER)
            self._kept_short("update", key, short)
        return True

    async def aswap(self, key: str, token: str, entry: Entry) -> bool:
        side = self._side()
        swap, (keys, args) = self._swap.acall, self._swap_args(key, token, entry)
        short: _Unacknowledged | None = None
        try:
            done = await self._asent(side, "update", key, swap, side.writes, keys, args)
        except _Unacknowledged as caught:
            short, done = caught, caught.reply
        if done != 1 and not await arun(self._refused(key, token, entry, done), self._aread, side):
            return False
        if short is not None:
            if entry.status == "processing" and entry.token != token:
                await self._awithdraw(side, key, entry.token, short.acked, _TAKING_OVER)
            self._kept_short("update", key, short)
        return True

    def _refused(self, key: str, token: str, entry: Entry, done: int) -> _Steps:
        """What a refused swap means, as steps the sync and async drivers run: the reads it
        needs (``_Read``; None for the store's time). Returns False, or raises ``StoreError``
        when the refusal is not the claim's loss (a restarted server, a damaged fence); True
        when the record is the entry this swap writes: a second try of the swap (redis-py
        retries a command whose answer was lost to a timeout) refused by the first's write."""
        if done == -1:
            # The claim's record is gone: forgotten, pruned, or lost by a server that restarted
            # without persistence. The last is not the owner's loss of a race: say so.
            info = yield _Read("read the uptime for", key, ("INFO", "server"))
            now = yield None
            # Uptime is in whole seconds, so this estimate of the server's start is up to 1 s
            # late. Only a start more than 1 s after the claim is surely a restart since: a
            # server that started just before the claim (a fresh one) must not pass for one, and
            # a record lost in a restart within 1 s of its claim is reported as gone, like a
            # forgotten one.
            started = now - _uptime(info)
            if started > entry.started_at + 1.0:
                raise self.error(
                    "update",
                    key,
                    "the server restarted since this call claimed the key, and the claim's record"
                    " is gone (a server without persistence loses records: enable appendonly)",
                )
        else:  # refused: by the claim's own fence?
            data, fence = yield _Read("read", key, ("HMGET", self.prefix + key, "e", "t"))
            if data is not None and data == self.encode(entry):
                return True
            if data is not None:
                text = None if fence is None else fence.decode("utf-8", "surrogateescape")
                self.check_fence(key, token, text, data)
        return False

    def _read(self, step: _Read | None) -> Any:
        """One of ``_refused``'s steps, for a sync caller: a read, or (None) the store's time."""
        if step is None:
            return self.time()
        return self._call(step.action, step.key, self._send, *step.command)

    async def _aread(self, side: _LoopSide, step: _Read | None) -> Any:
        """One of ``_refused``'s steps, for an async caller, on its loop's client."""
        if step is None:
            return await self.atime()
        return await self._acall(side, step.action, step.key, side.send, *step.command)

    def _release_args(self, key: str, token: str) -> tuple[list[str], list[str]]:
        return [self.prefix + key], [token, self._channel(key)]

    def release(self, key: str, token: str) -> bool:
        args = self._release_args(key, token)
        try:
            return bool(self._call("release", key, self._release, self._writes, *args))
        except _Unacknowledged as short:
            return bool(self._unacknowledged("release", key, short))

    async def arelease(self, key: str, token: str) -> bool:
        side = self._side()
        release, args = self._release.acall, self._release_args(key, token)
        try:
            return bool(await self._acall(side, "release", key, release, side.writes, *args))
        except _Unacknowledged as short:
            return bool(self._unacknowledged("release", key, short))

    def _delete_args(self, key: str, token: str | None) -> tuple[list[str], list[str]]:
        return [self.prefix + key], [token or "", self._channel(key)]

    def delete(self, key: str, token: str | None = None) -> bool:
        args = self._delete_args(key, token)
        try:
            done = self._call("delete", key, self._delete, self._writes, *args)
        except _Unacknowledged as short:
            done = self._unacknowledged("delete", key, short)
        return _deleted(done, token)

    async def adelete(self, key: str, token: str | None = None) -> bool:
        side = self._side()
        delete, args = self._delete.acall, self._delete_args(key, token)
        try:
            done = await self._acall(side, "delete", key, delete, side.writes, *args)
        except _Unacknowledged as short:
            done = self._unacknowledged("delete", key, short)
        return _deleted(done, token)

    def scan(self, prefix: str = "", *, corrupt: Corrupt | None = None) -> Iterator[Entry]:
        pattern = _glob_escape(self.prefix + prefix) + "*"
        names = self._call(
            "list", prefix or "*", lambda: list(self.client.scan_iter(match=pattern, count=1000))
        )
        start = len(self.prefix)
        for name in sorted(set(names)):  # (SCAN may return a key more than once)
            key = name[start:].decode("utf-8", "surrogateescape")
            data = self._call("read", key, self.client.hget, name, "e")
            if data is not None and (entry := self.decoded(key, data, corrupt)) is not None:
                yield entry  # (None: removed since, or corrupt)

    # Wake-ups: every settle publishes on the key's channel; watches subscribe to it.

    def _channel(self, key: str) -> str:
        return self.prefix + "settled:" + key

    def watch(self, key: str) -> RedisWatch:
        """A sync waiter's watch on ``key``, woken by the settle of any process on any machine
        (Redis pub/sub, on a connection of its own that it closes on exit).

        Args:
            key: The stored key.

        Returns:
            A ``RedisWatch``: ``with store.watch(key) as w: w.wait(seconds)``.
        """
        return RedisWatch(self, key)

    def awatch(self, key: str) -> RedisAsyncWatch:
        """An async waiter's watch on ``key``, woken by the settle of any process on any
        machine. The watches of one event loop share one subscriber connection.

        Args:
            key: The stored key.

        Returns:
            A ``RedisAsyncWatch``: ``async with store.awatch(key) as w: await w.wait(seconds)``.
        """
        return RedisAsyncWatch(self, key)

    def _pubsub_paused(self) -> bool:
        return time.monotonic() < self._pubsub_paused_until

    def _pubsub_failed(self, exc: BaseException) -> None:
        """Pub/sub failed: waiters poll. Said once as a warning, then at debug level; new
        watches poll for a while before they try pub/sub again."""
        self._pubsub_paused_until = time.monotonic() + _PUBSUB_PAUSE
        level = logging.DEBUG if self._pubsub_warned else logging.WARNING
        self._pubsub_warned = True
        logger.log(
            level,
            "idemfn: %r could not watch keys with pub/sub (%s: %s); callers that wait for a busy"
            " key look at it again at intervals instead",
            self,
            type(exc).__name__,
            exc,
            extra=no_key(WATCH_FAILED),
        )

    # One async client per event loop.

    def _side(self) -> _LoopSide:
        """This event loop's async client and subscriber."""
        import asyncio

        loop = asyncio.get_running_loop()
        side = self._loops.get(loop)
        if side is None or side.closed:
            side = self._open_side(loop)
        return side

    def _open_side(self, loop: asyncio.AbstractEventLoop) -> _LoopSide:
        with self._loops_lock:
            self._forget_closed_loops()
            side = self._loops.get(loop)
            if side is None or side.closed:
                given, self._given = self._given, None
                client = given if given is not None else self._new_async()
                side = self._loops[loop] = self._new_side(client)
                side.close_with_loop()
            return side

    def _new_side(self, client: Any) -> _LoopSide:
        side = _LoopSide(client, self._pubsub_failed)
        if self.replicas:
            side.writes = _AsyncAcked(side.send, self._wait)
        return side

    def _forget_closed_loops(self) -> None:
        # A loop closed without shutting down its async generators (asyncio.run, Runner and
        # pytest-asyncio do) never closed its side: its connections are the garbage collector's
        # (redis-py then closes their sockets, which at most warns with a ResourceWarning).
        for loop in [loop for loop in self._loops if loop.is_closed()]:
            del self._loops[loop]

    def close(self) -> None:
        """Close the sync client's connections now. Each event loop's async connections (and
        its subscriber) close when that loop shuts down (``asyncio.run``'s end); the store
        forgets those of loops already closed. Used again, the store opens new ones."""
        self.client.close()
        with self._loops_lock:
            self._forget_closed_loops()


class _Script:
    """A Lua script, run by its SHA1 (``EVALSHA``) through a sync ``send`` (call it) or an async
    one (``acall``), and sent whole (``EVAL``, which loads it again) to a server that lost it (a
    restart, ``SCRIPT FLUSH``). Leaner per call than redis-py's ``Script``, which builds
    tuples and imports a module on every call: about 5 µs of an async claim's 80."""

    __slots__ = ("missing", "sha", "source")

    def __init__(self, source: str, missing: type[BaseException]) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.missing = missing  # redis-py's NoScriptError (imported with redis)

    def __call__(self, send: Callable[..., Any], keys: list[str], args: list[Any]) -> Any:
        try:
            return send("EVALSHA", self.sha, len(keys), *keys, *args)
        except self.missing:
            return send("EVAL", self.source, len(keys), *keys, *args)

    async def acall(self, send: Callable[..., Any], keys: list[str], args: list[Any]) -> Any:
        try:
            return await send("EVALSHA", self.sha, len(keys), *keys, *args)
        except self.missing:
            return await send("EVAL", self.source, len(keys), *keys, *args)


# The store's commands skip redis-py's per-command path (issue 18). A command through
# ``Redis.execute_command`` checks a connection out of the pool and back in with a fork check,
# a lock, an event dispatched and four metrics calls (redis-py 8's observability, which is
# global and cannot be turned off for one client), then records the command's duration: about
# 18 µs of CPU around a 14 µs command, more than a replay's whole budget. The store takes the
# connection from the pool's own lists instead, under the pool's lock (so the pool's limit and
# its count of connections in use hold, and every connection is the pool's, with its settings:
# credentials, timeouts, TLS, retries, health checks), and sends the command as the client
# does: through the connection's ``retry``, disconnecting it after each failed try. Like the
# pool, it first looks whether the connection has bytes waiting (the server closed it, or a
# reply was left unread) and connects it again if so; a command cut short (an error, a signal,
# a cancellation) disconnects its connection, so no reply is ever left for the next command.
# Anything unusual (no connection free, a fork since, a pool of another kind) goes through the
# pool's own ``get_connection`` and ``release``.


def _checkout_arguments(pool: Any) -> tuple[str, ...]:
    """What ``pool.get_connection`` takes: nothing since redis-py 5.3 (which warns when given
    a command name), a command name before."""
    parameter = inspect.signature(pool.get_connection).parameters.get("command_name")
    required = parameter is not None and parameter.default is inspect.Parameter.empty
    return ("EVALSHA",) if required else ()


def _borrows(client: Any, pool_class: type) -> bool:
    """Whether the store may take connections from the lists of ``client``'s pool itself: a
    plain pool (not a blocking one, which hands connections to waiters, nor Sentinel's), no
    single connection shared under a lock, no client-side cache, no credential provider (whose
    new tokens reach a busy connection when the pool's ``release`` gets it back), no
    maintenance notifications (which move connections between servers)."""
    pool = client.connection_pool
    maintained = getattr(pool, "maint_notifications_enabled", None)
    provider = pool.connection_kwargs.get("credential_provider")
    return (
        type(pool) is pool_class
        and all(hasattr(pool, name) for name in ("_available_connections", "_in_use_connections"))
        and getattr(client, "connection", None) is None
        and not getattr(client, "single_connection_client", False)
        and getattr(pool, "cache", None) is None
        and provider is None
        and not (maintained is not None and maintained())
    )


class _Lanes:
    """What a lane knows of its client's pool: whether it may take connections from its lists
    (``_borrows``), how its check-out is called, how its commands are packed."""

    __slots__ = ("_borrow", "_broken", "_checkout", "_pack", "_pool", "_replied")

    def __init__(self, client: Any, pool_class: type) -> None:
        import redis

        self._pool = pool = client.connection_pool
        self._borrow = _borrows(client, pool_class)
        self._checkout = _checkout_arguments(pool)
        self._pack = _packer(pool.connection_kwargs)
        self._replied = redis.ResponseError  # an error reply, read whole: a sound connection
        self._broken = (OSError, redis.ConnectionError, redis.TimeoutError)


class _Lane(_Lanes):
    """The sync client's pool, for the store's commands: ``lane(*command)`` sends one and
    returns its reply, unparsed; ``lane.many(commands)`` sends several in one round trip."""

    __slots__ = ()

    def __init__(self, client: Any) -> None:
        import redis

        super().__init__(client, redis.ConnectionPool)
        self._borrow = self._borrow and hasattr(self._pool, "_lock")

    def __call__(self, *args: Any) -> Any:
        return self._run(_ask, self._pack(args))

    def many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        return self._run(_ask_many, commands)  # type: ignore[no-any-return]

    def _run(self, ask: Callable[[Any, Any], Any], what: Any) -> Any:
        pool = self._pool
        conn = self._take() if self._borrow else None
        borrowed = conn is not None
        if conn is None:
            conn = pool.get_connection(*self._checkout)
        try:
            if borrowed and _waiting(conn, self._broken):
                conn.disconnect()  # closed by the server, or bytes nobody asked for: connects again
            reply = conn.retry.call_with_retry(
                lambda: ask(conn, what), lambda error: conn.disconnect()
            )
        except self._replied:
            raise
        except BaseException:
            conn.disconnect()  # (a reply may be left unread: it connects again when next used)
            raise
        finally:
            if borrowed:
                self._give(conn)
            else:
                pool.release(conn)
        return reply

    def _take(self) -> Any:
        """A free connection of the pool's, now counted in use; None if none is free (or the
        process forked since the pool's last use, which the pool's own check-out handles)."""
        pool = self._pool
        if pool.pid != os.getpid():
            return None
        with pool._lock:
            free = pool._available_connections
            if not free:
                return None
            conn = free.pop()
            pool._in_use_connections.add(conn)
            return conn

    def _give(self, conn: Any) -> None:
        pool = self._pool
        pid = os.getpid()
        with pool._lock:
            if conn.pid == pid == pool.pid and conn in pool._in_use_connections:
                pool._in_use_connections.remove(conn)
                pool._available_connections.append(conn)
                return
        pool.release(conn)  # not the pool's any more (a fork, a reset): its own way


def _waiting(conn: Any, broken: tuple[type[BaseException], ...]) -> bool:
    """Whether anything waits to be read on an idle connection (an end of file: the server
    closed it; or bytes nobody asked for), or it is broken. Its socket is asked with one
    ``poll`` (0.9 µs; ``select`` would refuse a descriptor past 1023, which a busy server
    has); the connection's ``can_read``, which the pool's check-out uses, makes three system
    calls (two ``settimeout`` around a ``recv``: 2.7 µs), and it is asked only for a socket of
    another kind (TLS: bytes may wait in its buffer), none (it connects), or where there is no
    ``poll`` (Windows). (What ``poll`` cannot see, bytes in redis-py's own buffer, is never
    there: every reply is read whole, and the pools the store takes from carry no pushed
    messages.)"""
    sock = getattr(conn, "_sock", None)
    try:
        if type(sock) is socket.socket and _POLL is not None:
            return _polled(sock.fileno())
        return bool(conn.can_read())
    except broken:
        return True
    except ValueError:  # a socket closed meanwhile
        return True


async def _awaiting(conn: Any, broken: tuple[type[BaseException], ...]) -> bool:
    """``_waiting`` for an idle async connection: bytes in its stream's buffer (its
    ``can_read``), or still in its socket, which the loop has not read yet (a reply that came
    after its caller was cancelled: redis-py's check-out gives back a connection whose
    handshake was cut short, and the next command would read that reply as its own)."""
    # (redis-py 8 names it can_read; before, can_read_destructive, which on a connection with
    # bytes waiting reads them into its parser: it is given up then.)
    can_read = getattr(conn, "can_read", None) or conn.can_read_destructive
    try:
        if await can_read():
            return True
    except broken:
        return True
    except Exception:  # (redis-py 5's hiredis parser, never connected: AttributeError)
        return True  # cannot tell: given up, as a broken one
    writer = getattr(conn, "_writer", None)
    transport = None if writer is None else writer.transport
    if _POLL is None or transport is None or transport.get_extra_info("sslcontext") is not None:
        return False  # (TLS: its records are read by the loop, which can_read has seen)
    try:
        return _polled(transport.get_extra_info("socket").fileno())
    except (OSError, ValueError, AttributeError):  # closed meanwhile
        return True


def _polled(fd: int) -> bool:
    """Whether the descriptor ``fd`` has anything to say at once: bytes, an end, an error."""
    poller = _POLL()  # type: ignore[misc]  # (only called where poll exists)
    poller.register(fd, _ANY_EVENT)
    return bool(poller.poll(0))


_POLL = getattr(select, "poll", None)
# Data, an end of file, an error, a hang-up or a closed descriptor: the connection is not idle.
_ANY_EVENT = (
    getattr(select, "POLLIN", 1)
    | getattr(select, "POLLPRI", 2)
    | getattr(select, "POLLERR", 8)
    | getattr(select, "POLLHUP", 16)
)


def _packer(settings: dict[str, Any]) -> Callable[[tuple[Any, ...]], bytes]:
    """``pack(command)``: a command of str, bytes and int words in the Redis protocol, encoded
    as the client encodes (its ``encoding`` and ``encoding_errors``). A third of redis-py's
    packer's time (2 µs against 5 µs for a script call's eight words), which looks at each
    word's type several times over, for any type."""
    encoding = settings.get("encoding", "utf-8")
    errors = settings.get("encoding_errors", "strict")

    def pack(command: tuple[Any, ...]) -> bytes:
        parts = [b"*%d\r\n" % len(command)]
        for word in command:
            if isinstance(word, str):
                word = word.encode(encoding, errors)
            elif isinstance(word, int):
                word = b"%d" % word
            parts.append(b"$%d\r\n%b\r\n" % (len(word), word))
        return b"".join(parts)

    return pack


def _ask(conn: Any, packed: bytes) -> Any:
    conn.send_packed_command([packed])
    return conn.read_response()


def _ask_many(conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    conn.send_packed_command(conn.pack_commands(commands))
    replies = []
    for _ in commands:  # every reply read, errors too, before the first error is raised
        try:
            replies.append(conn.read_response())
        except _response_error() as error:
            replies.append(error)
    return _first_error_raised(replies)


class _AsyncLane(_Lanes):
    """``_Lane`` for one event loop's async client: ``await lane(*command)``,
    ``await lane.many(commands)``. (The pool is this loop's alone, and nothing below awaits
    between looking at its lists and changing them: no lock is needed.)"""

    __slots__ = ()

    def __init__(self, client: Any) -> None:
        import redis.asyncio

        super().__init__(client, redis.asyncio.ConnectionPool)

    async def __call__(self, *args: Any) -> Any:
        return await self._run(_aask, self._pack(args))

    async def many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        return await self._run(_aask_many, commands)  # type: ignore[no-any-return]

    async def _run(self, ask: Callable[[Any, Any], Awaitable[Any]], what: Any) -> Any:
        pool = self._pool
        free = pool._available_connections if self._borrow else None
        if free:
            conn = free.pop()
            pool._in_use_connections.add(conn)
            borrowed = True
        else:
            conn = await pool.get_connection(*self._checkout)
            borrowed = False
        try:
            if borrowed and await _awaiting(conn, self._broken):
                # Closed by the server, or bytes nobody asked for: it connects again.
                await conn.disconnect(nowait=True)
            reply = await conn.retry.call_with_retry(
                lambda: ask(conn, what), lambda error: conn.disconnect()
            )
        except self._replied:
            raise
        except BaseException:
            # (redis-py disconnects a command cut short already; without waiting here, so
            # that a second cancellation cannot come in between.)
            await conn.disconnect(nowait=True)
            raise
        finally:
            if borrowed and conn in pool._in_use_connections:
                pool._in_use_connections.remove(conn)
                pool._available_connections.append(conn)
            else:
                await pool.release(conn)
        return reply


async def _aask(conn: Any, packed: bytes) -> Any:
    await conn.send_packed_command([packed])
    return await conn.read_response()


async def _aask_many(conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    await conn.send_packed_command(conn.pack_commands(commands))
    replies = []
    for _ in commands:
        try:
            replies.append(await conn.read_response())
        except _response_error() as error:
            replies.append(error)
    return _first_error_raised(replies)


def _response_error() -> type[Exception]:
    import redis

    return redis.ResponseError


def _first_error_raised(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _deleted(done: int, token: str | None) -> bool:
    # An expired record counts as absent: removing it is tidying, not forgetting.
    return done == 1 or (done == 2 and token is not None)


def _clock_reading(first: bool) -> list[tuple[str, ...]]:
    """The commands that read the server's clock, in one round trip: on the store's first use
    they load the scripts too, so that no call pays for it."""
    loads = [("SCRIPT", "LOAD", script) for script in _SCRIPTS] if first else []
    return [*loads, ("TIME",)]


def _seconds(replies: list[Any]) -> float:
    seconds, micros = replies[-1]  # TIME's answer: the last of the commands
    return float(seconds) + float(micros) / 1e6


def _uptime(info: bytes) -> float:
    """``uptime_in_seconds`` from the text of ``INFO server``; 0 when it is not there."""
    for line in info.splitlines():
        name, _, value = line.partition(b":")
        if name == b"uptime_in_seconds":
            return float(value)
    return 0.0


# Whether a command may swallow its caller's cancellation, which _acall then raises (issue 19).
# redis.asyncio sends every command in asyncio.wait_for (its default socket_timeout is 5 s), and
# before Python 3.12 wait_for returns the awaited work's result when its caller is cancelled in
# the turn of the loop in which that work ends (CPython gh-86296): the task read its reply and
# went on (a waiter whose timeout ran out then waited out all of its wait=). 3.12 fixed
# wait_for; 3.10 has no Task.cancelling() to tell by.
_LOSES_CANCELS = sys.version_info[:2] == (3, 11)


def _cancels_seen() -> tuple[asyncio.Task[Any], int] | None:
    """The running task, and how many cancellations it was asked for so far (3.11+)."""
    import asyncio

    task = asyncio.current_task()
    if sys.version_info >= (3, 11) and task is not None:
        return task, task.cancelling()
    return None


def _raise_if_cancelled_since(seen: tuple[asyncio.Task[Any], int] | None) -> None:
    """Raise ``CancelledError`` if the task ``seen`` was asked for another cancellation since,
    and none came out: it was swallowed below (see ``_LOSES_CANCELS``)."""
    if seen is not None and sys.version_info >= (3, 11) and seen[0].cancelling() > seen[1]:
        import asyncio

        raise asyncio.CancelledError


class _LoopSide:
    """One event loop's async client, and its subscriber (made on first use)."""

    def __init__(self, client: redis.asyncio.Redis, failed: Callable[[BaseException], None]):
        import asyncio

        self.client = client
        self.send = _AsyncLane(client)  # the store's commands (see _Lane)
        self.writes: Any = self.send  # its writes (``_AsyncAcked`` with replicas=N)
        # Turns for calls: at most _ASYNC_CALLS at once, within the pool's connections.
        connections = client.connection_pool.max_connections or _ASYNC_CALLS + 1
        self.turns = asyncio.Semaphore(max(1, min(_ASYNC_CALLS, connections - 1)))
        self.failed = failed
        self.hub: _Hub | None = None
        self.closed = False
        self._closer: AsyncGenerator[None, None] | None = None

    def subscriber(self) -> _Hub:
        hub = self.hub
        if hub is None:
            hub = self.hub = _Hub(self)
        return hub

    def close_with_loop(self) -> None:
        """Close this side when the running loop shuts down. asyncio's one hook for that: a
        loop's ``shutdown_asyncgens`` (``asyncio.run``, ``asyncio.Runner``) closes every async
        generator first iterated on it, which runs its ``finally`` on the loop, still open."""
        closer = self._closer = _closed_at_shutdown(self)
        try:
            closer.asend(None).send(None)  # to its yield, now: the loop's hook tracks it from here
        except StopIteration:
            pass

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        hub, self.hub = self.hub, None
        if hub is not None:
            await hub.aclose()
        await self.client.aclose()


async def _closed_at_shutdown(side: _LoopSide) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await side.aclose()


class _Hub:
    """One event loop's subscriber for a store: one connection that subscribes to the channel
    of every key the loop's watches watch, and wakes a key's watches on each of its messages
    (200 waiting tasks share one connection, not 200). Any failure breaks it: its watches then
    poll, and the next watch makes a new one (after ``_PUBSUB_PAUSE``)."""

    def __init__(self, side: _LoopSide) -> None:
        import asyncio

        self._side = side
        self._pubsub: Any = side.client.pubsub()
        self._members: dict[bytes, set[RedisAsyncWatch]] = {}
        # SUBSCRIBEs sent and not yet confirmed, per channel, oldest first.
        self._unconfirmed: dict[bytes, collections.deque[asyncio.Future[None]]] = {}
        # One command at a time: the first connects, and a second must not connect again.
        self._sending = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.broken = False

    async def join(self, channel: bytes, watch: RedisAsyncWatch) -> None:
        """Add ``watch`` to ``channel``'s, subscribing when it is the first, and wait (up to
        ``_CONFIRM`` s) until the server confirms the subscription."""
        import asyncio

        if self.broken:
            watch.degrade()
            return
        members = self._members.get(channel)
        if members is None:
            self._members[channel] = {watch}
            confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._unconfirmed.setdefault(channel, collections.deque()).append(confirmed)
            # In a task of the hub's own: a joiner cancelled meanwhile leaves no command half
            # sent on the shared connection.
            self._spawn(self._send(self._pubsub.subscribe, channel))
        else:
            members.add(watch)
            pending = self._unconfirmed.get(channel)
            if not pending:
                return
            confirmed = pending[-1]
        await asyncio.wait([confirmed], timeout=_CONFIRM)

    def leave(self, channel: bytes, watch: RedisAsyncWatch) -> None:
        members = self._members.get(channel)
        if members is None:
            return
        members.discard(watch)
        if not members:
            del self._members[channel]
            if not self.broken:
                self._spawn(self._send(self._pubsub.unsubscribe, channel))

    async def _send(self, command: Callable[[bytes], Any], channel: bytes) -> None:
        import asyncio

        try:
            async with self._sending:
                if self.broken:
                    return
                await command(channel)
                # (Not once shut: a cancellation of this task that the send swallowed, see
                # _LOSES_CANCELS, must not start a reader on a closed subscriber.)
                if self._reader is None and not self.broken:
                    self._reader = asyncio.get_running_loop().create_task(self._read())
        except Exception as exc:
            self._fail(exc)

    async def _read(self) -> None:
        try:
            while True:
                message = await self._pubsub.get_message(timeout=_LISTEN)
                if message is not None:
                    self._dispatch(message["type"], message["channel"])
        except Exception as exc:
            self._fail(exc)

    def _dispatch(self, kind: str, channel: bytes) -> None:
        if kind == "message":
            for watch in list(self._members.get(channel, ())):
                watch._wake()
        elif kind == "subscribe":
            pending = self._unconfirmed.get(channel)
            if pending:
                confirmed = pending.popleft()
                if not pending:
                    del self._unconfirmed[channel]
                if not confirmed.done():
                    confirmed.set_result(None)
            else:
                # A confirmation nobody waits for: redis-py subscribed again after a reconnect,
                # and a settle published meanwhile went unheard. Its watchers look again.
                for watch in list(self._members.get(channel, ())):
                    watch._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self.broken:
            self._side.failed(exc)
            self._shut()
            self._spawn(self._close_pubsub())

    def _shut(self) -> None:
        """Break the hub: its watches poll from now on (woken once, to look again now)."""
        import asyncio

        self.broken = True
        if self._side.hub is self:
            self._side.hub = None
        for pending in self._unconfirmed.values():
            for confirmed in pending:
                if not confirmed.done():
                    confirmed.set_result(None)
        self._unconfirmed.clear()
        members, self._members = self._members, {}
        for watches in members.values():
            for watch in watches:
                watch.degrade()
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()

    async def _close_pubsub(self) -> None:
        try:
            await self._pubsub.aclose()
        except Exception:  # closing a broken connection: nothing more to do
            pass

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        self._shut()
        for task in tasks:
            task.cancel()
        await self._close_pubsub()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        import asyncio

        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # (the loop keeps only a weak reference to its tasks)
        task.add_done_callback(self._tasks.discard)


class RedisWatch(LocalWatch):
    """A sync waiter's watch on one key of a ``RedisStore``: ``wait(seconds)`` returns when
    the key's channel announces a settle (by any process, on any machine), or after
    ``seconds``.

    It subscribes on a connection of the store's sync client when it is made (and waits for
    the server to confirm, so that a settle after the caller's next look is heard) and closes
    it on exit. If pub/sub fails, it logs once, returns (a settle may have gone unheard: the
    caller looks again), sets ``hears_others`` to False and from then on waits as the default
    watch does (this process's settles wake it; others are seen by looking again); it never
    raises.
    """

    hears_others = True

    def __init__(self, store: RedisStore, key: str) -> None:
        super().__init__(key)
        self._store = store
        self._pubsub: Any = None
        if store._pubsub_paused():
            self.hears_others = False
            return
        try:
            self._pubsub = store.client.pubsub()  # type: ignore[no-untyped-call]
            self._pubsub.subscribe(store._channel(key))
            self._listen(_CONFIRM, "subscribe")
        except Exception as exc:
            self._degrade(exc)

    def _listen(self, seconds: float, kind: str) -> None:
        """Read the subscription's messages until one of ``kind``, or for ``seconds``."""
        give_up = time.monotonic() + seconds
        while (left := give_up - time.monotonic()) > 0:
            message = self._pubsub.get_message(timeout=left)
            if message is not None and message["type"] == kind:
                return

    def wait(self, seconds: float) -> None:
        """Block until the key may have settled, or for ``seconds``; never raises."""
        if self._pubsub is None:
            super().wait(seconds)
            return
        try:
            self._listen(seconds, "message")
        except Exception as exc:
            # Returns at once: a settle may have gone unheard, and the caller looks again.
            self._degrade(exc)

    def _degrade(self, exc: BaseException) -> None:
        self.hears_others = False
        self._store._pubsub_failed(exc)
        self._unsubscribe()

    def _unsubscribe(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()  # disconnects, and gives the connection back to the pool
            except Exception:  # a broken connection: nothing more to do
                pass

    def close(self) -> None:
        """Stop watching: unsubscribe, and give the connection back."""
        super().close()
        self._unsubscribe()


class RedisAsyncWatch(LocalAsyncWatch):
    """An async waiter's watch on one key of a ``RedisStore``: ``await wait(seconds)``
    returns when the key's channel announces a settle (by any process, on any machine), or
    after ``seconds``, never blocking the event loop.

    Entering it (``async with``) subscribes, through the one subscriber connection the store
    keeps for this event loop, and waits for the server to confirm. If pub/sub fails, it logs
    once, wakes (the caller looks again), sets ``hears_others`` to False and from then on waits
    as the default watch does; ``wait`` never raises but ``CancelledError``.
    """

    hears_others = True

    def __init__(self, store: RedisStore, key: str) -> None:
        super().__init__(key)
        self._store = store
        self._channel_name = store._channel(key).encode()
        self._hub: _Hub | None = None
        self._started = False

    async def __aenter__(self) -> RedisAsyncWatch:
        await self._start()
        return self

    async def _start(self) -> None:
        self._started = True
        if self._store._pubsub_paused():
            self.hears_others = False
            return
        try:
            hub = self._store._side().subscriber()
        except Exception as exc:  # (no client for this loop: the store failed to make one)
            self._store._pubsub_failed(exc)
            self.hears_others = False
            return
        self._hub = hub
        try:
            await hub.join(self._channel_name, self)
        except BaseException:  # cancelled while the subscription was confirmed
            await self.aclose()
            raise

    async def wait(self, seconds: float) -> None:
        """Wait until the key may have settled, or for ``seconds``."""
        if not self._started:  # (used without ``async with``)
            await self._start()
        await super().wait(seconds)

    def degrade(self) -> None:
        """The subscriber broke: hear this process's settles only, and look again now (a
        settle may have gone unheard)."""
        self._hub = None
        self.hears_others = False
        self._wake()

    async def aclose(self) -> None:
        """Stop watching: leave the subscriber (which unsubscribes when no watch is left)."""
        hub, self._hub = self._hub, None
        if hub is not None:
            hub.leave(self._channel_name, self)
        await super().aclose()


# Building a client of the other kind (sync for async, async for sync, or async for another
# event loop) with a given client's connection settings.

# Connection settings that a pool or client makes for itself, or that hold objects of one
# kind (sync or async): never copied.
_NOT_COPIED = ("orig_", "maint", "oss_cluster", "himport", "maintenance")
_SHARED_OBJECTS = {"credential_provider", "driver_info"}  # of either kind: copied as they are
_PLAIN = (type(None), bool, int, float, str, bytes, list, tuple, dict)


def _like(client: Any, kind: Any) -> Any:
    """A new client of ``kind`` (the module ``redis`` or ``redis.asyncio``) that reaches
    ``client``'s server with its connection settings (address, database, credentials,
    timeouts, TLS, retries)."""
    pool = client.connection_pool
    if _is_sentinel_pool(pool):
        return _sentinel_like(client, kind)
    connection_class = _counterpart(pool.connection_class, kind.connection)
    accepted = _parameters(connection_class)
    settings: dict[str, Any] = {}
    for name, value in pool.connection_kwargs.items():
        if name not in accepted or name.startswith(_NOT_COPIED):
            continue
        if name == "retry":
            value = _retry_like(value, kind)
            if value is None:
                continue
        elif not isinstance(value, _PLAIN) and name not in _SHARED_OBJECTS:
            continue  # a parser, an encoder, an event dispatcher: the kind's own default
        settings[name] = value
    if "driver_info" in accepted and "driver_info" not in settings:
        settings |= _resolved_driver_info()
    return kind.Redis.from_pool(kind.ConnectionPool(connection_class=connection_class, **settings))


@functools.cache
def _resolved_driver_info() -> dict[str, Any]:
    """``driver_info=`` for new clients, resolved once: redis-py 7+ otherwise reads its own
    version from the package's metadata for every new connection, about 1.3 ms each, on the
    event loop for an async one (a store's first burst of 50 calls held its loop 30-58 ms)."""
    try:
        from redis.driver_info import resolve_driver_info
    except ImportError:  # redis-py before 7: no such lookup
        return {}
    return {"driver_info": resolve_driver_info()}


def _counterpart(connection_class: type, module: Any) -> type:
    """The class of ``module`` (``redis.connection`` or ``redis.asyncio.connection``) for a
    connection of ``connection_class``'s kind (TLS, unix socket, TCP), subclasses included."""
    names = {cls.__name__ for cls in connection_class.__mro__}
    for name in ("SSLConnection", "UnixDomainSocketConnection", "Connection"):
        if name in names:
            return getattr(module, name)  # type: ignore[no-any-return]
    raise TypeError(f"RedisStore cannot tell what kind of connection {connection_class} makes")


def _parameters(connection_class: type) -> set[str]:
    names: set[str] = set()
    for cls in connection_class.__mro__:
        init = vars(cls).get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return names


def _retry_like(retry: Any, kind: Any) -> Any:
    """``retry`` (a redis-py ``Retry``) as a ``Retry`` of ``kind``; None when it cannot tell."""
    try:
        return kind.retry.Retry(retry._backoff, retry.get_retries(), retry._supported_errors)
    except (AttributeError, TypeError):  # another redis-py's Retry: the kind's default
        return None


def _describe(kwargs: dict[str, Any]) -> str:
    """A client's server, for messages (never its password)."""
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    host, port, db = kwargs.get("host", "localhost"), kwargs.get("port", 6379), kwargs.get("db", 0)
    return f"redis://{host}:{port}/{db}"


def _where(client: Any) -> str:
    """A client's server (or its Sentinels and service), for messages (never a password)."""
    pool = client.connection_pool
    if _is_sentinel_pool(pool):
        sentinels = ",".join(
            "{}:{}".format(*_address(sentinel)) for sentinel in pool.sentinel_manager.sentinels
        )
        db = pool.connection_kwargs.get("db", 0)
        return f"redis+sentinel://{sentinels}/{pool.service_name}/{db}"
    return _describe(pool.connection_kwargs)


# Replication (issue 19): replicas=N makes every write wait for N replicas (WAIT).

#: The store's own query parameters of a URL, taken out before redis-py reads it.
_REPLICATION_OPTIONS = ("replicas", "replica_timeout")


_TAKING_OVER = "taking over an abandoned claim: "


def _connection_lost(exc: StoreError) -> bool:
    """Whether a write failed because its connection was lost under it (the server went: a
    Sentinel failover, a restart, a cut link), not because the server answered with an error:
    it may have landed or not. ``claim`` and ``swap`` then send it once more, on a connection
    that reaches a server now, and tell from the answer whether the first had landed (the
    record is exactly what this write puts there: its token is this caller's alone), as
    ``PostgresStore``'s ``_resent`` does (issue 19). Failed before, an outcome that had
    landed was logged as not recorded, one that had not was never sent again (its key then
    halted), and a claim that had landed held its key until its lease ran out, with no one to
    run it."""
    import redis

    return isinstance(exc.__cause__, (redis.ConnectionError, redis.TimeoutError))


class _Unacknowledged(Exception):
    """A write that fewer replicas acknowledged than asked for: ``reply`` is the write's own
    reply (it was done, on the primary), ``acked`` how many replicas acknowledged it."""

    def __init__(self, reply: Any, acked: int) -> None:
        super().__init__(reply, acked)
        self.reply = reply
        self.acked = acked


class _Acked:
    """A sync lane for writes: each command is followed by ``WAIT N ms`` in the same round
    trip (WAIT cannot run inside a Lua script); ``_Unacknowledged`` when fewer than N replicas
    acknowledged it."""

    __slots__ = ("_lane", "_wait")

    def __init__(self, lane: _Lane, wait: tuple[str, int, int]) -> None:
        self._lane = lane
        self._wait = wait

    def __call__(self, *command: Any) -> Any:
        reply, acked = self._lane.many([command, self._wait])
        if acked < self._wait[1]:
            raise _Unacknowledged(reply, acked)
        return reply


class _AsyncAcked:
    """``_Acked`` for an event loop's lane."""

    __slots__ = ("_lane", "_wait")

    def __init__(self, lane: _AsyncLane, wait: tuple[str, int, int]) -> None:
        self._lane = lane
        self._wait = wait

    async def __call__(self, *command: Any) -> Any:
        reply, acked = await self._lane.many([command, self._wait])
        if acked < self._wait[1]:
            raise _Unacknowledged(reply, acked)
        return reply


def _replication(replicas: object, timeout: object) -> tuple[int, tuple[str, int, int]]:
    """``replicas`` and ``replica_timeout`` checked: (replicas, the WAIT command)."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ValueError(
            "RedisStore(replicas=...) must be a whole number >= 0 (how many replicas must"
            f" acknowledge each write; 0: none), not {replicas!r}"
        )
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(
            "RedisStore(replica_timeout=...) must be a number of seconds > 0 (how long a write"
            f" waits for its replicas), not {timeout!r}"
        )
    # At least 1 ms: WAIT with 0 waits forever.
    return replicas, ("WAIT", replicas, max(1, math.ceil(timeout * 1000)))


def _replication_query(url: str, replicas: int, timeout: float) -> tuple[str, int, float]:
    """``url`` without the store's own query parameters (``replicas``, ``replica_timeout``),
    and their values: a URL's, else the arguments'. Given both ways, differently (an argument
    other than its default), they are refused: a safety setting asked for twice must not be
    weakened without a word."""
    head, sep, query = url.partition("?")
    if not sep:
        return url, replicas, timeout
    fragment = ""
    query, hashed, tail = query.partition("#")
    if hashed:
        fragment = "#" + tail
    kept: list[str] = []
    given: dict[str, str] = {}
    for part in query.split("&"):
        name = urllib.parse.unquote_plus(part.partition("=")[0])
        if name in _REPLICATION_OPTIONS:
            given[name] = urllib.parse.unquote_plus(part.partition("=")[2])
        elif part:
            kept.append(part)
    if "replicas" in given:
        text = given["replicas"]
        try:
            in_url = int(text)
        except ValueError:
            in_url = -1
        if in_url < 0:
            raise ValueError(
                f"RedisStore: bad URL {_shown(url)!r}: ?replicas={text!r} is not a whole number"
                " >= 0 (how many replicas must acknowledge each write; 0: none)"
            )
        if replicas not in (0, in_url):
            raise ValueError(
                f"RedisStore: the URL {_shown(url)!r} says ?replicas={in_url} but the argument"
                f" says replicas={replicas!r}: give it once (or the same in both)"
            )
        replicas = in_url
    if "replica_timeout" in given:
        text = given["replica_timeout"]
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(
                f"RedisStore: bad URL {_shown(url)!r}: ?replica_timeout={text!r} is not a"
                " number of seconds > 0 (how long a write waits for its replicas)"
            )
        if timeout not in (1.0, seconds):
            raise ValueError(
                f"RedisStore: the URL {_shown(url)!r} says ?replica_timeout={seconds:g} but the"
                f" argument says replica_timeout={timeout!r}: give it once (or the same in both)"
            )
        timeout = seconds
    rest = "&".join(kept)
    return head + ("?" + rest if rest else "") + fragment, replicas, timeout


def _shown(url: str) -> str:
    """``url`` for messages: its password hidden (the cluster module's ``_without_password``),
    and the values of its query's passwords (``?password=``, ``?sentinel_password=``) too."""
    from .redis_cluster import _without_password

    head, sep, query = _without_password(url).partition("?")
    if not sep:
        return head
    parts = []
    for part in query.split("&"):
        name, equals, _ = part.partition("=")
        secret = equals and urllib.parse.unquote_plus(name).endswith("password")
        parts.append(f"{name}=***" if secret else part)
    return head + "?" + "&".join(parts)


# Sentinel (issue 19): redis+sentinel://host:port[,host:port...]/service_name[/db][?...].

_SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
# Query parameters for the Sentinels' own connections, not the master's.
_SENTINEL_AUTH = {"sentinel_username": "username", "sentinel_password": "password"}
# The master's settings that a Sentinel's connection shares.
_SENTINEL_SHARED = ("socket_timeout", "socket_connect_timeout", "ssl_cert_reqs", "ssl_ca_certs")


def _is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in _SENTINEL_SCHEMES


def _is_sentinel_pool(pool: Any) -> bool:
    return hasattr(pool, "sentinel_manager") and hasattr(pool, "service_name")


def _sentinel_client(url: str, kind: Any) -> Any:
    """A client of ``kind`` (the module ``redis`` or ``redis.asyncio``) for the master that
    the Sentinels of a ``redis+sentinel://`` URL name: it asks them again whenever it
    connects, so it follows a failover. The URL's user and password are the master's;
    ``sentinel_username``/``sentinel_password`` are the Sentinels'; its other query parameters
    are redis-py's (``socket_timeout=``, ...), for both."""
    import importlib

    parts = urllib.parse.urlsplit(url)
    tls = parts.scheme.lower() == "rediss+sentinel"
    credentials, _, hosts = parts.netloc.rpartition("@")
    sentinels = [_host_port(item) for item in hosts.split(",") if item.strip()]
    if not sentinels:
        raise ValueError("no Sentinel address (redis+sentinel://host:port/service_name)")
    path = [part for part in parts.path.split("/") if part]
    if not path or len(path) > 2:
        raise ValueError("the path must be /service_name or /service_name/db")
    service = urllib.parse.unquote(path[0])
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    own = {_SENTINEL_AUTH[name]: value for name, value in query if name in _SENTINEL_AUTH}
    rest = urllib.parse.urlencode(
        [(name, value) for name, value in query if name not in _SENTINEL_AUTH]
    )
    # The master's settings, as redis-py reads a redis:// URL with them.
    at = credentials + "@" if credentials else ""
    db = "/" + path[1] if len(path) == 2 else ""
    settings = dict(
        kind.connection.parse_url(f"redis://{at}localhost{db}" + ("?" + rest if rest else ""))
    )
    for name in ("host", "port", "connection_class"):
        settings.pop(name, None)
    if tls:
        settings["ssl"] = True
    sentinel_settings = {name: settings[name] for name in _SENTINEL_SHARED if name in settings}
    sentinel_settings |= own
    if tls:
        sentinel_settings["ssl"] = True
    if kind.__name__ == "redis.asyncio":
        settings |= _resolved_driver_info()
    module = importlib.import_module(kind.__name__ + ".sentinel")
    manager = module.Sentinel(sentinels, sentinel_kwargs=sentinel_settings)
    return manager.master_for(service, **settings)


def _host_port(item: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, _, port = item[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    try:
        return host, int(port) if port else 26379
    except ValueError:
        raise ValueError(f"bad Sentinel address {item!r} (host:port)") from None


def _address(client: Any) -> tuple[str, int]:
    settings = client.connection_pool.connection_kwargs
    return settings.get("host", "localhost"), settings.get("port", 26379)


def _sentinel_like(client: Any, kind: Any) -> Any:
    """``_like`` for a client of a Sentinel pool: a client of ``kind`` for the same service,
    through the same Sentinels, with the same plain connection settings."""
    import importlib

    pool = client.connection_pool
    manager = pool.sentinel_manager
    settings = {
        name: value
        for name, value in pool.connection_kwargs.items()
        if isinstance(value, _PLAIN)
        and name not in ("connection_pool", "connection_class")
        and not name.startswith(_NOT_COPIED)
    }
    if "SSL" in pool.connection_class.__name__:
        settings["ssl"] = True
    if kind.__name__ == "redis.asyncio":
        settings |= _resolved_driver_info()
    sentinel_settings = {
        name: value
        for name, value in (manager.sentinel_kwargs or {}).items()
        if isinstance(value, _PLAIN)
    }
    module = importlib.import_module(kind.__name__ + ".sentinel")
    new = module.Sentinel(
        [_address(sentinel) for sentinel in manager.sentinels],
        min_other_sentinels=manager.min_other_sentinels,
        sentinel_kwargs=sentinel_settings,
    )
    return new.master_for(pool.service_name, **settings)
