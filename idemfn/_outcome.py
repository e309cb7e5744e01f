"""Outcomes as bytes: the returned value, or the raised exception with what describes it.

A ``Serializer`` turns them into a record's payload. The default, ``"pickle"``, writes values
and exceptions with pickle, or cloudpickle where pickle cannot do as well (lambdas, local
classes, objects of the running script's ``__main__``, which cloudpickle stores by value so that
other processes can load them), and reads them back with plain ``pickle``. ``"json"`` and a
user's object with ``dumps``/``loads`` never unpickle anything: they store values their way and
only builtin exceptions (type and arguments, as JSON), so others replay as ``Halted``. Every
replay builds a fresh copy.

Payloads say how they were written: a pickle starts with its protocol byte (0x80); the others
start with a zero byte and a tag, so that a serializer that must not unpickle can refuse a
pickle, and ``idemfn show`` can read a JSON value.
"""

from __future__ import annotations

import builtins
import json
import pickle
import traceback as tb_module
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

import cloudpickle

__all__ = [
    "Failure",
    "Serializer",
    "describe_failure",
    "dump_value",
    "load",
    "replay_note",
    "serializer_of",
    "type_name",
]

_JSON_VALUE = b"\x00j"  # JSON text of a value (serializer "json")
_JSON_ERROR = b"\x00e"  # JSON of a builtin exception's type name and arguments
_CUSTOM = b"\x00c"  # what a user's serializer's dumps() returned


_PROTOCOL = 5  # readable by every supported Python (3.8+)


def dump_value(value: object) -> bytes:
    """The value as bytes; raises whatever pickling raised when it cannot be stored."""
    try:
        data = pickle.dumps(value, protocol=_PROTOCOL)
    except Exception:
        data = b"__main__"  # let cloudpickle try, and raise its error if it cannot either
    # pickle wrote the same bytes cloudpickle would, unless it referred to the script itself.
    # (It is 5-10x faster, on every first call.)
    if b"__main__" in data:
        data = cloudpickle.dumps(value, protocol=_PROTOCOL)
    return data


def load(payload: bytes) -> object:
    """A payload of any serializer but a user's, pickles included (for ``idemfn show``)."""
    return PICKLE.load(payload)


def type_name(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


@dataclass(frozen=True)
class Failure:
    """What a halted record keeps of the exception that halted it."""

    exc_type: str
    message: str
    traceback: str
    payload: bytes | None  # None: the exception is replayed as ``Halted``
    reason: str


def _text(describe: Callable[[], str], what: str) -> str:
    # A broken __str__ must not stop the outcome from being recorded.
    try:
        return describe()
    except Exception as problem:
        return f"<{what} failed: {type(problem).__name__}: {problem}>"


def describe_failure(exc: BaseException, serializer: Serializer | None = None) -> Failure:
    """Describe ``exc`` for a halted record, keeping a payload only if it can be rebuilt."""
    kind = type_name(type(exc))
    message = _text(lambda: str(exc), "str()")
    text = _text(
        lambda: "".join(tb_module.format_exception(type(exc), exc, exc.__traceback__)),
        "formatting the traceback",
    )
    if not isinstance(exc, Exception):
        # KeyboardInterrupt, SystemExit, CancelledError: never replayed as themselves.
        return Failure(kind, message, text, None, f"the call was interrupted by {kind}")
    if serializer is not None and not serializer.unpickles:
        return _as_json_failure(exc, kind, message, text, serializer.name)
    try:
        payload = dump_value(exc)
        # Many exception classes pickle but cannot be rebuilt (an __init__ with required
        # arguments it does not pass to Exception): find out now, not at replay time.
        rebuilt = pickle.loads(payload)
        if type(rebuilt) is not type(exc):
            raise TypeError(f"it came back as {type(rebuilt).__name__}")
    except Exception as problem:
        reason = (
            f"the call raised {kind}, which could not be stored to be re-raised as itself"
            f" ({type(problem).__name__}: {problem})"
        )
        return Failure(kind, message, text, None, reason)
    return Failure(kind, message, text, payload, f"the call raised {kind}")


def _as_json_failure(
    exc: BaseException, kind: str, message: str, text: str, serializer: str
) -> Failure:
    """A builtin exception as JSON, rebuilt here to be sure it comes back as itself: same
    type, arguments, message and attributes."""
    problem = f"serializer {serializer!r} replays only builtin exceptions as themselves"
    if _BUILTIN_EXCEPTIONS.get(type(exc).__name__) is type(exc):
        problem = "it could not be stored as JSON exactly (its arguments or attributes)"
        try:
            payload = _JSON_ERROR + json.dumps([kind, list(exc.args)]).encode()
            rebuilt = _builtin_exception(payload)
        except (TypeError, ValueError):
            pass
        else:
            if (
                type(rebuilt) is type(exc)
                and rebuilt.args == exc.args
                and str(rebuilt) == message
                and _attributes(rebuilt) == _attributes(exc)
            ):
                return Failure(kind, message, text, payload, f"the call raised {kind}")
    reason = f"the call raised {kind}, which is replayed as Halted: {problem}"
    return Failure(kind, message, text, None, reason)


# Attributes builtin exceptions keep outside their args (ImportError.name, OSError.filename...)
_NAMED = ("name", "path", "obj", "filename", "filename2", "characters_written")


def _attributes(exc: BaseException) -> tuple[object, ...]:
    return (getattr(exc, "__dict__", None), *(getattr(exc, a, None) for a in _NAMED))


# Only the interpreter's own exception types: never whatever a library put in builtins.
_BUILTIN_EXCEPTIONS: dict[str, type[Exception]] = {
    name: kind
    for name, kind in vars(builtins).items()
    if isinstance(kind, type) and issubclass(kind, Exception) and kind.__module__ == "builtins"
}

_JSON_TYPES = frozenset({dict, list, tuple, str, int, float, bool, type(None)})


def _check_exact(value: object) -> None:
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
                f"a {type_name(kind)} would replay as a plain {base.__name__}: convert it first"
            )
        if kind is dict:
            for key in item:  # type: ignore[attr-defined]
                if type(key) is not str:
                    shown = next(iter(json.loads(json.dumps({key: 0}))))
                    raise TypeError(
                        f"the dict key {key!r} ({type_name(type(key))}) would replay as"
                        f" {shown!r}: use str keys"
                    )
            stack.extend(item.values())  # type: ignore[attr-defined]
        elif kind is list or kind is tuple:
            stack.extend(item)  # type: ignore[arg-type]


def _builtin_exception(payload: bytes) -> BaseException:
    name, args = json.loads(payload[len(_JSON_ERROR) :])
    kind = _BUILTIN_EXCEPTIONS.get(name) if isinstance(name, str) else None
    if kind is None or not isinstance(args, list):
        raise ValueError(f"{name!r} is not a builtin exception")
    return kind(*args)


class Codec(Protocol):
    """What ``serializer=`` accepts besides "pickle" and "json"."""

    def dumps(self, value: Any, /) -> bytes | str: ...
    def loads(self, data: bytes, /) -> Any: ...


class Serializer:
    """How a key's outcomes become payloads and come back (``serializer=``)."""

    __slots__ = ("_codec", "name", "unpickles")

    def __init__(self, name: str, codec: Codec | None, *, unpickles: bool) -> None:
        self.name = name
        self._codec = codec
        self.unpickles = unpickles

    def __repr__(self) -> str:
        return repr(self.name) if self._codec is None or self.name == "json" else self.name

    def dump_value(self, value: object) -> bytes:
        """``value`` as a payload; raises what the serializer raised when it cannot."""
        codec = self._codec
        if codec is None:
            return dump_value(value)
        if codec is json:
            try:
                text = json.dumps(value, ensure_ascii=False)  # raises on a cycle, a set...
                _check_exact(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"serializer='json' cannot store it exactly: {exc}. Return plain JSON"
                    " types, or use serializer='pickle'"
                ) from None
            return _JSON_VALUE + text.encode()
        data = codec.dumps(value)
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, bytes):
            raise TypeError(f"{self.name}.dumps() returned {type(data).__name__}, not bytes or str")
        return _CUSTOM + data

    def load(self, payload: bytes) -> object:
        """A fresh copy of what ``payload`` holds (a value, or an exception to raise).

        Raises ``ValueError`` for a pickle when this serializer must not unpickle, and for a
        user serializer's payload that this one cannot read.
        """
        if payload[:1] == b"\x80":
            if not self.unpickles:
                raise ValueError(
                    f"it holds a pickle, and serializer {self.name!r} never unpickles: it was"
                    " recorded with serializer='pickle'"
                )
            return pickle.loads(payload)
        tag = payload[:2]
        if tag == _JSON_VALUE:
            return json.loads(payload[2:])
        if tag == _JSON_ERROR:
            return _builtin_exception(payload)
        if tag == _CUSTOM and self._codec is not None and self._codec is not json:
            return self._codec.loads(payload[2:])
        if tag == _CUSTOM:
            raise ValueError(f"it was recorded with a custom serializer, not {self.name!r}")
        raise ValueError("it is not a payload this idemfn knows")


PICKLE = Serializer("pickle", None, unpickles=True)
JSON = Serializer("json", json, unpickles=False)


def serializer_of(given: object) -> Serializer:
    """``serializer=``: "pickle", "json", or an object with ``dumps`` and ``loads``."""
    if given == "pickle":
        return PICKLE
    if given == "json":
        return JSON
    if isinstance(given, str) or not (
        callable(getattr(given, "dumps", None)) and callable(getattr(given, "loads", None))
    ):
        raise TypeError(
            "serializer must be 'pickle', 'json', or an object with dumps(value) -> bytes and"
            f" loads(bytes) -> value, not {given!r}"
        )
    name = getattr(given, "__name__", None) or type(given).__qualname__
    return Serializer(str(name), given, unpickles=False)  # type: ignore[arg-type]


SerializerOption = Literal["pickle", "json"] | Codec


def replay_note(key: str, finished_at: float | None) -> str:
    when = (
        datetime.fromtimestamp(finished_at, timezone.utc).isoformat(timespec="seconds")
        if finished_at is not None
        else "an unknown time"
    )
    return f"idemfn: replayed from the record of key {key!r}, which halted at {when}"
