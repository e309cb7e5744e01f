"""Outcomes as bytes: the returned value, or the raised exception with what describes it.

(Over 600 lines: the pickle rules below are one piece, and pickles name ``_main_class`` in this
module, so they stay together; the JSON payloads are in ``_json_codec``.)

A ``Serializer`` turns them into a record's payload. The default, ``"pickle"``, writes values
and exceptions with pickle, or cloudpickle where pickle cannot do as well (lambdas, local
classes, objects of the running script's ``__main__``), and reads them back with plain
``pickle``. ``"json"`` and a user's object with ``dumps``/``loads`` never unpickle anything:
they store values their way and only builtin exceptions (type and arguments, as JSON), so
others replay as ``Halted``. Every replay builds a fresh copy.

What is written must load back, as the same types (issue 13):

- A class of the script's ``__main__`` is written by name, with a copy of it by value: a replay
  gets the class of the running ``__main__`` when it defines one of that name, so that the
  script's next run catches its own exceptions and compares its own dataclasses; any other
  program (``idemfn show``) loads the copy, as cloudpickle alone would.
- An exception that is wholly its ``args``, ``__dict__`` and its classes' own ``__slots__`` (no
  state of a builtin base such as ``OSError.errno``, no ``__reduce__``/``__setstate__``/``__new__``
  of its own) is rebuilt without calling ``__init__``, whose signature often differs from ``args``
  (``__init__(self, code, detail)`` passing one message to ``Exception``). Raised exceptions are
  always written so; exceptions inside a returned value when the default way does not load back.
- A value is loaded back once before it is recorded ``ok`` unless its pickle refers to no class
  or function at all (then it is builtin containers and scalars, which always load).
  ``NotLoadable`` says why it did not, for the engine to halt the key instead of recording
  something that every replay would fail to load.

Payloads say how they were written: a pickle starts with its protocol byte (0x80); the others
start with a zero byte and a tag, so that a serializer that must not unpickle can refuse a
pickle, and ``idemfn show`` can read a JSON value.
"""

from __future__ import annotations

import contextlib
import copyreg
import json
import pickle
import re
import sys
import threading
import traceback as tb_module
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

import cloudpickle

from ._errors import IdempotencyError
from ._json_codec import (
    builtin_exception,
    check_exact,
    exact_exception_json,
    is_builtin_exception,
    json_text,
    json_value,
)

__all__ = [
    "ExceptionDescription",
    "NotLoadable",
    "Serializer",
    "describe_exception",
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

# A pickle refers to a class or function only through STACK_GLOBAL (protocol 5 never writes
# GLOBAL), or EXT1/2/4 for what copyreg.add_extension registered (the same dict pickle reads).
# A pickle without them holds only builtin containers and scalars, which always load back. The
# bytes may also occur inside data (binary floats, non-ASCII text): then the check below loads
# back for nothing, never the other way round.
_STACK_GLOBAL = b"\x93"
_EXT = re.compile(b"[\x82-\x84]")
_EXTENSIONS: dict[object, object] = copyreg._extension_registry  # type: ignore[attr-defined]
# Above this size, finding out exactly whether the value holds any object besides builtin
# containers and scalars (one more pickling, stopped at the first such object) is cheaper than
# loading back a payload that only looks as if it does (e.g. a long list of floats).
_LARGE = 16 * 1024


class NotLoadable(Exception):
    """A value pickled, but its bytes do not load back: every replay would fail.

    Raised by ``Serializer.dump_value``; ``str()`` is the reason to record (the failing type and
    how to fix it). The engine halts the key with it and still returns the value to the caller.
    """


# Scalars pickle in one C call, as fast as copying them; anything else may be a container of
# millions of objects, which pickle.dumps and pickle.loads would walk holding the GIL.
_ATOMIC = frozenset({type(None), bool, int, float, complex, str, bytes})


class _Frames:
    """Where pickle writes a value a frame (64 KiB) at a time. This Python ``write`` between
    frames lets other threads run while a large value is pickled: the heartbeat renewing the
    claim's lease among them (``pickle.dumps`` holds the GIL throughout: a second for 100 MB,
    long enough for a short lease to lapse under a live owner, issue 13)."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(data)
        return len(data)


def _pickle(value: object) -> bytes:
    """``pickle.dumps(value)``, the same bytes, yielding the GIL between frames."""
    if type(value) in _ATOMIC:
        return pickle.dumps(value, protocol=_PROTOCOL)
    return _dump(pickle.Pickler, value)


def _dump(pickler: type[pickle.Pickler], value: object) -> bytes:
    """``value`` pickled by a ``pickler``, written a frame at a time (see ``_Frames``)."""
    frames = _Frames()
    pickler(frames, protocol=_PROTOCOL).dump(value)
    parts = frames.parts
    if len(parts) == 1 and type(parts[0]) is bytes:
        return parts[0]
    return b"".join(parts)


class _FrameReader:
    """What pickle reads a large payload from, a frame at a time: a Python ``read`` between
    frames lets other threads run while it is loaded back (as ``_Frames`` when dumping)."""

    __slots__ = ("data", "position")

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        start = self.position
        end = len(self.data) if size < 0 else min(start + size, len(self.data))
        self.position = end
        return self.data[start:end].tobytes()

    def readinto(self, buffer: memoryview) -> int:
        start = self.position
        chunk = self.data[start : start + len(buffer)]
        buffer[: len(chunk)] = chunk
        self.position = start + len(chunk)
        return len(chunk)

    def readline(self) -> bytes:  # protocol 0 only; never written here, but part of the API
        data, start = self.data, self.position
        end = bytes(data[start:]).find(b"\n")
        end = len(data) if end < 0 else start + end + 1
        self.position = end
        return data[start:end].tobytes()


_YIELDING_LOAD = 1024 * 1024  # bytes: smaller payloads load in a few milliseconds at most


def _unpickle(data: bytes) -> object:
    """``pickle.loads(data)``; a large payload yielding the GIL between frames."""
    if len(data) < _YIELDING_LOAD:
        return pickle.loads(data)
    return pickle.Unpickler(_FrameReader(data)).load()


def dump_value(value: object) -> bytes:
    """``value`` as a pickle that loads back.

    Raises ``NotLoadable`` when the bytes do not load back, else whatever pickling raised.
    """
    try:
        data = _pickle(value)
    except Exception:
        data = b"__main__"  # let cloudpickle try, and raise its error if it cannot either
    # pickle wrote the same bytes cloudpickle would, unless it referred to the script itself.
    # (It is 5-10x faster, on every first call.)
    cloud = _mentions_main(data)
    if not cloud:
        if _STACK_GLOBAL not in data and not (_EXTENSIONS and _EXT.search(data)):
            return data  # builtin containers and scalars: nothing to load back
        if len(data) > _LARGE and _only_builtins(value):
            return data
        try:
            _unpickle(data)
        except Exception:
            pass  # e.g. an exception inside whose __init__ takes other arguments: write it exactly
        else:
            return data
    data = _exact_dumps(value, cloud=cloud)
    try:
        _unpickle(data)
    except Exception as problem:
        raise NotLoadable(_not_loadable(value, problem)) from None
    return data


class _Found(Exception):
    pass


class _Sink:
    """Where ``_Finder`` writes: nowhere (pickle writes a frame at a time)."""

    def write(self, data: bytes) -> int:
        return len(data)


class _Finder(pickle.Pickler):
    """Raises ``_Found`` at the first object that is not a builtin container or scalar (the
    only objects for which pickle calls ``reducer_override``)."""

    def reducer_override(self, obj: Any) -> Any:
        raise _Found


def _only_builtins(value: object) -> bool:
    try:
        _Finder(_Sink(), protocol=_PROTOCOL).dump(value)
    except _Found:
        return False
    return True


def _not_loadable(value: object, problem: Exception) -> str:
    # Where a Python-level rebuild (an __init__, a __setstate__) failed, when it was one.
    where = ""
    tb = problem.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None and tb.tb_frame.f_code.co_filename != __file__:
        code = tb.tb_frame.f_code
        name = code.co_name
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None:
            name = f"{type(owner).__qualname__}.{name}"  # co_qualname is 3.11+
        where = f", raised in {name} at {code.co_filename}:{tb.tb_lineno}"
    return (
        f"the call returned a {type_name(type(value))}, which pickles but does not load back"
        f" ({type(problem).__name__}: {problem}{where}), so no replay could return it. Make the"
        " type that fails rebuildable from its pickle: a __reduce__ (or __getnewargs__) that"
        " returns what its __init__ takes, an __init__ that accepts the arguments it is rebuilt"
        " with, or a __setstate__ that accepts its state; or return other types, or pass"
        " serializer= with a codec that stores it"
    )


def _exact_dumps(value: object, *, cloud: bool = False) -> bytes:
    """``value`` pickled with exceptions rebuilt without ``__init__`` where that is exact, and
    the script's own classes by name; with cloudpickle when ``cloud`` or where pickle cannot
    do as well (lambdas, local classes, the script's ``__main__``)."""
    if not cloud:
        try:
            data = _dump(_ExactPickler, value)
        except Exception:
            pass
        else:
            if not _mentions_main(data):
                return data
    with _script_by_value():
        return _dump(_CloudPickler, value)  # raises if it cannot either


# The script's module: __main__, or __mp_main__ in a multiprocessing "spawn"/"forkserver"
# child, which runs the script under that name. A pickle naming __mp_main__ only loads in a
# process that imported multiprocessing (which aliases it to its __main__): never in the
# script's next run without it, nor in another program.
_SCRIPT_MODULES = ("__main__", "__mp_main__")
_by_value_lock = threading.RLock()  # reentrant: a dump inside a dump finds it registered


def _mentions_main(data: bytes) -> bool:
    return b"__main__" in data or b"__mp_main__" in data


@contextlib.contextmanager
def _script_by_value() -> Iterator[None]:
    """In a child where the script runs as ``__mp_main__``, cloudpickle writes its functions
    and classes by value, as it does those of ``__main__`` (it only knows that name)."""
    module = sys.modules.get("__mp_main__")
    if module is None or getattr(module, "__name__", None) != "__mp_main__":
        yield  # the usual case: the script is __main__ (its alias, after multiprocessing)
        return
    with _by_value_lock:
        if "__mp_main__" in cloudpickle.list_registry_pickle_by_value():
            yield  # registered by someone else: theirs to keep
            return
        cloudpickle.register_pickle_by_value(module)
        try:
            yield
        finally:
            cloudpickle.unregister_pickle_by_value(module)


# State that a builtin exception keeps outside args and __dict__ is a member or getset
# descriptor of its class (OSError.errno, StopIteration.value); so are a class's __slots__.
_STATE = (types.MemberDescriptorType, types.GetSetDescriptorType)
_OWN_PICKLING = ("__reduce__", "__reduce_ex__", "__setstate__")


_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement


def _declared_slots(base: type) -> set[str]:
    """The (mangled) attribute names of the ``__slots__`` a Python class declares itself."""
    if not base.__flags__ & _HEAPTYPE or "__slots__" not in vars(base):
        return set()
    declared = vars(base)["__slots__"]
    names = [declared] if isinstance(declared, str) else list(declared)
    prefix = "_" + base.__name__.lstrip("_")
    return {
        prefix + name if name.startswith("__") and not name.endswith("__") else name
        for name in names
    }


def _exact_state(kind: type[BaseException]) -> list[tuple[str, Any]] | None:
    """The ``__slots__`` (name, descriptor) of ``kind``'s Python classes when an exception of
    ``kind`` is wholly its ``args``, ``__dict__`` and those slots: then building it with
    ``__new__(kind, *args)`` and setting them gives it back exactly, without ``__init__``.
    None when it is not (state of a builtin base, its own way to pickle, a ``__new__``)."""
    slots: list[tuple[str, Any]] = []
    for base in kind.__mro__:
        if base is BaseException:
            return slots
        attrs = vars(base)
        if any(name in attrs for name in _OWN_PICKLING):
            return None  # its own way to pickle (OSError, ImportError, a user's): keep it
        new = attrs.get("__new__")
        if new is not None and not isinstance(new, types.BuiltinFunctionType):
            return None  # a __new__ in Python may want other arguments
        own = None
        for name, attr in attrs.items():
            if isinstance(attr, _STATE) and name not in ("__dict__", "__weakref__"):
                if own is None:
                    own = _declared_slots(base)
                if name not in own:
                    return None  # a builtin base's state (OSError.errno)
                slots.append((name, attr))
    return None


def _reduce_exception(exc: BaseException) -> tuple[Any, ...] | None:
    kind = type(exc)
    slots = _exact_state(kind)
    if slots is None:
        return None
    state = dict(exc.__dict__)
    for name, descriptor in slots:  # BaseException.__setstate__ sets each with setattr
        try:
            state[name] = descriptor.__get__(exc, kind)
        except AttributeError:
            pass  # never set
    # copyreg.__newobj__ is pickle's NEWOBJ: kind.__new__(kind, *args), then __setstate__ with
    # the __dict__, exactly as BaseException.__reduce__ would but for the __init__ call. Any
    # pickle reader loads it, idemfn or not.
    newobj = copyreg.__newobj__  # type: ignore[attr-defined]  # not in typeshed
    return (newobj, (kind, *exc.args), state or None)


class _ExactPickler(pickle.Pickler):
    """pickle, but exceptions are rebuilt without ``__init__`` where that is exact."""

    def reducer_override(self, obj: Any) -> Any:
        if issubclass(type(obj), BaseException):
            reduced = _reduce_exception(obj)
            if reduced is not None:
                return reduced
        return NotImplemented


class _CloudPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, with exceptions as ``_ExactPickler`` writes them, and the classes of the
    script's ``__main__`` by name with a copy by value (see ``_main_class``)."""

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if issubclass(kind, BaseException):
            reduced = _reduce_exception(obj)
            if reduced is not None:
                return reduced
        elif issubclass(kind, type) and obj.__module__ in _SCRIPT_MODULES:
            qualname: str = obj.__qualname__
            if "<locals>" not in qualname:  # else it cannot be looked up: by value only
                try:
                    copy: bytes | None = cloudpickle.dumps(obj, protocol=_PROTOCOL)
                except Exception:  # a class attribute that does not pickle: by name only
                    copy = None
                return (_main_class, (qualname, copy))
        return super().reducer_override(obj)


def _main_class(qualname: str, copy: bytes | None) -> type:
    """A class of the writer's ``__main__``: the running ``__main__``'s class of that name when
    it has one (the script's next run, which must catch its own exceptions and compare its own
    dataclasses), else the copy stored by value (any other program).

    Pickles call this by reference: keep its name and arguments.
    """
    found: object = sys.modules.get("__main__")
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if (
        isinstance(found, type)
        and found.__qualname__ == qualname
        # __mp_main__: the script's module in a multiprocessing "spawn" child
        and found.__module__ in _SCRIPT_MODULES
    ):
        return found
    if copy is None:
        raise pickle.UnpicklingError(
            f"the class {qualname} of the recording script's __main__ is not defined in this"
            " program, and had no copy stored by value (a class attribute did not pickle)"
        )
    cls = pickle.loads(copy)
    if not isinstance(cls, type):
        raise pickle.UnpicklingError(f"the stored copy of {qualname} is not a class")
    return cls


def load(payload: bytes) -> object:
    """A payload of any serializer but a user's, pickles included (for ``idemfn show``)."""
    return PICKLE.load(payload)


def type_name(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


@dataclass(frozen=True)
class ExceptionDescription:
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


def describe_exception(
    exc: BaseException, serializer: Serializer | None = None
) -> ExceptionDescription:
    """Describe ``exc`` for a halted record, keeping a payload only if it can be rebuilt."""
    kind = type_name(type(exc))
    message = _text(lambda: str(exc), "str()")
    text = _text(
        lambda: "".join(tb_module.format_exception(type(exc), exc, exc.__traceback__)),
        "formatting the traceback",
    )
    if not isinstance(exc, Exception):
        # KeyboardInterrupt, SystemExit, CancelledError: never replayed as themselves.
        return ExceptionDescription(
            kind, message, text, None, f"the call was interrupted by {kind}"
        )
    if isinstance(exc, IdempotencyError):
        # idemfn's own error from a call inside the body (its key busy elsewhere, halted,
        # other arguments...) is about that call, not this key's outcome: replayed as itself
        # for the whole ttl, AlreadyRunning would tell this key's callers to retry when
        # retrying can only replay it. Not released either: the body may have had side
        # effects before the inner call, and at-most-once is the default (retry_on= releases).
        about = f" about key {exc.key!r}" if exc.key else ""
        reason = (
            f"its body raised idemfn's {type(exc).__name__}{about}, which is replayed as"
            " Halted: retrying this key cannot run the body again. Forget this key to run it"
            f" again, or pass retry_on=idemfn.{type(exc).__name__} to release it instead"
        )
        return ExceptionDescription(kind, message, text, None, reason)
    if serializer is not None and not serializer.unpickles:
        return _as_json_description(exc, kind, message, text, serializer.name)
    try:
        # Raised exceptions are always written exactly (without __init__ where that is
        # exact): a message and attributes as they were raised, not as __init__ remakes them.
        payload = _exact_dumps(exc)
        # Some exceptions still pickle but cannot be rebuilt (an OSError subclass whose
        # __init__ takes other arguments): find out now, not at replay time.
        rebuilt = pickle.loads(payload)
        if type(rebuilt) is not type(exc):
            raise TypeError(f"it came back as {type(rebuilt).__name__}")
        if str(rebuilt) != message:  # rebuilt by an __init__ that rewords its arguments
            raise TypeError(f"it came back with the message {str(rebuilt)!r}")
    except Exception as problem:
        reason = (
            f"the call raised {kind}, which could not be stored to be re-raised as itself"
            f" ({type(problem).__name__}: {problem})"
        )
        return ExceptionDescription(kind, message, text, None, reason)
    return ExceptionDescription(kind, message, text, payload, f"the call raised {kind}")


def _as_json_description(
    exc: BaseException, kind: str, message: str, text: str, serializer: str
) -> ExceptionDescription:
    """A builtin exception as JSON, when it comes back as itself (see ``exact_exception_json``)."""
    problem = f"serializer {serializer!r} replays only builtin exceptions as themselves"
    if is_builtin_exception(exc):
        problem = "it could not be stored as JSON exactly (its arguments or attributes)"
        data = exact_exception_json(exc, kind, message)
        if data is not None:
            return ExceptionDescription(
                kind, message, text, _JSON_ERROR + data, f"the call raised {kind}"
            )
    reason = f"the call raised {kind}, which is replayed as Halted: {problem}"
    return ExceptionDescription(kind, message, text, None, reason)


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
        """``value`` as a payload; raises what the serializer raised when it cannot, and
        ``NotLoadable`` when what it wrote does not load back."""
        codec = self._codec
        if codec is None:
            return dump_value(value)
        if codec is json:
            try:
                text = json_text(value)  # raises on a cycle, a set...
                check_exact(value)
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
        try:
            codec.loads(data)
        except Exception as problem:
            raise NotLoadable(
                f"the call returned a {type_name(type(value))}, which {self.name}.loads() cannot"
                f" read back from what {self.name}.dumps() wrote ({type(problem).__name__}:"
                f" {problem}), so no replay could return it. Make the serializer read what it"
                " writes, or return other types"
            ) from None
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
            return json_value(payload[2:])
        if tag == _JSON_ERROR:
            return builtin_exception(payload[2:])
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
