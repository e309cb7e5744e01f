"""Celery task bodies under real workers: duplicates, redelivery after SIGKILL, retries.

Each test starts a real ``celery worker`` (prefork pool, concurrency 2, ``acks_late`` and
``task_reject_on_worker_lost``) of ``tests.support.celery_tasks`` on a queue of its own, with the
suite's redis-server as broker and result backend, and the tasks' records in a DiskStore shared
by the worker's processes or in a RedisStore. Bodies append a line per run to a file, which is
how runs are counted; the ``task_postrun`` signal logs every delivery's state and return value.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import idemfn
from idemfn import Halted, MemoryStore, Status, Store, idempotent, open_store
from idemfn._record import Entry
from idemfn.celery import idempotent_task, task_id
from tests.support import celery_tasks
from tests.support.servers import RedisServer
from tests.support.workers import Worker, celery_worker, lines, poll, process_alive, release

pytestmark = pytest.mark.slow


@dataclass
class Celeryd:
    """A running worker and what a test needs to talk to it."""

    worker: Worker
    queue: str
    effects: Path
    store: Store
    env: dict[str, str]
    tmp_path: Path

    def publish(self, task: Any, *args: Any, task_id: str | None = None) -> str:
        tid = task_id or uuid.uuid4().hex
        task.apply_async(args, task_id=tid, queue=self.queue)
        return tid

    def deliveries(self, tid: str, state: str | None = None) -> list[str]:
        """The return values' reprs of the deliveries of ``tid`` that ended in ``state``
        (``ok``, ``retry`` or ``failed``)."""
        logged = [json.loads(line) for line in lines(self.effects / "deliveries")]
        return [r for t, s, r in logged if t == tid and (state is None or s == state)]

    def wait_deliveries(self, tid: str, state: str, count: int) -> list[str]:
        return poll(
            lambda: (found := self.deliveries(tid, state)) and len(found) >= count and found,
            f"{count} {state} deliveries of task {tid}\n{self.worker.output()[-3000:]}",
            timeout=60,
        )

    def runs(self, name: str) -> list[str]:
        return lines(self.effects / name)

    def record(self, task: Any, tid: str) -> idemfn.Record | None:
        entry = self.store.get(f"{task.__wrapped__.__module__}.{task.__name__}:{tid}")
        return None if entry is None else entry.record()

    def restart(self, name: str = "second") -> None:
        self.worker.kill()
        self.worker = celery_worker(self.tmp_path, self.env, name)


def _result(tid: str) -> Any:
    return celery_tasks.app.AsyncResult(tid)


@pytest.fixture(scope="module")
def celery_app(redis_server: RedisServer) -> Celery:
    # The workers read the socket from their environment; this process publishes through it.
    url = f"redis+socket://{redis_server.socket}"
    celery_tasks.app.conf.update(broker_url=url, result_backend=url)
    return celery_tasks.app


@pytest.fixture(params=["disk", "redis"])
def celeryd(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    redis_server: RedisServer,
    celery_app: Celery,
) -> Iterator[Celeryd]:
    effects = tmp_path / "effects"
    effects.mkdir()
    # Keys are unique to each test, so the tests can share the Redis store.
    location = str(tmp_path / "store") if request.param == "disk" else redis_server.url
    queue = f"q-{uuid.uuid4().hex}"
    env = {
        "IDEMFN_TEST_REDIS": str(redis_server.socket),
        "IDEMFN_TEST_QUEUE": queue,
        "IDEMFN_TEST_EFFECTS": str(effects),
        "IDEMFN_TEST_VISIBILITY": "3",
        "IDEMFN_STORE": location,
    }
    worker = celery_worker(tmp_path, env, "first")
    running = Celeryd(worker, queue, effects, open_store(location), env, tmp_path)
    try:
        yield running
    finally:
        running.worker.kill()


def test_messages_with_one_business_key_run_the_body_once(celeryd: Celeryd) -> None:
    order = uuid.uuid4().hex
    tids = [celeryd.publish(celery_tasks.ship, order, True)]
    poll(lambda: celeryd.runs(f"ship-{order}"), "the first message's body to start")
    tids += [celeryd.publish(celery_tasks.ship, order, True) for _ in range(2)]  # they wait
    # The body runs until the second pool process has started a duplicate, which waits.
    poll(lambda: set(tids) & set(celeryd.runs("started")) - {tids[0]}, "a duplicate to start")
    release(celeryd.effects, f"ship-{order}")

    values = [_result(tid).get(timeout=60) for tid in tids]
    assert len(celeryd.runs(f"ship-{order}")) == 1
    assert len(set(values)) == 1


# A whole worker killed: the broker redelivers its unacknowledged message after the visibility
# timeout. (A pool process killed, whose worker rejects the message: the shared suite,
# tests/integrations/test_queues.py.)
def test_a_whole_worker_killed_mid_body_halts_the_redelivered_task(celeryd: Celeryd) -> None:
    name = f"crash-{uuid.uuid4().hex}"
    tid = celeryd.publish(celery_tasks.crash_halt, name)
    pid = int(poll(lambda: celeryd.runs(name), "the body to start")[0])
    celeryd.restart()  # the broker redelivers the unacknowledged message after 3 s

    celeryd.wait_deliveries(tid, "failed", 1)
    assert celeryd.runs(name) == [str(pid)], "the body ran again"
    error = _result(tid).get(timeout=60, propagate=False)
    assert isinstance(error, Halted), repr(error)
    assert f"/{pid}/" in str(error) and " died: " in str(error), str(error)  # the owner
    assert "Halted" in celeryd.worker.output()
    record = celeryd.record(celery_tasks.crash_halt, tid)
    assert record is not None and record.status is Status.HALTED


def test_a_whole_worker_killed_mid_body_runs_it_once_more_with_on_abandoned_retry(
    celeryd: Celeryd,
) -> None:
    name = f"crash-{uuid.uuid4().hex}"
    tid = celeryd.publish(celery_tasks.crash_retry, name)
    pid = int(poll(lambda: celeryd.runs(name), "the body to start")[0])
    celeryd.restart()

    assert _result(tid).get(timeout=60) == "finished on run 2"
    runs = celeryd.runs(name)
    assert len(runs) == 2 and runs[0] != runs[1] and not process_alive(pid)
    record = celeryd.record(celery_tasks.crash_retry, tid)
    assert record is not None and record.status is Status.OK and record.attempt == 2


# (autoretry_for with idempotent_task: the shared suite.)
def test_a_task_retried_with_self_retry_keeps_its_key_and_records_ok_once(
    celeryd: Celeryd,
) -> None:
    task = "flaky_self_retry"
    name = f"{task}-{uuid.uuid4().hex}"
    flaky = getattr(celery_tasks, task)
    tid = celeryd.publish(flaky, name, 2)

    value = celeryd.wait_deliveries(tid, "ok", 1)[0]  # not the result backend: see below
    assert value.startswith("'ok on run 3: ")
    assert celeryd.runs(name) == ["0", "1", "2"]  # request.retries of each run
    record = celeryd.record(flaky, tid)
    assert record is not None and record.status is Status.OK

    celeryd.publish(flaky, name, 2, task_id=tid)  # a late duplicate replays
    assert celeryd.wait_deliveries(tid, "ok", 2)[-1] == value
    assert len(celeryd.runs(name)) == 3


def test_autoretry_releases_the_key_until_the_last_attempt_which_records_halted(
    celeryd: Celeryd,
) -> None:
    name = f"autoretry-{uuid.uuid4().hex}"
    tid = celeryd.publish(celery_tasks.flaky_autoretry, name, 10)

    # The worker's deliveries log, not the result backend: Celery stores a retried attempt's
    # RETRY state after it has published the retry, so on a busy machine that RETRY can land
    # after the next attempt's FAILURE and stay the backend's last word (seen in CI's load test:
    # runs 0, 1, 2 done in 0.4 s, the backend still saying RETRY a minute later).
    assert celeryd.wait_deliveries(tid, "failed", 1) == ["ConnectionError('run 3 failed')"]
    assert celeryd.runs(name) == ["0", "1", "2"]  # max_retries=2: three runs
    record = celeryd.record(celery_tasks.flaky_autoretry, tid)
    assert record is not None and record.status is Status.HALTED

    celeryd.publish(celery_tasks.flaky_autoretry, name, 10, task_id=tid)
    celeryd.wait_deliveries(tid, "failed", 2)
    assert len(celeryd.runs(name)) == 3  # the replayed failure never ran the body


# --- in-process: no worker needed --------------------------------------------------------


def _app(name: str, backend: str | None = "cache+memory://") -> Celery:
    """An app of one test's own, which never becomes Celery's current app."""
    return Celery(name, broker="memory://", backend=backend, set_as_current=False)


def test_idempotent_over_app_task_is_refused() -> None:
    app = _app("refused", backend=None)

    with pytest.raises(TypeError, match=r"must go under @app\.task, not over it"):

        @idempotent(key="x", store=MemoryStore())
        @app.task
        def charge() -> None: ...

    class Bound:  # a task instance (not app.task's lazy proxy) is refused too
        def apply_async(self) -> None: ...

        def __call__(self) -> None: ...

    with pytest.raises(TypeError, match=r"must go under @app\.task"):
        idempotent(key="x", store=MemoryStore())(Bound())


def test_task_id_outside_a_worker_says_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"no Celery task is running here.*pass key="):
        task_id()

    app = _app("direct", backend=None)

    @app.task
    @idempotent_task(store=MemoryStore())
    def direct() -> int:
        return 1

    with pytest.raises(ValueError, match="no Celery task is running here"):
        direct()  # a direct call has no task id


def test_apply_runs_the_body_once_per_task_id() -> None:
    app = _app("eager")
    runs: list[int] = []

    @app.task
    @idempotent_task(store=MemoryStore())
    def add(a: int, b: int) -> int:
        runs.append(a + b)
        return a + b

    assert add.apply((1, 2), task_id="t-1").get() == 3
    assert add.apply((1, 2), task_id="t-1").get() == 3
    assert add.apply((1, 2), task_id="t-2").get() == 3
    assert runs == [3, 3]
    assert add.apply((5, 5), task_id="t-1").state == "FAILURE"  # same id, other arguments


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"on_running": "wait"}, "on_running must be 'retry' or 'raise'"),
        ({"countdown": -1}, "countdown must be >= 0"),
        ({"countdown": "5"}, "countdown must be a number of seconds"),
        ({"max_retries": 0}, "max_retries must be a whole number >= 1"),
        ({"max_retries": True}, "max_retries must be a whole number >= 1"),
        ({"ttl": 0}, "ttl must be > 0"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, Any], error: str) -> None:
    with pytest.raises((TypeError, ValueError), match=error):
        idempotent_task(store=MemoryStore(), **options)


def test_coroutine_functions_and_methods_are_refused() -> None:
    with pytest.raises(TypeError, match="Celery calls task bodies synchronously"):

        @idempotent_task(store=MemoryStore())
        async def body() -> None: ...

    with pytest.raises(TypeError, match="decorates a task's function, not staticmethod"):
        idempotent_task(store=MemoryStore())(staticmethod(lambda: None))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "error",
    [
        idemfn.Halted("key 'k' halted: its owner died", key="k", reason="its owner died"),
        idemfn.AlreadyRunning("key 'k' is being run", key="k", owner="o", started_at=None),
        idemfn.FingerprintMismatch("key 'k' has other arguments", key="k", stored="a", given="b"),
        idemfn.OwnershipLost("the claim on key 'k' was taken over", key="k"),
        idemfn.StoreError("the store failed", key="k"),
        idemfn.DeadlineExceeded("the deadline has passed", key="k"),
    ],
)
def test_errors_keep_their_type_through_a_json_result_backend(error: Exception) -> None:
    backend = _app("results").backend

    rebuilt = backend.exception_to_python(backend.prepare_exception(error))

    assert type(rebuilt) is type(error) and str(rebuilt) == str(error)


def test_eager_self_retry_in_a_plain_body_releases_the_key() -> None:
    app = _app("eager-retry")
    store = MemoryStore()
    runs: list[int] = []

    @app.task(bind=True, max_retries=3)
    @idempotent(key=task_id, store=store)
    def flaky(self: Any) -> str:
        runs.append(self.request.retries)
        if len(runs) < 3:
            raise self.retry(countdown=0)
        return "ok"

    result = flaky.apply(task_id="t-9")
    assert result.get() == "ok"
    assert runs == [0, 1, 2]  # Retry released the key each time: the body ran again
    entry = store.get(f"{flaky.run.__module__}.{flaky.run.__qualname__}:t-9")
    assert entry is not None and entry.record().status is Status.OK


class _Looked(MemoryStore):
    """A MemoryStore that counts the looks (``get``) at its keys."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0

    def get(self, key: str) -> Entry | None:
        self.looks += 1
        return super().get(key)


def _send_task(decorate: str, **options: Any) -> tuple[Any, _Looked, str]:
    """A bound task under ``decorate``, its store, and the key of its task id ``t-1``.

    ``idempotent_task`` with ``on_running="raise"``: with ``"retry"`` a busy retried delivery
    is retried later at once (tests/integrations/test_queue_rules.py), which outlasts the
    previous attempt too."""
    app = _app(f"send-{decorate}")
    store = _Looked()
    if decorate == "idempotent":
        guard = idempotent(key=task_id, store=store, **options)
    else:
        guard = idempotent_task(store=store, on_running="raise", **options)

    @app.task(bind=True, max_retries=3)
    @guard
    def send(self: Any, to: str) -> str:
        return f"sent to {to} on retry {self.request.retries}"

    return send, store, f"{send.run.__module__}.{send.run.__qualname__}:t-1"


@pytest.mark.parametrize("decorate", ["idempotent", "idempotent_task"])
def test_a_retried_delivery_waits_for_its_previous_attempt_to_release_the_key(
    decorate: str,
) -> None:
    # Task.retry() publishes the retry, then raises Retry, which releases the key once it has
    # left the body: on a busy worker the retry started first, found the key held by the
    # attempt that asked for it, and failed for good with AlreadyRunning.
    send, store, key = _send_task(decorate)
    previous = idemfn.begin(key, store=store)  # the previous attempt, not yet released
    assert isinstance(previous, idemfn.Claim)
    store.looks = 0
    results: list[Any] = []
    retry = threading.Thread(
        target=lambda: results.append(send.apply(("bob",), task_id="t-1", retries=1))
    )
    retry.start()

    poll(lambda: store.looks >= 2 or not retry.is_alive(), "the retry to look at its key again")
    assert retry.is_alive(), results[0].traceback  # it waits, looking again
    previous.release()
    retry.join(timeout=60)

    assert not retry.is_alive()
    assert results[0].get() == "sent to bob on retry 1"
    entry = store.get(key)
    assert entry is not None and entry.record().status is Status.OK


@pytest.mark.parametrize("decorate", ["idempotent", "idempotent_task"])
def test_a_first_delivery_that_finds_its_key_busy_fails_at_once(decorate: str) -> None:
    send, store, key = _send_task(decorate)
    assert isinstance(idemfn.begin(key, store=store), idemfn.Claim)  # a live duplicate
    store.looks = 0

    result = send.apply(("bob",), task_id="t-1")  # retries=0: a duplicate, not a retry

    assert isinstance(result.result, idemfn.AlreadyRunning), result.traceback
    assert store.looks == 1  # it did not wait


@pytest.mark.parametrize("decorate", ["idempotent", "idempotent_task"])
def test_a_retried_delivery_whose_key_stays_busy_for_a_lease_fails_as_busy(
    decorate: str,
) -> None:
    # The holder is live (this process), so its claim is never abandoned, whatever the lease.
    send, store, key = _send_task(decorate, lease=1)
    assert isinstance(idemfn.begin(key, store=store), idemfn.Claim)  # a live duplicate
    store.looks = 0

    result = send.apply(("bob",), task_id="t-1", retries=1)

    assert isinstance(result.result, idemfn.AlreadyRunning), result.traceback
    assert store.looks >= 2  # it waited, looking again, before it gave up


@pytest.mark.parametrize(("requeue", "recorded"), [(True, False), (False, True)])
def test_a_requeued_reject_releases_the_key(requeue: bool, recorded: bool) -> None:
    from celery.exceptions import Reject

    store = MemoryStore()

    @idempotent(key="k", store=store)
    def body() -> None:
        raise Reject("not now", requeue=requeue)

    with pytest.raises(Reject):
        body()
    assert (body.status() is not None) is recorded


def test_a_nested_call_that_finds_its_key_busy_is_not_the_tasks_own_busy_key(
    celeryd: Celeryd,
) -> None:
    # The task's own key is free: the inner key's AlreadyRunning is the body's exception,
    # which the task handles as it says (here: retry_on + autoretry_for), never as "busy".
    name = uuid.uuid4().hex
    celeryd.publish(celery_tasks.hold_inner, name)
    poll(lambda: celeryd.runs(f"inner-{name}"), "the inner call to start")
    tid = celeryd.publish(celery_tasks.outer, name)
    # The inner call runs until the outer task has found it busy and run again.
    poll(lambda: len(celeryd.runs(f"outer-{name}")) >= 2, "the outer task to be retried")
    release(celeryd.effects, f"inner-{name}")

    assert _result(tid).get(timeout=60) == "inner done"
    assert len(celeryd.runs(f"inner-{name}")) == 1
    assert len(celeryd.runs(f"outer-{name}")) >= 2  # released each time, then replayed inner
    record = celeryd.record(celery_tasks.outer, tid)
    assert record is not None and record.status is Status.OK


def test_the_celery_extra_brings_the_redis_transport_the_examples_use() -> None:
    # kombu's Redis transport imports modules only its own "redis" extra installs (packaging,
    # redis): a worker started as the README says failed with "No module named 'packaging'".
    import tomllib
    from packaging.requirements import Requirement

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    celery = [Requirement(text) for text in extras["celery"]]
    assert any(r.name == "celery" and "redis" in r.extras for r in celery), extras["celery"]


def test_a_nested_call_that_finds_its_key_busy_does_not_retry_the_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Only the task's own function asks Celery for a retry: a nested call's would release the
    # task's claim and run its whole body (its side effects) again.
    import idemfn.celery
    from idemfn import AlreadyRunning, begin

    store = MemoryStore()
    emails: list[str] = []

    @idempotent_task(key="charge:{order}", store=store)
    def charge(order: str) -> str:
        return f"charged {order}"

    @idempotent_task(key="checkout:{order}", store=store)
    def checkout(order: str) -> str:
        emails.append(order)
        return charge(order)

    retried: list[object] = []

    class Task:  # the running task, as a worker would have it: its run is checkout
        request = type("Request", (), {"id": "t-1", "called_directly": False, "is_eager": False})
        request.retries = 0  # type: ignore[attr-defined]
        run = staticmethod(checkout)

        def _get_current_object(self) -> Any:
            return self

        def retry(self, **options: Any) -> Exception:
            retried.append(options)
            return RuntimeError("Celery's Retry")

    monkeypatch.setattr(idemfn.celery, "current_task", Task())
    busy = begin(charge.key_for("o-1"), store=store)  # another worker charges the order
    with pytest.raises(AlreadyRunning):
        checkout("o-1")
    assert retried == [] and emails == ["o-1"]
    record = checkout.status("o-1")
    assert record is not None and record.status is Status.HALTED  # as any other failure
    busy.release()  # type: ignore[union-attr]
