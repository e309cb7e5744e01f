"""Records: the public ``Record`` view, and ``Entry``, what stores keep.

An ``Entry`` keeps times as float UNIX seconds and the outcome as bytes, so that a replay decodes
it with one ``marshal.loads`` and converts nothing it does not need. ``Record`` is the public,
frozen view with aware UTC datetimes, built only when a user asks for it.

A stored record is the marshal dump of ``(FORMAT_VERSION, *entry)`` followed by the CRC-32 of
that dump, checked before marshal (or, later, pickle) sees a byte of it: a record garbled on
disk or on the way is refused, never replayed as another value (issue 14: a single flipped bit
had turned an amount of 125000 into 125001). CRC-32 catches every error of up to 3 bits in a
record under 11 KB and every burst of up to 32 bits, whatever the length, and other damage but
for a chance of 1 in 2**32. It costs a replay a fraction of a microsecond, where a 64-bit
BLAKE2b cost about 1 µs more and took the replay past its 1.5x target (bench_core.py). It is no
signature: whoever can write the store can compute it; signed records (``_signing``) keep
such writers out. The CRC comes after the dump so that an idemfn from before it, which
ignores bytes after the dump, reports the newer format version instead of calling the record
garbage.
"""

from __future__ import annotations

import enum
import itertools
import marshal
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple

__all__ = ["FORMAT_VERSION", "Entry", "Record", "Status", "decode", "encode"]

#: Version of the stored record layout; a record from another version is refused, never guessed.
#: Versions 1 (no ``lease_mono``) and 2 (no checksum) are still read: see ``_legacy``.
FORMAT_VERSION = 3


class Status(str, enum.Enum):
    """Where a key's call stands: a ``str`` enum, so ``Status.OK == "ok"``.

    Attributes:
        PROCESSING: Claimed: the body is running, or its owner is gone and nobody has noticed
            yet.
        OK: Finished by returning: later calls replay the value.
        HALTED: Finished without a value: the body raised (later calls re-raise it), or it was
            interrupted, crashed, or its outcome could not be stored (later calls raise
            ``Halted``).
    """

    PROCESSING = "processing"
    OK = "ok"
    HALTED = "halted"

    def __repr__(self) -> str:
        return f"Status.{self.name}"


def _utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)


@dataclass(frozen=True)
class Record:
    """A key's record as stored, with aware UTC datetimes: what ``fn.status(...)`` returns.

    A frozen snapshot: it does not follow the record as it changes. The outcome itself (the
    value or exception) is not in it: a call replays that.

    Attributes:
        key: The stored key (``name:key``).
        status: Where the call stands.
        fingerprint: The hex fingerprint of the arguments the key was claimed with (empty
            with ``fingerprint=False``).
        owner: The process that claimed the key: ``host/machine/pid/start``.
        token: The claim's token: every write after the claim is fenced on it.
        attempt: 1 for the first claim, one more for each takeover of an abandoned claim
            (``on_abandoned="retry"``).
        started_at: When the claim (this attempt) was made.
        finished_at: When the call finished; None while processing.
        expires_at: When the finished record expires (``finished_at + ttl``); None while
            processing and for a record kept forever (``ttl=None``).
        lease_expires_at: When the claim's lease runs out unless renewed; None once finished.
        reason: Why a halted call halted; None otherwise.
        exc_type: The qualified name of the exception a halted call ended with, if any.
        traceback: That exception's traceback as text, if any.
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
    can age out abandoned claims. Not part of the public API (``idemfn._record.Entry``): a
    store author reads the fields below and passes entries on unchanged.

    Attributes:
        key: The stored key.
        status: ``"processing"``, ``"ok"`` or ``"halted"``.
        token: The claim's token: what ``swap``, ``release`` and ``delete`` compare.
        expires_at: When a finished entry expires (store-clock UNIX seconds); None while
            processing, or kept forever. ``is_expired(now)`` tells.
        lease_until: When a claim's lease runs out (store-clock UNIX seconds).
        lease_mono: When the lease runs out on the owner machine's ``CLOCK_MONOTONIC``; a
            store that overrides ``Store.renew`` must move it on with ``lease_until``, as the
            base ``renew`` does.
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
        """Whether this is a finished entry past its expiry, treated as absent before prune
        removes it.

        Args:
            now: The time on the store's clock, in UNIX seconds.

        Returns:
            True if ``expires_at`` is set and not after ``now``.
        """
        return self.expires_at is not None and self.expires_at <= now

    def record(self) -> Record:
        """The public view of this entry, with aware UTC datetimes and no payload."""
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
# marshal's type codes (the 0x80 bit of a code is FLAG_REF: masked off)
_SMALL_TUPLE, _NONE, _INT, _LONG, _FLOAT, _REF = b")Nilgr"
_SHORT_TEXT = frozenset(b"zZ")  # ASCII str, a one-byte length
_SIZED = frozenset(b"uatAs")  # str (UTF-8, ASCII, interned) and bytes, a four-byte length
_STATUSES = frozenset(s.value for s in Status)


def _field_types() -> frozenset[tuple[type, ...]]:
    """Every tuple of field types a well-formed entry can have (1,024 of them): one set
    look-up then checks a decoded record's 17 types at once (about 0.7 µs)."""
    text, number, none = (str,), (float,), type(None)
    optional = {str: (str, none), float: (float, none), bytes: (bytes, none)}
    per_field = [
        text,
        text,
        text,
        text,
        text,
        (int,),
        number,  # key, status, ..., attempt, started_at
        optional[float],
        optional[float],
        optional[float],
        optional[float],  # lease .. expires
        optional[bytes],
        optional[str],
        optional[str],
        optional[str],
        optional[str],  # payload..
        optional[float],  # lease_mono
    ]
    assert len(per_field) == _FIELDS
    return frozenset(itertools.product(*per_field))


_TYPES = _field_types()


_CHECK_BYTES = 4
# The CRC-32 of a dump followed by its own CRC (little-endian) is this constant, whatever the
# dump: the check reads the record once, without slicing it.
_RESIDUE = 0x2144DF1C


def _checksum(body: bytes) -> bytes:
    return zlib.crc32(body).to_bytes(_CHECK_BYTES, "little")


def encode(entry: Entry) -> bytes:
    """Serialise an entry. marshal only builds plain values: decoding runs no user code."""
    body = marshal.dumps((FORMAT_VERSION, *entry), 4)
    return body + _checksum(body)


# The first bytes of a record of this version: a tuple of 18 (a one-byte length), then the
# version, an int (four bytes); marshal may set FLAG_REF on either type code.
_HEADS = frozenset(
    bytes((kind, _FIELDS + 1, number)) + FORMAT_VERSION.to_bytes(4, "little")
    for kind in (_SMALL_TUPLE, _SMALL_TUPLE | 0x80)
    for number in (_INT, _INT | 0x80)
)


def decode(data: bytes) -> Entry:
    """Rebuild an entry; raise ``ValueError`` for bytes that are not a record of this version,
    or whose checksum does not match (nothing in them is loaded then)."""
    if data[:7] in _HEADS:
        if zlib.crc32(data) != _RESIDUE:  # (zlib lets other threads run over a large record)
            raise ValueError(
                "its checksum does not match its bytes: the record was damaged after it was written"
            )
        try:
            fields = marshal.loads(data)  # it stops at the checksum: no copy of the record
        except (EOFError, ValueError, TypeError) as exc:  # (a forger can compute a CRC too)
            raise ValueError(f"not an idemfn record ({exc})") from None
    else:
        fields = _older(data)
    if type(fields) is not tuple or len(fields) != _FIELDS + 1:
        raise ValueError("not an idemfn record (wrong layout)")
    entry = Entry._make(fields[1:])
    if tuple(map(type, entry)) not in _TYPES:
        raise ValueError("not an idemfn record (a field of the wrong type)")
    if entry.status not in _STATUSES:
        raise ValueError(f"not an idemfn record (status {entry.status!r})")
    return entry


# Records written before the checksum (versions 1 and 2) are still read, or every key recorded
# before an upgrade would fail until forgotten, which runs its side effect again. They have no
# checksum to check, so the next best is checked before marshal reads one: it must be exactly
# a tuple of plain values, each of a type some field can have, and nothing after it. That keeps
# a damaged version 3 record from passing as an old one (a flipped bit turns version 3 into 2
# or 1, but its checksum still follows the tuple), and keeps nested containers, and so every
# huge size claimed inside one, away from marshal. Two flipped bits can get one through: the
# version, and the length of the text a record ends with (a halted record's traceback, before
# a None lease_mono) grown by four, so that it swallows the checksum but for its last byte,
# when that byte reads as None (one record in 128). What passes is four bytes of junk at the
# end of that text, never the value: the payload comes before it (issue 14, review; every
# single and double flip of tests/stores/test_corrupt.py's records is refused).


def _older(data: bytes) -> object:
    """The fields of a record that is not of this version: of version 1 or 2, else an error
    saying what it is."""
    # Its header is checked before marshal sees it: five corrupt bytes claiming a tuple of a
    # billion slots made marshal allocate gigabytes before it noticed the data was short
    # (found by fuzzing, issue 13).
    if (
        len(data) < 7
        or data[0] & 0x7F != _SMALL_TUPLE
        or not _FIELDS <= data[1] <= _FIELDS + 1
        or data[2] & 0x7F != _INT
    ):
        raise ValueError("not an idemfn record (wrong layout)")
    version = int.from_bytes(data[3:7], "little", signed=True)
    if version in (1, 2):
        return _legacy(data, version)
    if version == FORMAT_VERSION:  # with the wrong number of fields
        raise ValueError("not an idemfn record (wrong layout)")
    raise ValueError(
        f"record format version {version}; this idemfn reads versions 1 to {FORMAT_VERSION}"
        " (a newer idemfn wrote it, or it is damaged)"
    )


def _legacy(data: bytes, version: int) -> object:
    """The fields of a version 1 or 2 record (one without a checksum)."""
    count = _FIELDS + version - 1  # the version, then 16 fields (17 from version 2)
    if data[1] != count:
        raise ValueError("not an idemfn record (wrong layout)")
    end = len(data)
    at = 2
    for _ in range(count):
        if at >= end:
            raise ValueError("not an idemfn record (cut short)")
        code = data[at] & 0x7F
        if code == _NONE:
            at += 1
        elif code in (_INT, _REF):
            at += 5
        elif code == _FLOAT:
            at += 9
        elif code in _SHORT_TEXT:
            at += 2 + int.from_bytes(data[at + 1 : at + 2], "little")
        elif code in _SIZED:
            at += 5 + int.from_bytes(data[at + 1 : at + 5], "little")
        elif code == _LONG:  # an attempt past 2**31: a count of 15-bit digits, then them
            at += 5 + 2 * abs(int.from_bytes(data[at + 1 : at + 5], "little", signed=True))
        else:
            raise ValueError("not an idemfn record (a field of the wrong type)")
    if at != end:
        raise ValueError("not an idemfn record (wrong layout)")
    try:
        fields = marshal.loads(data)
    except (EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"not an idemfn record ({exc})") from None
    if type(fields) is tuple and any(f != f for f in fields if type(f) is float):
        # A time no idemfn writes: a flipped bit in a float's exponent (no checksum to see it).
        raise ValueError("not an idemfn record (a time that is not a number)")
    if version == 1 and type(fields) is tuple:
        fields = (*fields, None)  # no lease_mono
    return fields
