"""Tests for ``idemfn._fingerprint``: the canonical encoding behind every argument fingerprint.

The golden vectors below (``GOLDEN``, ``CANONICAL_BYTES``, ``ARGUMENTS_GOLDEN``) are literal
copies of what the implementation produced when the format was fixed. Fingerprints are stored by
users alongside their records: changing any of these vectors breaks every user's stored
fingerprints (replays turn into mismatches). Never edit a vector to make a test pass; if the
encoding really has to change, bump ``FINGERPRINT_VERSION`` (and the prefix it drives) instead,
and add a new table for the new version.

The classes used by the golden vectors live at module level on purpose: their ``__qualname__``
is part of the encoding, so moving them into a function would change their vectors.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import itertools
import math
import os
import struct
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idemfn._fingerprint import (
    FINGERPRINT_VERSION,
    ArgumentsFingerprint,
    canonical,
    fingerprint_arguments,
    fingerprint_value,
)

if TYPE_CHECKING:
    import random

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFIX = b"idemfn-fp/1\n"


# --------------------------------------------------------------------------------------------
# Module-level types used by the golden vectors (their qualnames are encoded: do not move them)
# --------------------------------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 3


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


class Pair(NamedTuple):
    key: str
    size: int


class Money:
    """Not natively supported: fingerprinted through the hook."""

    def __init__(self, amount: str, currency: str) -> None:
        self.amount = amount
        self.currency = currency

    def __idemfn_fingerprint__(self) -> object:
        return (self.currency, Decimal(self.amount))


class Str(str):
    """A str subclass: must fingerprint like the plain str."""

    __slots__ = ()


# --------------------------------------------------------------------------------------------
# 1. Golden vectors
# --------------------------------------------------------------------------------------------

IST = dt.timezone(dt.timedelta(hours=5, minutes=30))

GOLDEN: list[tuple[str, object, str]] = [
    ("none", None, "38cf3247f1c69ca478323be25a4b7628387f9edca7b57936edf313198110c8af"),
    ("true", True, "287d40f130be419d4360f541d21cd31728dff70710d6a3183afe203a5b3bc1b1"),
    ("false", False, "18d0f29618f215d674374780a649696723bb01fc63c1da9e02d2207d0a5ddb50"),
    ("zero", 0, "a692c27604391f8b0df77e9dc9bd9592e4901b17f92a6ddaeb93ff73866da6b0"),
    ("negative_int", -5, "f144ce802ea4d9244604dbaf1f0d5fc9798acd838e840b804f4dc7434c44641b"),
    ("big_int", 2**100, "ec3aacd16897cd3e83caae3702462db6b89beaa87187bc7acd4eee9a1a3fa671"),
    ("float", 1.5, "6c3e07c982a1a42ae03e0dc68f57fc2855aa34b31bfeee01de3fdab9d31d8f05"),
    ("negative_zero", -0.0, "435b206fcd6894b30c69888fb3ce0aac99cd3c2db43a3140832c176bc438465a"),
    ("nan", float("nan"), "2be7efc5a540855acb1b0031f9da22bfe737f634ad192af0f64f556334e33913"),
    ("inf", float("inf"), "484933a2f32c999fa61926ab55dfc3a5c407e44268e65013633af2cf6d8a6493"),
    (
        "negative_inf",
        float("-inf"),
        "f07126a644d340d608a89e63509a1e3096ea1baa980e4b1a2857fc231cb303ad",
    ),
    ("empty_str", "", "3b5575b5b388713dd85eda69100f05bf6d081310c560b591b54eecea59af30a8"),
    ("unicode_str", "héllo", "b1c0680c752822049b2819e97b371fa5048c7ff32f724d43fda42c28df13a703"),
    (
        "lone_surrogate",
        "\ud800",
        "8bc4fd2591ddda35f260ba1e1c8ee4e6ca4d094a595833f92c290995ba9b9128",
    ),
    ("bytes", b"\x00\xff", "26b853897e822d285dff754d0bdd7fd46b126e90d7fd1be99ebc8fabdc8d75ad"),
    (
        "bytearray",
        bytearray(b"\x00\xff"),
        "54f56c39faecc206e0ac46826bf9f2cd94d6d826e0e68ff27a1f088d6b40280e",
    ),
    ("list", [1, "a", None], "9ed851218e3356290bb7462bf1b0cc2ab5f6607bc106ff3ab6e35c519f914438"),
    ("tuple", (1, 2.5), "f26124cfb62754843b9611390b2b8b1bbdc42c76d7d5fdb51328f32cd4a34e34"),
    (
        "nested_dict",
        {"b": [1, {"c": (True,)}], "a": {"x": b"y"}},
        "5bd2972b75fccbc7530dba20957ccb1fa49a51b0145af4644a867bab62762404",
    ),
    ("set", {3, 1, 2}, "f2286fc95f1d4dcbb27f351846a3f929439d62dccf5a37abcfc341e9228f9607"),
    (
        "frozenset",
        frozenset({"x", "y"}),
        "3d862e616de03abab5173029d549ac2e02927829c77edd5e12ec0d238ae85b17",
    ),
    (
        "aware_datetime",
        dt.datetime(2024, 3, 1, 12, 30, 15, 123456, tzinfo=IST),
        "91c5b4a82d9d3ba50b03cad6181b2016396b6102aceb57af019ea2eaf77e2498",
    ),
    (
        "naive_datetime",
        dt.datetime(2024, 3, 1, 12, 30),
        "3495b945c353ef6755a684e3628e1dc90faf5595684521ea4fc11709c4b2f0b2",
    ),
    (
        "date",
        dt.date(2024, 2, 29),
        "ccddb0135ba4f7bf393983909cce5eb7ac5d5c9f050bb7163d1cfa95787f58f4",
    ),
    (
        "time",
        dt.time(23, 59, 58, 1),
        "0e4e9fe238edbc86b832e1b2ccf24f90cc0ebb919bea35120af14ef21af33a87",
    ),
    (
        "timedelta",
        dt.timedelta(days=-1, seconds=5, microseconds=7),
        "2b533985bea033bcf1faa61c974bfb6af35acf2b74868aa9df18c12b53fd822b",
    ),
    (
        "decimal",
        Decimal("1.10"),
        "784dd05b2e160b879839c6d9f779159c2897fbc0cc593904bb8c67278221059d",
    ),
    (
        "uuid",
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "2a28f94db685a626ce1113919efd2ebcdf2f88de24fd1e42c84b55083d5b3d6c",
    ),
    ("enum", Color.RED, "63124245b8b1babd28163317fbcab3c0c6eb32c7ffd7dbef6c228432021776bb"),
    ("int_enum", Level.HIGH, "db28e7fd69d43f55c5657a9a81fe99a8e93c05a127b828332455611972429003"),
    (
        "pure_posix_path",
        PurePosixPath("/srv/data/file.txt"),
        "6793f774bee12f945f6475d481e9f420dd421b2f5353c3c88364d3cf7b84b4fb",
    ),
    (
        "pure_windows_path",
        PureWindowsPath("C:/Users/data.txt"),
        "8252d5ec9df5958294a909a07dd57f592e07855b21eec42fd7442680abe7cab7",
    ),
    ("dataclass", Point(1, 2), "2e5658bc7f2379e5711691bdb1148b3782cc743f704812979aaa9a7e09836a43"),
    (
        "namedtuple",
        Pair("k", 9),
        "46015a1853233e25f4aa150cddaa5fcfb0e693d0772c69470897288e8800c496",
    ),
    (
        "hook",
        Money("12.50", "EUR"),
        "9969599bd24c8d94bd47c1cf4e1306cd473445e85868bbc4785dd5e3cb606287",
    ),
]

CANONICAL_BYTES: list[tuple[object, bytes]] = [
    (None, b"N"),
    (True, b"T"),
    (7, b"i7;"),
    ("ab", b"s2:ab"),
    ([1, "a"], b"l2:i1;s1:a"),
    ({"b": 1, "a": 2}, b"d2:s1:ai2;s1:bi1;"),
]

ARGUMENTS_GOLDEN = "1677eef6755f96d4e114db7528c352ad3a73ca3d1d74fca53a1c138e55349b9b"


def test_fingerprint_version_is_pinned() -> None:
    # The golden vectors below belong to version 1; a new version needs new vectors.
    assert FINGERPRINT_VERSION == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [pytest.param(value, digest, id=name) for name, value, digest in GOLDEN],
)
def test_golden_vectors(value: object, expected: str) -> None:
    assert fingerprint_value(value) == expected


def test_golden_vectors_are_pairwise_distinct() -> None:
    digests = [digest for _, _, digest in GOLDEN]
    assert len(set(digests)) == len(digests)


@pytest.mark.parametrize(("value", "expected"), CANONICAL_BYTES, ids=repr)
def test_canonical_bytes_are_pinned(value: object, expected: bytes) -> None:
    assert canonical(value) == expected


@pytest.mark.parametrize(("value", "expected"), CANONICAL_BYTES, ids=repr)
def test_fingerprint_is_sha256_of_prefixed_canonical(value: object, expected: bytes) -> None:
    assert fingerprint_value(value) == hashlib.sha256(PREFIX + expected).hexdigest()


def test_arguments_golden_vector() -> None:
    names = ("order_id", "amount")
    assert fingerprint_arguments(names, {"order_id": "o-1", "amount": 100}) == ARGUMENTS_GOLDEN
    assert ArgumentsFingerprint(names)({"amount": 100, "order_id": "o-1"}) == ARGUMENTS_GOLDEN


# --------------------------------------------------------------------------------------------
# 2. Equality semantics
# --------------------------------------------------------------------------------------------


def test_dict_order_never_matters() -> None:
    a = {"a": 1, "b": [2, 3], 4: "four", (5, "x"): None}
    b = {(5, "x"): None, 4: "four", "b": [2, 3], "a": 1}
    assert list(a) != list(b)
    assert fingerprint_value(a) == fingerprint_value(b)


def test_set_and_frozenset_order_never_matter() -> None:
    # 1, 1025 and 2049 share a slot in a small hash table, so insertion order shows in iteration
    # order: the sets built below really do iterate in different orders.
    members = [1, 1025, 2049, "s", b"b"]
    for kind in (set, frozenset):
        built = [kind(order) for order in itertools.permutations(members)]
        assert len({tuple(b) for b in built}) > 1
        assert len({fingerprint_value(b) for b in built}) == 1
    assert fingerprint_value(set(members)) != fingerprint_value(frozenset(members))


def test_type_tags_keep_equal_looking_values_apart() -> None:
    values: list[object] = [
        1,
        1.0,
        True,
        "1",
        b"1",
        bytearray(b"1"),
        Decimal(1),
        [1],
        (1,),
        {1},
        frozenset({1}),
        {1: 1},
        Level.LOW,
    ]
    digests = [fingerprint_value(v) for v in values]
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert digests[i] != digests[j], (values[i], values[j])


def test_list_and_tuple_differ() -> None:
    assert fingerprint_value([1]) != fingerprint_value((1,))
    assert fingerprint_value([]) != fingerprint_value(())
    assert fingerprint_value([[1, 2]]) != fingerprint_value([(1, 2)])


def test_false_zero_and_empty_values_differ() -> None:
    values: list[object] = [None, False, 0, 0.0, "", b"", [], (), {}, set(), frozenset()]
    assert len({fingerprint_value(v) for v in values}) == len(values)


def test_positive_and_negative_zero_agree() -> None:
    assert fingerprint_value(0.0) == fingerprint_value(-0.0)
    assert fingerprint_value([0.0, {"k": -0.0}]) == fingerprint_value([-0.0, {"k": 0.0}])
    assert fingerprint_value(0.0) != fingerprint_value(0)
    assert fingerprint_value(0.0) != fingerprint_value(5e-324)


def test_distinct_floats_differ() -> None:
    values = [1.0, 1.0 + 2**-52, -1.0, 0.1, 1e308, 5e-324, math.inf, -math.inf, math.nan]
    assert len({fingerprint_value(v) for v in values}) == len(values)


def test_nan_always_encodes_the_same() -> None:
    negative_nan = -math.nan
    payload_nan = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_0000_1234))[0]
    assert math.isnan(payload_nan)
    assert fingerprint_value(math.nan) == fingerprint_value(float("nan"))
    assert fingerprint_value(math.nan) == fingerprint_value(negative_nan)
    assert fingerprint_value(math.nan) == fingerprint_value(payload_nan)


def test_equal_aware_datetimes_in_different_zones_agree() -> None:
    utc = dt.datetime(2024, 3, 1, 7, 0, 15, 123456, tzinfo=dt.timezone.utc)
    india = dt.datetime(2024, 3, 1, 12, 30, 15, 123456, tzinfo=IST)
    minus = dt.datetime(2024, 2, 29, 22, 0, 15, 123456, tzinfo=dt.timezone(-dt.timedelta(hours=9)))
    assert utc == india == minus
    assert fingerprint_value(utc) == fingerprint_value(india) == fingerprint_value(minus)
    assert fingerprint_value({"at": utc}) == fingerprint_value({"at": india})


def test_aware_and_naive_datetimes_differ() -> None:
    aware = dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
    naive = dt.datetime(2024, 3, 1, 12, 0)
    assert fingerprint_value(aware) != fingerprint_value(naive)
    later = aware + dt.timedelta(microseconds=1)
    assert fingerprint_value(aware) != fingerprint_value(later)
    assert fingerprint_value(naive) != fingerprint_value(naive.date())


def test_equal_decimals_agree() -> None:
    assert fingerprint_value(Decimal("1.0")) == fingerprint_value(Decimal("1.00"))
    assert fingerprint_value(Decimal("1.1")) == fingerprint_value(Decimal("1.10"))
    assert fingerprint_value(Decimal("100")) == fingerprint_value(Decimal("1E+2"))
    assert fingerprint_value(Decimal("0")) == fingerprint_value(Decimal("-0.00"))
    assert fingerprint_value(Decimal("0")) == fingerprint_value(Decimal("0E+5"))


def test_unequal_decimals_differ() -> None:
    values = [
        Decimal("1"),
        Decimal("-1"),
        Decimal("10"),
        Decimal("0.1"),
        Decimal("1.1"),
        Decimal("11"),
        Decimal("0"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        Decimal("NaN"),
    ]
    assert len({fingerprint_value(v) for v in values}) == len(values)


def test_str_subclass_agrees_with_str() -> None:
    assert fingerprint_value(Str("héllo")) == fingerprint_value("héllo")
    assert fingerprint_value({Str("k"): [Str("v")]}) == fingerprint_value({"k": ["v"]})
    assert fingerprint_value(Str("a")) != fingerprint_value("b")


def test_paths() -> None:
    assert fingerprint_value(PurePosixPath("a//b/")) == fingerprint_value(PurePosixPath("a/b"))
    assert fingerprint_value(PurePosixPath("a/b")) != fingerprint_value("a/b")
    assert fingerprint_value(PurePosixPath("a/b")) != fingerprint_value(PureWindowsPath("a/b"))
    assert fingerprint_value(PurePosixPath("a/b")) != fingerprint_value(PurePosixPath("a/c"))


def test_nested_structures() -> None:
    a = {"items": [{"sku": "x", "qty": 2}, {"qty": 1, "sku": "y"}], "tags": {"b", "a"}}
    b = {"tags": {"a", "b"}, "items": [{"qty": 2, "sku": "x"}, {"sku": "y", "qty": 1}]}
    assert fingerprint_value(a) == fingerprint_value(b)
    # Order inside lists is significant.
    c = {"tags": {"a", "b"}, "items": [{"sku": "y", "qty": 1}, {"sku": "x", "qty": 2}]}
    assert fingerprint_value(a) != fingerprint_value(c)
    # So is every leaf.
    d = {"items": [{"sku": "x", "qty": 2}, {"qty": 1, "sku": "y"}], "tags": {"b", "c"}}
    assert fingerprint_value(a) != fingerprint_value(d)


def test_dataclass_and_namedtuple() -> None:
    assert fingerprint_value(Point(1, 2)) == fingerprint_value(Point(1, 2))
    assert fingerprint_value(Point(1, 2)) != fingerprint_value(Point(2, 1))
    assert fingerprint_value(Pair("k", 9)) != fingerprint_value(("k", 9))
    assert fingerprint_value(Color.RED) != fingerprint_value("red")
    assert fingerprint_value(Level.HIGH) != fingerprint_value(3)


def _reference_arguments(names: tuple[str, ...], arguments: dict[str, object]) -> str:
    """The argument layout spelled out with ``canonical``: the fast path must match it."""
    body = b"".join(canonical(name) + canonical(arguments[name]) for name in names)
    return hashlib.sha256(PREFIX + b"a%d:" % len(names) + body).hexdigest()


def test_arguments_ignore_mapping_order() -> None:
    names = ("a", "b", "c")
    forward = {"a": "x", "b": 2, "c": [1.5, {"k"}]}
    backward = {"c": [1.5, {"k"}], "b": 2, "a": "x"}
    assert fingerprint_arguments(names, forward) == fingerprint_arguments(names, backward)
    # The names' order (the signature's) is what counts.
    assert fingerprint_arguments(names, forward) != fingerprint_arguments(("c", "b", "a"), forward)


@pytest.mark.parametrize(
    "value",
    [
        "o-1",
        "",
        "héllo",
        "\ud800",
        Str("héllo"),
        0,
        -7,
        2**100,
        -(2**70),
        True,
        1.0,
        None,
        b"bytes",
        [1, "a"],
        {"k": {1, 2}},
        Decimal("2.50"),
        Point(1, 2),
        Level.HIGH,
    ],
    ids=repr,
)
def test_arguments_fast_and_slow_paths_agree(value: object) -> None:
    names = ("first", "x")
    arguments = {"first": 1, "x": value}
    expected = _reference_arguments(names, arguments)
    assert ArgumentsFingerprint(names)(arguments) == expected
    assert fingerprint_arguments(names, arguments) == expected


def test_arguments_str_subclass_agrees_with_str_on_the_fast_path() -> None:
    names = ("s",)
    fast = fingerprint_arguments(names, {"s": "héllo\ud800"})
    assert fingerprint_arguments(names, {"s": Str("héllo\ud800")}) == fast


def test_arguments_bind_names_to_values() -> None:
    fp = ArgumentsFingerprint(("a", "b"))
    assert fp({"a": 1, "b": 2}) != fp({"a": 2, "b": 1})
    assert fp({"a": "1", "b": 2}) != fp({"a": 1, "b": 2})
    assert fingerprint_arguments(("a",), {"a": 1}) != fingerprint_arguments(("b",), {"b": 1})
    assert fingerprint_arguments((), {}) != fingerprint_arguments(("a",), {"a": None})
    # An argument fingerprint is not the fingerprint of the bare value.
    assert fingerprint_arguments(("a",), {"a": 1}) != fingerprint_value(1)


def test_arguments_fingerprint_is_reusable() -> None:
    fp = ArgumentsFingerprint(["a", "b"])
    first = fp({"a": "x", "b": 1})
    fp({"a": "y", "b": 2})
    assert fp({"a": "x", "b": 1}) == first


# --------------------------------------------------------------------------------------------
# 3. Properties
# --------------------------------------------------------------------------------------------

# Any code point, lone surrogates included (st.characters() alone almost never draws them).
_TEXT = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=8),
    st.text(st.sampled_from("a\x00é😀\ud800\udbff\udc00\udfff"), max_size=6),
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf]),
    _TEXT,
    st.binary(max_size=8),
)
_HASHABLE = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(tuple),
        st.frozensets(inner, max_size=3),
    ),
    max_leaves=4,
)
_VALUES = st.recursive(
    _HASHABLE,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(_HASHABLE, inner, max_size=3),
        st.frozensets(_HASHABLE, max_size=3),
        st.sets(_HASHABLE, max_size=3),
    ),
    max_leaves=6,
)

# A small domain, so that independent draws are often equal or nearly equal.
_SMALL_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, math.inf, math.nan]),
    st.text("a1\ud800", max_size=2),
    st.binary(max_size=1),
)
_SMALL_HASHABLE = st.recursive(
    _SMALL_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=2).map(tuple), st.frozensets(inner, max_size=2)
    ),
    max_leaves=4,
)
_SMALL_VALUES = st.recursive(
    _SMALL_HASHABLE,
    lambda inner: st.one_of(
        st.lists(inner, max_size=2),
        st.dictionaries(_SMALL_HASHABLE, inner, max_size=2),
        st.sets(_SMALL_HASHABLE, max_size=2),
    ),
    max_leaves=5,
)

# No deadline and no too_slow check: generation is slow on a loaded CI machine, not wrong.
_PROPERTY = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _contains_nan(value: object) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(_contains_nan(k) or _contains_nan(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_contains_nan(v) for v in value)
    return False


def _equivalent(value: object, rnd: random.Random) -> object:
    """An equal copy of ``value`` with the same types, built differently: zero signs flipped,
    str turned into a str subclass, dicts and sets rebuilt in a shuffled order."""
    kind = type(value)
    if kind is float:
        assert isinstance(value, float)
        return -value if value == 0.0 else value
    if kind is str:
        assert isinstance(value, str)
        return Str(value)
    if kind is list:
        assert isinstance(value, list)
        return [_equivalent(v, rnd) for v in value]
    if kind is tuple:
        assert isinstance(value, tuple)
        return tuple(_equivalent(v, rnd) for v in value)
    if kind is dict:
        assert isinstance(value, dict)
        items = [(_equivalent(k, rnd), _equivalent(v, rnd)) for k, v in value.items()]
        rnd.shuffle(items)
        return dict(items)
    if kind in (set, frozenset):
        assert isinstance(value, (set, frozenset))
        members = [_equivalent(v, rnd) for v in value]
        rnd.shuffle(members)
        return kind(members)
    return value


@_PROPERTY
@given(
    st.dictionaries(_HASHABLE, st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3)), max_size=6),
    st.randoms(use_true_random=False),
)
def test_property_dict_order_is_irrelevant(value: dict[object, object], rnd: random.Random) -> None:
    items = list(value.items())
    rnd.shuffle(items)
    shuffled = dict(items)
    assert fingerprint_value(shuffled) == fingerprint_value(value)
    assert canonical(shuffled) == canonical(value)


@_PROPERTY
@given(
    st.lists(_HASHABLE, max_size=6, unique=True).flatmap(
        lambda xs: st.tuples(st.just(xs), st.permutations(xs))
    )
)
def test_property_set_construction_order_is_irrelevant(
    orders: tuple[list[object], list[object]],
) -> None:
    # unique=True dedupes by equality, so no two members are equal-but-different (1 and True):
    # whichever order builds the set, it holds the same members.
    original, permuted = orders
    assert fingerprint_value(set(permuted)) == fingerprint_value(set(original))
    assert fingerprint_value(frozenset(permuted)) == fingerprint_value(frozenset(original))


@_PROPERTY
@given(_VALUES, st.randoms(use_true_random=False))
def test_property_equal_rebuilt_values_agree(value: object, rnd: random.Random) -> None:
    assert fingerprint_value(_equivalent(value, rnd)) == fingerprint_value(value)


@_PROPERTY
@given(_VALUES)
def test_property_no_collisions_across_type_tags(value: object) -> None:
    fp = fingerprint_value(value)
    if type(value) is not str:
        assert fingerprint_value(str(value)) != fp
    text = str(value)
    assert fingerprint_value(text) != fingerprint_value(text.encode("utf-8", "surrogatepass"))
    assert fingerprint_value([value]) != fp
    assert fingerprint_value((value,)) != fp
    assert fingerprint_value([value]) != fingerprint_value((value,))
    if isinstance(value, (list, tuple)):
        assert fingerprint_value(list(value)) != fingerprint_value(tuple(value))
    if isinstance(value, bytes):
        assert fingerprint_value(bytearray(value)) != fp
    if isinstance(value, (set, frozenset)):
        assert fingerprint_value(set(value)) != fingerprint_value(frozenset(value))


@_PROPERTY
@given(_VALUES, st.one_of(_SCALARS, _HASHABLE))
def test_property_different_types_never_collide(a: object, b: object) -> None:
    if type(a) is not type(b):
        assert fingerprint_value(a) != fingerprint_value(b)


@_PROPERTY
@given(st.one_of(st.tuples(_SMALL_VALUES, _SMALL_VALUES), st.tuples(_VALUES, _VALUES)))
def test_property_unequal_values_differ(pair: tuple[object, object]) -> None:
    a, b = pair
    if _contains_nan(a) or _contains_nan(b):
        return  # nan != nan, yet every nan has the same encoding
    if a != b:
        assert fingerprint_value(a) != fingerprint_value(b)
        assert canonical(a) != canonical(b)
    elif type(a) is type(b) and type(a) in (type(None), bool, int, float, str, bytes):
        # Equal scalars of the same type (including 0.0 and -0.0) agree.
        assert fingerprint_value(a) == fingerprint_value(b)


@_PROPERTY
@given(
    st.dictionaries(
        st.text("abcdef_", min_size=1, max_size=4),
        st.one_of(_TEXT, st.integers(), _VALUES),
        max_size=4,
    ),
    st.randoms(use_true_random=False),
)
def test_property_arguments_fingerprint(arguments: dict[str, object], rnd: random.Random) -> None:
    names = tuple(arguments)
    expected = _reference_arguments(names, arguments)
    items = list(arguments.items())
    rnd.shuffle(items)
    assert ArgumentsFingerprint(names)(dict(items)) == expected
    assert fingerprint_arguments(list(names), arguments) == expected


# --------------------------------------------------------------------------------------------
# 4. Cross-process determinism
# --------------------------------------------------------------------------------------------

_DETERMINISM_VALUES = """
import datetime as dt
from decimal import Decimal

WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
    "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
]
VALUES = [
    set(WORDS),
    frozenset(WORDS),
    {word: index for index, word in enumerate(WORDS)},
    {word.encode(): word for word in WORDS},
    {(word, word[:2]) for word in WORDS},
    {word: set(word) for word in WORDS},
    [frozenset({"p", "q", "r"}), {"z": frozenset({"m", "n"}), "y": {"o": ["k"]}}],
    {frozenset(WORDS[:5]): set(WORDS[5:10])},
    dt.datetime(2024, 3, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=-4))),
    Decimal("1.10"),
    -0.0,
    "\\ud800",
]
"""

_DETERMINISM_CHILD = (
    _DETERMINISM_VALUES
    + """
from idemfn._fingerprint import fingerprint_arguments, fingerprint_value

for value in VALUES:
    print(fingerprint_value(value))
print(fingerprint_arguments(["words", "index"], {"index": VALUES[2], "words": VALUES[0]}))
print("ORDER", list(VALUES[0]))
"""
)


def _run_child(hash_seed: str) -> tuple[list[str], str]:
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = hash_seed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", _DETERMINISM_CHILD],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("ORDER ")
    return lines[:-1], lines[-1]


def test_fingerprints_agree_across_processes_and_hash_seeds() -> None:
    namespace: dict[str, object] = {}
    exec(_DETERMINISM_VALUES, namespace)
    values = namespace["VALUES"]
    assert isinstance(values, list)
    parent = [fingerprint_value(value) for value in values]
    parent.append(
        fingerprint_arguments(["words", "index"], {"index": values[2], "words": values[0]})
    )

    children = {seed: _run_child(seed) for seed in ("0", "12345", "random")}
    # The test is only meaningful if the hash seed really changes iteration order.
    assert children["0"][1] != children["12345"][1]
    for seed, (lines, _) in children.items():
        assert lines == parent, f"PYTHONHASHSEED={seed}"


# --------------------------------------------------------------------------------------------
# 5. Errors
# --------------------------------------------------------------------------------------------


class Widget:
    """A plain class with no canonical form."""


def _assert_ways_out(message: str) -> None:
    assert "fingerprint=" in message
    assert "__idemfn_fingerprint__" in message


def test_unsupported_value_inside_an_argument() -> None:
    order = {"id": "o-1", "items": ["a", "b", object()]}
    with pytest.raises(TypeError) as info:
        fingerprint_arguments(("order",), {"order": order})
    message = str(info.value)
    assert "argument 'order'" in message
    assert "order['items'][2]" in message
    assert "object" in message
    _assert_ways_out(message)


def test_unsupported_argument_itself() -> None:
    with pytest.raises(TypeError) as info:
        fingerprint_arguments(("amount", "callback"), {"amount": 1, "callback": lambda: None})
    message = str(info.value)
    assert "argument 'callback'" in message
    assert "function" in message
    _assert_ways_out(message)


def test_unsupported_custom_class_instance() -> None:
    with pytest.raises(TypeError) as info:
        ArgumentsFingerprint(("w",))({"w": Point(1, Widget())})  # type: ignore[arg-type]
    message = str(info.value)
    assert "argument 'w'" in message
    assert "Widget" in message
    assert "w.y" in message
    _assert_ways_out(message)


def test_unsupported_value_without_an_argument_name() -> None:
    with pytest.raises(TypeError) as info:
        fingerprint_value([1, {"k": Widget()}])
    message = str(info.value)
    assert "Widget" in message
    assert "[1]['k']" in message
    _assert_ways_out(message)
    with pytest.raises(TypeError, match="payload"):
        fingerprint_value(Widget(), where="payload")


def test_unsupported_set_member_and_dict_key() -> None:
    with pytest.raises(TypeError, match="Widget"):
        fingerprint_value({Widget()})
    with pytest.raises(TypeError, match="Widget"):
        fingerprint_value({Widget(): 1})


def test_self_referencing_list_is_a_value_error() -> None:
    loop: list[object] = [1]
    loop.append(loop)
    with pytest.raises(ValueError, match="argument 'xs'"):
        fingerprint_arguments(("xs",), {"xs": loop})
    with pytest.raises(ValueError, match="itself"):
        fingerprint_value(loop)


def test_self_referencing_dict_is_a_value_error() -> None:
    loop: dict[str, object] = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="argument 'd'"):
        ArgumentsFingerprint(("d",))({"d": loop})


def test_hook_returning_unsupported_value_is_a_type_error() -> None:
    class BadHook:
        def __idemfn_fingerprint__(self) -> object:
            return {"inner": object()}

    with pytest.raises(TypeError) as info:
        fingerprint_arguments(("h",), {"h": BadHook()})
    message = str(info.value)
    assert "argument 'h'" in message
    assert "object" in message
    _assert_ways_out(message)


# --------------------------------------------------------------------------------------------
# 6. The __idemfn_fingerprint__ hook
# --------------------------------------------------------------------------------------------


def test_hook_equal_values_agree() -> None:
    assert fingerprint_value(Money("1.0", "EUR")) == fingerprint_value(Money("1.00", "EUR"))
    assert fingerprint_value([Money("5", "USD")]) == fingerprint_value([Money("5", "USD")])


def test_hook_unequal_values_differ() -> None:
    assert fingerprint_value(Money("1", "EUR")) != fingerprint_value(Money("2", "EUR"))
    assert fingerprint_value(Money("1", "EUR")) != fingerprint_value(Money("1", "USD"))


def test_hook_class_name_is_part_of_the_encoding() -> None:
    class Euro:
        def __idemfn_fingerprint__(self) -> object:
            return 5

    class Dollar:
        def __idemfn_fingerprint__(self) -> object:
            return 5

    assert fingerprint_value(Euro()) == fingerprint_value(Euro())
    assert fingerprint_value(Euro()) != fingerprint_value(Dollar())
    # Nor is a hooked object the same as the value its hook returns.
    assert fingerprint_value(Euro()) != fingerprint_value(5)


def test_hook_takes_precedence_over_builtin_base() -> None:
    class Tagged(str):
        __slots__ = ()

        def __idemfn_fingerprint__(self) -> object:
            return str(self).lower()

    assert fingerprint_value(Tagged("ABC")) == fingerprint_value(Tagged("abc"))
    assert fingerprint_value(Tagged("abc")) != fingerprint_value("abc")


# -- regressions found in review --------------------------------------------------------------


def test_equal_windows_paths_agree() -> None:
    from pathlib import PureWindowsPath

    assert PureWindowsPath("C:/A") == PureWindowsPath("c:/a")
    assert fingerprint_value(PureWindowsPath("C:/A")) == fingerprint_value(PureWindowsPath("c:/a"))
    assert fingerprint_value(PureWindowsPath("C:/A")) != fingerprint_value(PureWindowsPath("C:/B"))


def test_equal_aware_times_agree() -> None:
    utc_noon = dt.time(12, tzinfo=dt.timezone.utc)
    plus_one = dt.time(13, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert utc_noon == plus_one
    assert fingerprint_value(utc_noon) == fingerprint_value(plus_one)
    assert fingerprint_value(utc_noon) != fingerprint_value(dt.time(12))  # naive differs


def test_huge_ints_do_not_depend_on_the_digit_limit() -> None:
    import subprocess
    import sys

    code = (
        "from idemfn._fingerprint import fingerprint_value, fingerprint_arguments;"
        "print(fingerprint_value(10**5000), fingerprint_arguments(['n'], {'n': -(10**5000)}))"
    )
    outputs = set()
    for limit in ("0", "640", "4300"):
        env = {"PYTHONINTMAXSTRDIGITS": limit, "PATH": ""}
        outputs.add(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout
        )
    assert len(outputs) == 1
    assert fingerprint_value(2**2000) != fingerprint_value(2**2000 + 1)


def test_aware_datetimes_at_the_range_limits() -> None:
    late = dt.datetime.max.replace(tzinfo=dt.timezone(-dt.timedelta(hours=1)))
    same_instant = (dt.datetime.max - dt.timedelta(hours=1)).replace(
        tzinfo=dt.timezone(-dt.timedelta(hours=2))
    )
    assert late == same_instant
    assert fingerprint_value(late) == fingerprint_value(same_instant)
    early = dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert fingerprint_value(early) != fingerprint_value(late)


def test_dataclass_fields_outside_equality_are_left_out() -> None:
    @dataclasses.dataclass
    class D:
        x: int
        y: int = dataclasses.field(default=0, compare=False)

    assert D(1, 2) == D(1, 3)
    assert fingerprint_value(D(1, 2)) == fingerprint_value(D(1, 3))
    assert fingerprint_value(D(1, 2)) != fingerprint_value(D(2, 2))


def test_dataclass_field_never_set_is_a_type_error() -> None:
    @dataclasses.dataclass
    class E:
        x: int = dataclasses.field(init=False)

    with pytest.raises(TypeError, match="field 'x' is not set"):
        fingerprint_arguments(["e"], {"e": E()})


def test_error_path_for_keys_and_members_is_readable() -> None:
    class Widget:
        pass

    with pytest.raises(TypeError) as info:
        fingerprint_arguments(["m"], {"m": {Widget(): 1}})
    assert "(at m (key <" in str(info.value)
    with pytest.raises(TypeError) as info:
        fingerprint_value([Widget()], where="payload")
    assert "(at payload[0])" in str(info.value)
