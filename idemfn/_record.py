"""Records: the public ``Record`` view, and ``Entry``, what stores keep.

An ``Entry`` keeps times as float UNIX seconds and the outcome as bytes, so that a replay decodes
it with one ``marshal.loads`` and converts nothing it does not need. ``Record`` is the public,
frozen view with aware UTC datetimes, built only when a user asks for it.
"""

from __future__ import annotations

import enum
import itertools
import marshal
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple

__all__ = ["FORMAT_VERSION", "Entry", "Record", "Status", "decode", "encode"]

#: Version of the stored record layout; a record from another version is refused, never guessed
#: (version 1, which lacks ``lease_mono``, is still read).
FORMAT_VERSION = 2


class Status(str, enum.Enum):
    """Where a key's call stands."""

    PROCESSING = "processing"
    OK = "ok"
    HALTED = "halted"

    def __repr__(self) -> str:
        return f"Status.{self.name}"


def _utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)


@dataclass(frozen=True)
class Record:
    """A key's record as stored, with aware UTC datetimes.

    ``finished_at`` and ``expires_at`` are None while the call is processing (``expires_at`` is
    also None for a record kept forever); ``lease_expires_at`` is None once it has finished.
    ``reason``, ``exc_type`` and ``traceback`` describe a halted call.
    """

    key: str
    status: Status
    fingerprint: str
    owner: str
    token: str
    attempt: int
    started_at: datetime
    finished_at: datetime | None
    expires_at: datetime | None
    lease_expires_at: datetime | None = None
    reason: str | None = None
    exc_type: str | None = None
    traceback: str | None = None


class Entry(NamedTuple):
    """What a store keeps for a key. Stores treat it as a value; only the engine interprets it.

    A tuple, so that decoding a record is one ``marshal.loads`` and one tuple build. Times are
    UNIX seconds from the store's clock. ``payload`` is the serialised return value (``ok``) or
    exception (``halted``, when it could be serialised). ``ttl`` travels with the claim so prune
    can age out abandoned claims.
    """

    key: str
    status: str
    fingerprint: str
    owner: str
    token: str
    attempt: int
    started_at: float
    lease_until: float | None = None
    ttl: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    payload: bytes | None = None
    reason: str | None = None
    exc_type: str | None = None
    message: str | None = None
    traceback: str | None = None
    # When the lease runs out on the owner's CLOCK_MONOTONIC, which every process of its
    # machine shares until reboot: judged there instead of lease_until, no wall-clock jump can
    # make a live claim look abandoned. None in version 1 records.
    lease_mono: float | None = None

    def is_expired(self, now: float) -> bool:
        """A finished entry past its expiry is treated as absent, before prune removes it."""
        return self.expires_at is not None and self.expires_at <= now

    def record(self) -> Record:
        return Record(
            key=self.key,
            status=Status(self.status),
            fingerprint=self.fingerprint,
            owner=self.owner,
            token=self.token,
            attempt=self.attempt,
            started_at=_utc(self.started_at),  # type: ignore[arg-type]  # never None
            finished_at=_utc(self.finished_at),
            expires_at=_utc(self.expires_at),
            lease_expires_at=_utc(self.lease_until) if self.finished_at is None else None,
            reason=self.reason,
            exc_type=self.exc_type,
            traceback=self.traceback,
        )

    def __repr__(self) -> str:  # the payload may be megabytes: leave it out
        return (
            f"<Entry {self.key!r} {self.status} attempt={self.attempt} owner={self.owner!r}"
            f" token={self.token!r}>"
        )


_FIELDS = len(Entry._fields)
_SMALL_TUPLE = ord(")")  # marshal's TYPE_SMALL_TUPLE (its 0x80 bit is FLAG_REF)
_STATUSES = frozenset(s.value for s in Status)


def _field_types() -> frozenset[tuple[type, ...]]:
    """Every tuple of field types a well-formed entry can have (1,024 of them): one set
    look-up then checks a decoded record's 17 types at once (about 0.7 µs)."""
    text, number, none = (str,), (float,), type(None)
    optional = {str: (str, none), float: (float, none), bytes: (bytes, none)}
    per_field = [
        text, text, text, text, text, (int,), number,  # key, status, ..., attempt, started_at
        optional[float], optional[float], optional[float], optional[float],  # lease .. expires
        optional[bytes], optional[str], optional[str], optional[str], optional[str],  # payload..
        optional[float],  # lease_mono
    ]  # fmt: skip
    assert len(per_field) == _FIELDS
    return frozenset(itertools.product(*per_field))


_TYPES = _field_types()


def encode(entry: Entry) -> bytes:
    """Serialise an entry. marshal only builds plain values: decoding runs no user code."""
    return marshal.dumps((FORMAT_VERSION, *entry), 4)


def decode(data: bytes) -> Entry:
    """Rebuild an entry; raise ``ValueError`` for bytes that are not a record of this version."""
    # A record is a tuple of 17 or 18 fields (a one-byte length). Checked before marshal sees
    # it: five corrupt bytes claiming a tuple of a billion slots make marshal allocate
    # gigabytes before it notices the data is short (found by fuzzing, issue 13).
    if len(data) < 2 or data[0] & 0x7F != _SMALL_TUPLE or not _FIELDS <= data[1] <= _FIELDS + 1:
        raise ValueError("not an idemfn record (wrong layout)")
    try:
        fields = marshal.loads(data)
    except (EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"not an idemfn record ({exc})") from None
    if type(fields) is not tuple or not fields:
        raise ValueError("not an idemfn record (wrong layout)")
    if fields[0] == 1 and len(fields) == _FIELDS:  # version 1: no lease_mono
        fields = (*fields, None)
    elif fields[0] != FORMAT_VERSION:
        raise ValueError(
            f"record format version {fields[0]!r}; this idemfn reads versions 1 to"
            f" {FORMAT_VERSION}"
        )
    if len(fields) != _FIELDS + 1:
        raise ValueError("not an idemfn record (wrong layout)")
    entry = Entry._make(fields[1:])
    if tuple(map(type, entry)) not in _TYPES:
        raise ValueError("not an idemfn record (a field of the wrong type)")
    if entry.status not in _STATUSES:
        raise ValueError(f"not an idemfn record (status {entry.status!r})")
    return entry
