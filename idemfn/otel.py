"""OpenTelemetry for idemfn: a span per idempotent call, and the decision metrics.

Built on ``idemfn.events`` and the OpenTelemetry API only (the ``idemfn[otel]`` extra brings
``opentelemetry-api``); the SDK, its exporters and its sampling are the application's::

    import idemfn.otel

    instrumentation = idemfn.otel.instrument()      # the global providers, key hashed
    ...
    instrumentation.close()                          # or: with idemfn.otel.instrument(): ...

Each call of a decorated function gets a span (kind INTERNAL, named ``idemfn <function>``)
that is current while the call runs, so that the spans its body makes are its children, in
threads and in asyncio tasks alike. Every decision counts in ``idemfn.decisions``; waits and
bodies are timed by the histograms ``idemfn.wait.duration`` and ``idemfn.body.duration``. The
documentation's OpenTelemetry page lists each span attribute and metric.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable
from contextvars import ContextVar, Token
from typing import Any, Final, Literal

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace
    from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("idemfn.otel needs opentelemetry-api: pip install 'idemfn[otel]'") from exc

from . import __version__
from ._metrics import (
    ATTEMPT,
    BODY_DURATION,
    BODY_OUTCOMES,
    BUCKETS,
    DECISION,
    DECISIONS_COUNTER,
    FUNCTION,
    KEY,
    KEY_HASH,
    OUTCOME,
    REASON,
    STORE,
    WAIT_DURATION,
)
from .events import (
    ABANDONED,
    CALL_ENDED,
    CALL_STARTED,
    DECISIONS,
    WAITED,
    Event,
    Subscription,
    key_hash,
    subscribe,
)

__all__ = ["Instrumentation", "instrument"]

KeyOption = Literal["hash", "plain"] | None

#: The instrumentation scope of idemfn's tracer and meter.
SCOPE: Final = "idemfn"

# A span attribute of the semantic conventions (error.type): the class of what a call raised.
_ERROR_TYPE: Final = "error.type"
# The span attribute of a wait's time (in the idemfn.waited span event), in seconds.
_WAIT_SECONDS: Final = "idemfn.wait.duration"
_INTERNAL: Final = SpanKind.INTERNAL
# Decisions that are no outcome of a call: a step on its way, added to its span as an event.
_STEPS: Final = frozenset({WAITED, ABANDONED})

_lock = threading.RLock()  # (instrument() holds it while _Metrics takes it)
_active: Instrumentation | None = None  # at most one at a time: nothing is counted twice


class _Frame:
    """One call's span while it runs, current in the caller's context (thread or task)."""

    __slots__ = (
        "attempt",
        "decision",
        "function",
        "key",
        "otel_token",
        "owner",
        "reason",
        "span",
        "token",
    )

    def __init__(self, owner: Instrumentation, span: Span, key: str, function: str | None):
        self.owner = owner
        self.span = span
        self.key = key
        self.function = function
        self.decision: str | None = None
        self.reason: str | None = None
        self.attempt: int | None = None
        self.otel_token: object = None
        self.token: Token[_Frame | None] | None = None


# The innermost idemfn span of the running call in this context: the decisions of a call find
# its span here (they are made in the caller's context, between call_started and call_ended).
_frames: ContextVar[_Frame | None] = ContextVar("idemfn_otel_frame", default=None)


class _Counts:
    """The decision counts of one meter, fed to its ``idemfn.decisions`` observable counter.

    A counter's ``add`` costs the SDK microseconds per call; an increment here costs a lock,
    and the SDK reads the totals once per collection. One per meter, kept for the meter's
    life: the SDK hands an instrument created again on the same meter back with its first
    callback, so an instrumentation made after another on the same provider counts on, from
    where that one stopped (a cumulative counter never goes back)."""

    __slots__ = ("__weakref__", "counts", "labels", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # (decision, function, store, reason): count
        self.counts: dict[tuple[str, str | None, str, str | None], int] = {}
        self.labels: dict[tuple[str, str | None, str, str | None], dict[str, str]] = {}

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self.lock:
            counts = list(self.counts.items())
        labels = self.labels
        observations = []
        for labelled, count in counts:
            attributes = labels.get(labelled)
            if attributes is None:
                decision, function, store, reason = labelled
                attributes = labels[labelled] = {
                    DECISION: decision,
                    FUNCTION: function or "",
                    STORE: store,
                    REASON: reason or "",
                }
            observations.append(Observation(count, attributes))
        return observations

    def forked(self) -> None:
        # A forked child counts its own decisions: its parent's are its parent's to report
        # (and the lock may have been held by a thread the child does not have).
        self.lock = threading.Lock()
        self.counts = {}


# By meter provider: the SDK's provider hands out one meter per scope; the API's proxy provider
# a new proxy meter each time, all of them forwarding to the one meter of the SDK set later.
_counts: weakref.WeakKeyDictionary[object, _Counts] = weakref.WeakKeyDictionary()
_all_counts: weakref.WeakSet[_Counts] = weakref.WeakSet()


def _after_fork() -> None:
    global _lock
    _lock = threading.RLock()
    for counts in list(_all_counts):
        counts.forked()


if hasattr(os, "register_at_fork"):  # (not on Windows)
    os.register_at_fork(after_in_child=_after_fork)


class _Metrics:
    """The three instruments on one meter."""

    __slots__ = ("body", "body_labels", "counts", "wait", "wait_labels")

    def __init__(self, provider: object, meter: Meter) -> None:
        with _lock:
            try:
                counts = _counts.get(provider)
            except TypeError:  # (a provider that cannot be weakly referenced or hashed)
                counts = None
            if counts is None:
                counts = _Counts()
                try:
                    _counts[provider] = counts
                except TypeError:
                    pass
                _all_counts.add(counts)
                meter.create_observable_counter(
                    DECISIONS_COUNTER,
                    callbacks=[counts.observe],
                    unit="{decision}",
                    description="Decisions idemfn made about calls, by decision (claimed,"
                    " replayed, ...), function, store and reason",
                )
        self.counts = counts
        self.wait = _histogram(
            meter,
            WAIT_DURATION,
            "How long callers waited for a key another caller held, by what the wait ended in",
        )
        self.body = _histogram(
            meter,
            BODY_DURATION,
            "How long bodies ran, from claim to settle, by how the claim was settled",
        )
        # (function, store, outcome): attributes, built once each
        self.wait_labels: dict[tuple[str | None, str, str], dict[str, str]] = {}
        self.body_labels: dict[tuple[str | None, str, str], dict[str, str]] = {}


def _histogram(meter: Meter, name: str, description: str) -> Histogram:
    try:
        return meter.create_histogram(
            name, unit="s", description=description, explicit_bucket_boundaries_advisory=BUCKETS
        )
    except TypeError:  # pragma: no cover - an API before 1.23 has no bucket advisory
        return meter.create_histogram(name, unit="s", description=description)


def _labels(
    cache: dict[tuple[str | None, str, str], dict[str, str]],
    function: str | None,
    store: str,
    outcome: str,
) -> dict[str, str]:
    labelled = (function, store, outcome)
    attributes = cache.get(labelled)
    if attributes is None:
        attributes = cache[labelled] = {FUNCTION: function or "", STORE: store, OUTCOME: outcome}
    return attributes


def _error_type(error: BaseException) -> str:
    cls = type(error)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


class Instrumentation:
    """idemfn's spans and metrics going to OpenTelemetry, as made by ``instrument()``.

    ``close()`` it (or leave its ``with`` block) to stop: no span is started and nothing is
    counted after that; the spans of calls already running end with their calls. The
    ``idemfn.decisions`` counter keeps reporting the totals it reached (a cumulative counter
    does not go back), and an instrumentation made later on the same meter provider counts on
    from there.

    Attributes:
        key: What a span says of its key: ``"hash"`` (``idemfn.key_hash``), ``"plain"``
            (``idemfn.key``) or None (nothing).
        spans: Whether calls get spans.
        metrics: Whether decisions are counted and waits and bodies timed.
    """

    def __init__(
        self,
        tracer: Tracer | None,
        meter: Meter | None,
        key: KeyOption,
        *,
        describe: str,
        meter_provider: object = None,
    ) -> None:
        self.key = key
        self.spans = tracer is not None
        self.metrics = meter is not None
        self._tracer = tracer
        self._describe = describe
        self._closed = False
        self._open: set[_Frame] = set()  # frames of calls running, so close() can wait
        self._instruments = None if meter is None else _Metrics(meter_provider, meter)
        # (with no meter, counts nobody reads: the decision handlers do not touch it)
        self._counts = _Counts() if self._instruments is None else self._instruments.counts
        self._span_labels: dict[tuple[str | None, str], tuple[str, dict[str, str]]] = {}
        self._subscriptions: list[Subscription] = []  # closed by close()
        self._lingering: list[Subscription] = []  # closed once the last call with a span ends
        if tracer is not None:
            self._lingering.append(subscribe(self._ended, events=[CALL_ENDED]))
            self._subscriptions.append(subscribe(self._started, events=[CALL_STARTED]))
        decided = (
            self._annotated
            if meter is None
            else self._counted_and_annotated
            if tracer is not None
            else self._counted
        )
        decisions = subscribe(decided, events=DECISIONS)
        (self._subscriptions if tracer is None else self._lingering).append(decisions)

    @property
    def active(self) -> bool:
        """Whether it still makes spans and counts (not closed)."""
        return not self._closed

    def close(self) -> None:
        """Stop making spans and counting; closing again does nothing.

        The spans of calls running now end when their calls do (their span stays current in
        their thread or task until then, as the call's children expect)."""
        global _active
        with _lock:
            if self._closed:
                return
            self._closed = True
            if _active is self:
                _active = None
        for subscription in self._subscriptions:
            subscription.close()
        # The calls whose span is current still get their decisions and call_ended (or their
        # context would keep the span): once the last has ended (_ended), those go too.
        if not self._open:
            self._linger_no_more()

    def _linger_no_more(self) -> None:
        for subscription in self._lingering:
            subscription.close()

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "active"
        return f"<idemfn.otel.Instrumentation {self._describe} ({state})>"

    # The handlers. They run in the caller's thread or task (idemfn.events) and must not
    # raise: idemfn.events would log it, but a span left current would outlive its call.

    def _started(self, event: Event) -> None:
        function = event.function
        labelled = (function, event.store)
        named = self._span_labels.get(labelled)
        if named is None:
            named = self._span_labels[labelled] = (
                f"idemfn {function}",
                {FUNCTION: function or "", STORE: event.store},
            )
        assert self._tracer is not None
        span = self._tracer.start_span(named[0], kind=_INTERNAL, attributes=named[1])
        frame = _Frame(self, span, event.key, function)
        self._open.add(frame)
        if self._closed:  # closed meanwhile, and may have looked at _open before the add
            self._open.discard(frame)
            span.end()
            return
        frame.otel_token = otel_context.attach(otel_trace.set_span_in_context(span))
        frame.token = _frames.set(frame)

    def _ended(self, event: Event) -> None:
        frame = _frames.get()
        if (
            frame is None
            or frame.owner is not self
            or frame.key != event.key
            or frame.function != event.function
        ):
            return  # (a call that began before this instrumentation did: it has no span)
        span = frame.span
        try:
            if span.is_recording():
                self._finish(span, frame, event.error)
        finally:
            # Whatever failed above: the span is no longer current, and it ends.
            try:
                try:
                    _frames.reset(frame.token)  # type: ignore[arg-type]  # (set with the frame)
                except ValueError:  # (made in another context: leave this one's as it is)
                    pass
                otel_context.detach(frame.otel_token)  # type: ignore[arg-type]  # (logs a failure)
            finally:
                self._open.discard(frame)
                try:
                    span.end()
                finally:
                    if self._closed and not self._open:
                        self._linger_no_more()

    def _finish(self, span: Span, frame: _Frame, error: BaseException | None) -> None:
        """Set what the call's span says of it: its key, decision, attempt, error."""
        attributes: dict[str, Any] = {}
        if self.key == "hash":
            attributes[KEY_HASH] = key_hash(frame.key)
        elif self.key == "plain":
            attributes[KEY] = frame.key
        if frame.decision is not None:
            attributes[DECISION] = frame.decision
        if frame.reason is not None:
            attributes[REASON] = frame.reason
        if frame.attempt is not None:
            attributes[ATTEMPT] = frame.attempt
        # As OpenTelemetry's use_span: an Exception is an error; a BaseException that is not
        # (a cancelled task, Ctrl-C, exit) ends the span as it is.
        if isinstance(error, Exception):
            attributes[_ERROR_TYPE] = _error_type(error)
        span.set_attributes(attributes)
        if isinstance(error, Exception):  # (last: an exception's str() may raise)
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))

    # Decisions: the handler for the configuration (one call, few lookups: every replay pays it).

    def _counted(self, event: Event) -> None:
        """Metrics only: count ``event``, and time it if it ends a wait or a body."""
        counts = self._counts
        labelled = (event.name, event.function, event.store, event.reason)
        with counts.lock:
            counts.counts[labelled] = counts.counts.get(labelled, 0) + 1
        if event.duration is not None:
            self._timed(event)

    def _counted_and_annotated(self, event: Event) -> None:
        """Metrics and spans: count ``event``, time it, and put it on the current call's span
        (after ``close()``, still that, for the calls that had a span, but not count it)."""
        if not self._closed:
            counts = self._counts
            labelled = (event.name, event.function, event.store, event.reason)
            with counts.lock:
                counts.counts[labelled] = counts.counts.get(labelled, 0) + 1
            if event.duration is not None:
                self._timed(event)
        frame = _frames.get()
        if frame is not None and frame.owner is self:
            if (
                event.key == frame.key
                and event.function == frame.function
                and event.name not in _STEPS
            ):  # the call's own decision (inline: the common case)
                frame.decision = event.name
                frame.reason = event.reason
                if event.attempt is not None:
                    frame.attempt = event.attempt
            else:
                self._annotate(frame, event)

    def _annotated(self, event: Event) -> None:
        """Spans only: put ``event`` on the current call's span."""
        frame = _frames.get()
        if frame is not None and frame.owner is self:
            self._annotate(frame, event)

    def _timed(self, event: Event) -> None:
        instruments = self._instruments
        assert instruments is not None
        duration = event.duration
        assert duration is not None
        name = event.name
        if name in BODY_OUTCOMES:
            labels = _labels(instruments.body_labels, event.function, event.store, name)
            instruments.body.record(duration, labels)
        elif name == WAITED:
            outcome = event.status or "gave_up"
            labels = _labels(instruments.wait_labels, event.function, event.store, outcome)
            instruments.wait.record(duration, labels)

    def _annotate(self, frame: _Frame, event: Event) -> None:
        """Put ``event`` on the span of the call running in this context: its decision (an
        attribute, set as the span ends), or a span event for a step on the way (waited,
        abandoned) and for a decision about another key or function (``begin()`` used in the
        body, say)."""
        name = event.name
        own = event.key == frame.key and event.function == frame.function
        if own and name not in _STEPS:
            frame.decision = name
            frame.reason = event.reason
            if event.attempt is not None:
                frame.attempt = event.attempt
            return
        span = frame.span
        if not span.is_recording():
            return
        attributes: dict[str, Any] = {}
        if not own:
            attributes[FUNCTION] = event.function or ""
            attributes[STORE] = event.store
            if self.key == "hash":
                attributes[KEY_HASH] = key_hash(event.key)
            elif self.key == "plain":
                attributes[KEY] = event.key
        if event.attempt is not None:
            attributes[ATTEMPT] = event.attempt
        if event.reason is not None:
            attributes[REASON] = event.reason
        if name == WAITED:
            attributes[OUTCOME] = event.status or "gave_up"
            if event.duration is not None:
                attributes[_WAIT_SECONDS] = event.duration
        elif name == ABANDONED and event.status is not None:
            attributes[OUTCOME] = event.status
        span.add_event(f"idemfn.{name}", attributes)


def instrument(
    *,
    tracer_provider: otel_trace.TracerProvider | None = None,
    meter_provider: otel_metrics.MeterProvider | None = None,
    key: KeyOption = "hash",
    spans: bool = True,
    metrics: bool = True,
) -> Instrumentation:
    """Send idemfn's decisions to OpenTelemetry: a span per call of every decorated function,
    and the metrics ``idemfn.decisions``, ``idemfn.wait.duration`` and ``idemfn.body.duration``,
    for every call in this process (``begin()``, the HTTP middleware and ``idemfn run`` count
    in the metrics too).

    One instrumentation at a time: a second ``instrument()`` while one is active raises, so
    that nothing is counted twice. Instrument in each process (after a fork, in the worker:
    a forked child counts its own decisions).

    Args:
        tracer_provider: The ``TracerProvider`` to make spans with. Default: the global one
            (``opentelemetry.trace.get_tracer_provider()``; set before or after, the API
            forwards to it).
        meter_provider: The ``MeterProvider`` to make the metrics with. Default: the global
            one (``opentelemetry.metrics.get_meter_provider()``).
        key: What a span says of its call's key, which may hold personal data: ``"hash"``
            (default: the attribute ``idemfn.key_hash``, ``idemfn.events.key_hash(key)``, the
            same in every process and in idemfn's log lines), ``"plain"`` (``idemfn.key``, the
            full stored key), or None (neither). Metrics never carry a key.
        spans: Whether each call of a decorated function gets a span (default True).
        metrics: Whether decisions are counted and waits and bodies timed (default True).

    Returns:
        An ``Instrumentation``: ``close()`` it, or use it as a context manager, to stop.

    Raises:
        TypeError: ``tracer_provider`` or ``meter_provider`` is not a provider, or ``spans``
            or ``metrics`` is not a bool.
        ValueError: ``key`` is none of ``"hash"``, ``"plain"``, None; or both ``spans`` and
            ``metrics`` are False.
        RuntimeError: another instrumentation is active (close it first).
    """
    global _active
    if key not in ("hash", "plain", None):
        raise ValueError(
            f'instrument(key=...) must be "hash" (the default: idemfn.key_hash), "plain" (the'
            f" key itself, which may hold personal data) or None (no key), not {key!r}"
        )
    for option, value in (("spans", spans), ("metrics", metrics)):
        if not isinstance(value, bool):
            raise TypeError(
                f"instrument({option}=...) must be True or False, not {type(value).__name__}"
            )
    if not spans and not metrics:
        raise ValueError(
            "instrument(spans=False, metrics=False) would make nothing: leave one of them True"
        )
    _check_provider("tracer_provider", tracer_provider, "get_tracer", "TracerProvider")
    _check_provider("meter_provider", meter_provider, "get_meter", "MeterProvider")
    with _lock:
        if _active is not None:
            raise RuntimeError(
                f"idemfn.otel is instrumented already ({_active!r}): close() that"
                " instrumentation first, so that no decision is counted twice"
            )
        tracer: Tracer | None = None
        meter: Meter | None = None
        meters: object = None
        if spans:
            provider = tracer_provider or otel_trace.get_tracer_provider()
            tracer = provider.get_tracer(SCOPE, __version__)
        if metrics:
            meters = meter_provider or otel_metrics.get_meter_provider()
            meter = meters.get_meter(SCOPE, __version__)
        parts = [p for p, on in (("spans", spans), ("metrics", metrics)) if on]
        describe = f"{'+'.join(parts)}, key={key!r}"
        _active = Instrumentation(tracer, meter, key, describe=describe, meter_provider=meters)
        return _active


def _check_provider(option: str, provider: object, method: str, kind: str) -> None:
    if provider is not None and not callable(getattr(provider, method, None)):
        raise TypeError(
            f"instrument({option}=...) must be an OpenTelemetry {kind} (with {method}()), not"
            f" {type(provider).__name__}; leave it out to use the global one"
        )
