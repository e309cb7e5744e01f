#!/usr/bin/env python
"""What observing idemfn costs per call: events, OpenTelemetry and Prometheus (issue 21).

    python benchmarks/bench_observe.py              # full run (two to three minutes)
    python benchmarks/bench_observe.py --quick      # short run, used by the test suite
    python benchmarks/bench_observe.py --clock cpu  # this thread's CPU time (busy machine)
    python benchmarks/bench_observe.py --json PATH  # also write every round's numbers as JSON
    python benchmarks/bench_observe.py --profile    # also cProfile each integration, by package
    python benchmarks/bench_observe.py --only "first call" --rounds 31   # some calls, more rounds

The calls measured are bench_core.py's own (its fixture and its runners: a replay of a small
dict cycling over 64 recorded keys, a first call of a no-op body on a new key), on a DiskStore
and on a MemoryStore, with a different setting in force each time:

  no handler          nothing subscribed (the row bench_core.py measures)
  live, no event      a handler subscribed to an event these calls never emit: the cost of the
                      call_started/call_ended frame and of each decision point's dict look-up
  no-op, decisions    the same on the decisions only (``events=idemfn.events.DECISIONS``, as
                      idemfn.prometheus subscribes): call_started/call_ended are not built
  no-op handler       ``idemfn.subscribe(lambda event: None)``: every event built and handed over
  otel spans+metrics  ``idemfn.otel.instrument(...)`` on the OpenTelemetry SDK (TracerProvider
                      with a SimpleSpanProcessor into an InMemorySpanExporter, MeterProvider with
                      an InMemoryMetricReader)
  otel metrics only   the same with ``spans=False``
  prometheus          ``idemfn.prometheus.instrument(registry=<a private CollectorRegistry>)``

Each setting is switched on just before a round's timed loop and off after it (outside the
clock), and the rounds rotate through every setting of a call (and its raw-store baseline) so
that machine noise hits all of them. The table gives each setting's median µs per call and
what it adds over "no handler" measured in the same run: the median of the per-round
differences. The target (issue 21: under 2 µs per call on DiskStore with OpenTelemetry or
Prometheus on) is reported, never asserted; the run exits 1 only if an integration measured
recorded nothing (no span, no count): a cost measured so would be no cost. The library floors
(one SDK counter.add, one span, one prometheus child inc(), ...) are timed alone, so that what
is the library's and what is idemfn's can be told apart; "handler alone" replays the events of
one call straight into each integration's handler, without idemfn's engine.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import importlib
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_core  # benchmarks/ is on sys.path when this script runs
from bench_core import CLOCKS, Fixture, Runner, calibrate, machine_info, spread, timed_round

import idemfn
from idemfn import _metrics
from idemfn import events as ev

TARGET_US = 2.0  # issue 21: extra µs per call on DiskStore with OpenTelemetry or Prometheus on
NEVER_EMITTED = ev.MISMATCH  # the event "live, no event" subscribes to: these calls never emit it

# A setting: a context manager factory that is in force for one round.
Setting = Callable[[], contextlib.AbstractContextManager[Any]]


# --------------------------------------------------------------------------------------------
# Interleaved rounds


def interleave(runners: dict[str, Runner], rounds: int, round_ns: float) -> dict[str, list[float]]:
    """Ns per call of each runner's rounds, the runners' order rotating from round to round
    (each gets every position), after calibration and one warm-up round each."""
    sizes = {name: calibrate(run, round_ns) for name, run in runners.items()}
    for name, run in runners.items():
        timed_round(run, sizes[name])
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            times[name].append(timed_round(runners[name], sizes[name]))
    return times


def under(setting: Setting, run: Runner) -> Runner:
    """``run`` with ``setting`` in force: switched on before the round, off after it (the
    runner builds its inputs and starts its clock inside)."""

    def round_(n: int) -> int:
        with setting():
            return run(n)

    return round_


@dataclass
class Row:
    call: str  # "replay, DiskStore", ...
    setting: str
    rounds: list[float]  # ns per call
    reference: list[float]  # "no handler"'s rounds of the same run
    target: float | None
    skipped: str | None = None

    @property
    def us(self) -> float:
        return statistics.median(self.rounds) / 1000

    @property
    def extra_us(self) -> float:
        """The median of the per-round differences to "no handler", in µs."""
        return (
            statistics.median(a - b for a, b in zip(self.rounds, self.reference, strict=True))
            / 1000
        )

    @property
    def extra_range(self) -> tuple[float, float]:
        """The middle half (quartiles) of the per-round differences, in µs."""
        diffs = sorted((a - b) / 1000 for a, b in zip(self.rounds, self.reference, strict=True))
        if len(diffs) < 4:
            return diffs[0], diffs[-1]
        q = statistics.quantiles(diffs, n=4)
        return q[0], q[2]

    @property
    def result(self) -> str:
        if self.target is None:
            return "-"
        return "PASS" if self.extra_us < self.target else "MISS"

    def as_json(self) -> dict[str, Any]:
        if self.skipped:
            return {"call": self.call, "setting": self.setting, "skipped": self.skipped}
        return {
            "call": self.call,
            "setting": self.setting,
            "us": self.us,
            "extra_us": self.extra_us,
            "extra_quartiles_us": list(self.extra_range),
            "spread_percent": spread(self.rounds),
            "target_extra_us": self.target,
            "result": self.result,
            "rounds_us": [x / 1000 for x in self.rounds],
        }


# --------------------------------------------------------------------------------------------
# The settings


def _noop(event: idemfn.Event) -> None:
    return None


@dataclass
class Integration:
    """One setting a round runs under. ``on()`` switches it on for a round (a context manager:
    ``instrument(...)`` then ``close()``, the way a user would); ``check()`` says afterwards
    whether it recorded anything (None) or what is wrong; None ``on``: skipped, and why."""

    name: str
    on: Setting | None
    skipped: str | None = None
    check: Callable[[], str | None] = lambda: None


@contextlib.contextmanager
def handlers_of(on: Setting) -> Iterator[list[tuple[ev.Handler, frozenset[str]]]]:
    """Switch ``on`` on, and give the handlers (with their events) it subscribed: what
    "handler alone" feeds one call's events to, whatever the integration calls them. They
    are live only inside the block (an integration closed ignores what it is fed)."""
    with ev._lock:
        before = list(ev._process)
    with on():
        with ev._lock:
            made = [s for s in ev._process if s not in before]
        yield [(s.handler, s.events) for s in made]


def _missing(name: str, module: str, exc: BaseException) -> Integration:
    return Integration(name, None, skipped=f"{module} not importable ({type(exc).__name__}: {exc})")


def otel_integrations() -> list[Integration]:
    """OpenTelemetry through ``idemfn.otel.instrument``: spans and metrics, and metrics only,
    each on SDK providers of its own (in-memory exporter and reader)."""
    names = ("otel spans+metrics", "otel metrics only")
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError as exc:
        return [_missing(n, "opentelemetry-sdk", exc) for n in names]
    try:
        otel: Any = importlib.import_module("idemfn.otel")
    except ImportError as exc:
        return [_missing(n, "idemfn.otel", exc) for n in names]

    made = []
    for name, spans in zip(names, (True, False), strict=True):
        exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        reader = InMemoryMetricReader()
        meter_provider = MeterProvider(metric_readers=[reader])
        exported = [0]

        @contextlib.contextmanager
        def on(
            tp: Any = tracer_provider,
            mp: Any = meter_provider,
            spans: bool = spans,
            exporter: Any = exporter,
            exported: list[int] = exported,
        ) -> Iterator[None]:
            try:
                with otel.instrument(tracer_provider=tp, meter_provider=mp, spans=spans):
                    yield
            finally:  # the spans a round made go: memory would grow round after round
                exported[0] += len(exporter.get_finished_spans())
                exporter.clear()

        def check(
            spans: bool = spans, exported: list[int] = exported, reader: Any = reader
        ) -> str | None:
            if spans and not exported[0]:
                return "no span exported"
            if not spans and exported[0]:
                return f"{exported[0]} spans exported with spans=False"
            data = reader.get_metrics_data()
            names = {
                m.name
                for rm in (data.resource_metrics if data else ())
                for sm in rm.scope_metrics
                for m in sm.metrics
            }
            if _metrics.DECISIONS_COUNTER not in names:
                return f"no {_metrics.DECISIONS_COUNTER} metric read (got {sorted(names)})"
            return None

        made.append(Integration(name, on, check=check))
    try:  # instrument()'s API may still change: say how it failed, measure the rest
        for i in made:
            assert i.on is not None
            with handlers_of(i.on) as found:
                assert found, f"{i.name}: instrument() subscribed no handler"
    except Exception as exc:
        return [
            Integration(n, None, skipped=f"idemfn.otel.instrument failed: {exc!r}") for n in names
        ]
    return made


def prometheus_integrations() -> list[Integration]:
    """Prometheus through ``idemfn.prometheus.instrument`` on a private registry."""
    name = "prometheus"
    try:
        from prometheus_client import CollectorRegistry
    except ImportError as exc:
        return [_missing(name, "prometheus-client", exc)]
    try:
        prom: Any = importlib.import_module("idemfn.prometheus")
    except ImportError as exc:
        return [_missing(name, "idemfn.prometheus", exc)]
    registry = CollectorRegistry()
    counted = [0.0]

    @contextlib.contextmanager
    def on() -> Iterator[None]:
        with prom.instrument(registry=registry):
            try:
                yield
            finally:  # read before close(), which unregisters the metrics
                counted[0] += sum(
                    s.value
                    for metric in registry.collect()
                    for s in metric.samples
                    if s.name == "idemfn_decisions_total"
                )

    def check() -> str | None:
        return None if counted[0] else "idemfn_decisions_total counted nothing"

    try:
        with handlers_of(on) as found:
            assert found, "instrument() subscribed no handler"
    except Exception as exc:
        return [Integration(name, None, skipped=f"idemfn.prometheus.instrument failed: {exc!r}")]
    return [Integration(name, on, check=check)]


def settings() -> tuple[list[Integration], list[Integration]]:
    """The event machinery's settings (always there) and the integrations (maybe skipped)."""
    machinery = [
        Integration("live, no event", lambda: idemfn.subscribe(_noop, events=[NEVER_EMITTED])),
        Integration("no-op, decisions only", lambda: idemfn.subscribe(_noop, events=ev.DECISIONS)),
        Integration("no-op handler", lambda: idemfn.subscribe(_noop)),
    ]
    return machinery, otel_integrations() + prometheus_integrations()


# --------------------------------------------------------------------------------------------
# The calls, from bench_core.py


@dataclass
class Call:
    name: str  # "replay, DiskStore", ...
    run: Runner  # bench_core.py's idemfn runner
    baseline: Runner
    baseline_name: str
    target: float | None
    fn: Callable[[int], Any]  # the decorated function (for "handler alone" and the profile)
    inputs: Callable[[int], list[int]]  # n arguments for it


def calls(fx: Fixture) -> list[Call]:
    """bench_core.py's four calls, with its runners (the "no handler" rows are its rows)."""
    disk = bench_core.disk_pairs(fx)
    memory = bench_core.memory_pairs(fx)
    disk_fns = _decorated(fx, "disk")
    memory_fns = _decorated(fx, "mem")
    made = []
    for pair, fn, target in (
        (disk[0], disk_fns[0], TARGET_US),
        (disk[1], disk_fns[1], TARGET_US),
        (memory[0], memory_fns[0], None),
        (memory[1], memory_fns[1], None),
    ):
        replay = pair.name.startswith("replay")
        inputs = _replay_inputs if replay else _first_inputs(fx)
        made.append(
            Call(pair.name, pair.idemfn, pair.baseline, pair.baseline_name, target, fn, inputs)
        )
    return made


def _decorated(fx: Fixture, name: str) -> tuple[Any, Any]:
    """Functions of the same names and stores as bench_core's (its own are local to it)."""
    store = fx.disk if name == "disk" else fx.memory
    return bench_core.bodies(fx, store, name)


def _replay_inputs(n: int) -> list[int]:
    return [i % bench_core.POOL for i in range(n)]


def _first_inputs(fx: Fixture) -> Callable[[int], list[int]]:
    def inputs(n: int) -> list[int]:
        return list(fx.fresh(n))

    return inputs


def measure(
    calls_: list[Call],
    machinery: list[Integration],
    integrations: list[Integration],
    rounds: int,
    round_ns: float,
) -> list[Row]:
    rows: list[Row] = []
    for call in calls_:
        runners: dict[str, Runner] = {"no handler": call.run, "baseline": call.baseline}
        for s in machinery + integrations:
            if s.on is not None:
                runners[s.name] = under(s.on, call.run)
        print(f"  measuring {call.name}: {', '.join(runners)}", flush=True)
        times = interleave(runners, rounds, round_ns)
        ref = times["no handler"]
        rows.append(Row(call.name, "no handler", ref, ref, None))
        rows.append(Row(call.name, f"baseline: {call.baseline_name}", times["baseline"], ref, None))
        for s in machinery + integrations:
            if s.on is None:
                rows.append(Row(call.name, s.name, [], [], None, skipped=s.skipped))
                continue
            target = call.target if s in integrations else None
            rows.append(Row(call.name, s.name, times[s.name], ref, target))
    return rows


# --------------------------------------------------------------------------------------------
# Where the cost goes: library floors, handlers alone, cProfile by package


def library_floors(
    integrations: list[Integration], rounds: int, round_ns: float
) -> dict[str, float]:
    """µs of single library operations, timed alone in interleaved rounds: what any handler
    that does them pays, whoever wrote it."""
    clock = bench_core.clock
    runners: dict[str, Runner] = {}
    attrs = {
        "idemfn.decision": "replayed",
        "idemfn.function": "bench.disk.replay_small",
        "idemfn.store": "disk",
        "idemfn.reason": "",
    }

    def loop(op: Callable[[], Any]) -> Runner:
        def run(n: int) -> int:
            t0 = clock()
            for _ in range(n):
                op()
            return clock() - t0

        return run

    try:
        from opentelemetry import context as otel_context
        from opentelemetry import trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        pass
    else:
        meter = MeterProvider(metric_readers=[InMemoryMetricReader()]).get_meter("bench")
        counter = meter.create_counter("bench.counter")
        histogram = meter.create_histogram("bench.histogram", unit="s")
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("bench")
        span_attrs: dict[str, Any] = {
            **attrs,
            "idemfn.key": "bench.disk.replay_small:replay:1",
            "idemfn.attempt": 1,
        }

        def span() -> None:
            tracer.start_span("idemfn bench", attributes=span_attrs).end()

        def current_span() -> None:
            s = tracer.start_span("idemfn bench", attributes=span_attrs)
            token = otel_context.attach(trace.set_span_in_context(s))
            otel_context.detach(token)
            s.end()

        def clearing(run: Runner) -> Runner:
            def round_(n: int) -> int:
                try:
                    return run(n)
                finally:
                    exporter.clear()

            return round_

        runners["otel counter.add(1, 4 attributes)"] = loop(lambda: counter.add(1, attrs))
        runners["otel histogram.record(x, 4 attributes)"] = loop(
            lambda: histogram.record(0.001, attrs)
        )
        runners["otel span start+end (sampled, exported)"] = clearing(loop(span))
        runners["otel span start+end, made current"] = clearing(loop(current_span))
        runners["otel time.time_ns() (a span's clock)"] = loop(time.time_ns)
    try:
        from prometheus_client import CollectorRegistry, Counter, Histogram
    except ImportError:
        pass
    else:
        registry = CollectorRegistry()
        labels = ("replayed", "bench.disk.replay_small", "disk", "")
        pcounter = Counter(
            "bench_decisions",
            "bench",
            ("decision", "function", "store", "reason"),
            registry=registry,
        )
        phist = Histogram(
            "bench_wait_seconds",
            "bench",
            ("function", "store", "outcome"),
            registry=registry,
            buckets=list(_metrics.BUCKETS),
        )
        child = pcounter.labels(*labels)
        hchild = phist.labels("bench.disk.replay_small", "disk", "completed")
        runners["prometheus Counter.labels(...).inc()"] = loop(
            lambda: pcounter.labels(*labels).inc()
        )
        runners["prometheus child.inc() (cached child)"] = loop(child.inc)
        runners["prometheus Histogram child.observe(x)"] = loop(lambda: hchild.observe(0.001))
    if not runners:
        return {}
    times = interleave(runners, rounds, round_ns)
    return {name: statistics.median(t) / 1000 for name, t in times.items()}


def one_call_events(call: Call) -> list[idemfn.Event]:
    """The events one call emits (recorded with every event subscribed)."""
    seen: list[idemfn.Event] = []
    with idemfn.subscribe(seen.append):
        call.fn(call.inputs(1)[0])
    return seen


def handlers_alone(
    calls_: list[Call], integrations: list[Integration], rounds: int, round_ns: float
) -> dict[str, dict[str, float]]:
    """µs per call of each integration's handlers fed the events of one call (those they
    subscribe to, in the call's order), straight, with no engine around them: the handlers'
    own cost, library included. Each round switches the integration on and feeds its
    handlers of that round."""
    clock = bench_core.clock
    result: dict[str, dict[str, float]] = {}
    for call in calls_:
        if not call.name.endswith("DiskStore"):
            continue
        events = one_call_events(call)
        runners: dict[str, Runner] = {}
        for s in integrations:
            if s.on is None:
                continue

            def run(n: int, on: Setting = s.on, events: list[Any] = events) -> int:
                with handlers_of(on) as handlers:
                    # In the call's order: call_started's span is current at call_ended.
                    fed = [(h, e) for e in events for h, names in handlers if e.name in names]
                    t0 = clock()
                    for _ in range(n):
                        for handler, event in fed:
                            handler(event)
                    return clock() - t0

            with handlers_of(s.on) as handlers:
                names = [e.name for e in events if any(e.name in n for _, n in handlers)]
            runners[f"{s.name} ({len(names)} events: {', '.join(names)})"] = run
        if runners:
            times = interleave(runners, rounds, round_ns)
            result[call.name] = {name: statistics.median(t) / 1000 for name, t in times.items()}
    return result


def package_of(filename: str) -> str:
    """Which package a profiled function belongs to (idemfn's modules apart)."""
    if filename.startswith(("~", "<")):
        return "builtins (C)"
    path = filename.replace("\\", "/")
    if "/idemfn/" in path:
        return "idemfn/" + path.rsplit("/idemfn/", 1)[1]
    for pkg in ("opentelemetry", "prometheus_client", "diskcache", "sqlite3"):
        if f"/{pkg}/" in path:
            return pkg
    return "other Python"


def profile_by_package(
    calls_: list[Call], integrations: list[Integration], n: int
) -> dict[str, dict[str, dict[str, float]]]:
    """cProfile ``n`` DiskStore calls with each integration on and with none; own time per
    package, µs per call (cProfile's own overhead inflates every figure; read the shares and
    the differences to "no handler")."""
    result: dict[str, dict[str, dict[str, float]]] = {}
    clock = bench_core.clock
    for call in calls_:
        if not call.name.endswith("DiskStore"):
            continue
        per_setting: dict[str, dict[str, float]] = {}
        for s in [Integration("no handler", contextlib.nullcontext), *integrations]:
            if s.on is None:
                continue
            args = call.inputs(n)
            profiler = cProfile.Profile(clock, 1e-9)
            with s.on():
                profiler.enable()
                for a in args:
                    call.fn(a)
                profiler.disable()
            stats = pstats.Stats(profiler)
            by_pkg: dict[str, float] = {}
            for (filename, _line, _name), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
                pkg = package_of(filename)
                by_pkg[pkg] = by_pkg.get(pkg, 0.0) + tt * 1e6 / n
            per_setting[s.name] = by_pkg
        result[call.name] = per_setting
        packages = sorted({p for d in per_setting.values() for p in d})
        print(f"\ncProfile, {n} calls of {call.name}: own time per package, us per call")
        names = list(per_setting)
        print(f"  {'package':<28}" + "".join(f" {name[:18]:>18}" for name in names))
        for p in packages:
            cells = "".join(f" {per_setting[name].get(p, 0.0):>18.2f}" for name in names)
            print(f"  {p:<28}{cells}")
        totals = "".join(f" {sum(per_setting[name].values()):>18.2f}" for name in names)
        print(f"  {'total (profiled)':<28}{totals}")
    return result


# --------------------------------------------------------------------------------------------
# Report


def print_rows(rows: list[Row], rounds: int) -> None:
    print(
        f"\nPer-call time, median of {rounds} rounds rotating through every setting"
        " (us = microseconds)\n"
    )
    header = (
        f"{'call':<24} {'setting':<28} {'us/call':>8} {'+us':>7} {'+us quartiles':>15}"
        f" {'spread':>7} {'target':>7} {'result':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.skipped:
            print(f"{r.call:<24} {r.setting:<28} skipped: {r.skipped}")
            continue
        plain = r.setting == "no handler"
        extra = "" if plain else f"{r.extra_us:+7.2f}"
        lo, hi = r.extra_range
        quartiles = "" if plain else f"{lo:+.2f}..{hi:+.2f}"
        target = "-" if r.target is None else f"<{r.target:g}"
        print(
            f"{r.call:<24} {r.setting:<28} {r.us:>8.2f} {extra:>7} {quartiles:>15}"
            f" {spread(r.rounds):>6.0f}% {target:>7} {r.result:>6}"
        )
    print(
        "+us: the median of the per-round differences to 'no handler' in the same run;"
        " spread: (max - min) / median of the setting's rounds. The target is for"
        " OpenTelemetry and Prometheus on DiskStore, reported, not asserted."
    )
    for call in dict.fromkeys(r.call for r in rows):
        mine = {r.setting: r for r in rows if r.call == call}
        base = next(r for s, r in mine.items() if s.startswith("baseline"))
        print(
            f"  {call}: no handler / {base.setting[len('baseline: ') :]} ="
            f" {mine['no handler'].us / base.us:.2f}x (bench_core.py's ratio for this row)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (test suite)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write results here")
    parser.add_argument("--rounds", type=int, help="timed rounds per setting (default 11, quick 3)")
    parser.add_argument(
        "--round-time",
        type=float,
        metavar="SECONDS",
        help="target duration of one round (default 0.2, quick 0.005)",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="time rounds with wall time (default) or this thread's CPU time (busy machines)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also cProfile each integration, by package"
    )
    parser.add_argument(
        "--only",
        metavar="TEXT",
        help="measure only the calls whose name holds TEXT ('DiskStore', 'replay', ...)",
    )
    args = parser.parse_args(argv)
    bench_core.clock = CLOCKS[args.clock]  # bench_core's runners time with its module clock

    rounds = args.rounds or (3 if args.quick else 11)
    round_ns = 1e9 * (args.round_time or (0.005 if args.quick else 0.2))

    info = machine_info()
    print(
        "idemfn observability benchmarks"
        + (" (--quick)" if args.quick else "")
        + (", timed with this thread's CPU time" if args.clock == "cpu" else "")
    )
    print("  " + ", ".join(f"{k} {v}" for k, v in info.items()))
    machinery, integrations = settings()
    for s in integrations:
        if s.on is None:
            print(f"  {s.name}: skipped: {s.skipped}")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="idemfn-bench-observe-") as tmp:
        fx = Fixture(Path(tmp))
        try:
            calls_ = [c for c in calls(fx) if not args.only or args.only in c.name]
            # Each round starts with gc.collect() (bench_core.timed_round): with the SDKs
            # loaded that took ~50 ms a round. What exists now lives to the end: not scanned.
            gc.collect()
            gc.freeze()
            rows = measure(calls_, machinery, integrations, rounds, round_ns)
            print_rows(rows, rounds)
            floors = library_floors(integrations, rounds, round_ns)
            if floors:
                print("\nLibrary floors, timed alone (median us per operation):")
                for name, us in floors.items():
                    print(f"  {name:<48} {us:7.2f}")
            alone = handlers_alone(calls_, integrations, rounds, round_ns)
            for call, figures in alone.items():
                print(f"\nHandler alone, fed the events of one {call} (median us per call):")
                for name, us in figures.items():
                    print(f"  {name:<72} {us:7.2f}")
            problems = {s.name: s.check() for s in integrations if s.on is not None}
            profile = (
                profile_by_package(calls_, integrations, 300 if args.quick else 5000)
                if args.profile
                else None
            )
        finally:
            fx.close()
    load_after = machine_info()["load_average_1min"]
    failed = {name: why for name, why in problems.items() if why}
    for name, why in failed.items():
        print(f"\nINTEGRATION RECORDED NOTHING: {name}: {why}")
    if problems and not failed:
        print(f"\nintegrations recorded what they measured: {', '.join(problems)}")
    print(
        f"\n{time.perf_counter() - started:.1f} s; load average (1 min) {info['load_average_1min']}"
        f" before, {load_after} after"
    )
    if args.json is not None:
        report = {
            "machine": info,
            "load_average_1min_after": load_after,
            "settings": {
                "quick": args.quick,
                "rounds": rounds,
                "round_seconds": round_ns / 1e9,
                "clock": args.clock,
            },
            "rows": [r.as_json() for r in rows],
            "library_floors_us": floors,
            "handler_alone_us": alone,
            "profile_us_per_call": profile,
            "integration_problems": failed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
