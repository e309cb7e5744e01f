"""Outcomes as bytes: the returned value, or the raised exception with what describes it.

Values and exceptions are written with pickle, or cloudpickle where pickle cannot do as well
(lambdas, local classes, objects of the running script's ``__main__``, which cloudpickle stores
by value so that other processes can load them), and read back with plain ``pickle``: every
replay builds a fresh copy.
"""

from __future__ import annotations

import pickle
import traceback as tb_module
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import cloudpickle

__all__ = ["Failure", "describe_failure", "dump_value", "load", "replay_note", "type_name"]


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
    return pickle.loads(payload)


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


def describe_failure(exc: BaseException) -> Failure:
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


def replay_note(key: str, finished_at: float | None) -> str:
    when = (
        datetime.fromtimestamp(finished_at, timezone.utc).isoformat(timespec="seconds")
        if finished_at is not None
        else "an unknown time"
    )
    return f"idemfn: replayed from the record of key {key!r}, which halted at {when}"
