"""Prometheus metrics of idemfn's decisions (``pip install 'idemfn[prometheus]'``).

```python
from prometheus_client import start_http_server
from idemfn.prometheus import instrument

instrument()             # idemfn's metrics on prometheus_client's default registry
start_http_server(9100)  # or any exposition of that registry
```

``instrument`` subscribes one handler to idemfn's events (``idemfn.events``) that counts each
decision and times each wait and body, as three metrics:

- ``idemfn_decisions_total{decision,function,store,reason}`` (counter),
- ``idemfn_wait_duration_seconds{function,store,outcome}`` (histogram),
- ``idemfn_body_duration_seconds{function,store,outcome}`` (histogram),

defined once for this module, ``idemfn.otel`` and ``idemfn stats`` (``idemfn._metrics``). They
are ordinary prometheus_client metrics, so prometheus_client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, as gunicorn deployments use) applies to them unchanged; scrape a
``multiprocess_registry()`` there. The documentation's "Prometheus and Grafana" page has the
set-up, the queries and the cost.
"""

from __future__ import annotations

import bisect
import itertools
import os
import threading
import weakref
from collections.abc import Iterable
from types import TracebackType
from typing import Final, cast

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, values
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector
    from prometheus_client.utils import floatToGoString
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "idemfn.prometheus needs prometheus-client: pip install 'idemfn[prometheus]'"
    ) from exc

from . import _metrics
from .events import DECISIONS, WAITED, Event, Subscription, subscribe

__all__ = ["Instrumentation", "instrument", "multiprocess_registry"]

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_HELP = {
    _metrics.DECISIONS_COUNTER: "Decisions idemfn made about calls, by kind (idemfn.events).",
    _metrics.WAIT_DURATION: "Seconds callers waited for another caller's claim to settle.",
    _metrics.BODY_DURATION: "Seconds from a claim to its settlement (the body's run).",
}

_BODY: Final = _metrics.BODY_DURATION
_WAIT: Final = _metrics.WAIT_DURATION

_lock = threading.Lock()
# The open Instrumentation of each registry: Prometheus refuses a name registered twice, and two
# handlers feeding one registry would count every decision twice.
_open: weakref.WeakKeyDictionary[CollectorRegistry, Instrumentation] = weakref.WeakKeyDictionary()


Labels = tuple[str, str | None, str, str | None]  # the event's name, function, store, reason


class _Aggregates:
    """The metrics of a single process, kept as plain counts and exposed by ``collect()`` when
    scraped (a prometheus_client custom collector): an event costs a dict update under one lock
    instead of a metric child's (a counter's inc() takes a lock, a histogram's observe() two).
    """

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._buckets = buckets
        self._lock = threading.Lock()
        self._counts: dict[Labels, int] = {}
        # (metric, function, store, outcome): the count in each bucket (not cumulative), the
        # +Inf bucket's last, then the sum of the observations.
        self._timed: dict[tuple[str, str | None, str, str], list[float]] = {}

    def handle(self, event: Event) -> None:
        # The rules of _metrics.body_outcome and wait_outcome, inlined: this runs on each
        # decision (tests/integrations/observability/test_prometheus.py checks they agree).
        name, _, function, store, _, duration, reason = event[:7]
        key = (name, function, store, reason)
        if duration is None:
            with self._lock:
                self._counts[key] = self._counts.get(key, 0) + 1
            return
        if name in _metrics.BODY_OUTCOMES:
            timed_key: tuple[str, str | None, str, str] | None = (_BODY, function, store, name)
        elif name == WAITED:
            timed_key = (_WAIT, function, store, event.status or "gave_up")
        else:
            timed_key = None
        # Prometheus's buckets count what is <= their bound: the first bound >= duration.
        index = bisect.bisect_left(self._buckets, duration)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
            if timed_key is not None:
                row = self._timed.get(timed_key)
                if row is None:
                    row = self._timed[timed_key] = [0.0] * (len(self._buckets) + 2)
                row[index] += 1
                row[-1] += duration

    def describe(self) -> list[Metric]:
        return self._families()

    def collect(self) -> list[Metric]:
        with self._lock:
            counts = list(self._counts.items())
            timed = [(key, list(row)) for key, row in self._timed.items()]
        families = self._families()
        decisions = families[0]
        assert isinstance(decisions, CounterMetricFamily)
        for (name, function, store, reason), count in counts:
            decisions.add_metric([name, function or "", store, reason or ""], count)
        histograms = dict(
            zip((_metrics.WAIT_DURATION, _metrics.BODY_DURATION), families[1:], strict=True)
        )
        # the le values prometheus_client's own histograms write ("1.0", "+Inf")
        bounds = [*(floatToGoString(b) for b in self._buckets), "+Inf"]  # type: ignore[no-untyped-call]
        for (metric, function, store, outcome), row in timed:
            histogram = histograms[metric]
            assert isinstance(histogram, HistogramMetricFamily)
            cumulative = list(itertools.accumulate(row[:-1]))
            histogram.add_metric(
                [function or "", store, outcome],
                list(zip(bounds, cumulative, strict=True)),
                row[-1],
            )
        return families

    @staticmethod
    def _families() -> list[Metric]:
        names = _metrics.PROMETHEUS
        name, labels = names[_metrics.DECISIONS_COUNTER]
        families: list[Metric] = [
            CounterMetricFamily(
                name.removesuffix("_total"), _HELP[_metrics.DECISIONS_COUNTER], labels=labels
            )
        ]
        for instrument_name in (_metrics.WAIT_DURATION, _metrics.BODY_DURATION):
            name, labels = names[instrument_name]
            families.append(HistogramMetricFamily(name, _HELP[instrument_name], labels=labels))
        return families


class _Shared:
    """The metrics of a process of a multiprocess server: prometheus_client's own counter and
    histograms, whose values it writes to the process's files in PROMETHEUS_MULTIPROC_DIR (what
    the scrape's MultiProcessCollector sums); their label children made once per label set."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        names = _metrics.PROMETHEUS
        name, labels = names[_metrics.DECISIONS_COUNTER]
        self.decisions = Counter(
            name.removesuffix("_total"), _HELP[_metrics.DECISIONS_COUNTER], labels, registry=None
        )
        self.histograms: dict[str, Histogram] = {}
        for instrument_name in (_metrics.WAIT_DURATION, _metrics.BODY_DURATION):
            name, labels = names[instrument_name]
            self.histograms[instrument_name] = Histogram(
                name, _HELP[instrument_name], labels, registry=None, buckets=buckets
            )
        self._counted: dict[Labels, Counter] = {}
        self._timed: dict[tuple[str, str | None, str, str], Histogram] = {}

    def collectors(self) -> list[Counter | Histogram]:
        return [self.decisions, *self.histograms.values()]

    def handle(self, event: Event) -> None:
        key = (event.name, event.function, event.store, event.reason)
        child = self._counted.get(key)
        if child is None:  # .labels() returns the same child in a race: no lock needed
            child = self._counted[key] = self.decisions.labels(
                event.name, event.function or "", event.store, event.reason or ""
            )
        child.inc()
        duration = event.duration
        if duration is None:
            return
        outcome = _metrics.body_outcome(event)
        metric = _metrics.BODY_DURATION
        if outcome is None:
            outcome = _metrics.wait_outcome(event)
            metric = _metrics.WAIT_DURATION
            if outcome is None:
                return
        timed_key = (metric, event.function, event.store, outcome)
        timed = self._timed.get(timed_key)
        if timed is None:
            timed = self._timed[timed_key] = self.histograms[metric].labels(
                event.function or "", event.store, outcome
            )
        timed.observe(duration)


class Instrumentation:
    """idemfn's metrics on one registry, fed by one subscribed handler. Made by ``instrument``;
    ``close()`` it (or leave its ``with`` block) to stop counting and unregister the metrics.

    Attributes:
        registry: The registry the metrics are on.
        multiprocess: Whether prometheus_client is in multiprocess mode
            (``PROMETHEUS_MULTIPROC_DIR`` set when it was imported): the counts then go to
            this process's files in that directory, for a ``multiprocess_registry()`` to sum;
            else they are kept in this process and exposed when ``registry`` is collected.
    """

    def __init__(self, registry: CollectorRegistry, buckets: tuple[float, ...]) -> None:
        self.registry = registry
        self.multiprocess = _multiprocess()
        self._sink: _Aggregates | _Shared
        if self.multiprocess:
            self._sink = _Shared(buckets)
            self._collectors: list[Collector] = list(self._sink.collectors())
        else:
            self._sink = _Aggregates(buckets)
            self._collectors = [self._sink]
        self._subscription: Subscription | None = None

    def _open(self) -> None:
        registered: list[Collector] = []
        try:
            for collector in self._collectors:
                self.registry.register(collector)
                registered.append(collector)
        except ValueError as exc:
            for collector in registered:
                self.registry.unregister(collector)
            raise ValueError(
                f"idemfn.prometheus.instrument(registry=...): the registry already has a"
                f" metric named like idemfn's ({exc}); something other than instrument()"
                f" registered it: unregister it, or give instrument() another registry"
            ) from exc
        # Only the decisions: call_started/call_ended cost a call something only when wanted.
        self._subscription = subscribe(self._sink.handle, events=DECISIONS)

    @property
    def active(self) -> bool:
        """Whether the metrics still count (``close()`` not called)."""
        return self._subscription is not None and self._subscription.active

    def close(self) -> None:
        """Stop counting and unregister the metrics from the registry; closing again does
        nothing. In multiprocess mode what this process counted stays in its files, and so in
        the scrape."""
        with _lock:
            if self._subscription is None:
                return
            self._subscription.close()
            self._subscription = None
            for collector in self._collectors:
                self.registry.unregister(collector)
            if _open.get(self.registry) is self:
                del _open[self.registry]

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = (
            "the default registry"
            if self.registry is REGISTRY
            else (f"CollectorRegistry {id(self.registry):#x}")
        )
        mode = "multiprocess" if self.multiprocess else "single-process"
        state = "active" if self.active else "closed"
        return f"<idemfn.prometheus.Instrumentation on {where} ({mode}, {state})>"


def _multiprocess() -> bool:
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def _buckets(buckets: Iterable[float]) -> tuple[float, ...]:
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Iterable):
        raise TypeError(
            f"instrument(buckets=...) must be a sequence of seconds, not {type(buckets).__name__}"
        )
    bounds: list[float] = []
    for bound in cast("Iterable[object]", buckets):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0:
            raise ValueError(f"instrument(buckets=...) must be positive seconds, not {bound!r}")
        if bounds and bound <= bounds[-1]:
            raise ValueError(f"instrument(buckets=...) must increase, not {bounds[-1]}, {bound}")
        bounds.append(float(bound))
    if not bounds:
        raise ValueError("instrument(buckets=...) must be positive seconds, not empty")
    return tuple(bounds)


def instrument(
    registry: CollectorRegistry | None = None,
    *,
    buckets: Iterable[float] = _metrics.BUCKETS,
) -> Instrumentation:
    """Count idemfn's decisions in Prometheus metrics on ``registry``, from now on, for every
    decorated function, ``begin()``, the HTTP middleware and ``idemfn run`` of this process.

    Args:
        registry: The ``prometheus_client.CollectorRegistry`` to register the metrics on.
            Default None: prometheus_client's default ``REGISTRY``. In multiprocess mode the
            metrics write to ``PROMETHEUS_MULTIPROC_DIR`` whatever the registry; scrape a
            ``multiprocess_registry()``.
        buckets: The histograms' upper bounds in seconds, increasing. Default: 1 ms to
            5 minutes (``idemfn._metrics.BUCKETS``).

    Returns:
        An ``Instrumentation``: ``close()`` it (or use it as a context manager) to stop
        counting and unregister the metrics.

    Raises:
        ValueError: idemfn's metrics are already on ``registry`` (an earlier ``instrument()``
            not closed: use that one, or close it first; or another library registered the
            same names); ``buckets`` is empty, not positive or not increasing;
            ``PROMETHEUS_MULTIPROC_DIR`` is set but not a directory.
        TypeError: ``registry`` is not a ``CollectorRegistry``.
        RuntimeError: ``PROMETHEUS_MULTIPROC_DIR`` was set after prometheus_client was
            imported, so this process would count for itself only.
    """
    if registry is None:
        registry = REGISTRY
    elif not isinstance(registry, CollectorRegistry):
        raise TypeError(
            f"instrument(registry=...) must be a prometheus_client.CollectorRegistry, not"
            f" {type(registry).__name__}"
        )
    bounds = _buckets(buckets)
    _check_multiprocess_mode()
    with _lock:
        earlier = _open.get(registry)
        if earlier is not None:
            raise ValueError(
                f"instrument(registry=...): idemfn's metrics are already on this registry"
                f" ({earlier!r}); Prometheus refuses a metric registered twice and two"
                f" instrumentations would count each decision twice: keep the first, or"
                f" close() it before instrumenting again"
            )
        instrumentation = Instrumentation(registry, bounds)
        instrumentation._open()
        _open[registry] = instrumentation
    return instrumentation


def _check_multiprocess_mode() -> None:
    directory = os.environ.get(_MULTIPROC_ENV)
    if directory is None:
        return
    if not os.path.isdir(directory):
        raise ValueError(
            f"{_MULTIPROC_ENV}={directory!r} is not a directory: create it (empty) before the"
            f" server starts, or unset {_MULTIPROC_ENV} for a single process"
        )
    if not _multiprocess():
        raise RuntimeError(
            f"{_MULTIPROC_ENV} is set, but was not when prometheus_client was first imported:"
            f" its metrics would count for this process only. Set {_MULTIPROC_ENV} in the"
            f" server's environment, before it starts (not in code run after an import of"
            f" prometheus_client)"
        )


def multiprocess_registry(path: str | os.PathLike[str] | None = None) -> CollectorRegistry:
    """A new registry that collects every process's metrics from prometheus_client's
    multiprocess files: what a ``/metrics`` endpoint of a multi-process server exposes (for
    example with ``prometheus_client.make_wsgi_app(multiprocess_registry())``).

    Args:
        path: The directory of the files. Default None: ``$PROMETHEUS_MULTIPROC_DIR``, the
            directory the processes write to.

    Raises:
        ValueError: ``path`` is None and ``PROMETHEUS_MULTIPROC_DIR`` is not set, or the
            directory does not exist.
    """
    directory = os.fspath(path) if path is not None else os.environ.get(_MULTIPROC_ENV)
    if directory is None:
        raise ValueError(
            f"multiprocess_registry(path=None) reads {_MULTIPROC_ENV}, which is not set: set it"
            f" in the server's environment (to an empty directory), or pass path="
        )
    if not os.path.isdir(directory):
        which = "path=" if path is not None else f"{_MULTIPROC_ENV}="
        raise ValueError(
            f"multiprocess_registry({which}{directory!r}): not a directory; create it (empty)"
            f" before the server starts"
        )
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry
