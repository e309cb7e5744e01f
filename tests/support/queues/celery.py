"""Celery in the shared queue suite: a prefork worker (two pool processes) per
``start_worker``, ``acks_late`` with ``task_reject_on_worker_lost``, deliveries logged by the
app's ``task_postrun`` hook."""

from __future__ import annotations

import json
import os
import signal
import uuid

from tests.support.queues import Delivery, QueueUnderTest, adapter, celery_bodies
from tests.support.workers import Worker, celery_worker, lines, poll


@adapter
class CeleryQueue(QueueUnderTest):
    name = "celery"
    bodies = celery_bodies.__name__

    def __post_init__(self) -> None:
        super().__post_init__()
        # The workers read the socket from their environment; this process publishes through it.
        url = f"redis+socket://{self.redis_socket}"
        celery_bodies.app.conf.update(broker_url=url, result_backend=url)
        self.env["IDEMFN_TEST_VISIBILITY"] = "3"

    def start_worker(self) -> Worker:
        name = f"w{len(self.workers)}"
        worker = celery_worker(self.tmp_path, self.env, name, app=self.bodies)
        self.workers.append(worker)
        return worker

    def send(self, body: str, *args: object, message_id: str | None = None) -> str:
        message = message_id or uuid.uuid4().hex
        getattr(celery_bodies, body).apply_async(args, task_id=message, queue=self.queue)
        return message

    def deliveries(self, message: str) -> list[Delivery]:
        logged = [json.loads(line) for line in lines(self.effects / "deliveries")]
        return [Delivery(*entry) for entry in logged if entry[0] == message]

    def kill_mid_body(self, name: str) -> int:
        # The pool process: the worker sees it die and rejects the message, which the broker
        # delivers again (task_reject_on_worker_lost).
        pid = int(poll(lambda: self.runs(name), f"{name}'s body to start\n{self.logs()}")[0])
        os.kill(pid, signal.SIGKILL)
        return pid
