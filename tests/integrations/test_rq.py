"""RQ job functions under real ``rq worker`` processes: duplicates, overlap, killed workers.

Each test starts real workers (``rq worker --with-scheduler``, of the forking ``Worker`` class
and of ``SimpleWorker``) of ``tests.support.rq_jobs`` on a queue of its own on the suite's
redis-server, with the jobs' records in a DiskStore shared by the worker processes or in a
RedisStore. Bodies append a line per run to a file, which is how runs are counted.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue, Retry
from rq.job import Job, JobStatus

from idemfn import MemoryStore, Status, Store, open_store
from idemfn.rq import idempotent_job, job_id
from tests.support import rq_jobs
from tests.support.servers import RedisServer
from tests.support.workers import Worker, lines, poll, process_alive, rq_worker

pytestmark = pytest.mark.slow

WORKER_CLASSES = {"Worker": "rq.worker.Worker", "SimpleWorker": "rq.worker.SimpleWorker"}


@dataclass
class Rq:
    """A queue, the workers started for it, and what a test needs to check them."""

    queue: Queue
    effects: Path
    store: Store
    env: dict[str, str]
    tmp_path: Path
    url: str
    worker_class: str
    workers: list[Worker] = field(default_factory=list)

    def start_worker(self, worker_class: str | None = None) -> Worker:
        name = f"w{len(self.workers)}-{uuid.uuid4().hex[:8]}"
        worker = rq_worker(
            self.tmp_path,
            self.env,
            name,
            self.url,
            self.queue.name,
            WORKER_CLASSES[worker_class or self.worker_class],
        )
        self.workers.append(worker)
        return worker

    def enqueue(self, fn: Callable[..., Any], *args: Any, **options: Any) -> Job:
        return self.queue.enqueue(fn, *args, **options)

    def done(self, job: Job, timeout: float = 60) -> JobStatus:
        def ended() -> JobStatus | None:
            status = job.get_status(refresh=True)
            return status if status in (JobStatus.FINISHED, JobStatus.FAILED) else None

        logs = "\n".join(w.output()[-2000:] for w in self.workers)
        return poll(ended, f"job {job.id} to end\n{logs}", timeout)

    def runs(self, name: str) -> list[str]:
        return lines(self.effects / name)

    def record(self, fn: Any, key: str) -> Any:
        entry = self.store.get(f"{fn.__module__}.{fn.__qualname__}:{key}")
        return None if entry is None else entry.record()


@pytest.fixture(params=["disk", "redis"])
def store_location(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> str:
    # Keys are unique to each test, so the tests can share the Redis store.
    return str(tmp_path / "store") if request.param == "disk" else redis_server.url


@pytest.fixture(params=list(WORKER_CLASSES))
def rq(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer, store_location: str
) -> Iterator[Rq]:
    effects = tmp_path / "effects"
    effects.mkdir()
    connection = redis.Redis(unix_socket_path=str(redis_server.socket))
    queue = Queue(f"q-{uuid.uuid4().hex}", connection=connection)
    env = {"IDEMFN_TEST_EFFECTS": str(effects), "IDEMFN_STORE": store_location}
    running = Rq(
        queue,
        effects,
        open_store(store_location),
        env,
        tmp_path,
        f"unix://{redis_server.socket}",
        request.param,
    )
    try:
        yield running
    finally:
        for worker in running.workers:
            worker.kill()
        connection.close()


def test_two_jobs_with_one_business_key_run_the_body_once(rq: Rq) -> None:
    rq.start_worker()
    order = uuid.uuid4().hex
    first, second = rq.enqueue(rq_jobs.pay, order), rq.enqueue(rq_jobs.pay, order)

    assert rq.done(first) == rq.done(second) == JobStatus.FINISHED
    assert len(rq.runs(f"pay-{order}")) == 1
    assert first.return_value() == second.return_value()
    assert rq.record(rq_jobs.pay, f"pay:{order}").status is Status.OK


def test_the_plain_decorator_runs_a_job_function_once(rq: Rq) -> None:
    rq.start_worker()
    order = uuid.uuid4().hex
    jobs = [rq.enqueue(rq_jobs.refund, order) for _ in range(3)]

    assert {rq.done(job) for job in jobs} == {JobStatus.FINISHED}
    assert len(rq.runs(f"refund-{order}")) == 1
    assert len({job.return_value() for job in jobs}) == 1


def _kill_mid_body(rq: Rq, worker: Worker, name: str) -> int:
    pid = int(poll(lambda: rq.runs(name), "the body to start")[0])
    if rq.worker_class == "Worker":
        os.kill(pid, signal.SIGKILL)  # the work horse: the worker sees it die and retries
    else:
        assert pid == worker.pid  # SimpleWorker runs the body itself
        worker.kill()
        rq.start_worker()
        # What RQ's maintenance does with an abandoned job once its heartbeat has expired.
        rq.queue.started_job_registry.cleanup(timestamp=2**40)
    return pid


# (The forking Worker: the shared suite, tests/integrations/test_queues.py.)
@pytest.mark.parametrize("rq", ["SimpleWorker"], indirect=True)
def test_a_worker_killed_mid_job_halts_the_requeued_job(rq: Rq) -> None:
    worker = rq.start_worker()
    name = f"crash-{uuid.uuid4().hex}"
    job = rq.enqueue(rq_jobs.crash_halt, name, retry=Retry(max=1))
    pid = _kill_mid_body(rq, worker, name)

    assert rq.done(job) == JobStatus.FAILED
    assert rq.runs(name) == [str(pid)], "the body ran again"
    result = job.latest_result()
    assert result is not None and "idemfn.Halted" in (result.exc_string or ""), result
    assert f"/{pid}/" in (result.exc_string or "")  # the reason names the dead owner
    assert rq.record(rq_jobs.crash_halt, job.id).status is Status.HALTED


# (The forking Worker: the shared suite, tests/integrations/test_queues.py.)
@pytest.mark.parametrize("rq", ["SimpleWorker"], indirect=True)
def test_a_worker_killed_mid_job_runs_it_once_more_with_on_abandoned_retry(rq: Rq) -> None:
    worker = rq.start_worker()
    name = f"crash-{uuid.uuid4().hex}"
    job = rq.enqueue(rq_jobs.crash_retry, name, retry=Retry(max=1))
    pid = _kill_mid_body(rq, worker, name)

    assert rq.done(job) == JobStatus.FINISHED
    assert job.return_value() == "finished on run 2"
    runs = rq.runs(name)
    assert len(runs) == 2 and runs[0] == str(pid) and not process_alive(pid)
    record = rq.record(rq_jobs.crash_retry, job.id)
    assert record.status is Status.OK and record.attempt == 2


def test_rq_retries_release_the_key_until_the_last_attempt(rq: Rq) -> None:
    rq.start_worker()
    name = f"flaky-{uuid.uuid4().hex}"
    job = rq.enqueue(rq_jobs.flaky, name, 10, retry=Retry(max=2))

    assert rq.done(job) == JobStatus.FAILED
    assert len(rq.runs(name)) == 3  # RQ ran it three times: the key was free each time
    assert rq.record(rq_jobs.flaky, f"flaky:{name}").status is Status.HALTED

    again = rq.enqueue(rq_jobs.flaky, name, 10)  # a later duplicate replays the failure
    assert rq.done(again) == JobStatus.FAILED
    assert len(rq.runs(name)) == 3
    assert "run 3 failed" in (again.latest_result().exc_string or "")  # type: ignore[union-attr]


# --- in-process: no worker needed --------------------------------------------------------


def test_job_id_outside_a_worker_says_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"no RQ job is running here.*pass key="):
        job_id()


def test_a_direct_call_that_finds_its_key_running_raises() -> None:
    from idemfn import AlreadyRunning

    store = MemoryStore()

    @idempotent_job(key="k", name="same", store=store)
    def inner() -> None:
        outer()

    @idempotent_job(key="k", name="same", store=store)
    def outer() -> None: ...

    with pytest.raises(AlreadyRunning):  # outside a worker there is nothing to retry it
        inner()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"on_running": "wait"}, "on_running must be 'retry' or 'raise'"),
        ({"interval": -1}, "interval must be a whole number >= 0"),
        ({"interval": 1.5}, "interval must be a whole number >= 0"),
        ({"max_retries": 0}, "max_retries must be a whole number >= 1"),
        ({"lease": 0}, "lease must be > 0"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, Any], error: str) -> None:
    with pytest.raises((TypeError, ValueError), match=error):
        idempotent_job(store=MemoryStore(), **options)


def test_a_plain_body_returning_rq_retry_releases_the_key() -> None:
    from idemfn import idempotent

    store = MemoryStore()
    runs: list[int] = []

    @idempotent(key="again", store=store)
    def job() -> Retry | str:
        runs.append(1)
        return Retry(max=3) if len(runs) == 1 else "done"

    assert isinstance(job(), Retry)
    assert job.status() is None  # released, not recorded: RQ's retry runs the body again
    assert job() == "done"
    assert job() == "done" and len(runs) == 2


def test_a_job_function_called_directly_inside_another_job_has_no_job_id(
    redis_server: RedisServer,
) -> None:
    # Keyed on the other job's id, the second call would replay the first user's value.
    from rq import SimpleWorker

    connection = redis.Redis(unix_socket_path=str(redis_server.socket))
    queue = Queue(f"q-{uuid.uuid4().hex}", connection=connection)
    job = queue.enqueue(rq_jobs.notify_all, ["u1", "u2"])
    SimpleWorker([queue], connection=connection).work(burst=True)

    said = job.return_value()
    assert isinstance(said, list) and len(said) == 2, said
    assert all("called directly inside another job" in s for s in said), said
    connection.close()
