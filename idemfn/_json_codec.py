"""The JSON payloads of ``serializer="json"``: values, exactly, and builtin exceptions.

A value is written only when JSON gives it back as itself (``check_exact``), and ints of any
length whatever this process's digit limit (``json_text``, ``json_value``). An exception is
written only when it is one of the interpreter's own, and comes back with the same type,
arguments, message and attributes (``exact_exception_json``); any other replays as ``Halted``.
"""

from __future__ import annotations

import builtins
import decimal
import json
import re
import secrets
from typing import Any

__all__ = [
    "BUILTIN_EXCEPTIONS",
    "builtin_exception",
    "check_exact",
    "exact_exception_json",
    "is_builtin_exception",
    "json_text",
    "json_value",
]


# Attributes builtin exceptions keep outside their args (ImportError.name, OSError.filename...)
_NAMED = ("name", "path", "obj", "filename", "filename2", "characters_written")


def _attributes(exc: BaseException) -> tuple[object, ...]:
    return (getattr(exc, "__dict__", None), *(getattr(exc, a, None) for a in _NAMED))


# Only the interpreter's own exception types: never whatever a library put in builtins.
BUILTIN_EXCEPTIONS: dict[str, type[Exception]] = {
    name: kind
    for name, kind in vars(builtins).items()
    if isinstance(kind, type) and issubclass(kind, Exception) and kind.__module__ == "builtins"
}

_JSON_TYPES = frozenset({dict, list, tuple, str, int, float, bool, type(None)})


def _type_name(kind: type) -> str:
    from ._outcome import type_name  # (only for an error: _outcome imports this module)

    return type_name(kind)


def check_exact(value: object) -> None:
    """Refuse what JSON would replay as something else: a subclass of a JSON type (an IntEnum,
    an OrderedDict) or a dict key that is not a str. Run after ``json.dumps`` succeeded, so
    the value holds no cycle."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind not in _JSON_TYPES:
            base = next(t for t in kind.__mro__ if t in _JSON_TYPES)
            raise TypeError(
                f"a {_type_name(kind)} would replay as a plain {base.__name__}: convert it first"
            )
        if kind is dict:
            for key in item:  # type: ignore[attr-defined]
                if type(key) is not str:
                    shown = next(iter(json.loads(json.dumps({key: 0}))))
                    raise TypeError(
                        f"the dict key {key!r} ({_type_name(type(key))}) would replay as"
                        f" {shown!r}: use str keys"
                    )
            stack.extend(item.values())  # type: ignore[attr-defined]
        elif kind is list or kind is tuple:
            stack.extend(item)  # type: ignore[arg-type]


# JSON writes ints as decimal text, and Python limits the digits it converts per process
# (sys.set_int_max_str_digits, PYTHONINTMAXSTRDIGITS: 4300 by default, 640 at the lowest, 0 for
# none). A record crosses processes: a 5,000-digit int one process wrote failed to load in
# another with the default limit (issue 14). So ints are written and read here whatever the
# limit, through decimal.Decimal, which converts without one; and only when json itself
# refused, so the usual value keeps json's C path both ways. (The limit guards against text
# whose conversion takes quadratic time; records are written by idemfn, or by someone who can
# write the store, who can do worse than make a replay slow.)
_SHORT_INT_BITS = 2000  # at most 603 digits: under every limit (640 at the lowest)


def json_text(value: object) -> str:
    """``json.dumps(value)``, with ints of any length whatever this process's digit limit."""
    try:
        return json.dumps(value, ensure_ascii=False)  # raises on a cycle, a set...
    except ValueError:
        pass  # an int over this process's digit limit (or a cycle: found again below)
    # Each long int becomes a string no value can hold (a random token), replaced by its
    # digits once json has written the rest.
    longs: list[int] = []
    token = f"idemfn-int-{secrets.token_hex(16)}-"
    text = json.dumps(_with_tokens(value, longs, token, set()), ensure_ascii=False)
    return re.sub(f'"{token}([0-9]+)"', lambda m: str(decimal.Decimal(longs[int(m[1])])), text)


def _with_tokens(value: object, longs: list[int], token: str, open_: set[int]) -> object:
    """``value`` with each long int replaced by ``token`` and its index in ``longs``."""
    if type(value) is int:
        if value.bit_length() <= _SHORT_INT_BITS:
            return value
        longs.append(value)
        return f"{token}{len(longs) - 1}"
    if type(value) is not dict and type(value) is not list and type(value) is not tuple:
        return value  # json writes it, or says why not
    if id(value) in open_:
        raise ValueError("Circular reference detected")  # json's own words
    open_.add(id(value))
    try:
        if type(value) is dict:
            return {k: _with_tokens(v, longs, token, open_) for k, v in value.items()}
        return [_with_tokens(v, longs, token, open_) for v in value]
    finally:
        open_.discard(id(value))


def json_value(text: bytes) -> Any:
    """``json.loads(text)``, with ints of any length whatever this process's digit limit."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError:  # an int over this process's digit limit: the only other ValueError
        return json.loads(text, parse_int=_long_int)


def _long_int(digits: str) -> int:
    return int(decimal.Decimal(digits))


def builtin_exception(data: bytes) -> BaseException:
    """The builtin exception ``exact_exception_json`` wrote; ``ValueError`` for anything else."""
    name, args = json_value(data)
    kind = BUILTIN_EXCEPTIONS.get(name) if isinstance(name, str) else None
    if kind is None or not isinstance(args, list):
        raise ValueError(f"{name!r} is not a builtin exception")
    return kind(*args)


def is_builtin_exception(exc: BaseException) -> bool:
    """Whether ``exc``'s type is one of the interpreter's own exceptions (not a subclass)."""
    return BUILTIN_EXCEPTIONS.get(type(exc).__name__) is type(exc)


def exact_exception_json(exc: BaseException, kind: str, message: str) -> bytes | None:
    """A builtin exception's type name (``kind``) and arguments as JSON, rebuilt here to be
    sure it comes back as itself: same type, arguments, message (``message``, its ``str()``)
    and attributes. None when it would not."""
    try:
        data = json.dumps([kind, list(exc.args)]).encode()
        rebuilt = builtin_exception(data)
    except (TypeError, ValueError):
        return None
    if (
        type(rebuilt) is type(exc)
        and rebuilt.args == exc.args
        and str(rebuilt) == message
        and _attributes(rebuilt) == _attributes(exc)
    ):
        return data
    return None
