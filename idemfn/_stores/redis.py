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
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .._record import Entry
from .._signing import SigningKey
from .base import Corrupt, Store, removable_at
from .clock import ServerClock

if TYPE_CHECKING:
    import redis

__all__ = ["RedisStore"]

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

# KEYS[1]; ARGV: fence token, live token of the new entry ("" when finished), its token, data,
# expire-at ms, finished-expiry ms. Replaces the record only if its live claim is the fence;
# returns 1 if it did, 0 if another claim or a finished record is there, -1 if none is.
_SWAP = """
local live = redis.call('HGET', KEYS[1], 't')
if live == false then return -1 end
if live ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'e', ARGV[4], 't', ARGV[2], 'k', ARGV[3], 'x', ARGV[6])
if ARGV[5] == '' then redis.call('PERSIST', KEYS[1])
else redis.call('PEXPIREAT', KEYS[1], ARGV[5]) end
return 1
"""

# KEYS[1]; ARGV: fence token. Removes the record only if its live claim is the fence.
_RELEASE = """
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS[1]; ARGV: token ("" = any). Returns 1 if a live record was removed, 2 if an expired one
# was (tidying, not forgetting), 0 if nothing was.
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local found = redis.call('HMGET', KEYS[1], 'k', 'x')
if ARGV[1] ~= '' and found[1] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
local x = found[2]
if x == false or x == '' then return 1 end
local t = redis.call('TIME')
if tonumber(x) > tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) then return 1 end
return 2
"""


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStore(Store):
    """Records in Redis (extra ``idemfn[redis]``), shared by every process on every machine
    that reaches the server.

    Each transition is one Lua script, atomic on the server; expiry is the server's own, and
    the store's clock is the server's ``TIME``. Nothing is sent until the first use.

    Args:
        url_or_client: A URL (``redis://``, ``rediss://``, ``unix://``), or a ``redis.Redis``
            the caller already has, made without ``decode_responses``.
        prefix: Put before every stored key to make the Redis key. Default ``"idemfn:"``.
        signing_key: Keys to sign and verify records with (as ``idempotent``'s
            ``signing_key``): one that fails its check is never loaded. Default None:
            ``IDEMFN_SIGNING_KEY`` when set.

    Attributes:
        client: The ``redis.Redis`` used.
        prefix: The ``prefix`` given.
        url: Where the server is, without a password.

    Raises:
        ImportError: redis-py is not installed (``pip install 'idemfn[redis]'``).
        TypeError: ``url_or_client`` is neither a str nor a ``redis.Redis``, or ``prefix``
            not a str.
        ValueError: A bad URL, or a client made with ``decode_responses=True``.
    """

    claims_first = True  # the claim script returns a live record as cheaply as a read

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        *,
        prefix: str = "idemfn:",
        signing_key: SigningKey | None = None,
    ) -> None:
        try:
            import redis
        except ImportError:  # pragma: no cover - the extra is installed in the tests
            raise ImportError("RedisStore needs redis-py: pip install 'idemfn[redis]'") from None
        if not isinstance(prefix, str):
            raise TypeError(f"RedisStore(prefix=...) must be a str, not {type(prefix).__name__}")
        if isinstance(url_or_client, str):
            try:
                client = redis.Redis.from_url(url_or_client)
            except ValueError as exc:
                raise ValueError(f"RedisStore: bad URL {url_or_client!r}: {exc}") from None
        elif isinstance(url_or_client, redis.Redis):
            client = url_or_client
            if client.connection_pool.connection_kwargs.get("decode_responses"):
                raise ValueError(
                    "RedisStore needs a redis.Redis made without decode_responses=True: records"
                    " are bytes"
                )
        else:
            raise TypeError(
                "RedisStore() takes a redis:// URL or a redis.Redis, not"
                f" {type(url_or_client).__name__}"
            )
        self.client = client
        self.prefix = prefix
        self.sign_with(signing_key)
        self.url = _describe(client.connection_pool.connection_kwargs)  # never a password
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError,)
        self._claim = client.register_script(_CLAIM)
        self._swap = client.register_script(_SWAP)
        self._release = client.register_script(_RELEASE)
        self._delete = client.register_script(_DELETE)
        self._clock = ServerClock(self._read_clock)

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r})"

    def _call(self, action: str, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise self.error(action, key, f"{type(exc).__name__}: {exc}") from exc

    def time(self) -> float:
        return self._clock.now()

    def _read_clock(self, first: bool) -> float:
        def read() -> tuple[int, int]:
            if not first:
                return self.client.time()
            # First use: load the scripts in the same round trip, so that no call pays for it.
            pipe = self.client.pipeline(transaction=False)
            for script in (self._claim, self._swap, self._release, self._delete):
                pipe.script_load(script.script)
            pipe.time()
            return pipe.execute()[-1]  # type: ignore[no-any-return]

        seconds, micros = self._call("read the clock for", "TIME", read)
        return float(seconds) + float(micros) / 1e6

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

    def claim(self, entry: Entry) -> Entry | None:
        key = entry.key
        drop_at, expires = self._expiry(entry)
        token = entry.token if entry.status == "processing" else ""
        found = self._call(
            "claim",
            key,
            self._claim,
            keys=[self.prefix + key],
            args=[token, self.encode(entry), drop_at, expires],
        )
        return None if found is None else self.decode(key, found)

    def get(self, key: str) -> Entry | None:
        data = self._call("read", key, self.client.hget, self.prefix + key, "e")
        if data is None:
            return None
        entry = self.decode(key, data)
        return None if entry.is_expired(self.time()) else entry

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        drop_at, expires = self._expiry(entry)
        live = entry.token if entry.status == "processing" else ""
        done = self._call(
            "update",
            key,
            self._swap,
            keys=[self.prefix + key],
            args=[token, live, entry.token, self.encode(entry), drop_at, expires],
        )
        if done == -1:
            self._check_not_restarted(key, entry.started_at)
        elif done == 0:  # refused: by the claim's own fence?
            data, fence = self._call("read", key, self.client.hmget, self.prefix + key, "e", "t")
            if data is not None:
                text = None if fence is None else fence.decode("utf-8", "surrogateescape")
                self.check_fence(key, token, text, data)
        return bool(done == 1)

    def _check_not_restarted(self, key: str, since: float) -> None:
        """A claim's record is gone: forgotten, pruned, or lost by a server that restarted
        without persistence. The last is not the owner's loss of a race: say so."""
        info = self._call("read the uptime for", key, self.client.info, "server")
        # Uptime is in whole seconds, so this estimate of the server's start is up to 1 s late.
        # Only a start more than 1 s after the claim is surely a restart since: a server that
        # started just before the claim (a fresh one) must not pass for one, and a record lost in
        # a restart within 1 s of its claim is reported as gone, like a forgotten one.
        started = self.time() - float(info.get("uptime_in_seconds", 0))
        if started > since + 1.0:
            raise self.error(
                "update",
                key,
                "the server restarted since this call claimed the key, and the claim's record is"
                " gone (a server without persistence loses records: enable appendonly)",
            )

    def release(self, key: str, token: str) -> bool:
        done = self._call("release", key, self._release, keys=[self.prefix + key], args=[token])
        return bool(done)

    def delete(self, key: str, token: str | None = None) -> bool:
        done = self._call("delete", key, self._delete, keys=[self.prefix + key], args=[token or ""])
        # An expired record counts as absent: removing it is tidying, not forgetting.
        return done == 1 or (done == 2 and token is not None)

    def scan(self, prefix: str = "", *, corrupt: Corrupt | None = None) -> Iterator[Entry]:
        pattern = _glob_escape(self.prefix + prefix) + "*"
        names = self._call(
            "list", prefix or "*", lambda: list(self.client.scan_iter(match=pattern, count=1000))
        )
        start = len(self.prefix)
        for name in sorted(names):
            key = name[start:].decode("utf-8", "surrogateescape")
            data = self._call("read", key, self.client.hget, name, "e")
            if data is not None and (entry := self.decoded(key, data, corrupt)) is not None:
                yield entry  # (None: removed since, or corrupt)

    def close(self) -> None:
        self.client.close()


def _describe(kwargs: dict[str, Any]) -> str:
    """A client's server, for messages (never its password)."""
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    host, port, db = kwargs.get("host", "localhost"), kwargs.get("port", 6379), kwargs.get("db", 0)
    return f"redis://{host}:{port}/{db}"
