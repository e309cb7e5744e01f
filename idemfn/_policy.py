"""The options that govern a key's calls, validated once: errors name the option.

``Policy`` holds ``begin``'s options; ``seconds_option``, ``whole_option`` and
``deadline_timestamp`` check one option each, for ``Policy``, the decorator and the task-queue
integrations alike.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from ._outcome import Serializer, SerializerOption, serializer_of
from .events import PROCESS, Observer

__all__ = ["Policy", "deadline_timestamp", "seconds_option", "whole_option"]


class Policy:
    """The options that govern a key's calls, for ``begin`` and ``abegin``, validated once.

    ``@idempotent`` builds one from its own options of the same names; the low-level API takes
    one as ``policy=`` (default: ``Policy()``). Every option is keyword-only:

    ```python
    policy = idemfn.Policy(ttl=timedelta(days=7), wait=5, on_abandoned="retry")
    step = idemfn.begin("emails:welcome:42", store=store, policy=policy)
    ```

    Args:
        ttl: How long a finished record is kept, counted from when the call finished: seconds
            (> 0) or a ``timedelta``. Default 86400.0 (a day); None keeps records until
            forgotten. An expired record counts as absent: the next call runs again.
        lease: How long a claim stays valid without renewal: seconds (> 0) or a
            ``timedelta``. Default 30.0. A heartbeat thread renews every live ``Claim`` a
            third of the way through; an owner on another machine is judged gone once its
            lease runs out (one on this machine as soon as its process is gone).
        wait: How long ``begin`` waits for a key held by a live owner to finish (woken when
            the owner settles it, looking again at intervals as the fallback; ``abegin``
            without blocking its event loop) before raising ``AlreadyRunning``: seconds
            (>= 0) or a ``timedelta``. Default 0.0: raise at once.
        on_abandoned: What becomes of a claim whose owner is gone (crashed, killed, lost its
            lease). ``"halt"`` (default): the record becomes ``halted`` and is returned as a
            ``Finished`` whose ``replay()`` raises ``Halted`` (at most once: the side effect
            may have happened). ``"retry"``: exactly one caller takes the claim over
            (``attempt + 1``) and gets a ``Claim`` (at least once).
        retry_on: Exception types (one, or a tuple) that ``Claim.fail`` does not record: the
            key is released, so the next call runs again. Default ``()``: every exception is
            recorded ``halted``.
        serializer: How outcomes are stored: ``"pickle"`` (default; cloudpickle where pickle
            cannot, and a replay unpickles: trust the store or sign its records), ``"json"``
            (plain JSON values; builtin exceptions replay as themselves, others as
            ``Halted``; never unpickles), or an object with ``dumps(value) -> bytes | str``
            and ``loads(data) -> value``.

    Attributes:
        ttl: The ``ttl`` option in float seconds (None: kept until forgotten).
        lease: The ``lease`` option in float seconds.
        wait: The ``wait`` option in float seconds.
        on_abandoned: ``"halt"`` or ``"retry"``.
        retry_on: The ``retry_on`` option as a tuple of exception types.
        serializer: The ``serializer`` option, resolved.
        observer: Where the events of these calls go (``idemfn.events``): the process-wide
            handlers' for a ``Policy()``; ``@idempotent`` gives its function its own. Internal.

    Raises:
        TypeError: An option of the wrong type (a string for ``ttl``, a ``retry_on`` that is
            not exception types, a ``serializer`` without ``dumps``/``loads``); the message
            names the option.
        ValueError: An option out of range (a ``ttl`` or ``lease`` <= 0, a negative
            ``wait``, an infinite or NaN number, an ``on_abandoned`` other than ``"halt"`` or
            ``"retry"``); the message names the option.
    """

    __slots__ = ("lease", "observer", "on_abandoned", "retry_on", "serializer", "ttl", "wait")

    def __init__(
        self,
        *,
        ttl: float | timedelta | None = 86400.0,
        lease: float | timedelta = 30.0,
        wait: float | timedelta = 0.0,
        on_abandoned: Literal["halt", "retry"] = "halt",
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (),
        serializer: SerializerOption = "pickle",
    ) -> None:
        self.serializer: Serializer = serializer_of(serializer)
        self.ttl = None if ttl is None else seconds_option("ttl", ttl, positive=True)
        self.lease = seconds_option("lease", lease, positive=True)
        self.wait = seconds_option("wait", wait, positive=False)
        if on_abandoned not in ("halt", "retry"):
            raise ValueError(f"on_abandoned must be 'halt' or 'retry', not {on_abandoned!r}")
        self.on_abandoned = on_abandoned
        types: object = (retry_on,) if isinstance(retry_on, type) else retry_on
        if not isinstance(types, tuple) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in types
        ):
            raise TypeError(
                f"retry_on must be an exception type or a tuple of them, not {retry_on!r}"
            )
        self.retry_on: tuple[type[BaseException], ...] = types
        # Where the decisions of these calls go (idemfn.events): the decorator gives each
        # function its own; begin() used directly reports to the process-wide handlers only.
        self.observer: Observer = PROCESS

    def __repr__(self) -> str:
        return (
            f"Policy(ttl={self.ttl!r}, lease={self.lease!r}, wait={self.wait!r},"
            f" on_abandoned={self.on_abandoned!r}, retry_on={self.retry_on!r},"
            f" serializer={self.serializer!r})"
        )


def seconds_option(option: str, value: object, *, positive: bool) -> float:
    """``option`` (a number of seconds or a timedelta) as float seconds; errors name it."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{option} must be a number of seconds or a timedelta, not {type(value).__name__}"
        )
    seconds = float(value)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError(f"{option} must be a finite number of seconds, not {value!r}")
    if positive and seconds <= 0:
        raise ValueError(f"{option} must be > 0 seconds, not {value!r}")
    if not positive and seconds < 0:
        raise ValueError(f"{option} must be >= 0 seconds, not {value!r}")
    return seconds


def whole_option(option: str, value: object, *, least: int) -> int:
    """``option`` (a whole number, at least ``least``) checked; errors name it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{option} must be a whole number >= {least}, not {value!r}")
    return value


def deadline_timestamp(deadline: object, *, option: str = "deadline") -> float:
    """A deadline as UNIX seconds; it must be an aware datetime."""
    if not isinstance(deadline, datetime):
        raise TypeError(f"{option} must be an aware datetime, not {type(deadline).__name__}")
    if deadline.utcoffset() is None:
        raise ValueError(
            f"{option} must be timezone-aware (e.g. datetime.now(timezone.utc) + ...),"
            f" not the naive {deadline!r}"
        )
    return deadline.timestamp()
