"""Dramatiq actor bodies that run once, however often their message is delivered.

Dramatiq "assumes all actors are idempotent": its Retries middleware runs a failed message again
(20 times by default), the Redis broker requeues the unacknowledged messages of a worker that
died, and a producer may send the same work twice. ``idempotent_actor`` guards the *execution*,
keyed by default on the message's id::

    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.middleware import CurrentMessage
    from idemfn.dramatiq import idempotent_actor

    broker = RedisBroker(url="redis://localhost:6379/0")
    broker.add_middleware(CurrentMessage())     # how the body reaches its message's id
    dramatiq.set_broker(broker)

    @dramatiq.actor(max_retries=3)
    @idempotent_actor(key="charge:{order_id}")  # UNDER @dramatiq.actor
    def charge(order_id: str, amount: int) -> str:
        ...

What it adds to ``idemfn.idempotent``, whose options it takes:

- ``key`` defaults to the message's id (``message_id``), which Dramatiq's retries and the
  broker's redeliveries keep. It needs the ``CurrentMessage`` middleware on the broker.
- ``AlreadyRunning`` (another worker is running the same key) raises ``dramatiq.Retry(delay=...)``
  so that Dramatiq runs the message again later, and it then replays the outcome, instead of
  failing it; ``on_running="raise"`` fails it. Dramatiq counts such a retry as one of the
  message's ``max_retries``; the last one fails with ``AlreadyRunning``.
- ``async def`` actors (Dramatiq's ``AsyncIO`` middleware) work too, with the async stores.

Dramatiq's own retries work with the plain decorator too: an exception escaping the actor's
function while the message has retries left, and ``dramatiq.Retry`` wherever it is raised,
release the key, so the retried message runs the body again; the last failure is recorded.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal, NoReturn, ParamSpec, TypeVar

from .events import BUSY, log_fields

try:
    import dramatiq.broker
    import dramatiq.worker
    from dramatiq import Retry
    from dramatiq.middleware import CurrentMessage
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("idemfn.dramatiq needs Dramatiq: pip install 'idemfn[dramatiq]'") from exc

from ._decorator import IdempotentFunction, decorator
from ._errors import AlreadyRunning
from ._outcome import SerializerOption
from ._policy import seconds_option
from ._queue_retry import _dramatiq_retries_left, dramatiq_running, is_dramatiq_actor_of
from ._signing import SigningKey
from ._stores import Store

__all__ = ["idempotent_actor", "message_id"]

# The class of Dramatiq's worker threads (1.x names it _WorkerThread).
_WORKER_THREAD: Any = getattr(dramatiq.worker, "WorkerThread", None) or (
    dramatiq.worker._WorkerThread
)

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("idemfn")

_ADD_IT = (
    "add it: broker.add_middleware(dramatiq.middleware.CurrentMessage()), where the broker"
    " is created"
)


def message_id(*args: object, **kwargs: object) -> str:
    """The id of the Dramatiq message running this call; as ``key=``, it ignores the arguments.

    ``idempotent_actor``'s default key. A message retried by Dramatiq, or requeued after its
    worker died, keeps its id. Dramatiq shows it to the body through the ``CurrentMessage``
    middleware, which the broker must have.

    Args:
        *args: The actor's arguments, ignored.
        **kwargs: The actor's keyword arguments, ignored.

    Returns:
        The running message's id.

    Raises:
        ValueError: No message is running here (an actor called directly has no message), or
            the broker has no ``CurrentMessage`` middleware (the message says to add it).
    """
    message = CurrentMessage.get_current_message()
    if message is not None:
        return message.message_id
    thread = threading.current_thread()
    if isinstance(thread, _WORKER_THREAD) and not _has_current_message(thread.broker):
        raise ValueError(
            "idemfn.dramatiq.message_id: this Dramatiq worker's broker has no CurrentMessage"
            f" middleware, through which an actor reaches its message's id: {_ADD_IT} (or"
            " pass key= to key the call on its arguments)"
        )
    problem = (
        "idemfn.dramatiq.message_id: no Dramatiq message is running here (an actor called"
        " directly has no message): send it with .send(), or pass key= to key the call on its"
        " arguments"
    )
    broker = dramatiq.broker.global_broker  # (never get_broker(): it would create one)
    if broker is not None and not _has_current_message(broker):
        problem += (
            "; and the global broker has no CurrentMessage middleware, which a worker needs for"
            f" this key: {_ADD_IT}"
        )
    raise ValueError(problem)


def _has_current_message(broker: dramatiq.Broker) -> bool:
    return any(isinstance(m, CurrentMessage) for m in broker.middleware)


class _OwnMessageId:
    """``idempotent_actor``'s default key: ``message_id``, for a call of the running message's
    own actor only. An actor called directly inside another actor's message has no message of
    its own: keyed on the other's id, a second such call would replay the first."""

    def __init__(self) -> None:
        self.functions: list[object] = []  # what this idempotent_actor(...) decorated

    def __call__(self, *args: object, **kwargs: object) -> str:
        found = message_id()
        running = dramatiq_running()
        actor = None if running is None else running[2]
        if actor is not None and not any(is_dramatiq_actor_of(actor, f) for f in self.functions):
            raise ValueError(
                f"idemfn.dramatiq.message_id: the message running here is {actor.actor_name!r}'s:"
                " an actor called directly inside another actor's message has no message of its"
                " own. Send it with .send(), or pass key= to key the call on its arguments"
            )
        return found


def idempotent_actor(
    *,
    key: str | Callable[..., str] | None = None,
    name: str | None = None,
    store: Store | str | os.PathLike[str] | None = None,
    ttl: float | timedelta | None = 86400.0,
    fingerprint: Sequence[str] | Callable[..., object] | bool | None = None,
    wait: float | timedelta = 0.0,
    lease: float | timedelta = 30.0,
    on_abandoned: Literal["halt", "retry"] = "halt",
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = (),
    deadline: datetime | Callable[..., datetime] | None = None,
    transactional: bool = False,
    signing_key: SigningKey | None = None,
    serializer: SerializerOption = "pickle",
    on_running: Literal["retry", "raise"] = "retry",
    delay: float | timedelta = 5.0,
) -> Callable[[Callable[P, R]], IdempotentFunction[P, R]]:
    """``idemfn.idempotent`` for a Dramatiq actor's function; goes under ``@dramatiq.actor``.

    ``key`` defaults to the message's id, which needs the ``CurrentMessage`` middleware on
    the broker. When another worker is running the same key, the body raises
    ``dramatiq.Retry(delay=delay)`` (``on_running="retry"``, the default): Dramatiq's Retries
    middleware runs the message again after ``delay``, until that call has finished (then it
    replays its outcome) or is found gone (then ``on_abandoned`` decides). Dramatiq counts
    each such retry as one of the message's ``max_retries`` (the actor's, 20 by default), and
    ``retry_when`` sees it; once none is left, the message fails with ``AlreadyRunning``
    instead. Called directly (not by a worker), it raises ``AlreadyRunning`` at once. Every
    other option is ``idempotent``'s.

    Args:
        key: As ``idempotent``'s. Default None: the message's id (``message_id``), which
            Dramatiq's retries and the broker's redeliveries keep. Pass a template such as
            ``"charge:{order_id}"`` so that two messages for one order run once.
        name: As ``idempotent``'s: the namespace of the keys.
        store: As ``idempotent``'s: where records live; one every worker reaches (a
            ``RedisStore`` or ``PostgresStore``) when workers run on several machines.
        ttl: As ``idempotent``'s: seconds a finished record is kept. Default a day.
        fingerprint: As ``idempotent``'s: what a key's record is checked against.
        wait: As ``idempotent``'s: seconds to wait for a live call holding the key before
            ``on_running`` applies. Default 0.0.
        lease: As ``idempotent``'s: seconds a claim stays valid without renewal. Default 30.0.
        on_abandoned: As ``idempotent``'s: ``"halt"`` (default) or ``"retry"`` a claim whose
            worker is gone.
        retry_on: As ``idempotent``'s: exception types that release the key instead of being
            recorded.
        deadline: As ``idempotent``'s: when a call must no longer start.
        transactional: As ``idempotent``'s: run the body in the ``PostgresStore``
            transaction of its ``ok`` record.
        signing_key: As ``idempotent``'s: keys to sign records with.
        serializer: As ``idempotent``'s: ``"pickle"`` (default), ``"json"``, or an object
            with ``dumps`` and ``loads``.
        on_running: What a message does when another worker runs its key: ``"retry"``
            (default) raises ``dramatiq.Retry(delay=...)``; ``"raise"`` raises
            ``AlreadyRunning``, which Dramatiq retries like any exception (with its backoff)
            unless the actor's ``throws`` lists it.
        delay: Seconds (>= 0) or a ``timedelta`` before Dramatiq runs the message again,
            given to ``Retry`` in whole milliseconds. Default 5.0.

    Returns:
        A decorator for the actor's function, to be placed under ``@dramatiq.actor``.

    Raises:
        TypeError: A bad option (as for ``idempotent``); when decorating, anything but a
            plain or ``async def`` function (a Dramatiq ``Actor``: put this decorator under
            ``@dramatiq.actor``).
        ValueError: A bad option (as for ``idempotent``), an unknown ``on_running`` or a
            negative ``delay``.
    """
    if on_running not in ("retry", "raise"):
        raise ValueError(f"on_running must be 'retry' or 'raise', not {on_running!r}")
    delay_ms = round(seconds_option("delay", delay, positive=False) * 1000)

    def retry_later(busy: AlreadyRunning, function: Callable[..., object]) -> NoReturn:
        running = dramatiq_running()
        # Called directly, not by a worker, nothing can retry it; a nested call (not the
        # actor's own function) must not retry the whole message.
        if running is None or running[2] is None or not is_dramatiq_actor_of(running[2], function):
            raise busy
        message = running[1]
        retry = Retry(f"idemfn: {busy.key} is running elsewhere", delay=delay_ms)
        # Dramatiq counts a Retry as a failure: once the message has no retry left, fail it
        # with the cause rather than with a bare Retry.
        if not _dramatiq_retries_left(retry):
            raise busy
        logger.info(
            "idemfn: %s is running elsewhere (owner %s); message %s retries in %d ms",
            busy.key,
            busy.owner,
            message.message_id,
            delay_ms,
            extra=log_fields(busy.key, BUSY),
        )
        raise retry from busy

    own_key = _OwnMessageId() if key is None else None
    decorate_once = decorator(
        key=own_key if own_key is not None else key,
        name=name,
        store=store,
        ttl=ttl,
        fingerprint=fingerprint,
        wait=wait,
        lease=lease,
        on_abandoned=on_abandoned,
        retry_on=retry_on,
        deadline=deadline,
        transactional=transactional,
        signing_key=signing_key,
        serializer=serializer,
        on_busy=retry_later if on_running == "retry" else None,
    )

    def decorate(fn: Callable[P, R]) -> IdempotentFunction[P, R]:
        if not inspect.isfunction(fn):
            raise TypeError(
                "idempotent_actor decorates an actor's function, not"
                f" {type(fn).__name__}; put it directly above the def, under @dramatiq.actor"
            )
        if own_key is not None:
            own_key.functions.append(fn)
        return decorate_once(fn)

    return decorate
