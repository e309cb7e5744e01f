"""idemfn.prometheus: the metrics each decision makes, read from a private registry and scraped
over HTTP by prometheus_client's own exposition; and gunicorn with two sync workers in
prometheus-client's multiprocess mode, scraped over HTTP, with a worker SIGKILLed."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

import idemfn
import idemfn.events
from idemfn.prometheus import Instrumentation, instrument, multiprocess_registry
from tests.support.http_servers import Deployment, serve
from tests.support.workers import poll

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Retry(Exception):
    pass


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Iterator[Instrumentation]:
    with instrument(registry) as instrumentation:
        yield instrumentation


def decisions(registry: CollectorRegistry, decision: str, function: str, **labels: str) -> float:
    value = registry.get_sample_value(
        "idemfn_decisions_total",
        {"decision": decision, "function": function, "store": "disk", "reason": "", **labels},
    )
    return value or 0.0


def timed(registry: CollectorRegistry, metric: str, function: str, outcome: str) -> float:
    value = registry.get_sample_value(
        f"idemfn_{metric}_duration_seconds_count",
        {"function": function, "store": "disk", "outcome": outcome},
    )
    return value or 0.0


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def count(samples: Samples, decision: str, function: str, reason: str = "") -> float:
    labels = {"decision": decision, "function": function, "store": "disk", "reason": reason}
    return samples.get(("idemfn_decisions_total", frozenset(labels.items())), 0.0)


@pytest.mark.usefixtures("metrics")
def test_first_call_replay_halted_and_released_counted(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    store = idemfn.DiskStore(tmp_path / "store")

    @idemfn.idempotent(store=store, name="pay", retry_on=Retry)
    def pay(order: str) -> str:
        if order == "bad":
            raise ValueError("declined")
        if order == "later":
            raise Retry
        return order

    assert pay("o-1") == "o-1"
    assert (decisions(registry, "claimed", "pay"), decisions(registry, "completed", "pay")) == (
        1,
        1,
    )
    assert timed(registry, "body", "pay", "completed") == 1
    for _ in range(3):
        assert pay("o-1") == "o-1"
    assert decisions(registry, "replayed", "pay") == 3
    assert decisions(registry, "claimed", "pay") == 1  # a replay claims nothing
    assert timed(registry, "body", "pay", "completed") == 1  # nor times a body

    with pytest.raises(ValueError):
        pay("bad")
    assert decisions(registry, "halted", "pay", reason="raised") == 1
    assert timed(registry, "body", "pay", "halted") == 1
    with pytest.raises(ValueError):
        pay("bad")  # a halted record replays its exception
    assert decisions(registry, "replayed", "pay") == 4

    with pytest.raises(Retry):
        pay("later")
    assert decisions(registry, "released", "pay", reason="retry_on") == 1
    assert timed(registry, "body", "pay", "released") == 1
    assert decisions(registry, "claimed", "pay") == 3
    # No other label set was made: no key, no attempt, nothing per call.
    labelled = {
        tuple(sorted(sample.labels))
        for family in registry.collect()
        for sample in family.samples
        if sample.name.startswith("idemfn_decisions")
    }
    assert labelled == {("decision", "function", "reason", "store")}


@pytest.mark.usefixtures("metrics")
def test_busy_and_waited_counted(registry: CollectorRegistry, tmp_path: Path) -> None:
    store = idemfn.DiskStore(tmp_path / "store")
    running, release = threading.Event(), threading.Event()

    def body(order: str) -> str:
        running.set()
        assert release.wait(60)
        return order

    held = idemfn.idempotent(store=store, name="held")(body)
    # A caller that waits 50 ms for a claim held until the test lets it go: it gives up.
    waiting = idemfn.idempotent(store=store, name="held", wait=0.05)(body)
    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(held("o-1")))
    first.start()
    try:
        assert running.wait(60)
        with pytest.raises(idemfn.AlreadyRunning):
            held("o-1")
        assert decisions(registry, "busy", "held", reason="live_owner") == 1
        with pytest.raises(idemfn.AlreadyRunning):
            waiting("o-1")
    finally:
        release.set()
        first.join(60)
    assert results == ["o-1"]
    assert decisions(registry, "waited", "held") == 1
    assert timed(registry, "wait", "held", "gave_up") == 1
    assert decisions(registry, "busy", "held", reason="live_owner") == 2
    assert held("o-1") == "o-1"
    assert decisions(registry, "replayed", "held") == 1


def test_threads_lose_no_count(registry: CollectorRegistry, metrics: Instrumentation) -> None:
    """Threads handing out decisions at once, switching as often as the interpreter can: every
    decision and every duration is counted (one process's counts are updated under a lock;
    without it, about a fifth were lost here)."""
    store = idemfn.MemoryStore()
    threads, events = 6, 10000
    barrier = threading.Barrier(threads)

    def run() -> None:
        barrier.wait(60)
        for _ in range(events):  # what begin()'s decisions go through
            idemfn.events.PROCESS.emit("completed", store, "k", attempt=1, duration=0.002)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=run) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
    finally:
        sys.setswitchinterval(interval)
    labels = {"decision": "completed", "function": "", "store": "memory", "reason": ""}
    assert registry.get_sample_value("idemfn_decisions_total", labels) == threads * events
    body = {"function": "", "store": "memory", "outcome": "completed"}
    assert registry.get_sample_value("idemfn_body_duration_seconds_count", body) == threads * events
    bucket = {**body, "le": "0.001"}
    assert registry.get_sample_value("idemfn_body_duration_seconds_bucket", bucket) == 0


def test_scraped_over_http_by_prometheus_client(
    metrics: Instrumentation, registry: CollectorRegistry, tmp_path: Path
) -> None:
    # undecorated begin(): the function label is empty
    store = idemfn.DiskStore(tmp_path / "store")

    @idemfn.idempotent(store=store, name="scraped")
    def scraped(order: str) -> str:
        return order

    scraped("o-1")
    scraped("o-1")
    claim = idemfn.begin("raw-key", store=store)
    assert isinstance(claim, idemfn.Claim)
    claim.complete("done")
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        response = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=30)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)
    assert response.status_code == 200
    samples = parse(response.text)
    assert count(samples, "claimed", "scraped") == count(samples, "replayed", "scraped") == 1
    assert count(samples, "claimed", "") == count(samples, "completed", "") == 1
    body = {"function": "scraped", "store": "disk", "outcome": "completed"}
    bucket = frozenset({**body, "le": "+Inf"}.items())
    assert samples[("idemfn_body_duration_seconds_bucket", bucket)] == 1
    assert "idemfn_wait_duration_seconds" in response.text  # declared, no sample yet


def test_single_process_counts_expose_as_prometheus_clients_own_metrics() -> None:
    """A single process keeps plain counts (cheaper than metric children) and exposes them when
    scraped; a multiprocess server's workers use prometheus_client's Counter and Histogram.
    Fed the same events, both expose the same samples (but prometheus_client's ``_created``)."""
    from idemfn._metrics import BUCKETS
    from idemfn.prometheus import _Aggregates, _Shared

    events = [
        idemfn.Event("claimed", "f:k", "f", "disk", attempt=1),
        idemfn.Event("completed", "f:k", "f", "disk", attempt=1, duration=0.0004),
        idemfn.Event("halted", "f:j", "f", "disk", duration=0.3, reason="raised"),
        idemfn.Event("halted", "f:j", "f", "disk", duration=0.25, reason="raised"),  # = a bound
        idemfn.Event("released", "f:r", None, "redis", duration=400.0, reason="retry_on"),
        idemfn.Event("waited", "f:w", "f", "disk", duration=0.01, status="replayed"),
        idemfn.Event("waited", "f:x", "f", "disk", duration=2.0),  # gave up
        idemfn.Event("abandoned", "f:k", "f", "disk", reason="owner_died", status="halted"),
        idemfn.Event("halted", "f:k", "f", "disk", reason="abandoned"),  # no duration: no body
        idemfn.Event("replayed", "f:k", "f", "disk", status="ok"),
    ]
    aggregates, shared = _Aggregates(BUCKETS), _Shared(BUCKETS)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    ours.register(aggregates)
    for collector in shared.collectors():
        theirs.register(collector)
    for event in events:
        aggregates.handle(event)
        shared.handle(event)

    def samples(registry: CollectorRegistry) -> Samples:
        return {
            key: value
            for key, value in parse(generate_latest(registry).decode()).items()
            if not key[0].endswith("_created")
        }

    assert samples(ours) == samples(theirs)
    assert len(samples(ours)) == 8 + 5 * (len(BUCKETS) + 3)  # 8 counts, 5 histograms
    assert generate_latest(ours).decode().count("# TYPE") == 3


def test_close_stops_counting_and_unregisters(registry: CollectorRegistry, tmp_path: Path) -> None:
    store = idemfn.DiskStore(tmp_path / "store")

    @idemfn.idempotent(store=store, name="closing")
    def closing(order: str) -> str:
        return order

    live_before = idemfn.events.PROCESS.live
    instrumentation = instrument(registry)
    assert idemfn.events.PROCESS.live and instrumentation.active
    assert "active" in repr(instrumentation) and "single-process" in repr(instrumentation)
    closing("o-1")
    instrumentation.close()
    instrumentation.close()  # again: nothing
    assert (instrumentation.active, "closed" in repr(instrumentation)) == (False, True)
    assert idemfn.events.PROCESS.live == live_before  # its handler is gone
    closing("o-2")
    assert registry.get_sample_value("idemfn_decisions_total", {}) is None
    assert list(registry.collect()) == []
    with instrument(registry):  # the registry takes idemfn's metrics again, from zero
        closing("o-3")
        assert decisions(registry, "claimed", "closing") == 1


def test_instrumenting_one_registry_twice_is_refused(
    metrics: Instrumentation, registry: CollectorRegistry
) -> None:
    with pytest.raises(ValueError, match=r"instrument\(registry=...\): idemfn's metrics are alre"):
        instrument(registry)
    assert metrics.active
    with instrument(CollectorRegistry()):  # another registry is another matter
        pass
    other = CollectorRegistry()
    from prometheus_client import Counter

    Counter("idemfn_decisions", "someone else's", registry=other)
    with pytest.raises(ValueError, match="something other than instrument"):
        instrument(other)
    assert [m.name for m in other.collect()] == ["idemfn_decisions"]  # left as it was


def test_arguments_are_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"instrument\(registry=...\) must be a prometheus_clie"):
        instrument("default")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"instrument\(buckets=...\) must increase"):
        instrument(CollectorRegistry(), buckets=[1.0, 0.5])
    with pytest.raises(ValueError, match="positive seconds"):
        instrument(CollectorRegistry(), buckets=[])
    with pytest.raises(TypeError, match=r"instrument\(buckets=...\)"):
        instrument(CollectorRegistry(), buckets="1,2")  # type: ignore[arg-type]
    custom = CollectorRegistry()
    with instrument(custom, buckets=[0.5, 2]):
        idemfn.idempotent(store=idemfn.MemoryStore(), name="custom")(lambda: 1)()
        families = list(custom.collect())
    bounds = [
        sample.labels["le"]
        for family in families
        for sample in family.samples
        if sample.name == "idemfn_body_duration_seconds_bucket"
    ]
    assert bounds == ["0.5", "2.0", "+Inf"]

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(ValueError, match=r"multiprocess_registry\(path=None\) reads PROMETHEUS"):
        multiprocess_registry()
    with pytest.raises(ValueError, match=r"multiprocess_registry\(path="):
        multiprocess_registry(tmp_path / "missing")
    assert isinstance(multiprocess_registry(tmp_path), CollectorRegistry)

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="is not a directory"):
        instrument(CollectorRegistry())
    # Set after prometheus_client was imported (this process): it would count for itself only.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="was not when prometheus_client was first imported"):
        instrument(CollectorRegistry())


@pytest.mark.parametrize("preload", [False, True], ids=["instrumented-in-workers", "preload"])
def test_gunicorn_workers_counted_together_and_a_killed_workers_counts_survive(
    tmp_path: Path, preload: bool
) -> None:
    """gunicorn, 2 sync workers, multiprocess mode: requests land on both workers (a held
    request keeps one busy, so the next is served by the other); /metrics, served by either,
    sums both; a worker SIGKILLed mid-request keeps its counts, and its claim is found
    abandoned by the other. With --preload, instrument() runs in the master, before the fork."""
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    deployment = Deployment("gunicorn", "prometheus", 2, "disk")
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "GUNICORN_CMD_ARGS": "--config python:tests.support.prometheus_app"
        + (" --preload" if preload else ""),
    }
    with serve(deployment, tmp_path, str(tmp_path / "store"), env=env) as served:
        client = served.client()

        def post(key: str, **params: str) -> httpx.Response:
            return client.post("/orders", params=params, headers={"Idempotency-Key": key})

        def scrape() -> Samples:
            response = client.get("/metrics")
            assert response.status_code == 200
            return parse(response.text)

        # One worker runs k-1 (held), the other answers its duplicate: busy.
        with served.holding():
            cut_off: list[BaseException] = []

            def hold() -> None:
                try:
                    with served.client() as own:
                        own.post(
                            "/orders", params={"hold": "1"}, headers={"Idempotency-Key": "k-1"}
                        )
                except httpx.TransportError as exc:
                    cut_off.append(exc)

            held = threading.Thread(target=hold, daemon=True)
            held.start()
            holder = served.wait_run("k-1")["pid"]
            busy = post("k-1", hold="1")  # the same request: its query is fingerprinted
            assert busy.status_code == 409
            other = int(busy.headers["X-Worker-Pid"])
            assert other != holder and {holder, other} == set(served.server.worker_pids())
            # SIGKILL the holder mid-request: its claim was counted in its own file only.
            served.server.kill_worker(holder)
            held.join(60)
            assert len(cut_off) == 1  # its client got no response
        served.server.wait_workers(without=holder)
        log = served.server.output()
        assert f"child_exit: marked worker {holder} dead" in log
        # --preload: once, in the master, before the fork; else in each worker
        instrumented = [holder, other] if not preload else [served.server.pid]
        assert all(f"instrumented in process {pid}\n" in log for pid in instrumented)
        if preload:
            assert log.count("instrumented in process") == 1

        abandoned = post("k-1", hold="1")  # the dead worker's claim, found on this machine at once
        assert abandoned.status_code == 500

        first = post("k-2")
        assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
        pids = {int(first.headers["X-Worker-Pid"])}
        for _ in range(3):
            replay = post("k-2")
            assert replay.headers["Idempotent-Replayed"] == "true"
            pids.add(int(replay.headers["X-Worker-Pid"]))
        assert client.post("/charge", params={"order": "o-1"}).json()["order"] == "o-1"
        assert client.post("/charge", params={"order": "o-1"}).json()["order"] == "o-1"

        expected = {
            ("claimed", "http", ""): 2,  # k-1 by the killed worker, k-2
            ("busy", "http", "live_owner"): 1,
            ("abandoned", "http", "owner_died"): 1,
            ("halted", "http", "abandoned"): 1,
            ("completed", "http", ""): 1,
            ("replayed", "http", ""): 3,
            ("claimed", "charge", ""): 1,
            ("completed", "charge", ""): 1,
            ("replayed", "charge", ""): 1,
        }

        def summed() -> dict[tuple[str, str, str], float]:
            samples = scrape()
            return {labels: count(samples, *labels) for labels in expected}

        # The scrape may come before a worker's last decision is written: wait for it.
        poll(lambda: summed() == expected, f"the scrape to sum to {expected}", 60)
        samples = scrape()
        body = frozenset({"function": "http", "store": "disk", "outcome": "completed"}.items())
        assert samples[("idemfn_body_duration_seconds_count", body)] == 1
        # Each worker writes its own files; the killed one's are kept, and read.
        files = sorted(p.name for p in multiproc.iterdir())
        assert f"counter_{holder}.db" in files and f"counter_{other}.db" in files
        assert not any(name.startswith("gauge_live") for name in files)
    assert os.listdir(multiproc)  # what a restart must clear (the docs say so)
