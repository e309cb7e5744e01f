"""Tests for ``idemfn._fingerprint``: the canonical encoding behind every argument fingerprint.

The golden vectors below (``VECTORS``, ``ARGUMENTS_GOLDEN``) are written out: each value's
canonical bytes by hand from the layout, and the sha256 of those bytes under the version prefix
(a test checks the two columns agree without the code under test). Fingerprints are stored by
users alongside their records: changing any of these vectors breaks every user's stored
fingerprints (replays turn into mismatches). Never edit a vector to make a test pass; if the
encoding really has to change, bump ``FINGERPRINT_VERSION`` (and the prefix it drives) instead,
and add a new table for the new version. Version 2 (issue 13) replaced version 1, whose table
``GOLDEN_V1`` still pins every encoding version 2 did not change.

The classes used by the golden vectors live at module level in ``tests/support/values.py`` on
purpose: their ``__qualname__`` is part of the encoding, so moving them into a function would
change their vectors.
"""

from __future__ import annotations

import collections
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
from typing import TYPE_CHECKING

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
from tests.support.values import Color, Level, Money, Pair, Point, Str, ToyZone

if TYPE_CHECKING:
    import random

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFIX = b"idemfn-fp/2\n"


# --------------------------------------------------------------------------------------------
# 1. Golden vectors
# --------------------------------------------------------------------------------------------

IST = dt.timezone(dt.timedelta(hours=5, minutes=30))
UTC = dt.timezone.utc


def _offset(**kwargs: float) -> dt.timezone:
    return dt.timezone(dt.timedelta(**kwargs))


TOY = ToyZone()

# Version 2: each value, its canonical encoding written out by hand from the layout (so a reader
# can check it without running anything), and the fingerprint users store. Numbers worth
# checking: 2024-03-01 is day 738946 (date.toordinal), 2024-03-31 day 738976; an aware
# datetime is microseconds from 0001-01-01 00:00 UTC to its instant, a time in a fold or gap of
# its zone also its wall time and zone; an aware time is seconds past midnight minus the
# offset's whole seconds, its microseconds, the offset's microseconds.
VECTORS: list[tuple[str, object, bytes, str]] = [
    ("none", None, b"N", "c592a7b4a7ea0f6ac9c52bd5c2900743bec07a492eccb001c8242a8ac0434633"),
    ("true", True, b"T", "218d945a8d6aae0262a4fa15140e357118140892016a2d6094780528ec5e9b70"),
    ("false", False, b"F", "56279dee89e0e21af307b0c997d59122b273e14f02ec71b55cf49e3c51eb7d9e"),
    ("zero", 0, b"i0;", "f30572d3b49f9e0a8590146addc219ef3617bb5a7732d651105af29ce01a4d5d"),
    (
        "negative_int",
        -5,
        b"i-5;",
        "0274b43ed595b98c84bda6584036be6a94498929efd78c6a55b69de11917c23d",
    ),
    (
        "big_int",
        2**100,
        b"i1267650600228229401496703205376;",
        "5fe7059c98300b80be8c152d119ebcd584b552a0a986723ad0bf9eed956258f0",
    ),
    (
        "huge_int",
        2**2000,
        b"I1" + b"0" * 500 + b";",
        "d828c845de64931bc9c8eb89477aa71e36b4adad34a7c89537216e48d329a248",
    ),
    (
        "float",
        1.5,
        b"f0x1.8000000000000p+0;",
        "848604faa9518c4a4baf866f0a54a31277debb726e07e903fc23fb7e5d8a95d6",
    ),
    (
        "negative_zero",
        -0.0,
        b"f0;",
        "8ec23d2c6fbdf15f44c58f2a77a5a6b70308ecddab62068eb1e0d1b12ecc3d4a",
    ),
    (
        "nan",
        float("nan"),
        b"fnan;",
        "9278aff1ee8652e5e981eea3f55c84f9fda4b11ba609aa618e11914d74702d8a",
    ),
    (
        "inf",
        float("inf"),
        b"finf;",
        "0a0efad4f5e76f6bcd30d6ff3151561dd4e0e853e6fc4f9c085b00e3033601f5",
    ),
    (
        "negative_inf",
        float("-inf"),
        b"f-inf;",
        "3b0c11910af4e5d0e74da7c0dd5943ad65ee1c6a68ce4b7679f51d5b4f9e6460",
    ),
    ("empty_str", "", b"s0:", "7abf64d6b7a9babbd6d1d047ac255b13e5b400eb588e701eb43c87aaa36e61d4"),
    (
        "unicode_str",
        "h\u00e9llo",
        b"s6:h\xc3\xa9llo",
        "b6c5f07122b3a5c390091fa22afda79062a07064d887ecd07e504d4e381a1bab",
    ),
    (
        "lone_surrogate",
        "\ud800",
        b"s3:\xed\xa0\x80",
        "73a8d70d27fff16a0fe50928a64a6ede9548cb204b94cfe4a0f231ef228f5345",
    ),
    (
        "bytes",
        b"\x00\xff",
        b"b2:\x00\xff",
        "53896674f0a89d46f5961090a041843e5b35e3b0b50df6017f4d4a8795bc3d82",
    ),
    (
        "bytearray",
        bytearray(b"\x00\xff"),
        b"y2:\x00\xff",
        "800c5bef76a99f7f3323aba8c42c11ef7dc6cb388061c1e0008692c579cb3405",
    ),
    (
        "list",
        [1, "a", None],
        b"l3:i1;s1:aN",
        "03d471df240e1770f6b0125e298997f5525911fb376baecad220b094c9b78199",
    ),
    (
        "tuple",
        (1, 2.5),
        b"t2:i1;f0x1.4000000000000p+1;",
        "da526b9fecc5faeeafea2d8dbc7f893ea6140574f99d251165708b996cc41a56",
    ),
    (
        "nested_dict",
        {"b": [1, {"c": (True,)}], "a": {"x": b"y"}},
        b"d2:s1:ad1:s1:xb1:ys1:bl2:i1;d1:s1:ct1:T",
        "740baf542eaaa3239543441ceed3fd01994e098244b7b2e39b36da1cf3b2754b",
    ),
    (
        "set",
        {3, 1, 2},
        b"S3:i1;i2;i3;",
        "c081cc6daf50316ccf371f703aba496404f45da1b4f363245b17b646a8270306",
    ),
    (
        "frozenset",
        frozenset({"x", "y"}),
        b"Z2:s1:xs1:y",
        "692a621da0bd593738db3b5a1d7f5adc50a8f59742695b9c032ee4286d75e951",
    ),
    (
        "ordered_dict",
        collections.OrderedDict([("b", 1), ("a", 2)]),
        b"O2:s1:bi1;s1:ai2;",
        "e608e8ef1aa52eba7fd004ca6534e45a3cb7d6dce7dae0c01b199c58aab5077e",
    ),
    (
        "aware_datetime",
        dt.datetime(2024, 3, 1, 12, 30, 15, 123456, tzinfo=IST),  # 07:00:15.123456 UTC
        b"A63844959615123456;",
        "8db094db47b97b42ffb600aad5bab77981ff05ffcc67b9575d5facd8d3263c5a",
    ),
    (
        "aware_datetime_in_a_gap",  # 02:30 does not exist in TOY that day; fold=0: UTC+1
        dt.datetime(2024, 3, 31, 2, 30, tzinfo=TOY),
        b"G63847531800000000,63847535400000000;s16:ToyZone:Toy/Zone",
        "b09a0d1808f9fe4401cd933ced351cf6ded2f4ea46218b4de317e4c6cbf8deb3",
    ),
    (
        "naive_datetime",
        dt.datetime(2024, 3, 1, 12, 30),
        b"Ws19:2024-03-01T12:30:00",
        "40913f1fcd1622dc8256eeec75c4e8a7058ce4533b94d5357c25c28bd908e553",
    ),
    (
        "date",
        dt.date(2024, 2, 29),
        b"Ds10:2024-02-29",
        "acf65ef76125eb4c7721fa85976170743e49950daef1472c1ce7c4eccde237f9",
    ),
    (
        "time",
        dt.time(23, 59, 58, 1),
        b"Hs15:23:59:58.000001",
        "e416302f6e6780a3515fe2948519fe2baadb082e86a10b04090a30525fcaf18b",
    ),
    (
        "aware_time",
        dt.time(10, 0, tzinfo=UTC),
        b"h36000,0,0;",
        "1753b840205bccec23072ac0c10b8c500f01a094f62bfb13e68aa66a085519d6",
    ),
    (
        "aware_time_30s_offset",
        dt.time(10, 0, tzinfo=_offset(seconds=30)),
        b"h35970,0,0;",
        "5f7aff16875de2eca805591a4435e5a8f629d2a3fb73b1da9008febe2c5e3dda",
    ),
    (
        "aware_time_half_second_offset",  # offset = -1 day + 86399.5 s
        dt.time(10, 0, 0, 5, tzinfo=_offset(microseconds=-500_000)),
        b"h36001,5,500000;",
        "3023e3c11e619bfe8e60bf2b6454f1d4c9ea3899d2fb699422afb485aabbb5e4",
    ),
    (
        "timedelta",
        dt.timedelta(days=-1, seconds=5, microseconds=7),
        b"R-1,5,7;",
        "b48cf27e9dbd79fc1b0a4e2726f1287d3464f8dfd64e0bedf388340a6c128ae5",
    ),
    (
        "decimal",
        Decimal("1.10"),
        b"Ms5:11e-1",
        "d04303e076042f6b01a05fd8a130f83f5d280e16832c2e8c7c88a7bed43dfbe3",
    ),
    (
        "decimal_nan",
        Decimal("NaN"),
        b"Ms3:nan",
        "93c904e3d9c161e7d3147d5fc17e4087f1a6172ea2e8168316b2dd799bb8af24",
    ),
    (
        "decimal_signalling_nan",
        Decimal("-sNaN12"),
        b"Ms7:-snan12",
        "f2be7bb34ed2fd1bafdd77d3b57530444c23d00b478d2c52b203c1cb63151009",
    ),
    (
        "decimal_infinity",
        Decimal("-Infinity"),
        b"Ms4:-inf",
        "b91463b63b3ed421205ac6af8f8269da10bcf77fc93d5f0f1c4170abb34834d5",
    ),
    (
        "uuid",
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        b"U16:\x124Vx\x124Vx\x124Vx\x124Vx",
        "3a2b4d634c7969bd2a16a30d5b57b90705a4d483af59ccd9a44fa708f6593cc2",
    ),
    (
        "enum",
        Color.RED,
        b"Es5:Colors3:red",
        "9f94e0b03fc1e89f0bd603d37993e14e5ce1d1a8c187e00f2881c91792f9bf17",
    ),
    (
        "int_enum",
        Level.HIGH,
        b"Es5:Leveli3;",
        "89bbe372a5a23005bcf5d82bdc6f80dd0bb04f25c0571c97e3ce74d4105878d9",
    ),
    (
        "pure_posix_path",
        PurePosixPath("/srv/data/file.txt"),
        b"Pps18:/srv/data/file.txt",
        "9ef5cc99af9680cacdb16070448e4822a6927473c5c105e6f5434c271feaa215",
    ),
    (
        "pure_windows_path",
        PureWindowsPath("C:/Users/data.txt"),
        b"Pws17:c:\\users\\data.txt",
        "b2c2b6a50288dfcf6def5942b675abb22df76fc2f48cb9e1893f00e7fd4a4069",
    ),
    (
        "dataclass",
        Point(1, 2),
        b"Cs5:Point2:s1:xi1;s1:yi2;",
        "ce7a251f10c57afbe814e8ce6a0f8150fbca3a4d0594960975f9a17cda442dfd",
    ),
    (
        "namedtuple",
        Pair("k", 9),
        b"Qs4:Pair2:s3:keys1:ks4:sizei9;",
        "543d729fb8ec5208d28759707ceae07d64ea4931595e0964c9699de53d6ea4aa",
    ),
    (
        "hook",
        Money("12.50", "EUR"),
        b"Xs5:Moneyt2:s3:EURMs6:125e-1",
        "ec923fada68cebcbd6c859f19caaf7f219c1e22ebf46caa2555baae4524bb360",
    ),
]

# f(order_id="o-1", amount=100): the arguments in signature order, each name then its value.
ARGUMENTS_BYTES = b"a2:s8:order_ids3:o-1s6:amounti100;"
ARGUMENTS_GOLDEN = "e5424d1bb20cfb1a912999d9ec94982e13dd49540de6a0e8ccbcccd2089ff695"

# Version 1, kept for what it still proves: every value whose encoding version 2 did not change
# still encodes as it did (only the prefix moved). Never edit; version 1 is frozen.
V1_PREFIX = b"idemfn-fp/1\n"
V1_CHANGED = {"aware_datetime"}  # version 2 writes aware datetimes as a count of microseconds
GOLDEN_V1: list[tuple[str, object, str]] = [
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


def test_fingerprint_version_is_pinned() -> None:
    # VECTORS belong to version 2; a new version needs new vectors (and keeps these).
    assert FINGERPRINT_VERSION == 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [pytest.param(value, digest, id=name) for name, value, _, digest in VECTORS],
)
def test_golden_vectors(value: object, expected: str) -> None:
    assert fingerprint_value(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [pytest.param(value, encoded, id=name) for name, value, encoded, _ in VECTORS],
)
def test_canonical_bytes_are_pinned(value: object, expected: bytes) -> None:
    assert canonical(value) == expected


@pytest.mark.parametrize(("name", "encoded", "digest"), [(n, e, d) for n, _, e, d in VECTORS])
def test_golden_digests_are_sha256_of_the_written_bytes(
    name: str, encoded: bytes, digest: str
) -> None:
    # The table checks itself, without the code under test: the two columns say the same.
    assert hashlib.sha256(PREFIX + encoded).hexdigest() == digest, name


def test_golden_vectors_are_pairwise_distinct() -> None:
    digests = [digest for _, _, _, digest in VECTORS]
    assert len(set(digests)) == len(digests)
    encodings = [encoded for _, _, encoded, _ in VECTORS]
    for a, b in itertools.permutations(encodings, 2):
        assert not b.startswith(a)  # no encoding is a prefix of another


def test_arguments_golden_vector() -> None:
    names = ("order_id", "amount")
    assert hashlib.sha256(PREFIX + ARGUMENTS_BYTES).hexdigest() == ARGUMENTS_GOLDEN
    assert fingerprint_arguments(names, {"order_id": "o-1", "amount": 100}) == ARGUMENTS_GOLDEN
    assert ArgumentsFingerprint(names)({"amount": 100, "order_id": "o-1"}) == ARGUMENTS_GOLDEN


@pytest.mark.parametrize(
    ("value", "v1_digest"),
    [pytest.param(v, d, id=n) for n, v, d in GOLDEN_V1 if n not in V1_CHANGED],
)
def test_version_2_changed_nothing_else(value: object, v1_digest: str) -> None:
    assert hashlib.sha256(V1_PREFIX + canonical(value)).hexdigest() == v1_digest


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


# --------------------------------------------------------------------------------------------
# 7. Issue 13 (A9): no lossy encodings. Each unequal pair below shared a fingerprint in version 1
# --------------------------------------------------------------------------------------------


def _zone(name: str) -> dt.tzinfo:
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        return zoneinfo.ZoneInfo(name)  # type: ignore[no-any-return]
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip(f"no tz database entry for {name}")


def test_aware_times_whose_offsets_differ_by_seconds_differ() -> None:
    plus_30s = dt.time(10, 0, tzinfo=_offset(seconds=30))
    utc = dt.time(10, 0, tzinfo=UTC)
    assert plus_30s != utc
    assert fingerprint_value(plus_30s) != fingerprint_value(utc)
    minus_30s = dt.time(10, 0, tzinfo=_offset(seconds=-30))
    assert len({fingerprint_value(t) for t in (plus_30s, utc, minus_30s)}) == 3
    # Equal times still agree, offsets in seconds included.
    same_instant = dt.time(10, 0, 30, tzinfo=_offset(seconds=30))
    assert same_instant == utc
    assert fingerprint_value(same_instant) == fingerprint_value(utc)
    assert fingerprint_value(
        dt.time(11, 1, 1, 7, tzinfo=_offset(hours=1, minutes=1, seconds=1))
    ) == fingerprint_value(dt.time(10, 0, 0, 7, tzinfo=UTC))


def test_aware_times_python_calls_equal_but_that_lie_apart_differ() -> None:
    # CPython ignores an offset's microseconds when comparing times: these two are "equal"
    # although half a second apart. A shared fingerprint would replay one for the other.
    half = dt.time(10, 0, tzinfo=_offset(microseconds=500_000))
    utc = dt.time(10, 0, tzinfo=UTC)
    assert half == utc
    assert fingerprint_value(half) != fingerprint_value(utc)
    # The time at the same instant is unequal by ==: it differs too.
    same_instant = dt.time(10, 0, 0, 500_000, tzinfo=_offset(microseconds=500_000))
    assert same_instant != utc
    assert fingerprint_value(same_instant) != fingerprint_value(utc)


def test_memoiser_mode_never_replays_another_times_result() -> None:
    from idemfn import MemoryStore, idempotent

    @idempotent(store=MemoryStore())
    def describe(at: dt.time) -> str:
        return at.isoformat()

    assert describe(dt.time(10, 0, tzinfo=UTC)) == "10:00:00+00:00"
    assert describe(dt.time(10, 0, tzinfo=_offset(seconds=30))) == "10:00:00+00:00:30"
    assert describe(dt.time(10, 0, 30, tzinfo=_offset(seconds=30))) == "10:00:00+00:00"  # replay


@pytest.mark.parametrize("zone", ["toy", "America/New_York"])
def test_wall_times_in_a_dst_gap_differ_from_the_same_instant(zone: str) -> None:
    tz = TOY if zone == "toy" else _zone(zone)
    day = (2024, 3, 31) if zone == "toy" else (2024, 3, 10)
    in_gap = dt.datetime(*day, 2, 30, tzinfo=tz)  # does not exist: fold=0 reads it as winter
    after_gap = dt.datetime(*day, 3, 30, tzinfo=tz)
    # One tzinfo, so Python compares wall times: unequal, at the same instant.
    assert in_gap != after_gap
    assert in_gap.astimezone(UTC) == after_gap.astimezone(UTC)
    assert fingerprint_value(in_gap) != fingerprint_value(after_gap)
    # Nor does the gap time agree with its instant in UTC: Python calls them unequal.
    assert in_gap != in_gap.astimezone(UTC)
    assert fingerprint_value(in_gap) != fingerprint_value(in_gap.astimezone(UTC))
    assert fingerprint_value(in_gap) == fingerprint_value(dt.datetime(*day, 2, 30, tzinfo=tz))


@pytest.mark.parametrize("zone", ["toy", "America/New_York"])
def test_wall_times_in_a_dst_fold_differ_from_the_same_instant_elsewhere(zone: str) -> None:
    tz = TOY if zone == "toy" else _zone(zone)
    day = (2024, 10, 27) if zone == "toy" else (2024, 11, 3)
    hour = 2 if zone == "toy" else 1
    first = dt.datetime(*day, hour, 30, tzinfo=tz)  # the first pass through the repeated hour
    second = first.replace(fold=1)
    in_utc = first.astimezone(UTC)
    # An ambiguous wall time is unequal to every datetime of another tzinfo, same instant or not.
    assert first != in_utc
    assert fingerprint_value(first) != fingerprint_value(in_utc)
    # Python calls the two passes equal (one tzinfo: wall times), though an hour apart. They
    # are different instants, so they keep different fingerprints: the safe side.
    assert first == second
    assert first.astimezone(UTC) != second.astimezone(UTC)
    assert fingerprint_value(first) != fingerprint_value(second)


def test_regular_aware_datetimes_agree_across_zones() -> None:
    summer = dt.datetime(2024, 7, 1, 14, tzinfo=TOY)  # UTC+2: no fold, no gap
    assert summer == dt.datetime(2024, 7, 1, 12, tzinfo=UTC)
    assert fingerprint_value(summer) == fingerprint_value(dt.datetime(2024, 7, 1, 12, tzinfo=UTC))
    assert fingerprint_value(summer) == fingerprint_value(summer.astimezone(_offset(hours=-7)))
    # Sub-second offsets are exact.
    odd = dt.datetime(2024, 7, 1, 12, 0, 0, 250_000, tzinfo=_offset(microseconds=250_000))
    assert odd == dt.datetime(2024, 7, 1, 12, tzinfo=UTC)
    assert fingerprint_value(odd) == fingerprint_value(dt.datetime(2024, 7, 1, 12, tzinfo=UTC))
    assert fingerprint_value(odd) != fingerprint_value(odd.replace(tzinfo=UTC))


def test_naive_datetimes_ignore_fold_as_equality_does() -> None:
    naive = dt.datetime(2024, 10, 27, 2, 30)
    assert naive == naive.replace(fold=1)
    assert fingerprint_value(naive) == fingerprint_value(naive.replace(fold=1))


def test_decimal_nans_are_written_exactly() -> None:
    nans = [Decimal(text) for text in ("NaN", "-NaN", "NaN7", "sNaN", "-sNaN", "sNaN7")]
    assert len({fingerprint_value(d) for d in nans}) == len(nans)
    # Every NaN still has one fingerprint: a payload's leading zeros are not part of it.
    assert fingerprint_value(Decimal("NaN007")) == fingerprint_value(Decimal("NaN7"))
    assert fingerprint_value(Decimal("NaN0")) == fingerprint_value(Decimal("NaN"))
    assert fingerprint_value(Decimal("sNaN")) != fingerprint_value(Decimal("Infinity"))


def test_ordered_dicts_in_another_order_differ() -> None:
    ab = collections.OrderedDict([("a", 1), ("b", 2)])
    ba = collections.OrderedDict([("b", 2), ("a", 1)])
    assert ab != ba
    assert fingerprint_value(ab) != fingerprint_value(ba)
    assert fingerprint_value(ab) == fingerprint_value(collections.OrderedDict(ab))
    assert fingerprint_value(ab) != fingerprint_value(dict(ab))  # types are tagged
    # Other dict subclasses compare as dicts, and fingerprint as them.
    counts = collections.Counter(a=1, b=2)
    assert fingerprint_value(counts) == fingerprint_value({"b": 2, "a": 1})
    assert fingerprint_value(collections.defaultdict(int, a=1)) == fingerprint_value({"a": 1})


def test_a_mapping_proxy_compares_like_the_mapping_it_shows() -> None:
    import types

    ab = types.MappingProxyType(collections.OrderedDict([("a", 1), ("b", 2)]))
    ba = types.MappingProxyType(collections.OrderedDict([("b", 2), ("a", 1)]))
    assert ab != ba
    assert fingerprint_value(ab) != fingerprint_value(ba)
    assert fingerprint_value(types.MappingProxyType({"a": 1})) == fingerprint_value({"a": 1})


class Word(str):
    """A str subclass whose == also compares a language: 'gift' in English != 'gift' in
    German. Encoding it as its str would give those one fingerprint."""

    lang: str

    def __new__(cls, text: str, lang: str) -> Word:
        word = super().__new__(cls, text)
        word.lang = lang
        return word

    def __eq__(self, other: object) -> bool:
        same_text = isinstance(other, str) and str.__eq__(self, other)
        return same_text and getattr(other, "lang", None) == self.lang

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = str.__hash__


class Stamp(dt.datetime):
    """A datetime subclass with its own == (as pandas.Timestamp, which adds nanoseconds)."""

    nanosecond = 0

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other) and self.nanosecond == getattr(other, "nanosecond", 0)

    __hash__ = dt.datetime.__hash__


def test_a_builtin_subclass_with_its_own_equality_is_refused() -> None:
    english, german = Word("gift", "en"), Word("gift", "de")
    assert english != german
    with pytest.raises(TypeError) as info:
        fingerprint_arguments(["word"], {"word": english})
    message = str(info.value)
    assert "argument 'word'" in message
    assert "Word" in message and "defines its own ==" in message
    _assert_ways_out(message)
    with pytest.raises(TypeError, match="subclasses datetime but defines its own =="):
        fingerprint_value([Stamp(2024, 1, 1)])


def test_a_builtin_subclass_with_its_own_equality_may_use_the_hook() -> None:
    class Tagged(Word):
        def __idemfn_fingerprint__(self) -> object:
            return (str(self), self.lang)

    assert fingerprint_value(Tagged("gift", "en")) != fingerprint_value(Tagged("gift", "de"))


class Pairish(tuple):  # type: ignore[type-arg]
    """A tuple subclass with a ``_fields`` that names fewer items than it holds."""

    __slots__ = ()
    _fields = ("first",)


def test_a_tuple_whose_fields_name_fewer_items_keeps_every_item() -> None:
    assert Pairish((1, 2)) != Pairish((1, 3))
    assert fingerprint_value(Pairish((1, 2))) != fingerprint_value(Pairish((1, 3)))
    assert fingerprint_value(Pairish((1, 2))) == fingerprint_value((1, 2))  # it compares as one


def test_equal_values_that_are_tagged_apart() -> None:
    # The other direction, by design: these compare equal yet differ, because their types do
    # (a fingerprint that differs costs a mismatch or a rerun, never a wrong replay).
    pairs: list[tuple[object, object]] = [
        (1, True),
        (1, 1.0),
        (Decimal(1), 1),
        (b"x", bytearray(b"x")),
        ({1}, frozenset({1})),
        (Pair("k", 9), ("k", 9)),
        (Level.LOW, 1),
        (collections.OrderedDict(a=1), {"a": 1}),
    ]
    for a, b in pairs:
        assert a == b
        assert fingerprint_value(a) != fingerprint_value(b), (a, b)


def test_same_named_classes_share_fingerprints_by_design() -> None:
    # Classes are named by qualified name, without their module, so that moving a class keeps
    # its fingerprints: two classes with one qualname in two modules are not told apart.
    def make() -> type[enum.Enum]:
        class Mode(enum.Enum):
            ON = 1

        return Mode

    first, second = make()["ON"], make()["ON"]  # two classes, one qualname
    assert first != second
    assert fingerprint_value(first) == fingerprint_value(second)
    assert fingerprint_value(first) != fingerprint_value(Level.LOW)  # another qualname


def test_boundaries_between_items_are_unambiguous() -> None:
    groups: list[list[object]] = [
        [("ab", "c"), ("a", "bc"), ("abc",), ("a", "b", "c")],
        [[b"ab", b"c"], [b"a", b"bc"], [b"abc"]],
        [{"a": "bc"}, {"ab": "c"}],
        [(1, 23), (12, 3), (123,)],
        [[[1], 2], [[1, 2]], [1, [2]]],
        [Point(12, 3), Point(1, 23)],
    ]
    for group in groups:
        assert len({fingerprint_value(v) for v in group}) == len(group), group


# --------------------------------------------------------------------------------------------
# 8. numpy (issue 13, B): dtype, shape and values, never the memory layout
# --------------------------------------------------------------------------------------------


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_fingerprinting_plain_values_never_imports_numpy() -> None:
    pytest.importorskip("numpy")  # only meaningful where numpy could be imported
    code = """
import datetime as dt, sys, uuid
from decimal import Decimal
from pathlib import PurePosixPath
import idemfn
from idemfn._fingerprint import fingerprint_arguments

class Unknown:
    pass

values = [1, "a", 2.5, None, b"x", [1, (2, {3})], {"k": frozenset({1})}, Decimal("1.1"),
          dt.datetime.now(dt.timezone.utc), dt.time(1), uuid.UUID(int=1), PurePosixPath("/")]
idemfn.fingerprint_value(values)
fingerprint_arguments(["a", "b"], {"a": "x", "b": values})
try:
    idemfn.fingerprint_value(Unknown())
except TypeError:
    pass
print("numpy" in sys.modules)
"""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_numpy_canonical_bytes() -> None:
    np = pytest.importorskip("numpy")
    # Each expected encoding is written out: the elements' little-endian bytes are hashed here
    # with hashlib, not by the code under test.
    cases: list[tuple[object, bytes]] = [
        (
            np.array([[1, 2], [3, 4]], dtype=">i2"),
            b"nA=s3:<i2(2,2)" + _sha(b"\x01\x00\x02\x00\x03\x00\x04\x00"),
        ),
        (np.float64(1.5), b"nS=s3:<f8()" + _sha(struct.pack("<d", 1.5))),
        (np.float32(-0.0), b"nS=s3:<f4()" + _sha(struct.pack("<f", 0.0))),
        (np.bool_(True), b"nS=s3:|b1()" + _sha(b"\x01")),
        (np.str_("ab"), b"nS=s3:<U2()" + _sha("ab".encode("utf-32-le"))),
        (np.array([1, "a", None], dtype=object), b"nAo(3)i1;s1:aN"),
        (
            np.array(["2024-01-01", "NaT"], dtype="M8[D]"),  # day 19723 since 1970
            b"nA=s6:<M8[D](2)" + _sha(struct.pack("<qq", 19723, -(2**63))),
        ),
        (
            np.array([(1, 2.0)], dtype=[("a", ">i4"), ("b", "<f8")]),
            b"nAr(1)2:s1:a=s3:<i4(1)"
            + _sha(struct.pack("<i", 1))
            + b"s1:b=s3:<f8(1)"
            + _sha(struct.pack("<d", 2.0)),
        ),
        (
            np.ma.masked_array(np.array([1, 2], dtype="<i8"), mask=[False, True]),
            b"nK=s3:<i8(2)"
            + _sha(struct.pack("<qq", 1, 2))
            + b"=s3:|b1(2)"
            + _sha(b"\x00\x01")
            + b"nS=s3:<i8()"
            + _sha(struct.pack("<q", 999999)),  # numpy's default fill value for ints
        ),
        (np.matrix([[1]], dtype="<i1"), b"nM=s3:|i1(1,1)" + _sha(b"\x01")),
    ]
    for value, expected in cases:
        assert canonical(value) == expected, value


def test_numpy_golden_vectors() -> None:
    np = pytest.importorskip("numpy")
    # sha256 of the prefix and the bytes test_numpy_canonical_bytes writes out for these.
    golden = [
        (
            np.arange(6, dtype="<i8").reshape(2, 3),
            "5e3612d30375cb3972a54bbd5c146d9764d98c1020d135b3a3398458c67eb8d4",
        ),
        (np.float64(1.5), "00a4ced6c1209ac028952f772343aa71faa059d00e45601fb00476be3a44e7aa"),
        (
            np.array([1, "a", None], dtype=object),
            "1ba4b91754e1c6a081d7a0768eae3ea68cb4cbeedcaa87941fb183310d168805",
        ),
    ]
    for value, digest in golden:
        assert fingerprint_value(value) == digest, value


def test_equal_arrays_agree_whatever_their_layout() -> None:
    np = pytest.importorskip("numpy")
    base = np.arange(24, dtype="<f8").reshape(4, 6) - 11.5
    layouts = [
        np.asfortranarray(base),  # F order
        base.astype(">f8"),  # big-endian
        np.asfortranarray(base.astype(">f8")),
        np.arange(48, dtype="<f8").reshape(4, 12)[:, ::2] * 0 + base,  # a strided view
        base.T.copy().T,  # transposed twice: F-ordered memory
        base[::-1][::-1],  # negative strides
        np.array(base, copy=True),
    ]
    readonly = base.copy()
    readonly.flags.writeable = False
    layouts.append(readonly)
    for layout in layouts:
        assert np.array_equal(layout, base)
        assert fingerprint_value(layout) == fingerprint_value(base)
    # A view of part of an array is that part.
    assert fingerprint_value(base[1:3, ::2]) == fingerprint_value(base[1:3, ::2].copy())


def test_arrays_differ_by_dtype_shape_or_any_element() -> None:
    np = pytest.importorskip("numpy")
    base = np.arange(6, dtype="<i4")
    changed = base.copy()
    changed[5] = 6
    variants = [
        base,
        changed,
        base.astype("<i8"),
        base.astype("<u4"),
        base.astype("<f8"),
        base.reshape(2, 3),
        base.reshape(3, 2),
        base.reshape(1, 6),
        base[:5],
        base.tolist(),
        np.zeros((0, 3)),
        np.zeros((3, 0)),
        np.zeros(0),
    ]
    assert len({fingerprint_value(v) for v in variants}) == len(variants)
    # A 0-d array is not its scalar, nor the scalar of another dtype.
    scalars = [np.array(1.5), np.float64(1.5), np.float32(1.5), 1.5, np.int64(1), 1, np.bool_(1)]
    assert len({fingerprint_value(v) for v in scalars}) == len(scalars)


def test_float_arrays_zero_and_nan_follow_python_floats() -> None:
    np = pytest.importorskip("numpy")
    a = np.array([0.0, 1.0, np.nan])
    b = np.array([-0.0, 1.0, -np.nan])
    payload = np.array([0x7FF8_0000_0000_1234], dtype="<u8").view("<f8")
    assert fingerprint_value(a) == fingerprint_value(b)
    assert fingerprint_value(np.array([np.nan])) == fingerprint_value(payload)
    assert fingerprint_value(np.float64(-0.0)) == fingerprint_value(np.float64(0.0))
    assert fingerprint_value(np.array([complex(-0.0, np.nan)])) == fingerprint_value(
        np.array([complex(0.0, -np.nan)])
    )
    assert fingerprint_value(np.array([complex(np.nan, 1)])) != fingerprint_value(
        np.array([complex(np.nan, 2)])
    )
    # The caller's array is left as it was.
    assert np.signbit(b[0]) and np.isnan(b[2])
    with np.errstate(all="raise"):  # a caller's strict float settings don't break hashing
        assert fingerprint_value(b) == fingerprint_value(a)


def test_object_arrays_are_encoded_element_by_element() -> None:
    np = pytest.importorskip("numpy")
    a = np.array([{"k": 1}, Decimal("1.0"), (1, 2)], dtype=object)
    b = np.array([{"k": 1}, Decimal("1.00"), (1, 2)], dtype=object)
    assert fingerprint_value(a) == fingerprint_value(b)
    assert fingerprint_value(a) != fingerprint_value(np.array([{"k": 2}, 1, 2], dtype=object))
    # The F-ordered copy holds the same elements in the same (C) order.
    grid = np.array([[1, "x"], [None, 2.5]], dtype=object)
    assert fingerprint_value(np.asfortranarray(grid)) == fingerprint_value(grid)
    assert fingerprint_value(grid) != fingerprint_value(grid.T)
    bad = np.array([[1, 2], [3, Widget()]], dtype=object)
    with pytest.raises(TypeError) as info:
        fingerprint_arguments(["grid"], {"grid": bad})
    assert "(at grid[1, 1])" in str(info.value)
    assert "Widget" in str(info.value)


def test_structured_arrays_compare_field_by_field() -> None:
    np = pytest.importorskip("numpy")
    packed = np.array([(1, 2.5), (3, -0.0)], dtype=[("id", "<i4"), ("x", "<f8")])
    aligned = packed.astype(np.dtype([("id", ">i4"), ("x", ">f8")], align=True))
    assert aligned.dtype.itemsize != packed.dtype.itemsize  # padding bytes between fields
    assert fingerprint_value(aligned) == fingerprint_value(packed)
    renamed = packed.astype([("key", "<i4"), ("x", "<f8")])
    assert fingerprint_value(renamed) != fingerprint_value(packed)
    assert fingerprint_value(packed[0]) == fingerprint_value(aligned[0])  # np.void scalars
    assert fingerprint_value(packed[0]) != fingerprint_value(packed[1])
    assert fingerprint_value(packed.view(np.recarray)) != fingerprint_value(packed)


def test_datetime64_values_keep_their_unit() -> None:
    np = pytest.importorskip("numpy")
    day = np.array(["2024-01-01"], dtype="M8[D]")
    hour = day.astype("M8[h]")
    assert (day == hour).all()
    assert fingerprint_value(day) != fingerprint_value(hour)  # the dtype is part of the value
    assert fingerprint_value(day) == fingerprint_value(day.astype(">M8[D]"))
    assert fingerprint_value(np.datetime64("NaT")) == fingerprint_value(np.datetime64("NaT"))
    assert fingerprint_value(np.timedelta64(1, "s")) != fingerprint_value(np.timedelta64(1, "ms"))


def test_masked_arrays_keep_their_mask() -> None:
    np = pytest.importorskip("numpy")
    data = np.array([1.0, 2.0, 3.0])
    none_masked = np.ma.masked_array(data)
    one_masked = np.ma.masked_array(data, mask=[False, True, False])
    assert fingerprint_value(one_masked) != fingerprint_value(none_masked)
    assert fingerprint_value(one_masked) != fingerprint_value(data)
    assert fingerprint_value(none_masked) != fingerprint_value(data)
    # nomask and an all-False mask are the same mask.
    all_false = np.ma.masked_array(data, mask=[False, False, False])
    assert fingerprint_value(all_false) == fingerprint_value(none_masked)
    other_fill = np.ma.masked_array(data, mask=[False, True, False], fill_value=-1.0)
    assert fingerprint_value(other_fill) != fingerprint_value(one_masked)
    assert fingerprint_value(np.ma.masked) == fingerprint_value(np.ma.masked)


def test_unknown_numpy_subclasses_and_long_doubles_are_refused() -> None:
    np = pytest.importorskip("numpy")

    quantity = type("Quantity", (np.ndarray,), {})  # like astropy's: a unit no element shows
    meters = np.array([1.0]).view(quantity)
    with pytest.raises(TypeError) as info:
        fingerprint_arguments(["q"], {"q": meters})
    assert "argument 'q'" in str(info.value) and "subclass of numpy.ndarray" in str(info.value)
    _assert_ways_out(str(info.value))
    if np.dtype(np.longdouble).itemsize > 8:  # where long double is wider than a double
        with pytest.raises(TypeError, match=r"astype\(numpy.float64\)"):
            fingerprint_value(np.array([1.0], dtype=np.longdouble))


def test_numpy_variable_width_strings() -> None:
    np = pytest.importorskip("numpy")
    dtypes = pytest.importorskip("numpy.dtypes")
    if not hasattr(dtypes, "StringDType"):
        pytest.skip("numpy < 2 has no StringDType")
    a = np.array(["a", "bb"], dtype=dtypes.StringDType())
    b = np.array(["a", "bb"], dtype=dtypes.StringDType())
    assert fingerprint_value(a) == fingerprint_value(b)  # its buffer holds pointers: not hashed
    assert fingerprint_value(a) != fingerprint_value(np.array(["a", "bc"], dtype=a.dtype))
    assert fingerprint_value(a) != fingerprint_value(a.astype("<U2"))


def test_memoiser_mode_on_numpy_arguments() -> None:
    np = pytest.importorskip("numpy")
    from idemfn import MemoryStore, idempotent

    calls: list[object] = []

    @idempotent(store=MemoryStore())
    def total(values: object) -> float:
        calls.append(values)
        return float(np.sum(values))

    assert total(np.array([1.0, 2.0])) == 3.0
    assert total(np.array([1.0, 2.0]).astype(">f8")) == 3.0  # equal: replayed
    assert total(np.array([1.0, 5.0])) == 6.0
    assert total(np.array([1.0, 2.0], dtype="<f4")) == 3.0  # another dtype: its own call
    assert len(calls) == 3
