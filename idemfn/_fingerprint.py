"""Canonical fingerprints of arguments.

A fingerprint is the sha256, as hex, of a canonical byte encoding: equal values give equal bytes
in every process, under every PYTHONHASHSEED, on every machine and supported Python version.
Every value is tagged with its type (so ``1``, ``1.0``, ``True`` and ``"1"`` differ), every
variable-length part is length-prefixed (so no two values share an encoding), and dicts and sets
are sorted by their encoded members (so order never matters). Pickle output is never hashed: it is
not deterministic.

Unequal values never share an encoding: where Python's ``==`` is finer than the value's obvious
fields (aware times and datetimes, ``OrderedDict``), the encoding follows ``==``. Where ``==``
equates values that behave differently, the encoding keeps them apart instead (two different
instants that Python calls equal; every type tag): a fingerprint that differs costs a mismatch
or a rerun, one that is shared replays the wrong result.

numpy values are encoded by dtype, shape and values (never by memory layout), without importing
numpy: a numpy value can only exist once numpy is in ``sys.modules``.

The layout is versioned by ``FINGERPRINT_VERSION``; golden vectors in the tests pin it. Changing a
single byte here changes every user's fingerprints and turns their replays into mismatches.
Version 2 (issue 13) changed how aware times, aware datetimes and Decimal NaNs are encoded, and
added ``OrderedDict`` and numpy.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import enum
import hashlib
import reprlib
import sys
import types
import uuid
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from pathlib import PurePath, PureWindowsPath
from typing import Any

__all__ = [
    "FINGERPRINT_VERSION",
    "ArgumentsFingerprint",
    "canonical",
    "fingerprint_arguments",
    "fingerprint_value",
]

FINGERPRINT_VERSION = 2
"""The version of the fingerprint encoding.

Every fingerprint depends on it: a version changes only when the encoding of some value must
change, and then a key recorded under the old version raises ``FingerprintMismatch`` when
called with the same arguments. Version 2 changed how aware times, aware
datetimes and Decimal NaNs are encoded, and added ``OrderedDict`` and numpy values.
"""
_PREFIX = b"idemfn-fp/%d\n" % FINGERPRINT_VERSION


class Unsupported(TypeError):
    """A value that has no canonical encoding; ``path`` says where it sits, innermost last."""

    def __init__(self, obj: object, why: str = "") -> None:
        super().__init__(why)
        self.obj = obj
        self.why = why
        self.path: list[str] = []


def _str(s: str) -> bytes:
    data = s.encode("utf-8", "surrogatepass")
    return b"s%d:%s" % (len(data), data)


def _bytes(tag: bytes, b: bytes) -> bytes:
    return b"%s%d:%s" % (tag, len(b), b)


# Ints whose decimal form could exceed Python's int-to-str digit limit (sys.int_info; 640
# digits at the lowest setting) are written in hex, so no process setting changes the result.
_DECIMAL_INT_BITS = 2000


def _int(i: int) -> bytes:
    if i.bit_length() <= _DECIMAL_INT_BITS:
        return b"i%d;" % i
    return b"I%x;" % i


def _float(x: float) -> bytes:
    # One encoding for every NaN: its sign and payload depend on the CPU that made it (inf - inf
    # is -nan on x86, nan on ARM), and no NaN equals anything, itself included.
    if x != x:
        return b"fnan;"
    if x == 0.0:
        return b"f0;"  # 0.0 == -0.0: equal values, one encoding
    return b"f%s;" % x.hex().encode()


def _seq(tag: bytes, items: Iterable[object]) -> bytes:
    parts = []
    for i, item in enumerate(items):
        try:
            parts.append(_enc(item))
        except Unsupported as exc:
            exc.path.append(f"[{i}]")
            raise
    return b"%s%d:%s" % (tag, len(parts), b"".join(parts))


def _unordered(tag: bytes, items: Iterable[object]) -> bytes:
    parts = []
    for item in items:
        try:
            parts.append(_enc(item))
        except Unsupported as exc:
            exc.path.append(f" (member {reprlib.repr(item)})")
            raise
    parts.sort()
    return b"%s%d:%s" % (tag, len(parts), b"".join(parts))


def _mapping(tag: bytes, items: Iterable[tuple[object, object]], ordered: bool = False) -> bytes:
    parts = []
    for k, v in items:
        try:
            encoded_key = _enc(k)
        except Unsupported as exc:
            exc.path.append(f" (key {reprlib.repr(k)})")
            raise
        try:
            parts.append(encoded_key + _enc(v))
        except Unsupported as exc:
            exc.path.append(f"[{reprlib.repr(k)}]")
            raise
    if not ordered:  # an OrderedDict equals another only with its items in the same order
        # Key encodings are prefix-free and distinct, so sorting the pairs sorts by key.
        parts.sort()
    return b"%s%d:%s" % (tag, len(parts), b"".join(parts))


def _named(tag: bytes, cls: type, fields: Iterable[tuple[str, object]]) -> bytes:
    parts = []
    for name, value in fields:
        try:
            parts.append(_str(name) + _enc(value))
        except Unsupported as exc:
            exc.path.append(f".{name}")
            raise
    # The class's qualified name without its module: moving a class keeps its fingerprints.
    return b"%s%s%d:%s" % (tag, _str(cls.__qualname__), len(parts), b"".join(parts))


def _micros(d: dt.datetime) -> int:
    """Microseconds from 0001-01-01 00:00 to ``d``'s wall time (its tzinfo left aside)."""
    seconds = d.hour * 3600 + d.minute * 60 + d.second
    return (dt.date.toordinal(d) * 86400 + seconds) * 1_000_000 + d.microsecond


def _offset_micros(offset: dt.timedelta) -> int:
    return (offset.days * 86400 + offset.seconds) * 1_000_000 + offset.microseconds


def _datetime(d: dt.datetime) -> bytes:
    offset = d.utcoffset()
    if offset is None:
        return b"W" + _str(dt.datetime.isoformat(d))  # naive: its wall time; fold never counts
    wall = _micros(d)
    instant = wall - _offset_micros(offset)  # exact, and no datetime range to overflow
    tz = d.tzinfo
    if type(tz) is not dt.timezone:
        # A wall time in a DST fold or gap has an offset that depends on fold. Python then calls
        # it unequal to every datetime of another tzinfo, even at the same instant, and compares
        # it by wall time within its own tzinfo (NY 02:30 in the spring gap != NY 03:30, though
        # both are 07:30 UTC): the encoding adds the wall time and the zone.
        flipped = dt.datetime(
            d.year,
            d.month,
            d.day,
            d.hour,
            d.minute,
            d.second,
            d.microsecond,
            tz,
            fold=1 - d.fold,
        )
        if flipped.utcoffset() != offset:
            key = getattr(tz, "key", None)  # zoneinfo.ZoneInfo's IANA name
            zone = f"{type(tz).__qualname__}:{key if isinstance(key, str) else ''}"
            return b"G%d,%d;%s" % (instant, wall, _str(zone))
    # Elsewhere aware datetimes that are equal are the same instant, whatever their zone.
    return b"A%d;" % instant


def _time(t: dt.time) -> bytes:
    offset = t.utcoffset()
    if offset is None:
        return b"H" + _str(dt.time.isoformat(t))
    # CPython compares aware times by seconds past midnight minus the offset's whole seconds
    # (no wrapping at midnight), then by microseconds; the offset's own microseconds are
    # written too, so that two times Python calls equal but that lie apart still differ.
    seconds = t.hour * 3600 + t.minute * 60 + t.second - offset.days * 86400 - offset.seconds
    return b"h%d,%d,%d;" % (seconds, t.microsecond, offset.microseconds)


def _decimal(d: Decimal) -> bytes:
    sign, digits, exponent = d.as_tuple()
    minus = "-" if sign else ""
    if not isinstance(exponent, int):
        if exponent == "F":
            return b"M" + _str(f"{minus}inf")
        # A NaN equals nothing, but a signalling one raises where a quiet one propagates, and
        # sign and payload show in str(): every NaN is written exactly (Decimal is the same
        # software everywhere, unlike a float NaN).
        payload = "".join(map(str, digits)).lstrip("0")
        return b"M" + _str(f"{minus}{'snan' if exponent == 'N' else 'nan'}{payload}")
    text = "".join(map(str, digits)).lstrip("0")
    if not text:
        return b"M" + _str("0")  # every zero, whatever its sign and exponent
    stripped = text.rstrip("0")
    exponent += len(text) - len(stripped)
    return b"M" + _str(f"{minus}{stripped}e{exponent}")


def _path(p: PurePath) -> bytes:
    if isinstance(p, PureWindowsPath):
        # Windows paths compare case-insensitively: C:/A == c:\a.
        return b"Pw" + _str(str(p).lower())
    return b"Pp" + _str(str(p))


_EXACT: dict[type, Callable[[Any], bytes]] = {
    type(None): lambda _: b"N",
    bool: lambda b: b"T" if b else b"F",
    int: _int,
    float: _float,
    str: _str,
    bytes: lambda b: _bytes(b"b", b),
    bytearray: lambda b: _bytes(b"y", bytes(b)),
    list: lambda v: _seq(b"l", v),
    tuple: lambda v: _seq(b"t", v),
    dict: lambda v: _mapping(b"d", v.items()),
    set: lambda v: _unordered(b"S", v),
    frozenset: lambda v: _unordered(b"Z", v),
    dt.datetime: _datetime,
    dt.date: lambda d: b"D" + _str(dt.date.isoformat(d)),
    dt.time: _time,
    dt.timedelta: lambda t: b"R%d,%d,%d;" % (t.days, t.seconds, t.microseconds),
    Decimal: _decimal,
    uuid.UUID: lambda u: _bytes(b"U", u.bytes),
}

# Subclasses of these encode as the base (a str subclass equals its str value), in this order
# (datetime before its base date), as long as they compare like the base: the equality each
# one may have instead.
_BASES: tuple[type, ...] = (
    bool,
    int,
    float,
    str,
    bytes,
    bytearray,
    list,
    tuple,
    dict,
    set,
    frozenset,
    dt.datetime,
    dt.date,
    dt.time,
    dt.timedelta,
    Decimal,
    uuid.UUID,
)
_BASE_EQUALITY: dict[type, tuple[object, ...]] = {base: (base.__eq__,) for base in _BASES}
# Counter calls a missing key and a zero count equal; treated as a dict, Counters that differ
# still never agree (Counter(a=0) and Counter() differ: the safe side).
_BASE_EQUALITY[dict] += (collections.Counter.__eq__,)


def _enc(value: object) -> bytes:
    encoder = _EXACT.get(type(value))
    if encoder is not None:
        return encoder(value)
    return _enc_other(value)


def _enc_other(value: object) -> bytes:
    """Everything that is not one of the exact builtin types: hooks, then subclasses."""
    cls = type(value)
    hook = getattr(cls, "__idemfn_fingerprint__", None)
    if hook is not None:
        try:
            return b"X" + _str(cls.__qualname__) + _enc(hook(value))
        except Unsupported as exc:
            exc.path.append(".__idemfn_fingerprint__()")
            raise
    np = sys.modules.get("numpy")  # no numpy value exists before numpy is imported
    if np is not None and isinstance(value, (np.ndarray, np.generic)):
        return _numpy(value, np)
    if isinstance(value, enum.Enum):
        try:
            return b"E" + _str(cls.__qualname__) + _enc(value.value)
        except Unsupported as exc:
            exc.path.append(".value")
            raise
    fields = getattr(cls, "_fields", None)
    # A tuple subclass whose _fields name fewer items than it holds is no namedtuple: zipping
    # would drop the rest, so it encodes as the tuple it compares as (below).
    if isinstance(value, tuple) and isinstance(fields, tuple) and len(fields) == len(value):
        return _named(b"Q", cls, zip(fields, value, strict=True))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Fields with compare=False don't take part in equality, so not in the fingerprint.
        compared = [f.name for f in dataclasses.fields(value) if f.compare]
        missing = [name for name in compared if not hasattr(value, name)]
        if missing:
            raise Unsupported(value, f"its dataclass field {missing[0]!r} is not set")
        return _named(b"C", cls, ((name, getattr(value, name)) for name in compared))
    if isinstance(value, PurePath):
        return _path(value)
    if isinstance(value, collections.OrderedDict) and cls.__eq__ is collections.OrderedDict.__eq__:
        return _mapping(b"O", value.items(), ordered=True)
    for base in _BASES:
        if isinstance(value, base):
            if cls.__eq__ not in _BASE_EQUALITY[base]:
                # Its own == may tell apart values its base encoding would merge (extra state,
                # order, precision): refuse rather than replay one for the other.
                raise Unsupported(
                    value,
                    f"it subclasses {base.__qualname__} but defines its own ==, so its"
                    f" {base.__qualname__} value alone may not identify it",
                )
            return _EXACT[base](value)
    if isinstance(value, types.MappingProxyType):
        try:  # it compares like the mapping it shows (an OrderedDict's order included)
            return _enc(value.copy())
        except AttributeError:
            pass
    if isinstance(value, Mapping):
        return _mapping(b"d", value.items())
    raise Unsupported(value)


# --------------------------------------------------------------------------------------------
# numpy. ``np`` is the numpy module, taken from sys.modules: this file never imports it.


def _numpy(value: Any, np: Any) -> bytes:
    cls = type(value)
    if isinstance(value, np.generic):
        if cls.__module__ == "numpy":
            # A scalar: tagged by its dtype, so np.float32(1) != np.float64(1) != 1.0.
            return b"nS" + _array(np.asarray(value), np)
    elif cls is np.ndarray or cls is np.memmap:  # a memmap is an ndarray on a file
        return b"nA" + _array(value, np)
    elif cls is np.matrix or cls is np.recarray:
        return b"n%s%s" % (b"M" if cls is np.matrix else b"R", _array(value.view(np.ndarray), np))
    else:
        ma = sys.modules.get("numpy.ma")
        if ma is not None and cls is ma.core.MaskedConstant:
            return b"nm"  # numpy.ma.masked, the one masked value (it has no fill value to read)
        if ma is not None and cls is ma.MaskedArray:
            # The data (masked entries included), the mask (nomask and all-False agree) and the
            # fill value: a masked array never agrees with its data alone.
            data = _array(np.asarray(value.data), np) + _array(ma.getmaskarray(value), np)
            return b"nK" + data + _enc(value.fill_value)
    # A subclass from elsewhere may hold more than its elements (units, a mask, metadata).
    base = "generic" if isinstance(value, np.generic) else "ndarray"
    raise Unsupported(
        value,
        f"it is a subclass of numpy.{base} that idemfn does not know; its elements may"
        " not be all that identifies it",
    )


def _shape(a: Any) -> bytes:
    return b"(%s)" % b",".join(b"%d" % n for n in a.shape)


def _array(a: Any, np: Any) -> bytes:
    """A plain ndarray's dtype, shape and elements; never its strides, order or byte order."""
    dtype = a.dtype
    kind = dtype.kind
    if dtype.names is not None:
        # Structured: field by field, each as an array of its own (names and values only, so
        # padding bytes, offsets and byte order never count).
        fields = []
        for name in dtype.names:
            try:
                fields.append(_str(name) + _array(a[name], np))
            except Unsupported as exc:
                exc.path.append(f"[{name!r}]")
                raise
        return b"r%s%d:%s" % (_shape(a), len(fields), b"".join(fields))
    if kind == "O" or kind == "T":
        # Python objects (or numpy 2's variable-width strings, which hold pointers): element by
        # element, in C order, with the encoding of the objects themselves.
        tag = b"o" if kind == "O" else b"T" + _str(str(dtype))
        parts = []
        for index, item in enumerate(a.astype(object, copy=False).flat):
            try:
                parts.append(_enc(item))
            except Unsupported as exc:
                where = np.unravel_index(index, a.shape)
                exc.path.append("[" + ", ".join(str(int(i)) for i in where) + "]")
                raise
        return b"%s%s%s" % (tag, _shape(a), b"".join(parts))
    if kind not in "biufcmMSUV":
        raise Unsupported(a, f"numpy dtype {dtype} has no canonical form")
    if (kind == "f" and dtype.itemsize > 8) or (kind == "c" and dtype.itemsize > 16):
        raise Unsupported(
            a,
            f"numpy {dtype} (long double) has padding bytes and a size that differ between"
            " machines; convert it with .astype(numpy.float64) first",
        )
    little = dtype.newbyteorder("<")  # a no-op for one-byte and already little-endian dtypes
    data = np.ascontiguousarray(a, dtype=little).reshape(-1)  # C order; a copy only if needed
    if kind == "b":
        data = data.view(np.uint8) != 0  # a bool's byte may hold any nonzero value
    elif kind in "fc":
        # As for Python floats: -0.0 and 0.0 agree, and every NaN is one NaN.
        real = data.view(np.dtype(f"<f{dtype.itemsize // (2 if kind == 'c' else 1)}"))
        with np.errstate(all="ignore"):
            real = real + real.dtype.type(0)  # -0.0 + 0.0 is 0.0; a copy, never the caller's
            real[np.isnan(real)] = np.nan
        data = real
    # A digest of the elements rather than the elements: a large array is hashed where it lies.
    digest = hashlib.sha256(data.view(np.uint8)).digest()
    return b"=%s%s%s" % (_str(little.str), _shape(a), digest)


def canonical(value: object) -> bytes:
    """The canonical encoding of one value (without the version prefix)."""
    return _enc(value)


def _describe(exc: Unsupported, where: str, root: str) -> str:
    path = "".join(reversed(exc.path))
    at = f" (at {root}{path})" if path else ""
    kind = type(exc.obj)
    problem = exc.why or "values of that type have no canonical form"
    return (
        f"cannot fingerprint {where}{at}: {kind.__module__}.{kind.__qualname__}: {problem}."
        " Leave the argument out with fingerprint=[...names...] or"
        " fingerprint=False, pass fingerprint=callable returning a supported value, or define"
        " __idemfn_fingerprint__(self) on the type"
    )


def _digest(data: bytes) -> str:
    return hashlib.sha256(_PREFIX + data).hexdigest()


def fingerprint_value(value: object, *, where: str = "value") -> str:
    """The fingerprint of one value, as ``@idempotent`` fingerprints arguments.

    The sha256, as hex, of a canonical encoding: equal values give equal fingerprints in
    every process, under every ``PYTHONHASHSEED``, on every machine and supported Python;
    dict and set order never matter; types are tagged, so ``1``, ``1.0``, ``True`` and
    ``"1"`` differ. Supported: None, bool, int, float, str, bytes, list, tuple, dict, set,
    frozenset, datetime, date, time, timedelta, Decimal, UUID, Enum, Path, dataclasses,
    NamedTuples, OrderedDicts, numpy values, and any object with an
    ``__idemfn_fingerprint__()`` method returning a supported value. For ``begin``'s
    ``fingerprint=``, and wherever a value must be compared across processes.

    Args:
        value: The value to fingerprint.
        where: What to call the value in error messages.

    Returns:
        64 hex digits. They change only with ``FINGERPRINT_VERSION``.

    Raises:
        TypeError: ``value``, or something in it, has no canonical encoding; the message
            says where it sits, its type, and the ways out.
        ValueError: ``value`` is nested too deeply, or refers to itself.

    Examples:
        >>> from idemfn import fingerprint_value
        >>> fingerprint_value({"a": 1, "b": 2}) == fingerprint_value({"b": 2, "a": 1})
        True
        >>> fingerprint_value(1) == fingerprint_value(1.0)
        False
        >>> len(fingerprint_value(b"{}"))
        64
    """
    try:
        return _digest(_enc(value))
    except Unsupported as exc:
        raise TypeError(_describe(exc, where, where)) from None
    except RecursionError:
        raise ValueError(
            f"cannot fingerprint {where}: it is nested too deeply or refers to itself"
        ) from None


class ArgumentsFingerprint:
    """Fingerprints a call's named arguments, in signature order, so that how they were passed
    (positionally or by keyword) never matters. Built once per decorated function: the encoded
    names are computed here, not on every call."""

    __slots__ = ("_count", "_names")

    def __init__(self, names: Iterable[str]) -> None:
        self._names = tuple((name, _str(name)) for name in names)
        self._count = b"a%d:" % len(self._names)

    def __call__(self, arguments: Mapping[str, object]) -> str:
        parts = [_PREFIX, self._count]
        append = parts.append
        for name, encoded_name in self._names:
            value = arguments[name]
            kind = type(value)
            try:
                # Inline the two commonest argument types: this runs on every call.
                if kind is str:
                    data = value.encode("utf-8", "surrogatepass")  # type: ignore[attr-defined]
                    append(b"%ss%d:%s" % (encoded_name, len(data), data))
                elif kind is int and value.bit_length() <= _DECIMAL_INT_BITS:  # type: ignore[attr-defined]
                    append(b"%si%d;" % (encoded_name, value))  # type: ignore[str-format]
                else:
                    append(encoded_name + _enc(value))
            except Unsupported as exc:
                raise TypeError(_describe(exc, f"argument {name!r}", name)) from None
            except RecursionError:
                raise ValueError(
                    f"cannot fingerprint argument {name!r}: it is nested too deeply or refers"
                    " to itself"
                ) from None
        return hashlib.sha256(b"".join(parts)).hexdigest()


def fingerprint_arguments(names: Iterable[str], arguments: Mapping[str, object]) -> str:
    """The hex fingerprint of the named arguments (see ``ArgumentsFingerprint``)."""
    return ArgumentsFingerprint(names)(arguments)
