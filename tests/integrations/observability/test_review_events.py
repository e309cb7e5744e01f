"""A hostile review of idemfn.events (issue 21): the guarantees attacked outside the basic
situations (each event's own situation is tested in tests/contract/test_events.py).

A test marked xfail(strict=True) is a guarantee that breaks today, for the reason it states;
a plain test is an attack that the guarantee held.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import idemfn
from idemfn import MemoryStore, Policy, Store, idempotent
from idemfn._heartbeat import heartbeat
from idemfn._record import Entry
from idemfn.events import Event, _observers
from tests.support.servers import PostgresServer
from tests.support.workers import poll


class _Looked(MemoryStore):
    """A MemoryStore that counts the looks (``get``) at its keys."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0

    def get(self, key: str) -> Entry | None:
        self.looks += 1
        return super().get(key)


class _Logged(logging.Handler):
    """What the ``idemfn`` logger said: (message, with a traceback). It keeps no record (a
    record's traceback would keep the failing handler alive)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.getMessage(), record.exc_info is not None))


@contextmanager
def _logged_alone() -> Iterator[_Logged]:
    """The ``idemfn`` logger's lines, to this handler only: pytest's log capture (which it
    attaches in the test's call phase) keeps each record, whose traceback keeps the failing
    handler alive."""
    handler = _Logged()
    logger = logging.getLogger("idemfn")
    handlers, logger.handlers = logger.handlers, [handler]
    propagate, logger.propagate = logger.propagate, False
    try:
        yield handler
    finally:
        logger.propagate = propagate
        logger.handlers = handlers


# "A handler that raises never breaks a call": a BaseException from a handler.


# (A finding of the review of issue 21, fixed since.)
def test_an_interrupt_in_a_claimed_handler_leaves_the_key_free() -> None:
    store = MemoryStore()
    ran: list[int] = []

    @idempotent(key="{n}", store=store)
    def work(n: int) -> int:
        ran.append(n)
        return n

    def interrupt(event: Event) -> None:
        raise KeyboardInterrupt  # (as a real Ctrl-C landing in the handler would)

    with work.subscribe(interrupt, events=["claimed"]), pytest.raises(KeyboardInterrupt):
        work(1)

    assert ran == []
    assert store.get(work.key_for(1)) is None  # today: processing, nobody renews it
    assert work(1) == 1 and ran == [1]  # the next call runs the body


# (A finding of the review of issue 21, fixed since.)
def test_an_interrupt_in_an_abandoned_handler_leaves_no_takeover_behind() -> None:
    from tests.support.records import foreign_entry

    store = MemoryStore()
    ran: list[int] = []

    @idempotent(key="{n}", store=store, on_abandoned="retry")
    def work(n: int) -> int:
        ran.append(n)
        return n

    key = work.key_for(1)
    # A claim of another machine's owner whose lease ran out a minute ago: abandoned.
    assert store.claim(foreign_entry(key, "", lease_until=store.time() - 60)) is None

    def interrupt(event: Event) -> None:
        raise KeyboardInterrupt

    with work.subscribe(interrupt, events=["abandoned"]), pytest.raises(KeyboardInterrupt):
        work(1)

    assert ran == []
    left = store.get(key)
    # Today: attempt 2, processing, this process's, renewed by nobody.
    assert left is None or left.status != "processing", left


# (A finding of the review of issue 21, fixed since.)
def test_an_interrupt_in_a_waited_handler_leaves_the_key_free() -> None:
    store = _Looked()

    @idempotent(key="{n}", store=store, wait=60)
    def work(n: int) -> int:
        return n

    key = work.key_for(1)
    holder = idemfn.begin(key, store=store)
    assert isinstance(holder, idemfn.Claim)
    raised: list[BaseException] = []

    def interrupt(event: Event) -> None:
        raise KeyboardInterrupt

    def waiter() -> None:
        try:
            work(1)
        except BaseException as exc:
            raised.append(exc)

    with work.subscribe(interrupt, events=["waited"]):
        store.looks = 0
        thread = threading.Thread(target=waiter)
        thread.start()
        poll(lambda: store.looks >= 2, "the waiter to look at the key again")
        holder.release()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert [type(e) for e in raised] == [KeyboardInterrupt]
    assert store.get(key) is None  # today: processing, its claim dropped


def test_an_interrupt_in_a_completed_handler_loses_nothing_recorded() -> None:
    # Held: the ok record is written (and settled) before completed is emitted, so the
    # interrupt only replaces the call's return; the next call replays the value.
    store = MemoryStore()
    ran: list[int] = []

    @idempotent(key="{n}", store=store)
    def work(n: int) -> int:
        ran.append(n)
        return n * 10

    def interrupt(event: Event) -> None:
        raise KeyboardInterrupt

    with work.subscribe(interrupt, events=["completed"]), pytest.raises(KeyboardInterrupt):
        work(1)

    record = work.status(1)
    assert record is not None and record.status is idemfn.Status.OK
    assert work(1) == 10 and ran == [1]
    assert len(heartbeat) == 0 or all(
        key != work.key_for(1) for _, key in heartbeat._claims.values()
    )


# (A finding of the review of issue 21, fixed since.)
def test_an_interrupt_after_the_span_starts_leaves_no_span_current() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import idemfn.otel
    from idemfn.otel import _frames

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    @idempotent(key="{n}", store=MemoryStore())
    def work(n: int) -> int:
        return n

    def interrupt(event: Event) -> None:
        raise KeyboardInterrupt

    instrumentation = idemfn.otel.instrument(tracer_provider=provider, metrics=False)
    try:
        # (subscribed after the span's handler, so its call_started comes second)
        with idemfn.subscribe(interrupt, events=["call_started"]), pytest.raises(KeyboardInterrupt):
            work(1)
        leaked = trace.get_current_span().get_span_context().is_valid
    finally:
        instrumentation.close()
        frame = _frames.get()
        if frame is not None:  # today: end it, so that no span stays current for other tests
            frame.owner._ended(Event("call_ended", frame.key, frame.function, "memory"))
    assert not leaked
    assert [s.name for s in exporter.get_finished_spans()] == [
        f"idemfn {work.__module__}.{work.__qualname__}"
    ]


# The heartbeat thread.


# (A finding of the review of issue 21, fixed since.)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_handler_exiting_on_the_heartbeat_thread_leaves_renewals_running() -> None:
    store = MemoryStore()
    policy = Policy(lease=60)
    threads: list[threading.Thread] = []

    def exit_(event: Event) -> None:
        threads.append(threading.current_thread())
        raise SystemExit

    with idemfn.subscribe(exit_, events=["ownership_lost"]):
        lost = idemfn.begin("review:lost", store=store, policy=policy)
        assert isinstance(lost, idemfn.Claim)
        store.delete("review:lost")  # forgotten while its body runs: the renewal sees it lost
        lost.renew_at = time.monotonic() - 1  # due now (heartbeat.add wakes the schedule)
        heartbeat.add(lost)
        poll(lambda: threads, "the renewal to report ownership_lost")

    renewed = threading.Event()
    renew = store.renew

    def renewing(entry: Entry, lease: float) -> Entry | None:
        renewed.set()
        return renew(entry, lease)

    store.renew = renewing  # type: ignore[method-assign]
    live = idemfn.begin("review:live", store=store, policy=policy)
    assert isinstance(live, idemfn.Claim)
    lane = id(store)
    try:
        live.renew_at = time.monotonic() - 1
        heartbeat.add(live)

        def stuck() -> bool:
            # No thread can ever take a lane that is queued but not ready once the thread
            # that served it is gone.
            with heartbeat._cond:
                queue = heartbeat._lanes.get(lane)
                return (
                    not threads[0].is_alive()
                    and queue is not None
                    and live in queue
                    and lane not in heartbeat._ready
                )

        poll(lambda: renewed.is_set() or stuck(), "the live claim's renewal")
        assert renewed.is_set(), "the store's renewal lane died with the handler's SystemExit"
    finally:
        live.release()
        with heartbeat._cond:  # today: unstick the dead lane, whose ids a later claim may reuse
            if lane not in heartbeat._ready and not threads[0].is_alive():
                for claim in heartbeat._lanes.pop(lane, ()):
                    heartbeat._renewing.discard(id(claim))
                heartbeat._renewing.discard(id(lost))


# "Every decision is an event, once, with correct fields": a task queue's retry.


# (A finding of the review of issue 21, fixed since.)
def test_a_retried_celery_delivery_that_waits_emits_no_busy() -> None:
    from celery import Celery

    from idemfn.celery import task_id

    app = Celery(
        "review-events", broker="memory://", backend="cache+memory://", set_as_current=False
    )
    store = _Looked()

    @app.task(bind=True, max_retries=3)
    @idempotent(key=task_id, store=store)
    def send(self: Any, to: str) -> str:
        return f"sent to {to}"

    key = f"{send.run.__module__}.{send.run.__qualname__}:t-1"
    previous = idemfn.begin(key, store=store)  # the previous attempt, not yet released
    assert isinstance(previous, idemfn.Claim)
    seen: list[tuple[str, str | None]] = []
    results: list[Any] = []

    def record(event: Event) -> None:
        if threading.current_thread().name == "review-retry":
            seen.append((event.name, event.status))

    with idemfn.subscribe(record):
        store.looks = 0
        retry = threading.Thread(
            target=lambda: results.append(send.apply(("bob",), task_id="t-1", retries=1)),
            name="review-retry",
        )
        retry.start()
        poll(lambda: store.looks >= 2 or not retry.is_alive(), "the retry to look again")
        previous.release()
        retry.join(timeout=60)
    assert results[0].get() == "sent to bob"
    assert seen == [
        ("call_started", None),
        ("waited", "claimed"),
        ("claimed", None),
        ("completed", None),
        ("call_ended", "ok"),
    ]


# "Nothing is spent when nobody listens", and what is kept.


# (A finding of the review of issue 21, fixed since.)
def test_a_new_handlers_first_failure_is_logged_though_its_id_was_used() -> None:
    @idempotent(key="{n}", store=MemoryStore())
    def work(n: int) -> int:
        return n

    class Failing:
        def __call__(self, event: Event) -> None:
            raise RuntimeError("broken handler")

    with _logged_alone() as logged:
        first = Failing()
        used = id(first)
        with work.subscribe(first, events=["claimed"]):
            work(1)
        assert len(logged.lines) == 1 and logged.lines[0][1]  # logged, with its traceback
        del first
        gc.collect()
        kept = []
        for _ in range(10_000):  # (CPython hands the freed address to the next such object)
            second = Failing()
            if id(second) == used:
                break
            kept.append(second)
        with work.subscribe(second, events=["claimed"]):
            work(2)
    assert len(logged.lines) == 2 and logged.lines[1][1]


def test_decorated_closures_dropped_leave_no_observer_behind() -> None:
    # Held: per-request decorated closures; the registry is a WeakSet, and a decorated
    # function's observer is freed with it, also while a process-wide handler is subscribed.
    store = MemoryStore()
    gc.collect()
    before = len(_observers)
    seen: list[str] = []
    with idemfn.subscribe(lambda e: seen.append(e.name), events=["completed"]):
        for n in range(200):

            @idempotent(key="{n}", name=f"request-{n}", store=store)
            def handle(n: int) -> int:
                return n

            handle(n)
        del handle
        gc.collect()
        assert len(_observers) == before
    assert seen == ["completed"] * 200


# Reentrancy and threads.


def test_handlers_subscribing_and_closing_from_inside_a_handler() -> None:
    # Held: the RLock lets a handler (un)subscribe; the event being dispatched goes to the
    # handlers subscribed when it was emitted, the next one to the new set.
    @idempotent(key="{n}", store=MemoryStore())
    def work(n: int) -> int:
        return n

    seen: list[tuple[str, str]] = []
    late: list[idemfn.Subscription] = []

    def first(event: Event) -> None:
        seen.append(("first", event.name))
        if event.name == "claimed":
            own.close()  # closes itself mid-dispatch
            late.append(work.subscribe(lambda e: seen.append(("late", e.name))))

    own = work.subscribe(first)
    second = work.subscribe(lambda e: seen.append(("second", e.name)))
    try:
        work(1)
    finally:
        second.close()
        for subscription in late:
            subscription.close()
    assert seen == [
        ("first", "call_started"),
        ("second", "call_started"),
        ("first", "claimed"),
        ("second", "claimed"),  # the dispatch under way is not cut short
        ("second", "completed"),
        ("late", "completed"),
        ("second", "call_ended"),
        ("late", "call_ended"),
    ]


def test_a_handler_calling_the_function_again_gets_a_replay() -> None:
    # Held: recursion from a handler, on the completed record (settled before completed).
    @idempotent(key="{n}", store=MemoryStore())
    def work(n: int) -> int:
        return n * 2

    inner: list[int] = []
    seen: list[str] = []

    def again(event: Event) -> None:
        seen.append(event.name)
        if event.name == "completed" and not inner:
            inner.append(work(1))

    with work.subscribe(again):
        assert work(1) == 2
    assert inner == [2]
    assert seen == [
        "call_started",
        "claimed",
        "completed",
        "call_started",
        "replayed",
        "call_ended",
        "call_ended",
    ]


def test_subscriptions_churning_on_other_threads_lose_no_event() -> None:
    # Held: a steady handler gets every call's events, exactly once and in order, while other
    # threads subscribe and close handlers (process-wide and per function) the whole time.
    @idempotent(key="{n}", store=MemoryStore())
    def work(n: int) -> int:
        return n

    steady: list[tuple[str, str]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            while not stop.is_set():
                with idemfn.subscribe(lambda e: None), work.subscribe(lambda e: None):
                    pass
        except BaseException as exc:  # pragma: no cover (reported below)
            errors.append(exc)

    churners = [threading.Thread(target=churn) for _ in range(2)]
    with work.subscribe(lambda e: steady.append((e.name, e.key))):
        for thread in churners:
            thread.start()
        try:
            for n in range(300):
                work(n)
        finally:
            stop.set()
            for thread in churners:
                thread.join(timeout=60)
    assert errors == []
    expected = []
    for n in range(300):
        key = work.key_for(n)
        expected += [(name, key) for name in ("call_started", "claimed", "completed", "call_ended")]
    assert steady == expected


# Validation of subscribe(events=...).


def test_events_may_be_any_iterable_of_names() -> None:
    names = ["replayed", "claimed"]
    for events in (set(names), tuple(names), (n for n in names), dict.fromkeys(names)):
        with idemfn.subscribe(lambda e: None, events=events) as subscription:
            assert subscription.events == frozenset(names)


# (A finding of the review of issue 21, fixed since.)
@pytest.mark.parametrize("events", [b"claimed", 5])
def test_events_of_a_wrong_type_are_refused_naming_the_argument(events: Any) -> None:
    with pytest.raises(TypeError, match=r"subscribe\(events=\.\.\.\)"):
        idemfn.subscribe(lambda e: None, events=events)


def test_bound_methods_classmethods_and_staticmethods_subscribe_to_their_function() -> None:
    # Held: fn.subscribe through an instance, the class, a classmethod and a staticmethod.
    store = MemoryStore()

    class Billing:
        @idempotent(key="{order}", store=store)
        def charge(self, order: str) -> str:
            return order

        @classmethod
        @idempotent(key="c-{order}", store=store)
        def refund(cls, order: str) -> str:
            return order

        @staticmethod
        @idempotent(key="s-{order}", store=store)
        def audit(order: str) -> str:
            return order

    seen: list[tuple[str | None, str]] = []
    billing = Billing()
    subscriptions = [
        billing.charge.subscribe(lambda e: seen.append((e.function, e.name)), events=["claimed"]),
        Billing.refund.subscribe(lambda e: seen.append((e.function, e.name)), events=["claimed"]),
        Billing.audit.subscribe(lambda e: seen.append((e.function, e.name)), events=["claimed"]),
    ]
    try:
        Billing().charge("a")  # another instance: the function's handlers, not the instance's
        billing.refund("b")
        billing.audit("c")
    finally:
        for subscription in subscriptions:
            subscription.close()
    prefix = f"{__name__}.{Billing.__qualname__}"
    assert seen == [
        (f"{prefix}.charge", "claimed"),
        (f"{prefix}.refund", "claimed"),
        (f"{prefix}.audit", "claimed"),
    ]


# The HTTP middleware (function "http").


class _FailingWrites(MemoryStore):
    """A MemoryStore whose outcome writes (``swap``) fail while ``failing``."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        if self.failing:
            raise idemfn.StoreError("the store is down (injected)")
        return super().swap(key, token, entry)


def _orders_app(store: Store) -> Any:
    from flask import Flask, request

    from idemfn.wsgi import IdempotencyMiddleware

    app = Flask(__name__)

    @app.post("/orders")
    def create() -> Any:
        return {"item": request.get_json()["item"]}, 201

    app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, store=store)  # type: ignore[method-assign]
    return app


def test_http_decisions_are_events_of_the_function_http() -> None:
    # Held: a first request, its replay, a reused key with another body (422) and a key
    # held by a live owner (409) are each one event, of the function "http".
    store = MemoryStore()
    client = _orders_app(store).test_client()
    seen: list[tuple[str, str | None, str | None]] = []
    with idemfn.subscribe(lambda e: seen.append((e.name, e.function, e.reason))):
        assert (
            client.post("/orders", json={"item": 1}, headers={"Idempotency-Key": "a"}).status_code
            == 201
        )
        assert (
            client.post("/orders", json={"item": 1}, headers={"Idempotency-Key": "a"}).status_code
            == 201
        )
        assert (
            client.post("/orders", json={"item": 2}, headers={"Idempotency-Key": "a"}).status_code
            == 422
        )
        (key,) = [entry.key for entry in store.scan()]
        assert key.endswith(":a")
        held = idemfn.begin(key[:-1] + "b", store=store)  # the key of "b", held live
        assert isinstance(held, idemfn.Claim)
        try:
            busy = client.post("/orders", json={"item": 3}, headers={"Idempotency-Key": "b"})
        finally:
            held.release()
    assert busy.status_code == 409, (key, busy.data)
    assert [s for s in seen if s[1] == "http"] == [
        ("claimed", "http", None),
        ("completed", "http", None),
        ("replayed", "http", None),
        ("mismatch", "http", None),
        ("busy", "http", "live_owner"),
    ]


# (A finding of the review of issue 21, fixed since.)
def test_http_response_that_could_not_be_recorded_is_a_store_error_event() -> None:
    store = _FailingWrites()
    client = _orders_app(store).test_client()
    seen: list[tuple[str, str | None]] = []
    store.failing = True
    with idemfn.subscribe(lambda e: seen.append((e.name, e.reason))):
        response = client.post("/orders", json={"item": 1}, headers={"Idempotency-Key": "a"})
    assert response.status_code == 201  # the response goes out all the same
    assert seen == [("claimed", None), ("store_error", "settle")]


# (A finding of the review of issue 21, fixed since.)
def test_idemfn_run_outcome_that_could_not_be_recorded_is_a_store_error_event() -> None:
    import sys

    from idemfn._cli.run import RUN_OBSERVER, run_once

    store = _FailingWrites()
    policy = Policy()
    policy.observer = RUN_OBSERVER
    seen: list[tuple[str, str | None, str | None]] = []
    store.failing = True
    with idemfn.subscribe(lambda e: seen.append((e.name, e.function, e.reason))):
        outcome, ran = run_once(
            store, "review:run", [sys.executable, "-c", "pass"], policy=policy, fingerprint=""
        )
    assert ran and outcome["returncode"] == 0  # the command ran, and its status is returned
    assert seen == [("claimed", "idemfn run", None), ("store_error", "idemfn run", "settle")]


# A waiter whose wait ends in an abandoned claim (the Deferred path of _engine.begin_with).


@pytest.mark.parametrize("on_abandoned", ["halt", "retry"])
def test_a_wait_ended_by_the_owner_killed_reports_waited_then_abandoned(
    on_abandoned: str, tmp_path: Path
) -> None:
    # Held: the owner is a real process, SIGKILLed while a caller waits for it; the waiter's
    # looks are held back and come, in order, after waited.
    import signal
    import subprocess
    import sys

    from idemfn import DiskStore

    store = DiskStore(tmp_path / "store")
    looks = 0
    get = store.get

    def counted(key: str) -> Entry | None:
        nonlocal looks
        looks += 1
        return get(key)

    store.get = counted  # type: ignore[method-assign]

    @idempotent(key="{n}", name="review", store=store, wait=60, on_abandoned=on_abandoned)
    def work(n: int) -> int:
        return n

    key = work.key_for(1)
    holding = (
        f"import idemfn, time; idemfn.begin({key!r}, store={str(tmp_path / 'store')!r});"
        " print('ready', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", holding], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        seen: list[tuple[str, str | None, str | None, int | None]] = []
        results: list[object] = []

        def waiter() -> None:
            try:
                results.append(work(1))
            except BaseException as exc:
                results.append(exc)

        with idemfn.subscribe(lambda e: seen.append((e.name, e.status, e.reason, e.attempt))):
            looks = 0
            thread = threading.Thread(target=waiter)
            thread.start()
            poll(lambda: looks >= 2, "the waiter to look at the key again")
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=60)
            thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    if on_abandoned == "halt":
        assert isinstance(results[0], idemfn.Halted)
        assert seen == [
            ("call_started", None, None, None),
            ("waited", "replayed", None, None),
            ("abandoned", "halted", "owner_died", 1),
            ("halted", None, "abandoned", 1),
            ("call_ended", "raised", None, None),
        ]
    else:
        assert results == [1]
        assert seen == [
            ("call_started", None, None, None),
            ("waited", "claimed", None, None),
            ("abandoned", "taken_over", "owner_died", 1),
            ("claimed", None, None, 2),
            ("completed", None, None, 2),
            ("call_ended", "ok", None, None),
        ]


# Cancellation of an async call.


def test_a_call_cancelled_as_its_claim_lands_releases_it_as_undone() -> None:
    # Held: the claim was written, the task cancelled before it got the answer: the claim is
    # undone (released, reason undone), the key is free, and the frame is closed.
    class Gated(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.gate = asyncio.Event()
            self.landed = asyncio.Event()

        async def aclaim(self, entry: Entry) -> Entry | None:
            found = await super().aclaim(entry)
            self.landed.set()
            await self.gate.wait()  # the answer never comes: the task is cancelled here
            return found

    async def scenario() -> tuple[list[tuple[str, str | None, str | None]], Entry | None]:
        store = Gated()

        @idempotent(key="{n}", store=store)
        async def work(n: int) -> int:
            return n

        seen: list[tuple[str, str | None, str | None]] = []
        with idemfn.subscribe(lambda e: seen.append((e.name, e.status, e.reason))):
            task = asyncio.create_task(work(1))
            await store.landed.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return seen, store.get(work.key_for(1))

    seen, left = asyncio.run(scenario())
    assert left is None
    assert seen == [
        ("call_started", None, None),
        ("released", None, "undone"),
        ("call_ended", "raised", None),
    ]


# transactional=True on a real PostgreSQL: the COMMIT's failure paths (_engine._after_transaction).


@pytest.fixture
def pg_store(postgres_server: PostgresServer) -> Iterator[Any]:
    from idemfn import PostgresStore

    store = PostgresStore(postgres_server.dsn, table=f"t_{uuid.uuid4().hex}")
    yield store
    store.close()


def test_a_commit_that_fails_is_a_halted_event_never_completed(
    postgres_server: PostgresServer, pg_store: Any
) -> None:
    # Held: a deferred constraint fails at COMMIT; the ok record went down with the
    # transaction, and the events say halted (raised), never completed.
    from psycopg.errors import UniqueViolation

    from tests.support.postgres_tools import ledger_table

    ledger = ledger_table(postgres_server, ", UNIQUE (order_id) DEFERRABLE INITIALLY DEFERRED")

    @idempotent(key="{order_id}", store=pg_store, transactional=True)
    def charge(order_id: str) -> int:
        idemfn.current_connection().execute(f"INSERT INTO {ledger} VALUES (%s, 2)", (order_id,))
        return 2

    seen: list[tuple[str, str | None, str | None]] = []
    with (
        charge.subscribe(lambda e: seen.append((e.name, e.status, e.reason))),
        pytest.raises(UniqueViolation),
    ):
        charge("o-1")
    assert seen == [
        ("call_started", None, None),
        ("claimed", None, None),
        ("halted", None, "raised"),
        ("call_ended", "raised", None),
    ]


# (A finding of the review of issue 21, fixed since.)
def test_a_commit_whose_answer_is_lost_but_that_committed_is_only_completed(
    postgres_server: PostgresServer, pg_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    from tests.support.postgres_tools import ledger_table

    ledger = ledger_table(postgres_server)
    real_transaction = pg_store.transaction

    @contextmanager
    def answer_lost(key: str) -> Iterator[Any]:
        with real_transaction(key) as conn:
            yield conn
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(pg_store, "transaction", answer_lost)

    @idempotent(key="{order_id}", store=pg_store, transactional=True)
    def charge(order_id: str) -> int:
        idemfn.current_connection().execute(f"INSERT INTO {ledger} VALUES (%s, 3)", (order_id,))
        return 3

    seen: list[tuple[str, str | None]] = []
    with charge.subscribe(lambda e: seen.append((e.name, e.status))):
        assert charge("o-3") == 3
    record = charge.status("o-3")
    assert record is not None and record.status is idemfn.Status.OK
    assert seen == [
        ("call_started", None),
        ("claimed", None),
        ("completed", None),
        ("call_ended", "ok"),
    ]


def test_a_celery_self_retry_is_released_as_queue_retry_each_time() -> None:
    # Held: each Task.retry() releases the key with reason queue_retry and the Retry as error;
    # the last attempt completes, and only its value is recorded.
    from celery import Celery
    from celery.exceptions import Retry

    from idemfn.celery import task_id

    app = Celery(
        "review-retry", broker="memory://", backend="cache+memory://", set_as_current=False
    )
    runs: list[int] = []

    @app.task(bind=True, max_retries=3)
    @idempotent(key=task_id, store=MemoryStore())
    def flaky(self: Any) -> str:
        runs.append(self.request.retries)
        if len(runs) < 3:
            raise self.retry(countdown=0)
        return "ok"

    seen: list[tuple[str, str | None, int | None]] = []
    errors: list[type[BaseException] | None] = []

    def record(event: Event) -> None:
        if event.name not in ("call_started", "call_ended"):
            seen.append((event.name, event.reason, event.attempt))
            errors.append(None if event.error is None else type(event.error))

    with flaky.run.subscribe(record):
        assert flaky.apply(task_id="t-9").get() == "ok"
    assert runs == [0, 1, 2]
    assert seen == [
        ("claimed", None, 1),
        ("released", "queue_retry", 1),
        ("claimed", None, 1),
        ("released", "queue_retry", 1),
        ("claimed", None, 1),
        ("completed", None, 1),
    ]
    assert errors == [None, Retry, None, Retry, None, None]


# A child forked inside the body (its claim is the parent's: Claim._settling records nothing).


# (A finding of the review of issue 21, fixed since.)
def test_a_child_forked_in_the_body_reports_nothing_of_its_parents_call(tmp_path: Path) -> None:
    import json
    import os

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import idemfn.otel
    from idemfn import DiskStore

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    parent = os.getpid()
    read, write = os.pipe()

    @idempotent(key="{n}", store=DiskStore(tmp_path / "store"))
    def work(n: int) -> str:
        child = os.fork()
        if child == 0:
            return "child"  # returns through the decorator, as a forking body's child may
        os.waitpid(child, 0)
        return "parent"

    seen: list[tuple[int, str]] = []  # (the process that got it, the event)
    try:
        with (
            idemfn.otel.instrument(tracer_provider=provider, metrics=False),
            idemfn.subscribe(lambda e: seen.append((os.getpid(), e.name))),
        ):
            assert work(1) in ("child", "parent")
    finally:
        if os.getpid() != parent:  # the child: report, and never run pytest on
            spans = [s.context.span_id for s in exporter.get_finished_spans()]  # type: ignore[union-attr]
            own = [name for pid, name in seen if pid == os.getpid()]
            os.write(write, json.dumps({"events": own, "spans": spans}).encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = json.load(pipe)
    assert [name for _, name in seen] == ["call_started", "claimed", "completed", "call_ended"]
    assert child == {"events": [], "spans": []}
