"""The actors a ``dramatiq`` worker of the shared queue suite imports (see ``__init__.py``).

Configured from the environment the adapter gives the worker: the suite's redis-server
(``IDEMFN_TEST_REDIS``, a socket), the queue (``IDEMFN_TEST_QUEUE``), the store
(``IDEMFN_STORE``) and where bodies append their side effects (``IDEMFN_TEST_EFFECTS``).

The broker is Dramatiq's ``RedisBroker`` with its default middleware, plus ``CurrentMessage``
(through which ``idemfn.dramatiq.message_id`` reaches the message) and ``_LogDeliveries``.
Its maintenance (which requeues the unacknowledged messages of a worker whose heartbeat is
older than ``heartbeat_timeout``) runs on every command here instead of on 1 in 1,000: the
adapter marks a SIGKILLed worker's heartbeat as expired, and the next fetch of a live worker
requeues its messages, without waiting for a timer. ``heartbeat_timeout`` stays long (30 s,
the default is 60 s), so that a live worker slowed down by the machine's load is never taken
for dead, unless a test sets it (``HEARTBEAT_TIMEOUT``) to see the maintenance on its own.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage, Middleware, Retries

import idemfn
from idemfn.dramatiq import idempotent_actor
from tests.support.queues import log_delivery
from tests.support.queues.dramatiq import BROKERS, HEARTBEAT_TIMEOUT
from tests.support.workers import crash_on_first_run, effect, held

QUEUE = os.environ.get("IDEMFN_TEST_QUEUE", "default")


class _LogDeliveries(Middleware):
    """Logs how each delivery ended; placed before ``Retries``, so that its ``after_`` hook runs
    after Retries has decided (Dramatiq runs ``after_`` hooks in reverse order)."""

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            log_delivery(message.message_id, "ok", repr(result))
        else:
            state = "failed" if message.failed else "retry"
            log_delivery(message.message_id, state, repr(exception))


broker = RedisBroker(
    unix_socket_path=os.environ.get("IDEMFN_TEST_REDIS"),
    maintenance_chance=1_000_000,  # every command (see the module's docstring)
    heartbeat_timeout=int(os.environ.get(HEARTBEAT_TIMEOUT, 30_000)),
)
broker.add_middleware(CurrentMessage())
broker.add_middleware(_LogDeliveries(), before=Retries)
dramatiq.set_broker(broker)
if "IDEMFN_TEST_EFFECTS" in os.environ:  # a worker process (not the test's, nor mypy's)
    effect(BROKERS, f"{os.getpid()} {broker.broker_id}")

# Busy retries every 0.1 s, for up to a minute (Dramatiq counts them in max_retries).
BUSY = {"max_retries": 600}
BUSY_DELAY = 0.1


# --- the shared bodies ---------------------------------------------------------------------


@dramatiq.actor(queue_name=QUEUE, **BUSY)
@idempotent_actor(delay=BUSY_DELAY)
def once(name: str, hold: bool = False) -> str:
    effect(name, str(os.getpid()))
    if hold:
        held(name)
    return f"{name}: {uuid.uuid4().hex}"


@dramatiq.actor(queue_name=QUEUE, **BUSY)
@idempotent_actor(key="shared:{name}", delay=BUSY_DELAY)
def shared(name: str, hold: bool = False) -> str:
    effect(name, str(os.getpid()))
    if hold:
        held(name)
    return f"{name}: {uuid.uuid4().hex}"


# A replayed Halted is final: throws= fails the message at once instead of replaying it on
# every retry.
@dramatiq.actor(queue_name=QUEUE, throws=(idemfn.Halted,), **BUSY)
@idempotent_actor(delay=BUSY_DELAY)
def crash_halt(name: str) -> str:
    return crash_on_first_run(name)


@dramatiq.actor(queue_name=QUEUE, **BUSY)
@idempotent_actor(on_abandoned="retry", delay=BUSY_DELAY)
def crash_retry(name: str) -> str:
    return crash_on_first_run(name)


@dramatiq.actor(queue_name=QUEUE, max_retries=5, min_backoff=50, max_backoff=200)
@idempotent_actor(delay=BUSY_DELAY)
def flaky(name: str, failures: int) -> str:
    runs = effect(name, str(os.getpid()))
    if runs <= failures:
        raise ConnectionError(f"run {runs} failed")
    return f"ok on run {runs}"
