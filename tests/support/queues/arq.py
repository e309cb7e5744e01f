"""arq in the shared queue suite: ``python -m arq`` workers of ``arq_bodies.WorkerSettings``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import uuid
from typing import Any, cast

import redis
from arq import create_pool
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import deserialize_job_raw

from tests.support.queues import Delivery, QueueUnderTest, adapter
from tests.support.workers import Worker, poll


@adapter
class ArqQueue(QueueUnderTest):
    """arq workers (one asyncio process each, running up to 10 jobs at once) polling the
    test's queue every 50 ms."""

    name = "arq"
    bodies = "tests.support.queues.arq_bodies"
    ends_an_id_once = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.connection = redis.Redis(unix_socket_path=str(self.redis_socket))
        self._resumers: list[threading.Thread] = []
        self._closing = threading.Event()

    def start_worker(self) -> Worker:
        number = len(self.workers)
        argv = [sys.executable, "-m", "arq", f"{self.bodies}.WorkerSettings"]
        # arq logs the server's version once its pool is connected, right before it polls.
        worker = Worker(argv, self.env, self.tmp_path / f"arq-{number}.log", "redis_version=")
        self.workers.append(worker)
        return worker

    def send(self, body: str, *args: object, message_id: str | None = None) -> str:
        if message_id is not None:
            if any(d.state != "retry" for d in self.deliveries(message_id)):
                # It has run: sent again later, as a producer would, once arq is done with it
                # (a delivery is logged as its result is made, before arq drops its keys).
                keys = (in_progress_key_prefix + message_id, job_key_prefix + message_id)
                poll(lambda: not self.connection.exists(*keys), f"arq to finish {message_id}")
            # arq refuses a known id while its job is queued or running, or its result kept.
            self.connection.delete(result_key_prefix + message_id)  # as keep_result's expiry
            if self.connection.exists(in_progress_key_prefix + message_id):
                self._stall_worker_running(message_id)
                return message_id
            if self.connection.exists(job_key_prefix + message_id):
                return message_id  # queued: arq runs it once, as it would
        return self.enqueue(body, *args, job_id=message_id)

    def enqueue(self, function: str, *args: Any, job_id: str | None = None, **options: Any) -> str:
        """Enqueue a job of ``function`` (``_job_id=job_id``, and arq's ``_`` options); return
        its id."""

        async def enqueue() -> str:
            pool = await create_pool(
                RedisSettings(unix_socket_path=str(self.redis_socket)),
                default_queue_name=self.queue,
            )
            try:
                job = await pool.enqueue_job(
                    function, *args, _job_id=job_id or uuid.uuid4().hex, **options
                )
                assert job is not None, f"arq refused job {job_id}: it is queued or running"
                return job.job_id
            finally:
                await pool.aclose()

        return asyncio.run(enqueue())

    def _stall_worker_running(self, message: str) -> None:
        """Deliver ``message``, which a worker is running, again as arq does when that worker
        stalls (a pause, a frozen VM) past the job's in-progress key, which expires the
        worker's longest job timeout + 10 s after the job started: another worker then runs
        the job again. The stalled worker (SIGSTOP) goes on once that delivery has ended
        (retried, as its key is busy). Needs a second worker."""
        raw = cast("bytes | None", self.connection.get(job_key_prefix + message))
        assert raw is not None, f"job {message} has ended"
        name = deserialize_job_raw(raw)[1][0]  # every shared body's first argument
        pid = int(poll(lambda: self.runs(name), f"{name}'s body to start\n{self.logs()}")[0])
        (stalled,) = (w for w in self.workers if w.pid == pid)  # arq runs jobs in its process
        os.kill(pid, signal.SIGSTOP)
        self.connection.delete(in_progress_key_prefix + message)  # expired meanwhile

        def resume() -> None:
            try:
                poll(
                    lambda: self._closing.is_set() or self.deliveries(message),
                    f"{message} delivered again",
                    60,
                )
            finally:
                if stalled.process.poll() is None:
                    os.kill(pid, signal.SIGCONT)

        resumer = threading.Thread(target=resume, daemon=True)
        resumer.start()
        self._resumers.append(resumer)

    def deliveries(self, message: str) -> list[Delivery]:
        path = self.effects / "deliveries"
        found = []
        for line in path.read_text().splitlines() if path.exists() else []:
            delivery = Delivery(*json.loads(line))
            if delivery.message == message:
                found.append(delivery)
        return found

    def kill_mid_body(self, name: str) -> int:
        pid = int(poll(lambda: self.runs(name), f"{name}'s body to start\n{self.logs()}")[0])
        (worker,) = (w for w in self.workers if w.pid == pid)  # arq runs jobs in its process
        worker.kill()
        # The job stays queued behind its in-progress key, which expires 10 s more than the
        # worker's longest job timeout after the job started (arq's default: 310 s); then a
        # worker runs it again. Expired now: the key of the job whose first argument is name.
        for message in cast(list[bytes], self.connection.zrange(self.queue, 0, -1)):
            raw = cast("bytes | None", self.connection.get(job_key_prefix + message.decode()))
            if raw is not None and deserialize_job_raw(raw)[1][:1] == (name,):
                self.connection.delete(in_progress_key_prefix + message.decode())
        self.start_worker()
        return pid

    def close(self) -> None:
        self._closing.set()
        super().close()  # (SIGKILL ends a stopped worker too)
        for resumer in self._resumers:
            resumer.join(timeout=70)
        self.connection.close()
