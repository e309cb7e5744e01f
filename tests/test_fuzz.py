"""Fuzzing the record decoder and the fingerprints (hypothesis).

The decoder reads bytes that anyone able to write the store may have put there: no input may
crash it (only ``ValueError``, which stores turn into ``StoreError`` naming the key), and an
input it accepts must be exactly the record it encodes, every field of the right type.
Fingerprints must never crash on supported values, and equal values must agree however they
were built.
"""

from __future__ import annotations

import copy
import marshal
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from idemfn import fingerprint_value
from idemfn._record import FORMAT_VERSION, Entry, Status, decode, encode

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
loose = st.none() | st.booleans() | st.integers() | times | st.text(max_size=5) | st.binary(
    max_size=5
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


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    _decodes_or_refuses(data)


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
@given(entries, st.lists(st.tuples(st.integers(0, 16), loose), min_size=1, max_size=3),
       st.sampled_from([1, FORMAT_VERSION, 3, "2", None]))  # fmt: skip
def test_forged_fields_decode_only_when_every_field_is_right(
    entry: Entry, changes: list[tuple[int, Any]], version: object
) -> None:
    fields = list(entry)
    for index, value in changes:  # a forger's edits of a real record's fields
        fields[index] = value
    if version == 1:
        fields = fields[:-1]  # version 1 had no lease_mono
    decoded = _decodes_or_refuses(marshal.dumps((version, *fields), 4))
    if decoded is None:
        return
    assert _well_formed(decoded), decoded._asdict()
    expected = fields if version == FORMAT_VERSION else [*fields, None]
    assert list(decoded) == expected  # exactly what was written, never a guess


@settings(max_examples=300, deadline=None)
@given(entries, st.randoms(use_true_random=False))
def test_damaged_records_are_refused_or_still_well_formed(
    entry: Entry, rng: random.Random
) -> None:
    data = bytearray(encode(entry))
    for _ in range(rng.randint(1, 4)):  # flip bytes, cut the end, or both
        if rng.random() < 0.7:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        else:
            del data[rng.randrange(len(data)) :]
            if not data:
                data.append(0)
    damaged = _decodes_or_refuses(bytes(data))
    if damaged is not None:  # a flipped bit inside a string can still be a record
        assert _well_formed(damaged) and decode(encode(damaged)) == damaged


values = st.recursive(
    st.none() | st.booleans() | st.integers() | times | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    | st.frozensets(st.integers() | st.text(max_size=4), max_size=4),
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
