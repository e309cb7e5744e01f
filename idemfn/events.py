"""Events: every decision idemfn makes about a call, for handlers to count, trace or log.

```python
import idemfn

def count(event: idemfn.Event) -> None:
    print(event.name, event.key, event.function, event.duration)

with idemfn.subscribe(count):          # every decorated function in this process
    charge("order-1", 100)             # call_started, claimed, completed, call_ended

subscription = charge.subscribe(count, events=["replayed"])   # one function, one event
subscription.close()
```

Each event is an ``Event`` (a named tuple) with a stable ``name`` (``EVENTS`` lists them all)
and the same fields: the key, the function, the store's kind, the attempt, a duration, a
low-cardinality ``reason`` (what metrics may use as a label) and a free-text ``detail``.
Handlers run in the thread (or event loop) that made the decision, in the order they were
subscribed, and must be quick: a handler that raises is logged and never breaks the call.

With no handler subscribed, nothing is built and nothing is called: each place a decision is
made tests one attribute. The OpenTelemetry (``idemfn.otel``) and Prometheus
(``idemfn.prometheus``) integrations are handlers built on this.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Final, NamedTuple

__all__ = [
    "ABANDONED",
    "BUSY",
    "CALL_ENDED",
    "CALL_STARTED",
    "CLAIMED",
    "COMPLETED",
    "DEADLINE_EXCEEDED",
    "DECISIONS",
    "EVENTS",
    "HALTED",
    "MISMATCH",
    "OWNERSHIP_LOST",
    "RELEASED",
    "REPLAYED",
    "STORE_ERROR",
    "WAITED",
    "Event",
    "Handler",
    "Subscription",
    "halted_reason",
    "key_hash",
    "log_fields",
    "store_kind",
    "subscribe",
]

logger = logging.getLogger("idemfn")

# The names, stable: metrics, dashboards and alerts are built on them.
CALL_STARTED: Final = "call_started"
CLAIMED: Final = "claimed"
COMPLETED: Final = "completed"
HALTED: Final = "halted"
RELEASED: Final = "released"
REPLAYED: Final = "replayed"
WAITED: Final = "waited"
BUSY: Final = "busy"
MISMATCH: Final = "mismatch"
ABANDONED: Final = "abandoned"
OWNERSHIP_LOST: Final = "ownership_lost"
STORE_ERROR: Final = "store_error"
DEADLINE_EXCEEDED: Final = "deadline_exceeded"
CALL_ENDED: Final = "call_ended"

#: The decisions: every event but the two that frame a decorated function's call.
DECISIONS: Final = (
    CLAIMED,
    COMPLETED,
    HALTED,
    RELEASED,
    REPLAYED,
    WAITED,
    BUSY,
    MISMATCH,
    ABANDONED,
    OWNERSHIP_LOST,
    STORE_ERROR,
    DEADLINE_EXCEEDED,
)
#: Every event name, in the order a call may emit them.
EVENTS: Final = (CALL_STARTED, *DECISIONS, CALL_ENDED)


class Event(NamedTuple):
    """One decision about one call, as handlers get it. Fields a decision has no value for are
    None; the table on the documentation's Observability page says which each event has.

    Attributes:
        name: What happened: one of ``EVENTS`` (``"claimed"``, ``"replayed"``, ...).
        key: The full stored key (``name:key``). It may hold personal data: export
            ``key_hash(key)`` where that matters.
        function: The decorated function (``module.qualname``); ``"http"`` for the HTTP
            middleware, ``"idemfn run"`` for the command; None for ``begin()`` used directly.
        store: The store's kind: ``"disk"``, ``"memory"``, ``"redis"``, ``"rediscluster"``,
            ``"postgres"``, or a custom store's class name, lowercased, without ``Store``.
        attempt: The claim's attempt (1, then one more per takeover), where there is one.
        duration: Seconds: the body's time (``completed``, ``halted``, ``released``,
            ``ownership_lost``), the wait's (``waited``), the whole call's (``call_ended``).
        reason: A short, fixed word saying why (a label for metrics): for ``halted``
            ``raised``, ``unstorable``, ``interrupted``, ``abandoned``, ``incomplete`` or
            ``other``; for ``released`` ``retry_on``, ``queue_retry``, ``retry_request``,
            ``not_started``, ``undone`` or ``released``; for ``abandoned`` ``owner_died`` or
            ``lease_expired``; for ``busy`` ``live_owner`` or ``reentered``; for
            ``store_error`` ``decide``, ``settle`` or ``renew``; for ``ownership_lost``
            ``settle`` or ``renew``.
        detail: Free text: the halted record's reason, the error's message.
        owner: The owner of the claim (``abandoned``, ``busy``, ``ownership_lost``).
        status: ``replayed``: the record's status (``ok``, ``halted``); ``abandoned``: what
            became of the claim (``halted``, ``taken_over``); ``call_ended``: ``ok`` (returned)
            or ``raised``.
        error: The exception: the body's (``halted``, ``released``, ``call_ended``), or
            idemfn's own (``busy``, ``mismatch``, ``store_error``, ``ownership_lost``,
            ``deadline_exceeded``).
        at: When it happened (UNIX seconds, this machine's clock).
    """

    name: str
    key: str
    function: str | None
    store: str
    attempt: int | None = None
    duration: float | None = None
    reason: str | None = None
    detail: str | None = None
    owner: str | None = None
    status: str | None = None
    error: BaseException | None = None
    at: float = 0.0


Handler = Callable[[Event], object]
_new_tuple: Any = tuple.__new__

_kinds: dict[type, str] = {}


def store_kind(store: object) -> str:
    """The kind of ``store`` as events and metrics name it: its class name, lowercased,
    without ``Store`` (``DiskStore`` is ``"disk"``)."""
    cls = type(store)
    kind = _kinds.get(cls)
    if kind is None:
        if getattr(cls, "_forwards_to_store", False):  # a wrapper of a store (idemfn run's)
            return store_kind(store.store)  # type: ignore[attr-defined]
        name = cls.__name__
        kind = _kinds[cls] = (
            name[:-5] if name.endswith("Store") and name != "Store" else name
        ).lower()
    return kind


def key_hash(key: str) -> str:
    """A short stable stand-in for ``key`` (the first 16 hex digits of its SHA-256), for
    exporting where a key may hold personal data. The same key gives the same hash in every
    process, so a hash in a trace can be matched with ``key_hash(key)``."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def log_fields(key: str, decision: str) -> dict[str, str]:
    """The ``extra`` of a log line about ``key``: ``idemfn_key``, ``idemfn_key_hash`` (see
    ``key_hash``) and ``idemfn_decision`` (an event name, or what the line reports), which
    structured loggers pick up as the record's attributes."""
    return {"idemfn_key": key, "idemfn_key_hash": key_hash(key), "idemfn_decision": decision}


def halted_reason(reason: str | None, exc_type: str | None) -> str:
    """The ``reason`` word of a halted record, from its recorded reason text and exception type:
    one rule for the ``halted`` event, the metrics and ``idemfn stats``.

    It reads only how idemfn's own reason texts begin and end (never an exception's message,
    which the reason text does not hold), so a user's names cannot change the word.
    """
    text = reason or ""
    if text.startswith("abandoned"):
        return "abandoned"
    if text.startswith(("the call was interrupted by ", "interrupted by ")) or (
        text.startswith("the call raised ") and text.endswith(", interrupted while storing it")
    ):
        return "interrupted"
    if text.startswith("the claim's block ended without complete()"):
        return "incomplete"
    if text.startswith("the call returned a "):
        return "unstorable"
    if exc_type is not None:
        return "raised"
    return "other"


class Subscription:
    """A subscribed handler: ``close()`` it (or leave its ``with`` block) to unsubscribe.

    Made by ``idemfn.subscribe`` (every function of the process) or by a decorated function's
    ``subscribe`` (that function only).

    Attributes:
        handler: The handler.
        events: The event names it gets.
    """

    __slots__ = ("_failed", "_logged_at", "_observer", "events", "handler")

    def __init__(self, handler: Handler, events: frozenset[str], observer: Observer | None):
        self.handler = handler
        self.events = events
        self._observer = observer
        # The rate limit of a failing handler's log lines (see _handler_failed): when one was
        # last logged (time.monotonic()), and how many failures since.
        self._logged_at: float | None = None
        self._failed = 0

    @property
    def active(self) -> bool:
        """Whether the handler still gets events."""
        with _lock:
            if self._observer is None:
                return self in _process
            return self in self._observer.own

    def close(self) -> None:
        """Unsubscribe the handler; closing again does nothing."""
        with _lock:
            if self._observer is None:
                if self in _process:
                    _process.remove(self)
                    for observer in list(_observers):
                        observer.refresh()
            elif self in self._observer.own:
                self._observer.own = tuple(s for s in self._observer.own if s is not self)
                self._observer.refresh()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "every function" if self._observer is None else repr(self._observer.function)
        state = "active" if self.active else "closed"
        handler = getattr(self.handler, "__qualname__", None) or repr(self.handler)
        return f"<Subscription {handler} on {where} ({len(self.events)} events, {state})>"


_lock = threading.RLock()
_process: list[Subscription] = []  # process-wide subscriptions, in order
_observers: weakref.WeakSet[Observer] = weakref.WeakSet()


class Observer:
    """Where one function's decisions go (internal): the process-wide handlers, then its own.

    ``live`` is the one attribute every decision point tests; it is True only while some
    handler is subscribed, so that with none no event is built."""

    __slots__ = ("__weakref__", "framed", "function", "live", "own", "wanted")

    def __init__(self, function: str | None) -> None:
        self.function = function
        self.own: tuple[Subscription, ...] = ()
        self.wanted: dict[str, tuple[Subscription, ...]] = {}
        self.live = False
        self.framed = False
        with _lock:
            _observers.add(self)
            self.refresh()

    def refresh(self) -> None:
        wanted: dict[str, list[Subscription]] = {}
        for subscription in (*_process, *self.own):
            for name in EVENTS:
                if name in subscription.events:
                    wanted.setdefault(name, []).append(subscription)
        self.wanted = {name: tuple(subscriptions) for name, subscriptions in wanted.items()}
        self.live = bool(self.wanted)
        # Whether a decorated call is framed by call_started and call_ended: only when some
        # handler wants them (a span does; counting decisions does not).
        self.framed = CALL_STARTED in self.wanted or CALL_ENDED in self.wanted

    def wants(self, name: str) -> bool:
        """Whether some handler gets ``name`` events."""
        return name in self.wanted

    def subscribe(self, handler: Handler, events: Iterable[str] | None = None) -> Subscription:
        subscription = Subscription(handler, _event_names(handler, events), self)
        with _lock:
            self.own = (*self.own, subscription)
            self.refresh()
        return subscription

    def emit(
        self,
        name: str,
        store: object,
        key: str,
        attempt: int | None = None,
        duration: float | None = None,
        reason: str | None = None,
        detail: str | None = None,
        owner: str | None = None,
        status: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Hand an event to the handlers that want it; a handler that raises is logged."""
        subscriptions = self.wanted.get(name)
        if not subscriptions:
            return
        # (Built as the tuple it is: a third of the cost of Event(...) with keywords.)
        event: Event = _new_tuple(
            Event,
            (
                name,
                key,
                self.function,
                store_kind(store),
                attempt,
                duration,
                reason,
                detail,
                owner,
                status,
                error,
                time.time(),
            ),
        )
        for subscription in subscriptions:
            try:
                subscription.handler(event)
            except Exception:
                _handler_failed(subscription, event)

    def __repr__(self) -> str:
        return f"<Observer {self.function!r} live={self.live}>"


class Deferred(Observer):
    """The observer of a waiting call's looks at the key (internal): it holds their events
    until ``flush()``, so that handlers get ``waited`` before the decision the wait ended in."""

    __slots__ = ("pending", "target")

    def __init__(self, target: Observer) -> None:  # (not registered: it lives for one wait)
        self.target = target
        self.function = target.function
        self.own = ()
        self.wanted = target.wanted
        self.live = True
        self.framed = False
        self.pending: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def emit(self, *event: Any, **fields: Any) -> None:
        self.pending.append((event, fields))

    def flush(self) -> None:
        """Hand the held events to the observer they were for, in order."""
        pending, self.pending = self.pending, []
        for event, fields in pending:
            self.target.emit(*event, **fields)


#: Decisions of ``begin()`` used directly (no decorated function).
PROCESS: Final = Observer(None)

_FAILURE_LOG_EVERY = 60.0


def _handler_failed(subscription: Subscription, event: Event) -> None:
    """Log a handler's exception: with its traceback the first time, then at most once a
    minute with how many failed since, so a broken handler cannot flood the log. The count
    is the subscription's own: a handler subscribed again starts afresh."""
    now = time.monotonic()
    handler = subscription.handler
    name = getattr(handler, "__qualname__", None) or repr(handler)
    logged_at = subscription._logged_at
    if logged_at is None:
        subscription._logged_at = now
        logger.exception(
            "idemfn: event handler %s raised on %r for key %r; the call goes on",
            name,
            event.name,
            event.key,
            extra=log_fields(event.key, event.name),
        )
        return
    since = subscription._failed + 1
    if now - logged_at < _FAILURE_LOG_EVERY:
        subscription._failed = since
        return
    subscription._logged_at = now
    subscription._failed = 0
    logger.error(
        "idemfn: event handler %s raised again (%d times in the last %.0f s, now on %r for key"
        " %r); the calls went on",
        name,
        since,
        now - logged_at,
        event.name,
        event.key,
        extra=log_fields(event.key, event.name),
    )


def _event_names(handler: object, events: Iterable[str] | None) -> frozenset[str]:
    if not callable(handler):
        raise TypeError(
            f"subscribe(handler=...) must be a callable taking an idemfn.Event, not"
            f" {type(handler).__name__}"
        )
    if events is None:
        return frozenset(EVENTS)
    given: object = events  # (checked as what it is, not as what its type says)
    if isinstance(given, str):
        raise TypeError(
            f"subscribe(events=...) must be a list of event names, not the str {given!r}:"
            f" write events=[{given!r}]"
        )
    if isinstance(given, bytes):
        raise TypeError("subscribe(events=...) must be a list of event names (str), not bytes")
    try:
        names = frozenset(events)
    except TypeError:
        raise TypeError(
            f"subscribe(events=...) must be a list of event names, not {type(events).__name__}"
        ) from None
    unknown = sorted(str(n) for n in names if n not in EVENTS)
    if unknown:
        raise ValueError(
            f"subscribe(events=...) names no such event: {', '.join(map(repr, unknown))};"
            f" the events are {', '.join(EVENTS)}"
        )
    return names


def subscribe(handler: Handler, *, events: Iterable[str] | None = None) -> Subscription:
    """Send every decorated function's events (and ``begin()``'s) in this process to
    ``handler``. A decorated function's own ``subscribe`` takes one function's only.

    Args:
        handler: Called with each ``Event``, in the thread or event loop that made the
            decision; it must be quick and must not block. What it raises is logged (with its
            traceback the first time, then at most once a minute) and never breaks the call.
        events: The names of the events to get (see ``EVENTS``). Default None: all of them.

    Returns:
        A ``Subscription``: ``close()`` it, or use it as a context manager, to unsubscribe.

    Raises:
        TypeError: ``handler`` is not callable, or ``events`` is a single string.
        ValueError: ``events`` names an unknown event.
    """
    subscription = Subscription(handler, _event_names(handler, events), None)
    with _lock:
        _process.append(subscription)
        for observer in list(_observers):
            observer.refresh()
    return subscription
