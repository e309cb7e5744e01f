"""Fuzzing the record decoder and the fingerprints (hypothesis).

The decoder reads bytes that anyone able to write the store may have put there: no input may
crash it (only ``ValueError``, which stores turn into ``StoreError`` naming the key), and an
input it accepts must be exactly the record it encodes, every field of the right type.
Fingerprints must never crash on supported values, and equal values must agree however they
were built. Unequal values of every supported type (issue 13), drawn from small domains so that
near-misses are common (a second of offset, a DST fold, a trailing zero, a dict's order), must
never share a fingerprint, and no encoding may be a prefix of another.
"""

from __future__ import annotations

import collections
import copy
import datetime as dt
import marshal
import math
import random
import uuid
from decimal import Decimal
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idemfn import fingerprint_value
from idemfn._fingerprint import canonical
from idemfn._record import FORMAT_VERSION, Entry, Status, _checksum, decode, encode
from tests.support.values import Color, Level, Pair, Point, Str, ToyZone

try:  # numpy is in the test extra; without it only the numpy properties are skipped
    import numpy as np
    from hypothesis.extra import numpy as hnp
except ImportError:  # pragma: no cover
    np = hnp = None  # type: ignore[assignment]

times = st.floats(allow_nan=False, allow_infinity=False, width=64)
maybe_time = st.none() | times
maybe_text = st.none() | st.text(max_size=20)

entries = st.builds(
    Entry,
    key=st.text(max_size=30),
    status=st.sampled_from([s.value for s in Status]),
    fingerprint=st.text(max_size=10),
    owner=st.text(max_size=20),
    token=st.text(max_size=10),
    attempt=st.integers(min_value=1, max_value=2**40),
    started_at=times,
    lease_until=maybe_time,
    ttl=maybe_time,
    finished_at=maybe_time,
    expires_at=maybe_time,
    payload=st.none() | st.binary(max_size=50),
    reason=maybe_text,
    exc_type=maybe_text,
    message=maybe_text,
    traceback=maybe_text,
    lease_mono=maybe_time,
)

# Anything marshal can write, as a record's fields would be if someone forged them.
loose = (
    st.none() | st.booleans() | st.integers() | times | st.text(max_size=5) | st.binary(max_size=5)
)


def _decodes_or_refuses(data: bytes) -> Entry | None:
    try:
        entry = decode(data)
    except ValueError:
        return None
    assert isinstance(entry, Entry)
    return entry


@settings(max_examples=300, deadline=None)
@given(entries)
def test_every_record_round_trips(entry: Entry) -> None:
    assert decode(encode(entry)) == entry


# A record's first bytes, each version (FLAG_REF set or not): what follows is then read by the
# version's own checks (the checksum; the layout of a record from before it).
heads = st.sampled_from(
    [
        b")\x11\xe9\x01\x00\x00\x00",
        b")\x12\xe9\x02\x00\x00\x00",
        b"\xa9\x12i\x02\x00\x00\x00",
        b")\x12\xe9\x03\x00\x00\x00",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300) | st.builds(bytes.__add__, heads, st.binary(max_size=300)))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    _decodes_or_refuses(data)


def _written(version: object, fields: list[Any]) -> bytes:
    """A record of ``version`` with ``fields``, as a forger (who can compute checksums) or an
    idemfn of that version would write it."""
    body = marshal.dumps((version, *fields), 4)
    return body + _checksum(body) if version == FORMAT_VERSION else body


def _well_formed(entry: Entry) -> bool:
    text = ("key", "status", "fingerprint", "owner", "token")
    times_ = ("started_at", "lease_until", "ttl", "finished_at", "expires_at", "lease_mono")
    words = ("reason", "exc_type", "message", "traceback")
    return (
        all(type(getattr(entry, f)) is str for f in text)
        and entry.status in {s.value for s in Status}
        and type(entry.attempt) is int
        and type(entry.started_at) is float
        and all(type(getattr(entry, f)) in (float, type(None)) for f in times_)
        and all(type(getattr(entry, f)) in (str, type(None)) for f in words)
        and type(entry.payload) in (bytes, type(None))
    )


@settings(max_examples=600, deadline=None)
@given(
    entries,
    st.lists(st.tuples(st.integers(0, 16), loose), min_size=1, max_size=3),
    st.sampled_from([1, 2, FORMAT_VERSION, FORMAT_VERSION + 1, "3", None]),
)
def test_forged_fields_decode_only_when_every_field_is_right(
    entry: Entry, changes: list[tuple[int, Any]], version: object
) -> None:
    fields = list(entry)
    for index, value in changes:  # a forger's edits of a real record's fields
        fields[index] = value
    if version == 1:
        fields = fields[:-1]  # version 1 had no lease_mono
    decoded = _decodes_or_refuses(_written(version, fields))
    if decoded is None:
        return
    assert _well_formed(decoded), decoded._asdict()
    expected = [*fields, None] if version == 1 else fields
    assert list(decoded) == expected  # exactly what was written, never a guess


def _damage(data: bytes, rng: random.Random) -> bytes:
    # Places are drawn as fractions of the length, never as randrange(len): marshal shares an
    # object it meets twice, so the same entry can be written a few bytes shorter or longer,
    # and Hypothesis refuses draws whose bounds change between replays of one example.
    damaged = bytearray(data)
    for _ in range(rng.randint(1, 4)):  # flip bits, cut the end, or both
        if rng.random() < 0.7:
            damaged[int(rng.random() * len(damaged))] ^= 1 << rng.randrange(8)
        else:
            del damaged[int(rng.random() * len(damaged)) :]
            if not damaged:
                damaged.append(0)
    return bytes(damaged)


@settings(max_examples=300, deadline=None)
@given(entries, st.randoms(use_true_random=False))
def test_damaged_records_are_refused(entry: Entry, rng: random.Random) -> None:
    data = encode(entry)
    damaged = _damage(data, rng)
    decoded = _decodes_or_refuses(damaged)
    # Only damage that undid itself (a bit flipped twice) may decode, and to the record itself
    # (issue 14: a flipped bit in a string or a number read back as another record).
    assert decoded is None or decoded == entry, (damaged, data)


@settings(max_examples=300, deadline=None)
@given(entries, st.randoms(use_true_random=False))
def test_damaged_records_from_before_the_checksum_are_refused_or_still_well_formed(
    entry: Entry, rng: random.Random
) -> None:
    damaged = _decodes_or_refuses(_damage(_written(2, list(entry)), rng))
    if damaged is not None:  # no checksum: a flipped bit inside a string can still be a record
        assert _well_formed(damaged) and decode(encode(damaged)) == damaged


values = st.recursive(
    st.none() | st.booleans() | st.integers() | times | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=4), inner, max_size=4)
        | st.frozensets(st.integers() | st.text(max_size=4), max_size=4)
    ),
    max_leaves=20,
)


def _rebuilt(value: Any, rng: random.Random) -> Any:
    """An equal value built another way: dicts in another insertion order, fresh containers."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _rebuilt(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_rebuilt(v, rng) for v in value]
    if isinstance(value, tuple):
        return tuple(_rebuilt(v, rng) for v in value)
    if isinstance(value, frozenset):
        items = list(value)
        rng.shuffle(items)
        return frozenset(items)
    return copy.copy(value)


@settings(max_examples=300, deadline=None)
@given(values, st.randoms(use_true_random=False))
def test_equal_values_have_one_fingerprint_however_built(value: Any, rng: random.Random) -> None:
    first = fingerprint_value(value)
    assert isinstance(first, str) and len(first) == 64
    assert fingerprint_value(_rebuilt(value, rng)) == first
    assert fingerprint_value(copy.deepcopy(value)) == first


@settings(max_examples=200, deadline=None)
@given(values, values)
def test_values_of_other_types_or_contents_differ(a: Any, b: Any) -> None:
    if type(a) is not type(b) or _canonical(a) != _canonical(b):
        assert fingerprint_value(a) != fingerprint_value(b)


def _canonical(value: Any) -> Any:
    """A comparable form that tells 1, 1.0 and True apart, as fingerprints do."""
    if isinstance(value, dict):
        return ("dict", sorted((k, _canonical(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_canonical(v) for v in value])
    if isinstance(value, frozenset):
        return ("frozenset", sorted(map(repr, (_canonical(v) for v in value))))
    if isinstance(value, float) and value == 0.0:
        return ("float", 0.0)  # 0.0 == -0.0: equal values, one fingerprint
    return (type(value).__name__, value)


# --------------------------------------------------------------------------------------------
# Every supported type (issue 13): unequal values never collide, equal ones agree


TOY = ToyZone()
UTC = dt.timezone.utc


def _tz(**kwargs: float) -> dt.timezone:
    return dt.timezone(dt.timedelta(**kwargs))


# Offsets a whole second, half a second, a minute or an hour apart: version 1 floored aware
# times' offsets to minutes. TOY (for a time of day) has no offset: it is naive.
_TIME_ZONES = [
    None,
    UTC,
    _tz(seconds=30),
    _tz(seconds=-30),
    _tz(minutes=1),
    _tz(hours=1),
    _tz(microseconds=500_000),
    _tz(microseconds=-500_000),
    _tz(hours=1, seconds=30),
    TOY,
]
aware_times = st.builds(
    dt.time,
    st.sampled_from([9, 10, 11, 23]),
    st.sampled_from([0, 1, 59]),
    st.sampled_from([0, 1, 30, 59]),
    st.sampled_from([0, 500_000, 999_999]),
    st.sampled_from(_TIME_ZONES),
    fold=st.integers(0, 1),
)
_DATETIME_ZONES = [
    TOY,
    TOY,
    TOY,
    UTC,
    _tz(hours=1),
    _tz(hours=2),
    _tz(seconds=30),
    _tz(microseconds=500_000),
    None,
]
# Wall times around TOY's spring gap and autumn fold, in TOY and in fixed offsets.
aware_datetimes = st.builds(
    lambda day, hour, minute, micro, tz, fold: dt.datetime(
        2024, day[0], day[1], hour, minute, 0, micro, tz, fold=fold
    ),
    st.sampled_from([(3, 31), (10, 27), (7, 1)]),  # the gap's day, the fold's, a summer day
    st.integers(1, 3),
    st.sampled_from([0, 30]),
    st.sampled_from([0, 500_000]),
    st.sampled_from(_DATETIME_ZONES),
    st.integers(0, 1),
)
finite_decimals = st.builds(
    lambda sign, digits, exponent: Decimal((sign, tuple(digits) or (0,), exponent)),
    st.integers(0, 1),
    st.lists(st.sampled_from([0, 1, 5]), max_size=3),
    st.integers(-2, 2),
)
paths = st.one_of(
    st.text("a/.", max_size=4).map(PurePosixPath),
    st.text("aB/\\\\:", max_size=4).map(PureWindowsPath),
)
hashable_atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.sampled_from([2**2000, 2**2000 + 1, -(2**70)]),
    st.sampled_from([0.0, -0.0, 1.0, 1.5, -1.0, math.inf, -math.inf, 5e-324]),
    st.text("ab\ud800", max_size=3),
    st.binary(max_size=2),
    finite_decimals,
    st.sampled_from([Decimal("Infinity"), Decimal("-Infinity")]),
    st.dates(dt.date(2024, 1, 1), dt.date(2024, 1, 3)),
    aware_datetimes,
    aware_times,
    st.builds(dt.timedelta, st.integers(-1, 1), st.integers(0, 2), st.integers(0, 2)),
    st.sampled_from([uuid.UUID(int=0), uuid.UUID(int=1), uuid.UUID(int=2**127)]),
    st.sampled_from([Color.RED, Color.GREEN, Level.LOW, Level.HIGH]),
    paths,
    st.builds(Point, st.integers(0, 1), st.integers(0, 1)),
    st.builds(Pair, st.text("k", max_size=1), st.integers(0, 1)),
)
hashables = st.recursive(
    hashable_atoms,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(tuple), st.frozensets(inner, max_size=3)
    ),
    max_leaves=5,
)
every_type = st.recursive(
    st.one_of(hashables, st.binary(max_size=2).map(bytearray)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(hashables, inner, max_size=3),
        st.lists(st.tuples(st.text("ab", max_size=1), inner), max_size=3).map(
            collections.OrderedDict
        ),
        st.sets(hashables, max_size=3),
    ),
    max_leaves=8,
)

_FUZZ = settings(
    max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def _has_nan(value: Any) -> bool:
    """NaN equals nothing, not even itself: such values are left to the NaN tests."""
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, Decimal):
        return value.is_nan()
    if isinstance(value, dict):
        return any(_has_nan(k) or _has_nan(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_has_nan(v) for v in value)
    return False


ordered_dicts = st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 1)), max_size=3).map(
    collections.OrderedDict
)


def _offset_of(tz: dt.tzinfo | None, when: dt.datetime | None = None) -> dt.timedelta:
    return (tz.utcoffset(when) if tz is not None else None) or dt.timedelta(0)


# Move the second value's wall time by nothing, by the offsets' difference (the same instant),
# by that and a second, or by an hour (a DST change).
_MOVES = st.sampled_from(["none", "instant", "instant+1", "instant-1", "hour"])


@st.composite
def time_pairs(draw: st.DrawFn) -> tuple[dt.time, dt.time]:
    """Two aware times that are equal or nearly so: one wall time in two zones, or one instant
    (give or take a second) in two zones."""
    a = draw(aware_times)
    tz = draw(st.sampled_from(_TIME_ZONES))
    shift = (_offset_of(tz) - _offset_of(a.tzinfo)) // dt.timedelta(seconds=1)
    move = draw(_MOVES)
    seconds = {
        "none": 0,
        "instant": shift,
        "instant+1": shift + 1,
        "instant-1": shift - 1,
        "hour": 3600,
    }[move]
    local = a.hour * 3600 + a.minute * 60 + a.second + seconds
    if not 0 <= local < 86400:
        return a, a
    micro = draw(st.sampled_from([a.microsecond, 0, 500_000]))
    return a, dt.time(local // 3600, local // 60 % 60, local % 60, micro, tz)


@st.composite
def datetime_pairs(draw: st.DrawFn) -> tuple[dt.datetime, dt.datetime]:
    """Two datetimes that are equal or nearly so, around TOY's DST gap and fold: one wall time
    in two zones or folds, or one instant (give or take a second) in two zones."""
    a = draw(aware_datetimes)
    b = a.replace(tzinfo=draw(st.sampled_from(_DATETIME_ZONES)), fold=draw(st.integers(0, 1)))
    shift = _offset_of(b.tzinfo, b) - _offset_of(a.tzinfo, a)
    delta = {
        "none": dt.timedelta(0),
        "instant": shift,
        "hour": dt.timedelta(hours=1),
        "instant+1": shift + dt.timedelta(seconds=1),
        "instant-1": shift - dt.timedelta(seconds=1),
    }[draw(_MOVES)]
    return a, b + delta


ordered_dict_pairs = ordered_dicts.flatmap(
    lambda a: st.sampled_from([a, collections.OrderedDict(reversed(a.items()))]).map(
        lambda b: (a, b)
    )
)


def _assert_unequal_values_differ(a: Any, b: Any) -> None:
    assert not _has_nan(a) and not _has_nan(b)  # none drawn: == is the oracle
    if a != b:
        assert canonical(a) != canonical(b), (a, b)
        assert fingerprint_value(a) != fingerprint_value(b), (a, b)


@_FUZZ
@given(st.one_of(st.tuples(every_type, every_type), st.tuples(hashable_atoms, hashable_atoms)))
def test_unequal_values_of_every_supported_type_never_collide(pair: tuple[Any, Any]) -> None:
    _assert_unequal_values_differ(*pair)


# Pairs of one type are where near-misses live: each family gets pairs drawn close together.
@_FUZZ
@given(time_pairs())
def test_unequal_aware_times_never_collide(pair: tuple[dt.time, dt.time]) -> None:
    _assert_unequal_values_differ(*pair)


@settings(_FUZZ, max_examples=1000)
@given(datetime_pairs())
def test_unequal_aware_datetimes_never_collide(pair: tuple[dt.datetime, dt.datetime]) -> None:
    _assert_unequal_values_differ(*pair)


@_FUZZ
@given(st.tuples(finite_decimals, finite_decimals) | st.tuples(paths, paths) | ordered_dict_pairs)
def test_unequal_decimals_paths_and_ordered_dicts_never_collide(pair: tuple[Any, Any]) -> None:
    _assert_unequal_values_differ(*pair)


@_FUZZ
@given(every_type, every_type)
def test_no_encoding_is_a_prefix_of_another(a: Any, b: Any) -> None:
    # So a container's items can be read back one by one: ("ab", "c") != ("a", "bc").
    ca, cb = canonical(a), canonical(b)
    if ca != cb:
        assert not cb.startswith(ca) and not ca.startswith(cb), (a, b)
        assert canonical([a, b]) != canonical([b, a]) or a == b


def _equal_copy(value: Any, rnd: random.Random) -> Any:
    """A value equal to ``value``, of the same types, built another way."""
    kind = type(value)
    if kind is float:
        return -value if value == 0.0 else value
    if kind is str:
        return Str(value)
    if kind is Decimal:
        if not value.is_finite():
            return Decimal(str(value))
        sign, digits, exponent = value.as_tuple()
        return Decimal((sign if any(digits) else 1 - sign, (*digits, 0), exponent - 1))
    if kind is dt.datetime:
        if value.utcoffset() is None:
            return value.replace(fold=1 - value.fold)
        flipped = value.replace(fold=1 - value.fold)
        if flipped.utcoffset() != value.utcoffset():
            return value  # in a fold or gap: equal only to itself in its own zone
        return value.astimezone(_tz(seconds=rnd.choice([-3600, -1, 0, 1, 7200])))
    if kind is dt.time:
        offset = value.utcoffset()
        if offset is None:
            return value.replace(fold=1 - value.fold)
        shift = rnd.choice([-3600, -60, -1, 1, 60, 3600])  # whole seconds: the same instant
        local = value.hour * 3600 + value.minute * 60 + value.second + shift
        if not 0 <= local < 86400 or not abs(offset.total_seconds() + shift) < 86400:
            return value
        return dt.time(
            local // 3600,
            local // 60 % 60,
            local % 60,
            value.microsecond,
            _tz(seconds=offset.total_seconds() + shift),
        )
    if kind is dt.date:
        return dt.date.fromordinal(value.toordinal())
    if kind is dt.timedelta:
        return dt.timedelta(microseconds=value // dt.timedelta(microseconds=1))
    if kind is uuid.UUID:
        return uuid.UUID(str(value).upper())
    if kind is PureWindowsPath:
        swapped = PureWindowsPath(str(value).swapcase())  # Windows paths ignore case
        return swapped if str(swapped).lower() == str(value).lower() else value
    if kind is PurePosixPath:
        return PurePosixPath(*value.parts) if value.parts else PurePosixPath("./")
    if kind is Point:
        return Point(_equal_copy(value.x, rnd), _equal_copy(value.y, rnd))
    if kind is Pair:
        return Pair(*(_equal_copy(v, rnd) for v in value))
    if kind in (list, tuple):
        return kind(_equal_copy(v, rnd) for v in value)
    if kind is collections.OrderedDict:
        return collections.OrderedDict((k, _equal_copy(v, rnd)) for k, v in value.items())
    if kind is dict:
        items = [(_equal_copy(k, rnd), _equal_copy(v, rnd)) for k, v in value.items()]
        rnd.shuffle(items)
        return dict(items)
    if kind in (set, frozenset):
        members = [_equal_copy(v, rnd) for v in value]
        rnd.shuffle(members)
        return kind(members)
    if kind is bytearray:
        return bytearray(value)
    return value


@_FUZZ
@given(every_type, st.randoms(use_true_random=False))
def test_equal_values_of_every_supported_type_agree(value: Any, rnd: random.Random) -> None:
    rebuilt = _equal_copy(value, rnd)
    assert rebuilt == value
    assert fingerprint_value(rebuilt) == fingerprint_value(value), (value, rebuilt)


@_FUZZ
@given(st.lists(st.sampled_from(["NaN", "-NaN", "NaN1", "sNaN", "-sNaN1", "sNaN2", "Inf"])))
def test_decimal_nans_differ_by_what_str_shows(texts: list[str]) -> None:
    values = [Decimal(t) for t in texts]
    assert len({fingerprint_value(v) for v in values}) == len({str(v) for v in values})


# --------------------------------------------------------------------------------------------
# numpy arrays: dtype, shape and elements, whatever the memory layout

needs_numpy = pytest.mark.skipif(np is None, reason="numpy is not installed")

if np is not None:
    _DTYPES = [
        "|b1",
        "|i1",
        "<i4",
        ">i4",
        "<u2",
        "<f2",
        ">f4",
        "<f8",
        ">f8",
        "<M8[s]",
        ">m8[ms]",
        "<U2",
        ">U2",
        "|S2",
        "<c8",
    ]
    arrays = st.sampled_from(_DTYPES).flatmap(
        lambda dtype: hnp.arrays(
            np.dtype(dtype),
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3),
            elements=(
                st.sampled_from([0, 1, 2]).map(lambda i: np.datetime64(i, "s"))
                if dtype.endswith("M8[s]")
                else st.sampled_from([0, 1, 2]).map(lambda i: np.timedelta64(i, "ms"))
                if dtype.endswith("m8[ms]")
                else None
            ),
        )
    )
else:  # pragma: no cover
    arrays = st.nothing()


def _layouts(a: Any) -> list[Any]:
    """``a`` as other memory layouts: F order, the other byte order, strided and reversed views."""
    out = [np.array(a, order="F"), a.astype(a.dtype.newbyteorder("S"))]
    if a.ndim:
        wide = np.zeros((*a.shape[:-1], a.shape[-1] * 2), dtype=a.dtype)
        wide[..., ::2] = a
        out.append(wide[..., ::2])  # a non-contiguous view
        reversed_copy = a[..., ::-1].copy()
        out.append(reversed_copy[..., ::-1])  # negative strides
    return out


def _same_values(a: Any, b: Any) -> bool:
    if a.dtype.newbyteorder("<") != b.dtype.newbyteorder("<") or a.shape != b.shape:
        return False
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fcmM"))


@needs_numpy
@_FUZZ
@given(arrays)
def test_equal_arrays_agree_in_every_layout(a: Any) -> None:
    expected = fingerprint_value(a)
    for other in _layouts(a):
        if a.dtype.kind == "c" and np.isnan(a).any():
            continue  # complex NaNs: equal_nan does not say which part is NaN
        assert _same_values(a, other)
        assert fingerprint_value(other) == expected


@needs_numpy
@_FUZZ
@given(arrays, arrays)
def test_arrays_that_differ_never_collide(a: Any, b: Any) -> None:
    if not _same_values(a, b):
        assert fingerprint_value(a) != fingerprint_value(b), (a, b)
    elif a.dtype.kind != "c":
        assert fingerprint_value(a) == fingerprint_value(b), (a, b)
    # A scalar of the array's dtype is not the 0-d array.
    if a.ndim == 0:
        assert fingerprint_value(a[()]) != fingerprint_value(a)


@pytest.mark.parametrize("field", ["started_at", "lease_until", "expires_at", "lease_mono"])
def test_a_record_from_before_the_checksum_with_a_time_that_is_not_a_number_is_refused(
    field: str,
) -> None:
    # A flipped exponent bit makes a float NaN; an old record has no checksum to see it, and a
    # NaN lease or expiry compares false with every time (found by the fuzz test above).
    entry = Entry("k", "processing", "f", "o", "t", 1, 1.5, lease_until=2.5, expires_at=3.5)
    fields = list(entry._replace(**{field: math.nan}))
    with pytest.raises(ValueError, match="not a number"):
        decode(_written(2, fields))
    assert decode(_written(2, list(entry))) == entry
