"""Canonical fingerprints of arguments.

A fingerprint is the sha256, as hex, of a canonical byte encoding: equal values give equal bytes
in every process, under every PYTHONHASHSEED, on every machine and supported Python version.
Every value is tagged with its type (so ``1``, ``1.0``, ``True`` and ``"1"`` differ), every
variable-length part is length-prefixed (so no two values share an encoding), and dicts and sets
are sorted by their encoded members (so order never matters). Pickle output is never hashed: it is
not deterministic.

The layout is versioned by ``FINGERPRINT_VERSION``; golden vectors in the tests pin it. Changing a
single byte here changes every user's fingerprints and turns their replays into mismatches.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import reprlib
import uuid
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from pathlib import PurePath, PureWindowsPath

__all__ = [
    "FINGERPRINT_VERSION",
    "ArgumentsFingerprint",
    "canonical",
    "fingerprint_arguments",
    "fingerprint_value",
]

FINGERPRINT_VERSION = 1
_PREFIX = b"idemfn-fp/1\n"


class Unsupported(TypeError):
    """A value that has no canonical encoding; ``path`` says where it sits, innermost last."""

    def __init__(self, obj: object, why: str = "") -> None:
        super().__init__(why)
        self.obj = obj
        self.why = why
        self.path: list[str] = []


def _len(n: int) -> bytes:
    return b"%d:" % n


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


def _mapping(tag: bytes, items: Iterable[tuple[object, object]]) -> bytes:
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


def _datetime(d: dt.datetime) -> bytes:
    offset = d.utcoffset()
    if offset is None:
        return b"W" + _str(d.isoformat())
    # Aware datetimes that are equal compare equal across zones: encode them in UTC.
    try:
        return b"A" + _str((d - offset).replace(tzinfo=None).isoformat())
    except OverflowError:
        # The UTC instant lies outside datetime's range (e.g. datetime.max at -01:00); every
        # datetime equal to it overflows too, so this form is still one per instant.
        since = d.replace(tzinfo=None) - dt.datetime.min - offset
        return b"a%d,%d,%d;" % (since.days, since.seconds, since.microseconds)


def _time(t: dt.time) -> bytes:
    offset = t.utcoffset()
    if offset is None:
        return b"H" + _str(t.isoformat())
    # Python compares aware times by minutes past midnight minus the offset, without wrapping.
    minutes = t.hour * 60 + t.minute - offset // dt.timedelta(minutes=1)
    return b"h%d,%d,%d;" % (minutes, t.second, t.microsecond)


def _decimal(d: Decimal) -> bytes:
    if not d.is_finite():
        return b"M" + _str("nan" if d.is_nan() else ("-inf" if d.is_signed() else "inf"))
    sign, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits)).lstrip("0")
    if not text:
        return b"M" + _str("0")  # every zero, whatever its sign and exponent
    stripped = text.rstrip("0")
    exponent += len(text) - len(stripped)
    return b"M" + _str(f"{'-' if sign else ''}{stripped}e{exponent}")


def _path(p: PurePath) -> bytes:
    if isinstance(p, PureWindowsPath):
        # Windows paths compare case-insensitively: C:/A == c:\a.
        return b"Pw" + _str(str(p).lower())
    return b"Pp" + _str(str(p))


_EXACT: dict[type, Callable[[object], bytes]] = {
    type(None): lambda _: b"N",
    bool: lambda b: b"T" if b else b"F",
    int: _int,  # type: ignore[dict-item]
    float: _float,  # type: ignore[dict-item]
    str: _str,  # type: ignore[dict-item]
    bytes: lambda b: _bytes(b"b", b),  # type: ignore[arg-type]
    bytearray: lambda b: _bytes(b"y", bytes(b)),  # type: ignore[call-overload]
    list: lambda v: _seq(b"l", v),  # type: ignore[arg-type]
    tuple: lambda v: _seq(b"t", v),  # type: ignore[arg-type]
    dict: lambda v: _mapping(b"d", v.items()),  # type: ignore[attr-defined]
    set: lambda v: _unordered(b"S", v),  # type: ignore[arg-type]
    frozenset: lambda v: _unordered(b"Z", v),  # type: ignore[arg-type]
    dt.datetime: _datetime,  # type: ignore[dict-item]
    dt.date: lambda d: b"D" + _str(d.isoformat()),  # type: ignore[attr-defined]
    dt.time: _time,  # type: ignore[dict-item]
    dt.timedelta: lambda t: b"R%d,%d,%d;" % (t.days, t.seconds, t.microseconds),  # type: ignore[attr-defined]
    Decimal: _decimal,  # type: ignore[dict-item]
    uuid.UUID: lambda u: _bytes(b"U", u.bytes),  # type: ignore[attr-defined]
}


def _enc(value: object) -> bytes:
    encoder = _EXACT.get(type(value))
    if encoder is not None:
        return encoder(value)
    return _enc_other(value)


def _enc_other(value: object) -> bytes:
    """Everything that is not one of the exact builtin types: hooks, then subclasses."""
    hook = getattr(type(value), "__idemfn_fingerprint__", None)
    if hook is not None:
        try:
            return b"X" + _str(type(value).__qualname__) + _enc(hook(value))
        except Unsupported as exc:
            exc.path.append(".__idemfn_fingerprint__()")
            raise
    if isinstance(value, enum.Enum):
        try:
            return b"E" + _str(type(value).__qualname__) + _enc(value.value)
        except Unsupported as exc:
            exc.path.append(".value")
            raise
    fields = getattr(type(value), "_fields", None)
    if isinstance(value, tuple) and isinstance(fields, tuple):
        return _named(b"Q", type(value), zip(fields, value, strict=False))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Fields with compare=False don't take part in equality, so not in the fingerprint.
        compared = [f.name for f in dataclasses.fields(value) if f.compare]
        missing = [name for name in compared if not hasattr(value, name)]
        if missing:
            raise Unsupported(value, f"its dataclass field {missing[0]!r} is not set")
        return _named(b"C", type(value), ((name, getattr(value, name)) for name in compared))
    if isinstance(value, PurePath):
        return _path(value)
    # Subclasses of builtin types encode as their base: a str subclass equals its str value.
    if isinstance(value, dt.datetime):
        return _datetime(value)
    for base in (bool, int, float, str, bytes, bytearray, list, tuple, dict, set, frozenset,
                 dt.date, dt.time, dt.timedelta, Decimal, uuid.UUID):  # fmt: skip
        if isinstance(value, base):
            return _EXACT[base](value)
    if isinstance(value, Mapping):
        return _mapping(b"d", value.items())
    raise Unsupported(value)


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
    """The hex fingerprint of one value; ``where`` names it in errors."""
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
