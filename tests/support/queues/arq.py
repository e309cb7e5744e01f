"""arq in the shared queue suite: ``python -m arq`` workers of ``arq_bodies.WorkerSettings``."""

from __future__ import annotations

import asyncio
import json
import sys
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

    def start_worker(self) -> Worker:
        number = len(self.workers)
        argv = [sys.executable, "-m", "arq", f"{self.bodies}.WorkerSettings"]
        # arq logs the server's version once its pool is connected, right before it polls.
        worker = Worker(argv, self.env, self.tmp_path / f"arq-{number}.log", "redis_version=")
        self.workers.append(worker)
        return worker

    def send(self, body: str, *args: object, message_id: str | None = None) -> str:
        return self.enqueue(body, *args, job_id=message_id)

    def enqueue(self, function: str, *args: Any, job_id: str | None = None, **options: Any) -> str:
        """Enqueue a job of ``function`` (``_job_id=job_id``, and arq's ``_`` options); return
        its id. A known id is delivered again as arq would once its result expired
        (``keep_result``), or, while its job is queued or running, once its in-progress key
        expired."""

        async def enqueue() -> str:
            pool = await create_pool(
                RedisSettings(unix_socket_path=str(self.redis_socket)),
                default_queue_name=self.queue,
            )
            try:
                if job_id is not None:
                    await pool.delete(result_key_prefix + job_id)
                    if await pool.exists(job_key_prefix + job_id):
                        # arq refuses an id whose job is queued or running; it runs that job
                        # again only once its in-progress key has expired (the worker's
                        # longest job timeout + 10 s after it started: a stalled or dead
                        # worker's job). Expired now: another worker delivers it again.
                        await pool.delete(in_progress_key_prefix + job_id)
                        return job_id
                job = await pool.enqueue_job(
                    function, *args, _job_id=job_id or uuid.uuid4().hex, **options
                )
                assert job is not None, f"arq refused job {job_id}"
                return job.job_id
            finally:
                await pool.aclose()

        return asyncio.run(enqueue())

    def deliveries(self, message: str) -> list[Delivery]:
        path = self.effects / "deliveries"
        found = []
        for line in path.read_text().splitlines() if path.exists() else []:
            delivery = Delivery(*json.loads(line))
            if delivery.message == message:
                found.append(delivery)
        return found

    def kill_mid_body(self, name: str) -> int:
        pid = int(poll(lambda: self.runs(name), f"{name} to start")[0])
        (worker,) = (w for w in self.workers if w.pid == pid)  # arq runs jobs in its process
        worker.kill()
        # The job stays queued behind its in-progress key, which expires the job's timeout +
        # 10 s after it started (arq's default: 310 s); then a worker runs it again. Expired
        # now: the key of the job whose first argument is the body's name.
        client = redis.Redis(unix_socket_path=str(self.redis_socket))
        try:
            for message in cast(list[bytes], client.zrange(self.queue, 0, -1)):
                raw = cast("bytes | None", client.get(job_key_prefix + message.decode()))
                if raw is not None and deserialize_job_raw(raw)[1][:1] == (name,):
                    client.delete(in_progress_key_prefix + message.decode())
        finally:
            client.close()
        self.start_worker()
        return pid
