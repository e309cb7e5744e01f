"""RQ in the shared queue suite: an ``rq worker --with-scheduler`` (the forking ``Worker``) per
``start_worker``; every message enqueued with ``Retry(max=5)``; deliveries read from RQ's own
results of the job (``Job.results``)."""

from __future__ import annotations

import os
import signal
from typing import Any

import redis
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.results import Result

from tests.support.queues import Delivery, QueueUnderTest, State, adapter, rq_bodies
from tests.support.workers import Worker, poll, rq_worker

_TYPES: dict[Result.Type, State] = {
    Result.Type.SUCCESSFUL: "ok",
    Result.Type.RETRIED: "retry",
    Result.Type.FAILED: "failed",
    Result.Type.MAX_RETRIES_EXCEEDED: "failed",
    Result.Type.STOPPED: "failed",
}


@adapter
class RqQueue(QueueUnderTest):
    name = "rq"
    bodies = rq_bodies.__name__

    def __post_init__(self) -> None:
        super().__post_init__()
        self.connection = redis.Redis(unix_socket_path=str(self.redis_socket))
        self.rq = Queue(self.queue, connection=self.connection)

    def start_worker(self) -> Worker:
        name = f"w{len(self.workers)}-{self.queue[-8:]}"
        url = f"unix://{self.redis_socket}"
        worker = rq_worker(self.tmp_path, self.env, name, url, self.queue, "rq.worker.Worker")
        self.workers.append(worker)
        return worker

    def send(self, body: str, *args: object, message_id: str | None = None) -> str:
        # A known id: RQ makes the job anew (a producer's retry), keeping its earlier results.
        job = self.rq.enqueue(getattr(rq_bodies, body), *args, job_id=message_id, retry=Retry(5))
        return job.id

    def deliveries(self, message: str) -> list[Delivery]:
        job = Job.fetch(message, connection=self.connection)
        results = sorted(job.results(), key=lambda r: r.created_at)
        ended: list[Delivery] = []
        for n, result in enumerate(results):
            state = _TYPES[result.type]
            # A failure that RQ retried (a later result, or the job queued again) was a retry.
            last = n == len(results) - 1
            if state == "failed" and (not last or job.get_status() != JobStatus.FAILED):
                state = "retry"
            value: Any = result.return_value if state == "ok" else result.exc_string
            ended.append(Delivery(message, state, repr(value) if state == "ok" else str(value)))
        return ended

    def kill_mid_body(self, name: str) -> int:
        # The work horse: the worker sees it die and runs the job again (its Retry).
        pid = int(poll(lambda: self.runs(name), f"{name}'s body to start\n{self.logs()}")[0])
        os.kill(pid, signal.SIGKILL)
        return pid

    def close(self) -> None:
        super().close()
        self.connection.close()
