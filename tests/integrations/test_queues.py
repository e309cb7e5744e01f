"""What every task queue's users are promised, tested once for all of them with real workers.

Each test runs on every queue that has an adapter in ``tests/support/queues/`` (Celery, RQ,
Dramatiq, Huey, arq), through ``QueueUnderTest``: real worker processes on the suite's
redis-server, a queue of the test's own, the shared bodies of ``<queue>_bodies.py``, each
decorated with that queue's idemfn helper. A body appends its pid to a file per run, which is
how runs are counted; how each delivery of a message ended (ok, retry, failed) is read from the
queue's own hook or results. What only one queue does is tested in ``test_<queue>.py``.

The records live in a DiskStore shared by the workers' processes or in a RedisStore, one per
queue (``STORE_OF``): the stores themselves are the conformance suite's business.
"""

from __future__ import annotations

import importlib
import pkgutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from idemfn import Status, open_store
from tests.support import queues
from tests.support.queues import QUEUES, QueueUnderTest
from tests.support.servers import RedisServer
from tests.support.workers import poll, process_alive

pytestmark = pytest.mark.slow

# Every adapter module of tests/support/queues registers its queue on import.
for _module in pkgutil.iter_modules(queues.__path__):
    if not _module.name.endswith("_bodies"):
        importlib.import_module(f"{queues.__name__}.{_module.name}")

#: Where each queue's records live (the others: a DiskStore).
STORE_OF = {"celery": "redis", "huey": "redis", "arq": "redis"}


@pytest.fixture(params=sorted(QUEUES))
def queue(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> Iterator[QueueUnderTest]:
    # Names are unique to each test, so the tests can share the Redis store.
    kind = STORE_OF.get(request.param, "disk")
    location = redis_server.url if kind == "redis" else str(tmp_path / "store")
    running = QUEUES[request.param](tmp_path, redis_server.socket, open_store(location), location)
    try:
        yield running
    finally:
        running.close()
        running.store.close()


def _name() -> str:
    return f"n-{uuid.uuid4().hex}"


def test_a_message_delivered_again_after_its_body_ran_replays_its_outcome(
    queue: QueueUnderTest,
) -> None:
    queue.start_worker()
    name = _name()
    message = queue.send("once", name, False)
    first = queue.wait(message, "ok")[0]

    queue.send("once", name, False, message_id=message)  # a producer's retry, a redelivery

    assert queue.wait(message, "ok", 2) == [first, first]
    assert len(queue.runs(name)) == 1
    record = queue.record("once", message)
    assert record is not None and record.status is Status.OK


def test_a_duplicate_delivered_while_the_body_runs_is_retried_by_the_queue_and_replays(
    queue: QueueUnderTest,
) -> None:
    queue.start_worker()
    queue.start_worker()
    name = _name()
    message = queue.send("once", name, True)
    poll(lambda: queue.runs(name), f"the body to start\n{queue.logs()}")
    queue.send("once", name, True, message_id=message)

    # The body runs until the duplicate has found its key busy and been handed back to the
    # queue to be delivered again, its own way.
    queue.wait(message, "retry")
    queue.release(name)

    values = queue.wait(message, "ok", 1 if queue.ends_an_id_once else 2)
    assert len(set(values)) == 1, values
    assert len(queue.runs(name)) == 1
    assert not [d for d in queue.deliveries(message) if d.state == "failed"]


def test_two_messages_racing_on_one_key_run_it_once_and_the_loser_is_retried_not_failed(
    queue: QueueUnderTest,
) -> None:
    queue.start_worker()
    queue.start_worker()
    name = _name()
    winner = queue.send("shared", name, True)
    poll(lambda: queue.runs(name), f"the first message's body to start\n{queue.logs()}")
    loser = queue.send("shared", name, True)

    queue.wait(loser, "retry")
    queue.release(name)

    value = queue.wait(winner, "ok")[0]
    assert queue.wait(loser, "ok") == [value]
    assert len(queue.runs(name)) == 1
    assert not [d for d in queue.deliveries(loser) if d.state == "failed"]
    record = queue.record("shared", f"shared:{name}")
    assert record is not None and record.status is Status.OK


def test_a_failure_the_queue_retries_runs_the_body_again_and_the_success_is_replayed(
    queue: QueueUnderTest,
) -> None:
    queue.start_worker()
    name = _name()
    message = queue.send("flaky", name, 2)

    value = queue.wait(message, "ok")[0]
    assert "ok on run 3" in value
    assert len(queue.runs(name)) == 3  # the key was released while the queue would retry
    record = queue.record("flaky", message)
    assert record is not None and record.status is Status.OK

    queue.send("flaky", name, 2, message_id=message)  # a late duplicate replays
    assert queue.wait(message, "ok", 2)[-1] == value
    assert len(queue.runs(name)) == 3


def test_a_worker_killed_mid_body_halts_the_message_delivered_again(
    queue: QueueUnderTest,
) -> None:
    queue.start_worker()
    name = _name()
    message = queue.send("crash_halt", name)
    pid = queue.kill_mid_body(name)

    failure = queue.wait(message, "failed")[-1]
    # The dead owner is named, and was seen dead (on this machine, at once: not its lease out).
    assert "Halted" in failure and f"/{pid}/" in failure and " died" in failure, failure
    assert queue.runs(name) == [str(pid)], "the body ran again"
    record = queue.record("crash_halt", message)
    assert record is not None and record.status is Status.HALTED


def test_a_worker_killed_mid_body_runs_it_once_more_with_on_abandoned_retry(
    queue: QueueUnderTest,
) -> None:
    queue.start_worker()
    name = _name()
    message = queue.send("crash_retry", name)
    pid = queue.kill_mid_body(name)

    assert "finished on run 2" in queue.wait(message, "ok")[0]
    runs = queue.runs(name)
    assert len(runs) == 2 and runs[0] == str(pid) != runs[1] and not process_alive(pid)
    record = queue.record("crash_retry", message)
    assert record is not None and record.status is Status.OK and record.attempt == 2
