"""Dramatiq in the shared queue suite: ``dramatiq`` worker processes (one process, two threads)
of ``tests.support.queues.dramatiq_bodies`` on the suite's redis-server (Dramatiq's
``RedisBroker``)."""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from pathlib import Path

import redis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker

from tests.support.queues import Delivery, QueueUnderTest, adapter
from tests.support.workers import Worker, lines, poll, process_alive

THREADS = 2
#: The file (in the effects directory) where each worker process of the bodies writes
#: ``<pid> <broker id>``.
BROKERS = "dramatiq-brokers"


def _group(pid: int) -> int:
    """The process group of ``pid``."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[2])


@adapter
class DramatiqQueue(QueueUnderTest):
    name = "dramatiq"
    bodies = "tests.support.queues.dramatiq_bodies"

    def __post_init__(self) -> None:
        super().__post_init__()
        # Sends only: no maintenance from the test's process.
        self.broker = RedisBroker(unix_socket_path=str(self.redis_socket), maintenance_chance=0)

    def start_worker(self) -> Worker:
        name = f"w{len(self.workers)}-{uuid.uuid4().hex[:8]}"
        argv = [
            sys.executable,
            "-m",
            "dramatiq",
            self.bodies,
            "--processes",
            "1",
            "--threads",
            str(THREADS),
            "--queues",
            self.queue,
        ]
        # One message per thread at most, so that none waits in a busy worker while another
        # worker is idle (Dramatiq prefetches two per thread by default).
        env = {**self.env, "dramatiq_queue_prefetch": str(THREADS)}
        worker = Worker(argv, env, self.tmp_path / f"{name}.log", "Worker process is ready")
        self.workers.append(worker)
        return worker

    def send(self, body: str, *args: object, message_id: str | None = None) -> str:
        # The Redis broker stores each enqueue under an id of its own (redis_message_id), so a
        # message sent again with a known message_id is delivered again: nothing refuses it.
        message: Message[object] = Message(
            queue_name=self.queue,
            actor_name=body,
            args=args,
            kwargs={},
            options={},
            message_id=message_id or str(uuid.uuid4()),
        )
        self.broker.enqueue(message)
        return message.message_id

    def deliveries(self, message: str) -> list[Delivery]:
        logged = [json.loads(line) for line in lines(self.effects / "deliveries")]
        return [Delivery(m, state, value) for m, state, value in logged if m == message]

    def kill_mid_body(self, name: str) -> int:
        pid = int(poll(lambda: self.runs(name), f"the body {name} to start")[0])
        worker = next(w for w in self.workers if _group(pid) == w.pid)
        os.kill(pid, signal.SIGKILL)
        # Dramatiq's main process sees its worker process die and shuts down: a supervisor
        # would start it again.
        worker.process.wait(timeout=60)
        worker.kill()
        poll(lambda: not process_alive(pid), f"the killed worker process {pid} to be gone")
        # The broker's maintenance requeues a dead worker's unacknowledged messages once its
        # last heartbeat is older than heartbeat_timeout: make it so at once for the dead
        # process (whose heartbeat nothing can renew), and not for any live one.
        broker_id = next(
            b
            for p, _, b in (line.partition(" ") for line in lines(self.effects / BROKERS))
            if int(p) == pid
        )
        client = redis.Redis(unix_socket_path=str(self.redis_socket))
        try:
            client.zadd(f"{self.broker.namespace}:__heartbeats__", {broker_id: 0})
        finally:
            client.close()
        self.start_worker()  # its first fetch runs the maintenance
        return pid

    def close(self) -> None:
        super().close()
        self.broker.close()
