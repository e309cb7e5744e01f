"""The shared queue suite's Huey: ``huey_consumer`` processes of ``huey_bodies.huey``.

Each consumer runs two workers of ``worker_type`` (process by default: each task runs in a
forked child of the consumer; thread: in the consumer itself), checks their health every second
(a killed process worker is replaced) and has no periodic tasks. Tasks are enqueued by the test
process straight into the queue's Redis list, serialised by ``huey_bodies.huey``.

Huey's Redis storage removes a task from its list when a worker takes it (BRPOP): a consumer
killed mid-task loses it, and Huey never runs it again. ``kill_mid_body`` therefore does what a
user would: it enqueues the same task (same id, same arguments) again, as a producer retrying or
an operator would.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from huey.storage import RedisStorage

from tests.support.queues import Delivery, QueueUnderTest, adapter
from tests.support.workers import Worker, poll


@adapter
@dataclass
class HueyQueue(QueueUnderTest):
    name: ClassVar[str] = "huey"
    bodies: ClassVar[str] = "tests.support.queues.huey_bodies"
    #: ``huey_consumer -k``: "process" or "thread".
    worker_type: ClassVar[str] = "process"

    # What send() sent, by the body's name (its first argument): kill_mid_body sends it again.
    _sent: dict[str, tuple[str, tuple[object, ...], str]] = field(default_factory=dict, init=False)
    _storage: RedisStorage | None = field(default=None, init=False)

    def start_worker(self) -> Worker:
        argv = [
            sys.executable,
            "-m",
            "huey.bin.huey_consumer",
            f"{self.bodies}.huey",
            "--workers",
            "2",
            "--worker-type",
            self.worker_type,
            "--health-check-interval",
            "1",  # a killed process worker is replaced within a second
            "--scheduler-interval",
            "1",  # (the least): a RetryTask's delay ends within a second of its eta
            "--no-periodic",
            "--verbose",
        ]
        log = self.tmp_path / f"huey-{len(self.workers)}.log"
        worker = Worker(argv, self.env, log, ready="idemfn-test: huey worker ready")
        self.workers.append(worker)
        return worker

    def send(self, body: str, *args: object, message_id: str | None = None) -> str:
        from tests.support.queues import huey_bodies

        task = getattr(huey_bodies, body).s(*args, id=message_id)
        if self._storage is None:
            self._storage = RedisStorage(self.queue, url=f"unix://{self.redis_socket}")
        self._storage.enqueue(huey_bodies.huey.serialize_task(task))
        if args:
            self._sent[str(args[0])] = (body, args, task.id)
        return str(task.id)

    def deliveries(self, message: str) -> list[Delivery]:
        ended: list[Any] = [
            json.loads(line) for line in _complete_lines(self.effects / "deliveries")
        ]
        return [Delivery(*entry) for entry in ended if entry[0] == message]

    def kill_mid_body(self, name: str) -> int:
        ran = poll(lambda: _complete_lines(self.effects / name), f"the body {name} to start")
        pid = int(ran[0])
        consumer = next((w for w in self.workers if w.pid == pid), None)
        if consumer is not None:  # a thread worker: the consumer ran the body
            consumer.kill()
            self.start_worker()
        else:  # a process worker: its consumer starts another within a second
            parent = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
            assert parent in {w.pid for w in self.workers}, f"{pid} is no worker of this test's"
            os.kill(pid, signal.SIGKILL)
        body, args, message = self._sent[name]
        self.send(body, *args, message_id=message)  # Huey lost it: enqueue it again
        return pid

    def close(self) -> None:
        super().close()
        if self._storage is not None:
            self._storage.pool.disconnect()


def _complete_lines(path: Path) -> list[str]:
    """The lines of ``path`` that a writer has finished (each ends with a newline): a reader
    may see another process's append half-done."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return text[: text.rfind("\n") + 1].splitlines()
