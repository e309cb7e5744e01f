"""The rules of ``idemfn.celery``, ``idemfn.rq`` and a task queue's retries, in-process.

Celery runs tasks eagerly here (``apply()``) and RQ jobs are simulated by patching the current
job; the same rules run under real workers in ``test_celery.py`` and ``test_rq.py``. Many of
these tests were written by a review that broke the code on purpose: each fails on some
plausible bug.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import Ignore, MaxRetriesExceededError
from rq import Queue, Retry, SimpleWorker

import idemfn
import idemfn.rq
from idemfn import AlreadyRunning, MemoryStore, Status, idempotent
from idemfn.celery import idempotent_task, task_id
from idemfn.rq import idempotent_job
from tests.support.servers import RedisServer
from tests.support.workers import lines


def _app(name: str) -> Celery:
    return Celery(name, broker="memory://", backend="cache+memory://", set_as_current=False)


@contextmanager
def first_call_held(call: Any) -> Iterator[None]:
    """Run ``call(gate)`` in a thread; its body waits on ``gate`` until the block ends."""
    gate, started = threading.Event(), threading.Event()
    thread = threading.Thread(target=call, args=(gate, started))
    thread.start()
    assert started.wait(5)
    try:
        yield
    finally:
        gate.set()
        thread.join(10)


def _busy_task(app: Celery, store: MemoryStore, **options: Any) -> Any:
    """A bound task keyed on its id whose first run blocks on a gate."""
    gates: list[tuple[threading.Event, threading.Event]] = []

    @app.task(bind=True, shared=False)
    @idempotent_task(store=store, **{"countdown": 0.25, **options})
    def busy(self: Any) -> str:
        if gates:
            gate, started = gates.pop()
            started.set()
            gate.wait(10)
        return "done"

    def hold(gate: threading.Event, started: threading.Event) -> None:
        gates.append((gate, started))
        busy.apply(task_id="busy-1")

    task = busy._get_current_object()  # app.task gives a lazy proxy: the task itself
    task.hold = hold
    return task


def _in_worker(task: Any, *, retries: int = 0) -> Any:
    """Run ``task`` as a worker would (not eagerly) with ``request.retries`` = ``retries``;
    return its value or the exception it raised. A retry goes to the in-memory broker."""
    from celery._state import _task_stack

    _task_stack.push(task)
    task.push_request(
        id="busy-1",
        args=(),
        kwargs={},
        retries=retries,
        called_directly=False,
        is_eager=False,
        delivery_info={},
    )
    try:
        return task.run()
    except Exception as exc:
        return exc
    finally:
        task.pop_request()
        _task_stack.pop()


def test_a_busy_duplicate_is_retried_until_the_first_call_ends() -> None:
    busy = _busy_task(_app("unlimited"), MemoryStore())
    with first_call_held(busy.hold):
        for retries in (0, 1, 50):  # no cap by default, whatever the task's max_retries (3)
            assert type(_in_worker(busy, retries=retries)).__name__ == "Retry"
    assert _in_worker(busy) == "done"  # the first call ended: its outcome replays


def test_max_retries_caps_the_busy_retries_and_fails_with_already_running() -> None:
    busy = _busy_task(_app("cap"), MemoryStore(), max_retries=2)
    with first_call_held(busy.hold):
        outcomes = [_in_worker(busy, retries=retries) for retries in (0, 1, 2)]
    assert [type(o).__name__ for o in outcomes] == ["Retry", "Retry", "AlreadyRunning"]
    assert not isinstance(outcomes[2], MaxRetriesExceededError)
    # retry()'s limit is not left on the task, where Celery's autoretry would take it up.
    assert "override_max_retries" not in vars(busy)


@pytest.mark.parametrize("countdown", [2.5, timedelta(seconds=2.5)])
def test_a_busy_duplicate_is_retried_with_countdown_in_seconds(
    monkeypatch: pytest.MonkeyPatch, countdown: Any
) -> None:
    busy = _busy_task(_app("countdown"), MemoryStore(), countdown=countdown)
    seen: list[dict[str, Any]] = []
    real_retry = type(busy).retry

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real_retry(self, *args, **kwargs)

    monkeypatch.setattr(type(busy), "retry", spy)
    with first_call_held(busy.hold):
        _in_worker(busy)
    assert seen and seen[0]["countdown"] == 2.5 and type(seen[0]["countdown"]) is float


def test_an_eager_busy_duplicate_fails_at_once_instead_of_recursing() -> None:
    busy = _busy_task(_app("eager"), MemoryStore())
    with first_call_held(busy.hold):
        result = busy.apply(task_id="busy-1")  # eager retries would run at once, recursively
    assert result.state == "FAILURE" and type(result.result) is AlreadyRunning


def test_countdown_zero_is_accepted() -> None:
    idempotent_task(store=MemoryStore(), countdown=0)


def test_on_running_raise_fails_a_busy_duplicate_without_retrying() -> None:
    busy = _busy_task(_app("raise"), MemoryStore(), on_running="raise")
    with first_call_held(busy.hold):
        assert type(_in_worker(busy)) is AlreadyRunning


def test_a_body_reentering_its_own_key_is_not_retried() -> None:
    app, store = _app("reentry"), MemoryStore()

    @app.task(bind=True, shared=False)
    @idempotent_task(key="same", store=store)
    def loop(self: Any) -> None:
        loop()  # a bug: retrying would never end

    task = loop._get_current_object()
    assert type(_in_worker(task)) is AlreadyRunning
    assert "re-entered its own key" in str(_in_worker(task))  # replayed as recorded


# --- C11, Q8: the helpers' extra attributes -----------------------------------------------


@pytest.mark.parametrize("helper", [idempotent_task, idempotent_job])
def test_the_helpers_keep_key_for_status_forget_and_store(helper: Any) -> None:
    store = MemoryStore()

    @helper(key="k:{x}", store=store)
    def body(x: int) -> int:
        return x * 2

    assert body(2) == 4  # called directly: the key is the business key
    assert body.store is store
    assert body.key_for(2).endswith("k:2")
    assert body.status(2).status is Status.OK
    assert body.forget(2) is True and body.status(2) is None


# --- R4, R5, R6, R10, R11 and retry_kwargs={"max_retries": None}: Celery's autoretry rules ---


def _autoretry(
    app: Celery, store: MemoryStore, failures: int, exc: type[BaseException], **task_options: Any
) -> Any:
    runs: list[int] = []

    @app.task(bind=True, shared=False, default_retry_delay=0, **task_options)
    @idempotent(key=task_id, store=store)
    def flaky(self: Any) -> str:
        runs.append(self.request.retries)
        if len(runs) <= failures:
            raise exc(f"run {len(runs)} failed")
        return f"ok on run {len(runs)}"

    flaky.runs = runs
    return flaky


def _record(store: MemoryStore) -> Any:
    entries = list(store.scan())
    return entries[0].record().status if entries else None


def test_autoretry_with_retry_kwargs_max_retries_records_the_last_attempt() -> None:
    app, store = _app("rk"), MemoryStore()
    flaky = _autoretry(
        app,
        store,
        10,
        ConnectionError,
        autoretry_for=(ConnectionError,),
        retry_kwargs={"max_retries": 1},
        max_retries=5,
    )
    assert flaky.apply(task_id="t").state == "FAILURE"
    assert flaky.runs == [0, 1]
    assert _record(store) is Status.HALTED


def test_autoretry_with_retry_kwargs_max_retries_none_uses_the_tasks_max_retries() -> None:
    # Celery's retry(max_retries=None) means the task's max_retries, not "no limit".
    app, store = _app("rk-none"), MemoryStore()
    flaky = _autoretry(
        app,
        store,
        10,
        ConnectionError,
        autoretry_for=(ConnectionError,),
        retry_kwargs={"max_retries": None},
        max_retries=2,
    )
    assert flaky.apply(task_id="t").state == "FAILURE"
    assert flaky.runs == [0, 1, 2]
    assert _record(store) is Status.HALTED


def test_dont_autoretry_for_is_recorded_at_once() -> None:
    app, store = _app("dont"), MemoryStore()
    flaky = _autoretry(
        app,
        store,
        10,
        ValueError,
        autoretry_for=(Exception,),
        dont_autoretry_for=(ValueError,),
        max_retries=5,
    )
    assert flaky.apply(task_id="t").state == "FAILURE"
    assert flaky.runs == [0]
    assert _record(store) is Status.HALTED


def test_a_task_called_directly_records_its_autoretry_exception() -> None:
    app, store = _app("direct"), MemoryStore()
    runs: list[int] = []

    @app.task(autoretry_for=(ConnectionError,), max_retries=5, shared=False)
    @idempotent(key="direct", store=store)
    def flaky() -> None:
        runs.append(1)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        flaky()  # not through a worker: nothing retries it
    assert _record(store) is Status.HALTED


def test_autoretry_with_no_max_retries_releases_every_failure() -> None:
    app, store = _app("unlimited"), MemoryStore()
    flaky = _autoretry(
        app, store, 2, ConnectionError, autoretry_for=(ConnectionError,), max_retries=None
    )
    result = flaky.apply(task_id="t")
    assert result.get() == "ok on run 3" and flaky.runs == [0, 1, 2]


def test_ignore_is_an_outcome_even_when_autoretry_covers_it() -> None:
    app, store = _app("ignore"), MemoryStore()
    flaky = _autoretry(app, store, 10, Ignore, autoretry_for=(Exception,), max_retries=5)
    flaky.apply(task_id="t")
    assert flaky.runs == [0]
    assert _record(store) is Status.HALTED


# --- Q2, Q4, Q5, Q9: idempotent_job inside a (simulated) job ------------------------------


@pytest.fixture
def in_a_job(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The RQ job running here: its ``func`` (the job's own function) is the test's to set."""
    running = SimpleNamespace(id="job-1", func=None)
    monkeypatch.setattr(idemfn.rq, "get_current_job", lambda: running)
    return running


def _sync_busy(**options: Any) -> tuple[Any, Any]:
    store = MemoryStore()
    gates: list[Any] = []

    @idempotent_job(key="k", store=store, **options)
    def job() -> str:
        if gates:
            gate, started = gates.pop()
            started.set()
            gate.wait(10)
        return "done"

    def hold(gate: threading.Event, started: threading.Event) -> None:
        gates.append((gate, started))
        job()

    return job, hold


def test_a_busy_job_returns_the_configured_retry(in_a_job: SimpleNamespace) -> None:
    job, hold = _sync_busy(interval=3, max_retries=7)
    in_a_job.func = job
    with first_call_held(hold):
        retry = job()
    assert isinstance(retry, Retry) and retry.max == 7 and retry.intervals == [3]


def test_a_busy_job_with_on_running_raise_raises(in_a_job: SimpleNamespace) -> None:
    job, hold = _sync_busy(on_running="raise")
    in_a_job.func = job
    with first_call_held(hold), pytest.raises(AlreadyRunning):
        job()


def test_a_busy_async_job_returns_retry(in_a_job: SimpleNamespace) -> None:
    store = MemoryStore()

    async def main() -> tuple[Any, Any]:
        gate = asyncio.Event()

        @idempotent_job(key="k", store=store, interval=2)
        async def job() -> str:
            await gate.wait()
            return "done"

        in_a_job.func = job
        first = asyncio.ensure_future(job())
        await asyncio.sleep(0.05)
        second = await job()
        gate.set()
        return await first, second

    first, second = asyncio.run(main())
    assert first == "done" and isinstance(second, Retry)


# --- E: errors rebuilt from their message alone --------------------------------------------


ERRORS = [c for c in vars(idemfn).values() if isinstance(c, type) and issubclass(c, Exception)]


@pytest.mark.parametrize("cls", ERRORS)
def test_every_error_can_be_built_from_its_message_alone(cls: type) -> None:
    error = cls("message")
    assert str(error) == "message" and error.key == ""


def test_errors_keep_their_fields_through_pickle() -> None:
    import pickle

    error = AlreadyRunning("busy", key="k", owner="o")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.key, copy.owner, str(copy)) == (AlreadyRunning, "k", "o", "busy")


# --- C17, C18, C19, Q10, Q11: every idempotent option reaches the core ---------------------


@pytest.mark.parametrize("module", ["celery", "rq"])
def test_the_helpers_forward_every_option_of_idempotent(
    monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    helpers = importlib.import_module(f"idemfn.{module}")
    helper = helpers.idempotent_task if module == "celery" else helpers.idempotent_job
    given: dict[str, Any] = {}

    def spy(**options: Any) -> Any:
        options.pop("on_busy")
        given.update(options)
        return lambda fn: fn

    monkeypatch.setattr(helpers, "decorator", spy)
    options = {
        "key": "k:{x}",
        "name": "custom.name",
        "store": MemoryStore(),
        "ttl": 12.0,
        "fingerprint": ["x"],
        "wait": 3.0,
        "lease": 9.0,
        "on_abandoned": "retry",
        "retry_on": KeyError,
        "deadline": datetime(2100, 1, 1, tzinfo=timezone.utc),
        "transactional": False,
        "signing_key": "s" * 32,
        "serializer": "json",
    }
    core = set(inspect.signature(idempotent).parameters) - {"_misuse"}
    assert set(options) == core  # this test lists every option of idempotent
    helper(**options)
    assert given == options


# --- an exception the task's own code catches is recorded: the side effect never repeats ----


class Declined(Exception):
    pass


def test_a_caught_exception_inside_an_autoretry_task_is_recorded() -> None:
    app, store, charges = _app("caught"), MemoryStore(), []

    @idempotent(key="charge:{order}", store=store)
    def charge(order: str) -> None:
        charges.append(order)
        raise Declined(order)

    @app.task(autoretry_for=(Exception,), max_retries=3, shared=False)
    def checkout(order: str) -> str:
        try:
            charge(order)
        except Declined:
            return "declined"
        return "charged"

    assert checkout.apply(("A-1",)).get() == checkout.apply(("A-1",)).get() == "declined"
    assert charges == ["A-1"], f"the card was charged {len(charges)} times"
    assert charge.status("A-1").status is Status.HALTED  # type: ignore[union-attr]


def test_a_caught_exception_inside_an_rq_job_with_retries_is_recorded(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support import rq_jobs

    monkeypatch.setenv("IDEMFN_TEST_EFFECTS", str(tmp_path))
    connection = redis.Redis(unix_socket_path=str(redis_server.socket))
    queue = Queue(f"q-{uuid.uuid4().hex}", connection=connection)
    order = uuid.uuid4().hex
    for _ in range(2):
        job = queue.enqueue(rq_jobs.checkout, order, retry=Retry(max=3))
        SimpleWorker([queue], connection=connection).work(burst=True)
        assert job.return_value() == "declined"
    assert len(lines(tmp_path / f"charge-{order}")) == 1, "the card was charged twice"
    connection.close()


def test_a_task_whose_own_body_raises_is_released_only_while_retries_remain() -> None:
    app, store = _app("own"), MemoryStore()
    flaky = _autoretry(
        app, store, 10, ConnectionError, autoretry_for=(ConnectionError,), max_retries=2
    )
    assert flaky.apply(task_id="t").state == "FAILURE"
    assert flaky.runs == [0, 1, 2]  # released twice, the third failure recorded
    assert _record(store) is Status.HALTED
    assert flaky.apply(task_id="t").state == "FAILURE"
    assert flaky.runs == [0, 1, 2]  # the replayed failures never ran the body
