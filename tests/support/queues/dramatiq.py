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
#: The variable of ``env`` that sets the workers' ``heartbeat_timeout`` (ms).
HEARTBEAT_TIMEOUT = "IDEMFN_TEST_DRAMATIQ_HEARTBEAT_TIMEOUT"


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
        self.redis = redis.Redis(unix_socket_path=str(self.redis_socket))

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

    def kill_mid_body(self, name: str, *, expire_heartbeat: bool = True) -> int:
        """As ``QueueUnderTest``'s; with ``expire_heartbeat=False``, the dead worker's message
        waits for the broker's maintenance to find its heartbeat older than the workers'
        ``heartbeat_timeout`` (``HEARTBEAT_TIMEOUT`` in ``env``)."""
        pid = int(poll(lambda: self.runs(name), f"the body {name} to start")[0])
        worker = next(w for w in self.workers if _group(pid) == w.pid)
        os.kill(pid, signal.SIGKILL)
        # Dramatiq's main process sees its worker process die and shuts down: a supervisor
        # would start it again.
        worker.process.wait(timeout=60)
        worker.kill()
        poll(lambda: not process_alive(pid), f"the killed worker process {pid} to be gone")
        if expire_heartbeat:
            # The broker's maintenance requeues a dead worker's unacknowledged messages once
            # its last heartbeat is older than heartbeat_timeout: make it so at once for the
            # dead process (whose heartbeat nothing can renew), and not for any live one.
            self.redis.zadd(self.heartbeats, {self.broker_id(pid): 0})
        self.start_worker()  # its fetches run the maintenance
        return pid

    @property
    def heartbeats(self) -> str:
        """The Redis key of the broker's workers' heartbeats."""
        return f"{self.broker.namespace}:__heartbeats__"

    def broker_id(self, pid: int) -> str:
        """The broker id of the worker process ``pid``."""
        for line in lines(self.effects / BROKERS):
            process, _, broker_id = line.partition(" ")
            if int(process) == pid:
                return broker_id
        raise AssertionError(f"no broker id for process {pid}")

    def close(self) -> None:
        super().close()
        self.broker.close()
        self.redis.close()
