"""Every task queue idemfn supports, driven the same way by the shared queue suite.

``tests/integrations/test_queues.py`` runs each of its tests on every queue (Celery, RQ,
Dramatiq, Huey, arq) through a ``QueueUnderTest``: real worker processes on the suite's
redis-server, a queue of the test's own, and bodies that append a line per run to a file
(``IDEMFN_TEST_EFFECTS``), which is how runs are counted. Each queue has an adapter module here
(``tests/support/queues/<queue>.py``, its class registered in ``QUEUES``) and a module of bodies
its workers import (``tests/support/queues/<queue>_bodies.py``) defining the **shared bodies**,
with these names and meanings (each decorated with the queue's idemfn helper, so that a call
whose key is busy is retried by the queue its own way):

- ``once(name, hold)``: keyed on the message's id (the helper's default). Appends its pid to
  ``name``; with ``hold`` it runs until the test calls ``release(name)``. Returns
  ``f"{name}: {uuid4().hex}"``: different on every run, so a replay is told from a run.
- ``shared(name, hold)``: the same body keyed ``"shared:{name}"``: two messages (two ids) for
  one key.
- ``crash_halt(name)``: keyed on the message's id; ``workers.crash_on_first_run(name)`` (the
  test SIGKILLs its first run).
- ``crash_retry(name)``: the same with ``on_abandoned="retry"``.
- ``flaky(name, failures)``: keyed on the message's id; appends its pid to ``name``; its first
  ``failures`` runs raise ``ConnectionError(f"run {n} failed")``, which the queue retries (its
  own retry settings: up to 5 retries, well under a second apart; arq retries only its
  ``Retry``, which the body raises from the ``ConnectionError``); then returns
  ``f"ok on run {n}"``.

Busy retries (the helper's delay before the queue runs a message whose key is busy) are well
under a second where the queue allows it.
"""

from __future__ import annotations

import json
import os
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from idemfn import Record, Store
from tests.support.workers import Worker, lines, poll, release

State = Literal["ok", "failed", "retry"]

#: The queues of the shared suite, by name: filled by the adapter modules (see ``adapter``).
QUEUES: dict[str, type[QueueUnderTest]] = {}


@dataclass(frozen=True)
class Delivery:
    """How one delivery of a message ended: ``ok`` (``value`` is the repr of what the body
    returned), ``failed`` for good (the repr of the exception, type name included), or
    ``retry`` (the queue will deliver it again)."""

    message: str
    state: State
    value: str


def log_delivery(message: str, state: State, value: str) -> None:
    """Append one delivery's end to ``$IDEMFN_TEST_EFFECTS/deliveries``: adapters whose queue
    has a hook for it (a signal, a middleware) call this from the worker."""
    if "IDEMFN_TEST_EFFECTS" not in os.environ:  # (a body called in the test process)
        return
    path = Path(os.environ["IDEMFN_TEST_EFFECTS"]) / "deliveries"
    with path.open("a") as f:
        f.write(json.dumps([message, state, value]) + "\n")


@dataclass
class QueueUnderTest(ABC):
    """One queue of the test's own on ``redis_socket`` (the suite's redis-server), its workers,
    and the records of the shared bodies in the store at ``store_location``."""

    #: The queue's name in the parametrised suite.
    name: ClassVar[str]
    #: The module the workers import, defining the shared bodies.
    bodies: ClassVar[str]
    #: Whether the queue ends a message id once: arq forgets a job when it has run, so a
    #: duplicate delivered while it ran, handed back to be delivered later, never runs.
    ends_an_id_once: ClassVar[bool] = False

    tmp_path: Path
    redis_socket: Path
    store: Store
    store_location: str
    effects: Path = field(init=False)
    env: dict[str, str] = field(init=False)
    workers: list[Worker] = field(default_factory=list, init=False)
    queue: str = field(default_factory=lambda: f"q-{uuid.uuid4().hex}", init=False)

    def __post_init__(self) -> None:
        self.effects = self.tmp_path / "effects"
        self.effects.mkdir(exist_ok=True)
        # What every worker reads: the adapters add their own.
        self.env = {
            "IDEMFN_TEST_REDIS": str(self.redis_socket),
            "IDEMFN_TEST_QUEUE": self.queue,
            "IDEMFN_TEST_EFFECTS": str(self.effects),
            "IDEMFN_STORE": self.store_location,
        }

    # -- what each adapter implements ------------------------------------------------------

    @abstractmethod
    def start_worker(self) -> Worker:
        """Start one more worker process of this queue (ready to take messages when it
        returns), able to run one body at a time at least; append it to ``workers``."""

    @abstractmethod
    def send(self, body: str, *args: object, message_id: str | None = None) -> str:
        """Send a message running shared body ``body`` with ``args``; return its id.

        ``message_id`` (default: a new one) may be one sent before: the message is delivered
        again, as a producer's retry or the broker's redelivery would (an adapter whose queue
        refuses a known id does what lets it through, as a result's expiry would)."""

    @abstractmethod
    def deliveries(self, message: str) -> list[Delivery]:
        """Every delivery of ``message`` that has ended so far, in order."""

    @abstractmethod
    def kill_mid_body(self, name: str) -> int:
        """SIGKILL the process running the first run of a shared body named ``name`` (waiting
        for it to start), and do what makes the queue deliver its message again (restart a
        worker, run the broker's maintenance, as it would on its own later). Return the pid
        that ran the body."""

    # -- shared ------------------------------------------------------------------------------

    def wait(self, message: str, state: State, count: int = 1, timeout: float = 90) -> list[str]:
        """The values of ``message``'s deliveries that ended in ``state``, once there are
        ``count`` of them."""

        def ended() -> list[str] | None:
            found = [d.value for d in self.deliveries(message) if d.state == state]
            return found if len(found) >= count else None

        return poll(ended, f"{count} {state} deliveries of {message}\n{self.logs()}", timeout)

    def runs(self, name: str) -> list[str]:
        """The lines body runs named ``name`` appended (their pids), in order."""
        return lines(self.effects / name)

    def release(self, name: str) -> None:
        """Let the runs of a body held on ``name`` return."""
        release(self.effects, name)

    def record(self, body: str, key: str) -> Record | None:
        """The record of shared body ``body``'s call keyed ``key`` (a message id, or
        ``"shared:<name>"``)."""
        entry = self.store.get(f"{self.bodies}.{body}:{key}")
        return None if entry is None else entry.record()

    def logs(self) -> str:
        """The end of every worker's output, for failure messages."""
        return "\n".join(f"--- {w.argv[:4]}\n{w.output()[-3000:]}" for w in self.workers)

    def close(self) -> None:
        """Kill every worker."""
        for worker in self.workers:
            worker.kill()


def adapter(cls: type[QueueUnderTest]) -> type[QueueUnderTest]:
    """Register an adapter class in ``QUEUES`` under its ``name``."""
    QUEUES[cls.name] = cls
    return cls
