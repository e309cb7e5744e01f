"""``idemfn.otel`` on the real OpenTelemetry SDK: spans (in-memory span exporter) and metrics
(in-memory metric reader), for each decision in the situation that causes it.

Each test gets providers of its own (``otel``), passed to ``instrument``: the global ones are
left alone, but for the one test that checks the API's no-op default in a fresh process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider, SpanKind, StatusCode

import idemfn
import idemfn.otel
from idemfn import (
    AlreadyRunning,
    FingerprintMismatch,
    MemoryStore,
    OwnershipLost,
    idempotent,
)
from idemfn._metrics import BUCKETS
from idemfn.events import key_hash
from idemfn.otel import _frames
from tests.support.concurrency import WatchSpy
from tests.support.records import foreign_entry
from tests.support.workers import ROOT

Attributes = dict[str, Any]


class Otel:
    """The SDK's providers of one test, with what they exported."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer = self.tracer_provider.get_tracer("test")

    def instrument(self, **options: Any) -> idemfn.otel.Instrumentation:
        return idemfn.otel.instrument(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **options
        )

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        """The finished spans (``name``'s only), in the order they ended."""
        spans = self.exporter.get_finished_spans()
        return [s for s in spans if name is None or s.name == name]

    def span(self, name: str) -> ReadableSpan:
        (span,) = self.spans(name)
        return span

    def points(self, metric: str) -> dict[frozenset[tuple[str, Any]], Any]:
        """``metric``'s data points by their attributes: a counter's value, a histogram's
        point (count, sum, bucket_counts, explicit_bounds)."""
        data = self.reader.get_metrics_data()
        found: dict[frozenset[tuple[str, Any]], Any] = {}
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    if m.name == metric:
                        for p in m.data.data_points:
                            value = getattr(p, "value", p)
                            found[frozenset((p.attributes or {}).items())] = value
        return found

    def metric(self, name: str) -> Any:
        data = self.reader.get_metrics_data()
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    if m.name == name:
                        assert scope.scope.name == "idemfn"
                        return m
        raise AssertionError(f"no metric {name}")


def labels(**attributes: str) -> frozenset[tuple[str, str]]:
    return frozenset((f"idemfn.{name}", value) for name, value in attributes.items())


def decision(name: str, function: str, store: str = "memory", reason: str = "") -> Any:
    return labels(decision=name, function=function, store=store, reason=reason)


@pytest.fixture
def otel() -> Iterator[Otel]:
    providers = Otel()
    yield providers
    # An instrumentation a test left open would count the next test's calls.
    active = idemfn.otel._active
    if active is not None:
        active.close()
        raise AssertionError(f"the test left {active!r} open")
    assert _frames.get() is None
    providers.tracer_provider.shutdown()
    providers.meter_provider.shutdown()


def no_span_current() -> bool:
    return not trace.get_current_span().get_span_context().is_valid and _frames.get() is None


# -- spans ---------------------------------------------------------------------------------


def test_a_first_call_and_its_replay_each_get_a_span_with_the_decision(otel: Otel) -> None:
    @idempotent(store=MemoryStore(), name="shop.charge", key="{order}")
    def charge(order: str) -> str:
        return f"charged {order}"

    with otel.instrument():
        assert charge("o-1") == "charged o-1"
        assert charge("o-1") == "charged o-1"
    first, replay = otel.spans("idemfn shop.charge")
    common = {
        "idemfn.function": "shop.charge",
        "idemfn.store": "memory",
        "idemfn.key_hash": key_hash(charge.key_for("o-1")),
        "idemfn.attempt": 1,
    }
    assert dict(first.attributes or {}) == {**common, "idemfn.decision": "completed"}
    assert dict(replay.attributes or {}) == {**common, "idemfn.decision": "replayed"}
    for span in (first, replay):
        assert span.kind is SpanKind.INTERNAL
        assert span.status.status_code is StatusCode.UNSET
        assert span.instrumentation_scope is not None
        assert span.instrumentation_scope.name == "idemfn"
        assert span.instrumentation_scope.version == idemfn.__version__
        assert not span.events
    assert no_span_current()


@pytest.mark.parametrize("key", ["hash", "plain", None])
def test_the_key_option_says_what_a_span_holds_of_the_key(otel: Otel, key: str | None) -> None:
    @idempotent(store=MemoryStore(), name="crm.update", key="{email}")
    def update(email: str) -> None:
        pass

    with otel.instrument(key=key):
        update("ada@example.com")
    attributes = dict(otel.span("idemfn crm.update").attributes or {})
    stored = update.key_for("ada@example.com")
    found = {k: v for k, v in attributes.items() if k in ("idemfn.key", "idemfn.key_hash")}
    assert (
        found
        == {
            "hash": {"idemfn.key_hash": key_hash(stored)},
            "plain": {"idemfn.key": stored},
            None: {},
        }[key]
    )
    # The personal data goes nowhere else: not in the span's name nor its other attributes.
    if key != "plain":
        assert "ada@" not in repr(attributes) + otel.span("idemfn crm.update").name


def test_a_body_that_raises_halts_and_its_span_records_the_exception(otel: Otel) -> None:
    @idempotent(store=MemoryStore(), name="pay.refund", key="{order}")
    def refund(order: str) -> None:
        raise LookupError(f"no payment for {order}")

    with otel.instrument():
        with pytest.raises(LookupError):
            refund("o-2")
        with pytest.raises(LookupError, match="replayed from the record"):
            refund("o-2")
    halted, replayed = otel.spans("idemfn pay.refund")
    assert halted.attributes is not None and replayed.attributes is not None
    assert halted.attributes["idemfn.decision"] == "halted"
    assert halted.attributes["idemfn.reason"] == "raised"
    assert halted.attributes["error.type"] == "LookupError"
    assert halted.status.status_code is StatusCode.ERROR
    assert halted.status.description == "LookupError: no payment for o-2"
    (exception,) = halted.events
    assert exception.name == "exception"
    assert exception.attributes is not None
    assert exception.attributes["exception.type"] == "LookupError"
    assert exception.attributes["exception.message"] == "no payment for o-2"
    assert "raise LookupError" in str(exception.attributes["exception.stacktrace"])
    # Its replay raises the recorded exception again: an error too.
    assert replayed.attributes["idemfn.decision"] == "replayed"
    assert replayed.attributes["error.type"] == "LookupError"
    assert replayed.status.status_code is StatusCode.ERROR
    assert [e.name for e in replayed.events] == ["exception"]


class Holder:
    """A thread whose call of ``fn(arg)`` holds its key until ``let_go()``."""

    def __init__(self, fn: Any, arg: object, entered: threading.Event | None) -> None:
        self.result: list[object] = []
        self.thread = threading.Thread(target=lambda: self.result.append(fn(arg)))
        self.thread.start()
        assert entered is None or entered.wait(60), "the holder's body never ran"

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive()


def test_busy_and_mismatch_spans(otel: Otel) -> None:
    entered, go = threading.Event(), threading.Event()
    store = MemoryStore()

    @idempotent(store=store, name="job.run", key="{n}", wait=0)
    def run(n: int, size: int = 1) -> int:
        if size == 1:
            entered.set()
            assert go.wait(60)
        return n * size

    with otel.instrument():
        holder = Holder(run, 7, entered)
        try:
            with pytest.raises(AlreadyRunning):
                run(7)
        finally:
            go.set()
            holder.join()
        with pytest.raises(FingerprintMismatch):
            run(7, size=2)
    busy, held, mismatch = otel.spans("idemfn job.run")
    assert busy.attributes is not None and mismatch.attributes is not None
    assert held.attributes is not None and held.attributes["idemfn.decision"] == "completed"
    assert busy.attributes["idemfn.decision"] == "busy"
    assert busy.attributes["idemfn.reason"] == "live_owner"
    assert busy.attributes["error.type"] == "idemfn.AlreadyRunning"
    assert busy.status.status_code is StatusCode.ERROR
    assert "idemfn.attempt" not in busy.attributes  # (no claim of its own)
    assert mismatch.attributes["idemfn.decision"] == "mismatch"
    assert mismatch.attributes["error.type"] == "idemfn.FingerprintMismatch"
    # The counter, by decision and reason.
    points = otel.points("idemfn.decisions")
    assert points[decision("busy", "job.run", reason="live_owner")] == 1
    assert points[decision("mismatch", "job.run")] == 1
    assert points[decision("claimed", "job.run")] == 1


def test_a_waiter_gets_the_wait_on_its_span_and_in_the_wait_histogram(
    otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, go = threading.Event(), threading.Event()
    store = MemoryStore()
    spy = WatchSpy(store, monkeypatch)

    @idempotent(store=store, name="report.build", key="{n}", wait=120)
    def build(n: int) -> str:
        entered.set()
        assert go.wait(60)
        return f"report {n}"

    with otel.instrument():
        holder = Holder(build, 3, entered)
        waiter = Holder(build, 3, None)  # (its body never runs)
        spy.wait_for_a_waiter()  # the second caller found the key held and waits on it
        go.set()
        holder.join()
        waiter.join()
    assert holder.result == waiter.result == ["report 3"]
    _first, waited = otel.spans("idemfn report.build")
    assert waited.attributes is not None
    assert waited.attributes["idemfn.decision"] == "replayed"
    (event,) = waited.events
    assert event.name == "idemfn.waited" and event.attributes is not None
    assert event.attributes["idemfn.outcome"] == "replayed"
    wait = event.attributes["idemfn.wait.duration"]
    assert isinstance(wait, float) and 0 < wait < 120
    (point,) = otel.points("idemfn.wait.duration").items()
    assert point[0] == labels(function="report.build", store="memory", outcome="replayed")
    assert point[1].count == 1
    assert tuple(point[1].explicit_bounds) == BUCKETS
    assert otel.metric("idemfn.wait.duration").unit == "s"


def test_body_spans_are_children_of_the_call_span_sync_and_async(otel: Otel) -> None:
    @idempotent(store=MemoryStore(), name="sync.body", key="{n}")
    def sync_body(n: int) -> int:
        with otel.tracer.start_as_current_span("sync child"):
            return n

    @idempotent(store=MemoryStore(), name="async.body", key="{n}")
    async def async_body(n: int) -> int:
        await asyncio.sleep(0)
        with otel.tracer.start_as_current_span("async child"):
            await asyncio.sleep(0)
        # A task the body starts inherits the span too.
        await asyncio.create_task(task_child())
        return n

    async def task_child() -> None:
        with otel.tracer.start_as_current_span("task child"):
            await asyncio.sleep(0)

    async def calls() -> None:
        await asyncio.gather(async_body(1), async_body(2))
        assert trace.get_current_span() is request and _frames.get() is None

    with otel.tracer.start_as_current_span("request") as request, otel.instrument():
        sync_body(1)
        asyncio.run(calls())
    sync_call = otel.span("idemfn sync.body")
    assert sync_call.parent is not None
    assert sync_call.parent.span_id == request.get_span_context().span_id
    assert otel.span("sync child").parent.span_id == sync_call.context.span_id  # type: ignore[union-attr]
    async_calls = {s.context.span_id: s for s in otel.spans("idemfn async.body")}
    assert len(async_calls) == 2
    children = otel.spans("async child") + otel.spans("task child")
    assert len(children) == 4
    parents = [c.parent.span_id for c in children]  # type: ignore[union-attr]
    assert sorted(parents) == sorted(list(async_calls) * 2)  # each call has its two children
    assert {c.context.trace_id for c in children} == {request.get_span_context().trace_id}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_nested_decorated_calls_get_nested_spans(otel: Otel, mode: str) -> None:
    store = MemoryStore()
    seen: list[object] = []

    if mode == "sync":

        @idempotent(store=store, name="inner", key="{n}")
        def inner(n: int) -> int:
            seen.append(trace.get_current_span())
            return n

        @idempotent(store=store, name="outer", key="{n}")
        def outer(n: int) -> int:
            seen.append(trace.get_current_span())
            value = inner(n) + inner(n)  # a first call, then a replay
            seen.append(trace.get_current_span())
            return value

        with otel.instrument():
            assert outer(2) == 4
    else:

        @idempotent(store=store, name="inner", key="{n}")
        async def ainner(n: int) -> int:
            seen.append(trace.get_current_span())
            return n

        @idempotent(store=store, name="outer", key="{n}")
        async def aouter(n: int) -> int:
            seen.append(trace.get_current_span())
            value = await ainner(n) + await ainner(n)
            seen.append(trace.get_current_span())
            return value

        async def main() -> None:
            assert await aouter(2) == 4
            assert no_span_current()

        with otel.instrument():
            asyncio.run(main())
    outer_span = otel.span("idemfn outer")
    first, replay = otel.spans("idemfn inner")
    assert [s.parent.span_id for s in (first, replay)] == [outer_span.context.span_id] * 2  # type: ignore[union-attr]
    assert first.attributes is not None and first.attributes["idemfn.decision"] == "completed"
    assert replay.attributes is not None and replay.attributes["idemfn.decision"] == "replayed"
    # Each body saw its own call's span; the outer body got its span back after each inner.
    ids = [s.get_span_context().span_id for s in seen]  # type: ignore[attr-defined]
    assert ids == [outer_span.context.span_id, first.context.span_id, outer_span.context.span_id]
    assert no_span_current()


def test_a_cancelled_async_call_ends_its_span_and_leaves_its_task_s_context_clean(
    otel: Otel,
) -> None:
    async def main() -> None:
        started = asyncio.Event()

        @idempotent(store=MemoryStore(), name="slow", key="{n}")
        async def slow(n: int) -> None:
            started.set()
            await asyncio.Event().wait()  # until cancelled

        async def caller() -> bool:
            try:
                await slow(1)
            except asyncio.CancelledError:
                return no_span_current()  # the same task, after the call was cancelled
            raise AssertionError("not cancelled")

        task = asyncio.create_task(caller())
        await started.wait()
        task.cancel()
        assert await task

    with otel.instrument():
        asyncio.run(main())
    span = otel.span("idemfn slow")
    assert span.attributes is not None
    assert span.attributes["idemfn.decision"] == "halted"
    assert span.attributes["idemfn.reason"] == "interrupted"
    # A cancellation is no error of the call's (as OpenTelemetry's own use_span has it).
    assert span.status.status_code is StatusCode.UNSET


def test_handlers_of_others_that_raise_leave_no_span_current(
    otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: idemfn.Event) -> None:
        raise RuntimeError(f"broken on {event.name}")

    @idempotent(store=MemoryStore(), name="fragile", key="{n}")
    def fragile(n: int) -> int:
        return n

    before = idemfn.subscribe(broken)  # gets each event before idemfn.otel
    try:
        with otel.instrument():
            after = idemfn.subscribe(broken)  # and after
            try:
                assert fragile(1) == 1
                assert no_span_current()
                with pytest.raises(AlreadyRunning), otel.tracer.start_as_current_span("outside"):
                    busy_inside()
                assert no_span_current()
            finally:
                after.close()
    finally:
        before.close()
    span = otel.span("idemfn fragile")
    assert span.attributes is not None and span.attributes["idemfn.decision"] == "completed"
    assert "broken on call_started" in caplog.text


def busy_inside() -> None:
    """A decorated call that re-enters its own key (busy, reentered) from inside its body."""

    @idempotent(store=MemoryStore(), name="reenter", key="{n}")
    def reenter(n: int) -> int:
        return reenter(n) if n else 0

    reenter(1)


def test_decisions_with_no_call_of_their_own_count_and_annotate_the_current_call_span(
    otel: Otel,
) -> None:
    store = MemoryStore()

    @idempotent(store=store, name="outer.job", key="{n}")
    def job(n: int) -> int:
        claim = idemfn.begin(f"step-{n}", store=store)  # begin() used directly in a body
        assert isinstance(claim, idemfn.Claim)
        with claim:
            claim.complete(n)
        return n

    with otel.instrument(key="plain"):
        job(1)
        claim = idemfn.begin("alone", store=store)  # and with no call around it
        assert isinstance(claim, idemfn.Claim)
        with claim:
            claim.complete(0)
    span = otel.span("idemfn outer.job")
    assert span.attributes is not None and span.attributes["idemfn.decision"] == "completed"
    assert [e.name for e in span.events] == ["idemfn.claimed", "idemfn.completed"]
    assert dict(span.events[0].attributes or {}) == {
        "idemfn.function": "",
        "idemfn.store": "memory",
        "idemfn.key": "step-1",
        "idemfn.attempt": 1,
    }
    points = otel.points("idemfn.decisions")
    assert points[decision("claimed", "")] == 2
    assert points[decision("completed", "")] == 2
    assert points[decision("completed", "outer.job")] == 1
    body = otel.points("idemfn.body.duration")
    assert body[labels(function="", store="memory", outcome="completed")].count == 2


def test_ownership_lost_on_the_heartbeat_s_thread_and_on_settle(otel: Otel) -> None:
    store = MemoryStore()

    @idempotent(store=store, name="taken", key="{n}")
    def taken(n: int) -> int:
        store.delete(taken.key_for(n))  # the claim is gone: another caller took the key
        return n

    with otel.instrument():
        with pytest.raises(OwnershipLost):
            taken(1)
        claim = idemfn.begin("renewed", store=store)
        assert isinstance(claim, idemfn.Claim)
        store.delete("renewed")
        renewals: list[bool] = []
        thread = threading.Thread(target=lambda: renewals.append(claim.renew()))
        thread.start()  # as the heartbeat thread does: no call, no span there
        thread.join(60)
        assert renewals == [False]
        with pytest.raises(OwnershipLost), claim:
            claim.complete(1)
    span = otel.span("idemfn taken")
    assert span.attributes is not None
    assert span.attributes["idemfn.decision"] == "ownership_lost"
    assert span.attributes["idemfn.reason"] == "settle"
    assert span.status.status_code is StatusCode.ERROR
    points = otel.points("idemfn.decisions")
    assert points[decision("ownership_lost", "taken", reason="settle")] == 1
    assert points[decision("ownership_lost", "", reason="renew")] == 1
    assert points[decision("ownership_lost", "", reason="settle")] == 1
    body = otel.points("idemfn.body.duration")
    assert body[labels(function="taken", store="memory", outcome="ownership_lost")].count == 1


def test_an_abandoned_claim_taken_over_is_a_span_event_and_a_second_attempt(otel: Otel) -> None:
    store = MemoryStore()

    @idempotent(store=store, name="resume", key="{n}", fingerprint=False, on_abandoned="retry")
    def resume(n: int) -> int:
        return n

    # A claim of another machine's, whose lease ran out a minute ago.
    assert store.claim(foreign_entry(resume.key_for(1), "", lease_until=time.time() - 60)) is None
    with otel.instrument():
        assert resume(1) == 1
    span = otel.span("idemfn resume")
    assert span.attributes is not None
    assert span.attributes["idemfn.decision"] == "completed"
    assert span.attributes["idemfn.attempt"] == 2
    (event,) = span.events
    assert event.name == "idemfn.abandoned"
    assert dict(event.attributes or {}) == {
        "idemfn.attempt": 1,
        "idemfn.reason": "lease_expired",
        "idemfn.outcome": "taken_over",
    }
    points = otel.points("idemfn.decisions")
    assert points[decision("abandoned", "resume", reason="lease_expired")] == 1


# -- metrics -------------------------------------------------------------------------------


def test_the_metrics_of_first_calls_replays_and_halts(otel: Otel) -> None:
    @idempotent(store=MemoryStore(), name="m.fn", key="{n}")
    def fn(n: int) -> int:
        if n < 0:
            raise ValueError(n)
        return n

    with otel.instrument(spans=False) as instrumentation:
        assert repr(instrumentation) == "<idemfn.otel.Instrumentation metrics, key='hash' (active)>"
        for n in (1, 2, 1, 1):
            fn(n)
        with pytest.raises(ValueError):
            fn(-1)
    assert otel.spans() == []
    counter = otel.metric("idemfn.decisions")
    assert counter.unit == "{decision}"
    assert counter.data.is_monotonic
    assert otel.points("idemfn.decisions") == {
        decision("claimed", "m.fn"): 3,
        decision("completed", "m.fn"): 2,
        decision("replayed", "m.fn"): 2,
        decision("halted", "m.fn", reason="raised"): 1,
    }
    body = otel.points("idemfn.body.duration")
    assert set(body) == {
        labels(function="m.fn", store="memory", outcome="completed"),
        labels(function="m.fn", store="memory", outcome="halted"),
    }
    completed = body[labels(function="m.fn", store="memory", outcome="completed")]
    assert completed.count == 2 and tuple(completed.explicit_bounds) == BUCKETS
    assert otel.metric("idemfn.body.duration").unit == "s"
    assert otel.points("idemfn.wait.duration") == {}


def test_close_stops_everything_and_a_later_instrumentation_counts_on(otel: Otel) -> None:
    entered, go = threading.Event(), threading.Event()

    @idempotent(store=MemoryStore(), name="c.fn", key="{n}")
    def fn(n: int) -> int:
        if n == 0:
            entered.set()
            assert go.wait(60)
        return n

    instrumentation = otel.instrument()
    fn(1)
    holder = Holder(fn, 0, entered)  # a call running as close() comes
    instrumentation.close()
    instrumentation.close()  # (again: nothing)
    assert repr(instrumentation).endswith("(closed)>") and not instrumentation.active
    fn(2)  # no span, not counted
    go.set()
    holder.join()
    # The span of the call that ran across close() is whole, with its decision.
    assert [s.attributes["idemfn.decision"] for s in otel.spans()] == ["completed", "completed"]  # type: ignore[index]
    assert otel.points("idemfn.decisions") == {
        decision("claimed", "c.fn"): 2,  # fn(1), and fn(0) before close()
        decision("completed", "c.fn"): 1,  # fn(0)'s came after
    }
    # Every subscription is gone: with none left, calls build no events at all.
    assert not fn.policy.observer.live  # type: ignore[attr-defined]
    # A new instrumentation on the same provider goes on from the totals.
    with otel.instrument(spans=False):
        fn(3)
    assert otel.points("idemfn.decisions")[decision("claimed", "c.fn")] == 3


def test_a_call_that_began_before_instrument_has_no_span_and_breaks_nothing(otel: Otel) -> None:
    entered, go = threading.Event(), threading.Event()

    @idempotent(store=MemoryStore(), name="early", key="{n}")
    def early(n: int) -> int:
        entered.set()
        assert go.wait(60)
        with otel.tracer.start_as_current_span("body child"):
            return n

    holder = Holder(early, 1, entered)
    with otel.instrument():
        go.set()
        holder.join()
    assert holder.result == [1]
    assert [s.name for s in otel.spans()] == ["body child"]
    assert otel.points("idemfn.decisions") == {decision("completed", "early"): 1}


# -- the options ---------------------------------------------------------------------------


def test_one_instrumentation_at_a_time(otel: Otel) -> None:
    with otel.instrument(), pytest.raises(RuntimeError, match=r"instrumented already .* close"):
        otel.instrument()
    otel.instrument().close()  # once closed, again


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"key": "sha256"}, ValueError, r'instrument\(key=...\) must be "hash"'),
        ({"key": True}, ValueError, r"instrument\(key=...\)"),
        ({"spans": "yes"}, TypeError, r"instrument\(spans=...\) must be True or False, not str"),
        ({"metrics": None}, TypeError, r"instrument\(metrics=...\) must be True or False"),
        ({"spans": False, "metrics": False}, ValueError, r"would make nothing"),
        ({"tracer_provider": "otlp"}, TypeError, r"instrument\(tracer_provider=...\) must be"),
        ({"meter_provider": object()}, TypeError, r"instrument\(meter_provider=...\) must be"),
        (
            {"tracer_provider": TracerProvider().get_tracer("x")},
            TypeError,
            r"TracerProvider \(with get_tracer\(\)\), not Tracer",
        ),
    ],
)
def test_options_are_checked(options: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        idemfn.otel.instrument(**options)
    assert idemfn.otel._active is None


def test_the_api_s_no_op_providers_work(otel: Otel) -> None:
    @idempotent(store=MemoryStore(), name="noop", key="{n}")
    def fn(n: int) -> int:
        assert not trace.get_current_span().is_recording()
        return n

    with idemfn.otel.instrument(
        tracer_provider=NoOpTracerProvider(), meter_provider=NoOpMeterProvider()
    ):
        assert fn(1) == fn(1) == 1
    assert no_span_current()


def test_with_no_sdk_the_global_providers_are_the_api_s_and_forward_to_one_set_later() -> None:
    # In a fresh process: the global providers are set once per process.
    code = """
import idemfn, idemfn.otel
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

@idemfn.idempotent(store=idemfn.MemoryStore(), name="early", key="{n}")
def fn(n):
    return n

instrumentation = idemfn.otel.instrument()   # no SDK set up: the API's proxies
assert fn(1) == fn(1) == 1
instrumentation.close()
instrumentation = idemfn.otel.instrument()   # again, on the same proxies
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)          # set up later: spans go to it from now on
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
assert fn(2) == 2
instrumentation.close()
print([s.name for s in exporter.get_finished_spans()])
(counter,) = [
    m
    for m in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
    if m.name == "idemfn.decisions"
]
print(sorted((p.attributes["idemfn.decision"], p.value) for p in counter.data.data_points))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    spans, counts = out.stdout.splitlines()
    assert spans == "['idemfn early']"
    # The decisions before the SDK was set count too: the counter reports the process's totals.
    assert counts == "[('claimed', 2), ('completed', 2), ('replayed', 1)]"
    assert out.stderr == ""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_counts_its_own_decisions(otel: Otel) -> None:
    @idempotent(store=MemoryStore(), name="forked", key="{n}")
    def fn(n: int) -> int:
        return n

    def counted() -> list[tuple[str, int]]:
        points = otel.points("idemfn.decisions")
        return sorted((dict(a)["idemfn.decision"], v) for a, v in points.items())

    with otel.instrument(spans=False) as instrumentation:
        fn(1)
        counts = instrumentation._counts
        with counts.lock:  # held as the child is forked: the child's own is a new one
            pid = os.fork()
            if pid == 0:  # the child: exit 0 if it counts its own call, and only that
                try:
                    fn(2)
                    os._exit(0 if counted() == [("claimed", 1), ("completed", 1)] else 1)
                finally:
                    os._exit(2)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        if done == (0, 0):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert done[0] == pid, "the child hung (on the lock its parent held?)"
        assert os.waitstatus_to_exitcode(done[1]) == 0
        assert counted() == [("claimed", 1), ("completed", 1)]  # the parent's: fn(1)


def test_the_http_middleware_s_decisions_count_and_its_app_s_calls_get_spans(otel: Otel) -> None:
    from flask import Flask

    from idemfn.wsgi import IdempotencyMiddleware

    store = MemoryStore()

    @idempotent(store=store, name="orders.create", key="{n}")
    def create(n: int) -> str:
        return f"order {n}"

    app = Flask("shop")
    app.add_url_rule("/orders", "orders", lambda: create(1), methods=["POST"])
    app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, store=store)  # type: ignore[method-assign]
    client = app.test_client()
    with otel.instrument():
        for _ in range(2):
            with otel.tracer.start_as_current_span("POST /orders"):
                response = client.post("/orders", headers={"Idempotency-Key": "k-1"})
            assert response.get_data(as_text=True) == "order 1"
    # The request's own decisions have no idemfn span: counted only.
    points = otel.points("idemfn.decisions")
    assert points[decision("claimed", "http")] == 1
    assert points[decision("completed", "http")] == 1
    assert points[decision("replayed", "http")] == 1
    (call,) = otel.spans("idemfn orders.create")  # the second request replayed: no call
    (first_request, _) = otel.spans("POST /orders")
    assert call.parent is not None and call.parent.span_id == first_request.context.span_id
    assert call.attributes is not None and call.attributes["idemfn.decision"] == "completed"
    assert not call.events


def test_an_unsampled_call_carries_its_context_and_nothing_else() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    seen: list[trace.SpanContext] = []

    @idempotent(store=MemoryStore(), name="unsampled", key="{n}")
    def fn(n: int) -> int:
        seen.append(trace.get_current_span().get_span_context())
        if n < 0:
            raise ValueError(n)
        return n

    with idemfn.otel.instrument(tracer_provider=provider, spans=True, metrics=False):
        assert fn(1) == 1
        with pytest.raises(ValueError):
            fn(-1)
    assert exporter.get_finished_spans() == ()
    # The body ran in the call's (unsampled) span: its own spans would be unsampled too.
    assert [(c.is_valid, c.trace_flags.sampled) for c in seen] == [(True, False)] * 2
    assert no_span_current()


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message")


def test_an_exception_that_cannot_be_recorded_still_ends_the_span_and_restores_the_context(
    otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    @idempotent(store=MemoryStore(), name="odd", key="{n}", retry_on=Unprintable)
    def odd(n: int) -> int:
        raise Unprintable

    with otel.instrument():
        with pytest.raises(Unprintable):
            odd(1)
        assert no_span_current()
    (span,) = otel.spans("idemfn odd")
    assert span.end_time is not None
    assert span.attributes is not None
    assert span.attributes["idemfn.decision"] == "released"
    assert str(span.attributes["error.type"]).endswith("test_otel.Unprintable")
    assert "event handler" in caplog.text  # (idemfn.events logged what the handler raised)
