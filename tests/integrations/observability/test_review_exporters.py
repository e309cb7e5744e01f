"""A hostile review of ``idemfn.otel``, ``idemfn.prometheus``, ``idemfn stats`` and their docs.

Each test is a claim of the code or of the documentation under attack: marked ``xfail(strict)``
with the cause where the claim breaks on the current code, plain where it held. The real
OpenTelemetry SDK (in-memory exporters), the real prometheus_client, real processes for what is
per process (the global OpenTelemetry providers, the ``idemfn stats`` command).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import markdown  # type: ignore[import-untyped]
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import idemfn
import idemfn.otel
import idemfn.prometheus
from idemfn import DiskStore, FingerprintMismatch, MemoryStore, idempotent
from idemfn.otel import _frames
from tests.support.concurrency import WatchSpy
from tests.support.records import foreign_entry
from tests.support.workers import ROOT


class Otel:
    """The SDK's providers of one test, with what they exported."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def instrument(self, **options: Any) -> idemfn.otel.Instrumentation:
        return idemfn.otel.instrument(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **options
        )

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def decisions(self) -> dict[tuple[str, str], int]:
        """``idemfn.decisions`` by (decision, function)."""
        data = self.reader.get_metrics_data()
        found: dict[tuple[str, str], int] = {}
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "idemfn.decisions":
                        for point in metric.data.data_points:
                            attributes = point.attributes or {}
                            labelled = (
                                str(attributes["idemfn.decision"]),
                                str(attributes["idemfn.function"]),
                            )
                            found[labelled] = found.get(labelled, 0) + int(point.value)  # type: ignore[union-attr]
        return found


@pytest.fixture
def otel() -> Iterator[Otel]:
    providers = Otel()
    yield providers
    active = idemfn.otel._active
    if active is not None:
        active.close()
        raise AssertionError(f"the test left {active!r} open")
    assert _frames.get() is None
    providers.tracer_provider.shutdown()
    providers.meter_provider.shutdown()


def _span_text(span: ReadableSpan) -> str:
    """Everything a span exports as text: name, attributes, events' attributes, status."""
    parts = [span.name, repr(dict(span.attributes or {})), str(span.status.description)]
    for event in span.events:
        parts.append(event.name)
        parts.append(repr(dict(event.attributes or {})))
    return "\n".join(parts)


# -- OpenTelemetry: the key option -------------------------------------------------------------


# (A finding of the review of issue 21, fixed since.)
def test_key_hash_keeps_the_plain_key_out_of_every_exported_span(otel: Otel) -> None:
    # docs/observability/opentelemetry.md, "The key option": "it may hold personal data, which
    # traces should not carry. So by default a span holds the key's hash".
    @idempotent(store=MemoryStore(), name="mail.welcome", key="{email}")
    def welcome(email: str, template: str = "welcome") -> str:
        raise ValueError("the mail server refused the message")

    email = "ada.lovelace@example.com"
    with otel.instrument():  # key="hash", the default
        for _ in range(2):  # runs and halts; then replays the recorded exception
            with pytest.raises(ValueError):
                welcome(email)
        with pytest.raises(FingerprintMismatch):  # the key reused with other arguments
            welcome(email, template="reminder")
    spans = otel.spans()
    assert len(spans) == 3
    assert all(s.attributes and "idemfn.key" not in s.attributes for s in spans)
    leaked = [s.attributes["idemfn.decision"] for s in spans if email in _span_text(s)]  # type: ignore[index]
    assert leaked == [], f"the plain key is on the spans of: {leaked}"


def test_key_hash_keeps_the_key_out_of_the_span_of_a_plain_raise(otel: Otel) -> None:
    # Held: the call's own first raise (its message free of the key) exports no key, and the
    # attributes carry only the hash.
    @idempotent(store=MemoryStore(), name="mail.receipt", key="{email}")
    def receipt(email: str) -> str:
        raise ValueError("the mail server refused the message")

    email = "grace.hopper@example.com"
    with otel.instrument(), pytest.raises(ValueError):
        receipt(email)
    (span,) = otel.spans()
    assert email not in _span_text(span)
    assert span.attributes is not None
    assert span.attributes["idemfn.key_hash"] == idemfn.events.key_hash(f"mail.receipt:{email}")


# -- OpenTelemetry: the counter across instrumentations ----------------------------------------

_PROXY_THEN_SDK = """
import idemfn, idemfn.otel
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

@idemfn.idempotent(store=idemfn.MemoryStore(), name="early", key="{n}")
def fn(n):
    return n

first = idemfn.otel.instrument(spans=False)    # at start-up, before the SDK: the API's proxy
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
fn(1)                                          # counted (the proxy forwards to the SDK)
first.close()
second = idemfn.otel.instrument(spans=False)   # "close() the first to instrument again"
fn(2)
fn(3)
second.close()
counts = {}
for resource in reader.get_metrics_data().resource_metrics:
    for scope in resource.scope_metrics:
        for metric in scope.metrics:
            if metric.name == "idemfn.decisions":
                for point in metric.data.data_points:
                    name = point.attributes["idemfn.decision"]
                    counts[name] = counts.get(name, 0) + point.value
print(sorted(counts.items()))
"""


# (A finding of the review of issue 21, fixed since.)
def test_instrumenting_again_after_the_sdk_was_set_keeps_counting() -> None:
    # docs: "Before or after the SDK. Instrumenting before the global providers are set is
    # fine" and "close() the first to instrument again (with other options, say)".
    out = subprocess.run(
        [sys.executable, "-c", _PROXY_THEN_SDK],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "[('claimed', 3), ('completed', 3)]", out.stderr


def test_threads_lose_no_decision_in_the_otel_counter(otel: Otel) -> None:
    # Held: the observable counter's counts (a dict under a lock) lose nothing when many
    # threads decide at once, with the SDK collecting meanwhile.
    threads, calls = 8, 300
    start = threading.Barrier(threads + 1)

    @idempotent(store=MemoryStore(), name="busy.counter", key="{t}-{n}")
    def work(t: int, n: int) -> int:
        return n

    def caller(t: int) -> None:
        start.wait(60)
        for n in range(calls):
            work(t, n)
            work(t, n)  # and its replay

    with otel.instrument(spans=False):
        workers = [threading.Thread(target=caller, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        start.wait(60)
        while any(w.is_alive() for w in workers):
            otel.decisions()  # collections racing the counting
            workers[0].join(0.01)
        for w in workers:
            w.join(60)
    total = threads * calls
    assert otel.decisions() == {
        ("claimed", "busy.counter"): total,
        ("completed", "busy.counter"): total,
        ("replayed", "busy.counter"): total,
    }


# -- the wait outcome "gave_up" ----------------------------------------------------------------


# (A finding of the review of issue 21, fixed since.)
def test_a_gave_up_wait_is_an_already_running(otel: Otel, monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore()
    spy = WatchSpy(store, monkeypatch)
    seen: list[tuple[str, str | None]] = []

    @idempotent(store=store, name="report.async", key="{n}", wait=120, fingerprint=["n"])
    async def build(n: int, gate: asyncio.Event) -> int:
        await gate.wait()
        return n

    async def main() -> None:
        gate = asyncio.Event()
        holder = asyncio.create_task(build(1, gate))
        while build.status(1, gate) is None:
            await asyncio.sleep(0.001)  # (until the holder's claim is in the store)
        waiter = asyncio.create_task(build(1, gate))
        await spy.await_a_waiter()
        waiter.cancel()  # the caller gives up: asyncio.timeout, a client that went away
        with pytest.raises(asyncio.CancelledError):
            await waiter
        gate.set()
        assert await holder == 1

    with otel.instrument(), idemfn.subscribe(lambda e: seen.append((e.name, e.status))):
        asyncio.run(main())
    assert _frames.get() is None
    # The cancelled waiter's wait is timed as cancelled; gave_up is only for AlreadyRunning.
    assert seen.count(("waited", "cancelled")) == 1, seen
    gave_up = seen.count(("waited", "gave_up"))
    busy = sum(1 for name, _ in seen if name == "busy")
    assert busy == gave_up == 0, f"{gave_up} gave_up wait(s), {busy} AlreadyRunning: {seen}"


# -- the halted reason word: one rule for events, metrics and stats ----------------------------


# (A finding of the review of issue 21, fixed since.)
def test_a_key_holding_interrupted_does_not_turn_a_raise_into_an_interruption(
    tmp_path: Path,
) -> None:
    store = DiskStore(tmp_path / "store")

    @idempotent(store=store, name="upload", key="{upload_id}")
    def upload(upload_id: str, size: int) -> int:
        return size

    @idempotent(store=store, name="resume", key="{upload_id}")
    def resume(upload_id: str, size: int) -> int:
        # the body raises FingerprintMismatch: upload() was first called with another size
        return upload(upload_id, size)

    registry = CollectorRegistry()
    halted: list[str | None] = []
    upload("file-interrupted-at-40", 100)
    with (
        idemfn.prometheus.instrument(registry),
        idemfn.subscribe(lambda e: halted.append(e.reason), events=["halted"]),
    ):
        with pytest.raises(FingerprintMismatch):
            resume("file-interrupted-at-40", 250)  # an ordinary raise, halted
        prometheus = {
            reason: registry.get_sample_value(
                "idemfn_decisions_total",
                {"decision": "halted", "function": "resume", "store": "disk", "reason": reason},
            )
            for reason in ("raised", "interrupted")
        }
    assert halted == ["raised"], f"the halted event's reason: {halted}"
    assert prometheus == {"raised": 1.0, "interrupted": None}
    out = subprocess.run(
        [sys.executable, "-m", "idemfn", "stats", "--store", str(tmp_path / "store"), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        timeout=120,
        check=True,
    )
    stats = json.loads(out.stdout)
    assert stats["by_state"]["halted"] == 1
    assert stats["halted_by_reason"]["raised"] == 1, stats["halted_by_reason"]


def test_stats_counts_every_halted_record_once_by_its_reason(tmp_path: Path) -> None:
    # Held: halted_by_reason sums to by_state.halted, with a raise, an unstorable value and
    # an incomplete low-level claim among many ok records; JSON keys in a stable order.
    store = DiskStore(tmp_path / "store")

    @idempotent(store=store, name="mixed", key="{n}")
    def mixed(n: int) -> object:
        if n == 0:
            raise LookupError("no such order")
        if n == 1:
            return threading.Lock()  # cannot be stored: halted, unstorable
        return n

    for n in range(40):
        with contextlib.suppress(LookupError, idemfn.Halted):  # (the two halted raise)
            mixed(n)
    claim = idemfn.begin("low:level", store=store)
    assert isinstance(claim, idemfn.Claim)
    with claim:
        pass  # ends without complete(): halted, incomplete
    out = subprocess.run(
        [sys.executable, "-m", "idemfn", "stats", "--store", str(tmp_path / "store"), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        timeout=120,
        check=True,
    )
    stats = json.loads(out.stdout)
    assert list(stats["halted_by_reason"]) == [
        "raised",
        "unstorable",
        "interrupted",
        "abandoned",
        "incomplete",
        "other",
    ]
    assert stats["halted_by_reason"] == {
        "raised": 1,
        "unstorable": 1,
        "interrupted": 0,
        "abandoned": 0,
        "incomplete": 1,
        "other": 0,
    }
    assert stats["by_state"]["halted"] == sum(stats["halted_by_reason"].values()) == 3
    assert stats["by_state"]["ok"] == 38
    assert stats["oldest_processing"] is None


# -- the documented PromQL ---------------------------------------------------------------------

_DOCS = ROOT / "docs" / "observability"
# The extensions of mkdocs.yml that change how code and tables render.
_EXTENSIONS = [
    "tables",
    "attr_list",
    "md_in_html",
    "pymdownx.superfences",
    "pymdownx.inlinehilite",
    "pymdownx.highlight",
]
# What PromQL's lexer accepts after a backslash in a double-quoted string (Go's escapes).
_PROMQL_ESCAPES = set("abfnrtv\\\"'xuU01234567")


def _exposed() -> dict[str, set[str]]:
    """The sample names a scrape of ``instrument()``'s registry shows, with their labels,
    after a first call, a replay, a halt, a busy key and a wait."""
    registry = CollectorRegistry()
    store = MemoryStore()
    entered, go = threading.Event(), threading.Event()

    @idempotent(store=store, name="scraped", key="{n}", wait=120)
    def scraped(n: int) -> int:
        if n == 2:
            raise ValueError("halted")
        if n == 3:
            entered.set()
            assert go.wait(60)
        return n

    with idemfn.prometheus.instrument(registry):
        scraped(1)
        scraped(1)
        with pytest.raises(ValueError):
            scraped(2)
        monkeypatch = pytest.MonkeyPatch()
        spy = WatchSpy(store, monkeypatch)
        holder = threading.Thread(target=scraped, args=(3,))
        holder.start()
        assert entered.wait(60)
        waiter = threading.Thread(target=scraped, args=(3,))
        waiter.start()
        spy.wait_for_a_waiter()
        go.set()
        holder.join(60)
        waiter.join(60)
        monkeypatch.undo()
        text = generate_latest(registry).decode()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def _promql_snippets() -> list[tuple[str, str]]:
    """(page, code) for each code span or block of the observability pages that is a query:
    names an ``idemfn_`` metric and is no exposition text."""
    found = []
    for page in ("index.md", "prometheus.md", "opentelemetry.md"):
        rendered = markdown.markdown((_DOCS / page).read_text(), extensions=_EXTENSIONS)
        for code in re.findall(r"<code>(.*?)</code>", rendered, flags=re.S):
            text = html.unescape(re.sub(r"<[^>]+>", "", code))
            if "idemfn_" in text and "(" in text and "# HELP" not in text:
                found.append((page, text))
    return found


# (A finding of the review of issue 21, fixed since.)
def test_the_documented_queries_are_promql_on_the_names_a_scrape_shows() -> None:
    exposed = _exposed()
    snippets = _promql_snippets()
    assert len(snippets) >= 15  # the queries of index.md's table and prometheus.md's blocks
    problems = []
    for page, query in snippets:
        for string in re.findall(r'"((?:[^"\\]|\\.)*)"', query):
            for escaped in re.findall(r"\\(.)", string):
                if escaped not in _PROMQL_ESCAPES:
                    problems.append(f"{page}: {query!r}: the escape \\{escaped} in {string!r}")
        metrics = re.findall(r"\b(idemfn_[a-z_]+)", query)
        labels: set[str] = set()
        for metric in metrics:
            if metric not in exposed:
                problems.append(f"{page}: {query!r}: no metric {metric} in a scrape")
                continue
            labels |= exposed[metric]
        for metric, matchers in re.findall(r"\b(idemfn_[a-z_]+)\{([^}]*)\}", query):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                if label not in exposed.get(metric, set()):
                    problems.append(f"{page}: {query!r}: {metric} has no label {label}")
        for grouped in re.findall(r"\bby \(([^)]*)\)", query):
            for label in (g.strip() for g in grouped.split(",")):
                if label not in labels:
                    problems.append(f"{page}: {query!r}: sum by a label no metric has: {label}")
    assert problems == []


# -- OpenTelemetry: a forked child -------------------------------------------------------------

_FORKED = """
import json, os
import idemfn, idemfn.otel
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

reader = InMemoryMetricReader()
provider = MeterProvider(metric_readers=[reader])

@idemfn.idempotent(store=idemfn.MemoryStore(), name="forked", key="{n}")
def fn(n):
    return n

idemfn.otel.instrument(meter_provider=provider, spans=False)
fn(1)                       # the parent's first call: claimed, completed, one body timed

def counted():
    found = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    if metric.name == "idemfn.decisions":
                        found[point.attributes["idemfn.decision"]] = point.value
                    else:
                        found[metric.name] = point.count
    return found

read, write = os.pipe()
child = os.fork()
if child == 0:
    fn(2)                   # the child's own first call
    os.write(write, json.dumps(counted()).encode())
    os._exit(0)
os.close(write)
assert os.waitpid(child, 0)[1] == 0
print(os.read(read, 65536).decode())
"""


@pytest.mark.xfail(
    strict=True,
    reason="a documented limit (docs/observability/opentelemetry.md, 'with providers of the"
    " child's own'): idemfn/otel.py:_after_fork resets idemfn's own decision counts, but the"
    " histograms are the SDK's synchronous instruments, whose aggregations a forked child"
    " inherits: it reports the parent's body observation again",
)
def test_a_forked_child_reports_its_own_bodies_as_it_reports_its_own_decisions() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _FORKED],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
        check=True,
    )
    child = json.loads(out.stdout)
    assert child["claimed"] == child["completed"] == 1  # its own decisions only: held
    assert child["idemfn.body.duration"] == child["completed"], child


# -- a queue's retry that waits: one call, counted as busy and as claimed ----------------------


# (A finding of the review of issue 21, fixed since.)
def test_a_retried_celery_delivery_that_waits_then_runs_is_not_counted_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery import Celery

    from idemfn.celery import task_id

    app = Celery("review-busy", broker="memory://", backend="cache+memory://", set_as_current=False)
    store = MemoryStore()
    spy = WatchSpy(store, monkeypatch)

    @app.task(bind=True, max_retries=3)
    @idempotent(key=task_id, store=store)
    def send(self: Any, to: str) -> str:
        return f"sent to {to}"

    key = f"{send.run.__module__}.{send.run.__qualname__}:t-1"
    previous = idemfn.begin(key, store=store)  # the attempt that asked for the retry
    assert isinstance(previous, idemfn.Claim)
    seen: list[str] = []
    registry = CollectorRegistry()
    results: list[Any] = []
    with idemfn.prometheus.instrument(registry), idemfn.subscribe(lambda e: seen.append(e.name)):
        retry = threading.Thread(
            target=lambda: results.append(send.apply(("bob",), task_id="t-1", retries=1))
        )
        retry.start()
        spy.wait_for_a_waiter()
        previous.release()
        retry.join(60)
        busy = sum(
            sample.value
            for family in registry.collect()
            for sample in family.samples
            if sample.name == "idemfn_decisions_total" and sample.labels["decision"] == "busy"
        )
    assert results[0].get(timeout=60) == "sent to bob"  # it waited, then ran: not refused
    assert "claimed" in seen and "completed" in seen
    assert busy == 0.0, seen  # idemfn_decisions_total{decision="busy"}
    assert "busy" not in seen, seen


# -- idemfn run: a run interrupted by a signal -------------------------------------------------


# (A finding of the review of issue 21, fixed since.)
def test_a_run_stopped_by_sigterm_is_counted_interrupted_by_stats(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    store = str(tmp_path / "store")
    command = ["sh", "-c", "echo ready; exec sleep 120"]
    runner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "idemfn",
            "run",
            "-s",
            store,
            "--key",
            "deploy:term",
            "--",
            *command,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    try:
        assert runner.stdout is not None
        assert runner.stdout.readline().strip() == "ready"  # CMD runs, the key is claimed
        runner.send_signal(signal.SIGTERM)  # passed on to CMD: the key is recorded halted
        runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait(60)
    assert runner.returncode == -signal.SIGTERM
    out = subprocess.run(
        [sys.executable, "-m", "idemfn", "stats", "-s", store, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=True,
    )
    stats = json.loads(out.stdout)
    assert stats["by_state"]["halted"] == 1
    assert stats["halted_by_reason"]["interrupted"] == 1, stats["halted_by_reason"]


# -- OpenTelemetry: an abandoned claim halted --------------------------------------------------


def test_a_call_that_halts_an_abandoned_claim_has_the_documented_span(otel: Otel) -> None:
    # Held (docs/observability/opentelemetry.md): "A call whose decision is `halted` with reason
    # `abandoned` found a claim whose owner is gone, halted it, and raised `Halted`", with an
    # idemfn.abandoned span event (reason lease_expired, the dead claim's attempt, outcome
    # halted); the counter has abandoned and halted, and no body was timed (none ran here).
    store = MemoryStore()

    @idempotent(store=store, name="ship", key="{n}", fingerprint=False)
    def ship(n: int) -> int:
        return n

    expired = foreign_entry(ship.key_for(7), "", lease_until=store.time() - 60)
    assert store.claim(expired) is None
    with otel.instrument(), pytest.raises(idemfn.Halted):
        ship(7)
    (span,) = otel.spans()
    assert span.attributes is not None
    assert span.attributes["idemfn.decision"] == "halted"
    assert span.attributes["idemfn.reason"] == "abandoned"
    assert span.attributes["error.type"] == "idemfn.Halted"
    (event,) = span.events[:1]
    assert event.name == "idemfn.abandoned" and event.attributes is not None
    assert dict(event.attributes) == {
        "idemfn.attempt": 1,
        "idemfn.reason": "lease_expired",
        "idemfn.outcome": "halted",
    }
    assert otel.decisions() == {("abandoned", "ship"): 1, ("halted", "ship"): 1}
    data = otel.reader.get_metrics_data()
    timed = [
        m.name
        for r in (data.resource_metrics if data is not None else ())
        for s in r.scope_metrics
        for m in s.metrics
        if m.name == "idemfn.body.duration" and m.data.data_points
    ]
    assert timed == []
