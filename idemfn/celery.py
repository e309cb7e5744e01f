"""Celery task bodies that run once, however often their message is delivered.

Celery delivers at least once: with ``acks_late`` a task whose worker died is delivered again,
a Redis broker redelivers after its ``visibility_timeout``, and producers publish duplicates.
``idempotent_task`` guards the *execution*, keyed by default on the task's id::

    from celery import Celery
    from idemfn.celery import idempotent_task

    app = Celery("shop", broker="redis://localhost:6379/0")

    @app.task(acks_late=True, reject_on_worker_lost=True)
    @idempotent_task()                  # UNDER @app.task; the key is the task's id
    def charge(order_id: str, amount: int) -> str:
        ...

What it adds to ``idemfn.idempotent``, whose options it takes:

- ``key`` defaults to the task's id (``task_id``), which redeliveries and ``self.retry()`` keep.
  Pass ``key="charge:{order_id}"`` to key on business arguments instead, so that two messages
  with different ids but the same order still charge once.
- ``AlreadyRunning`` (another worker is running the same key) retries the task with
  ``self.retry(countdown=countdown)`` until that call has finished, and then replays its
  outcome, instead of failing the task; ``on_running="raise"`` fails it.
- Coroutine functions are refused: Celery calls task bodies synchronously.

Celery's own retries work with the plain decorator too: ``self.retry()``, a requeued ``Reject``
and the task's ``autoretry_for`` exceptions release the key (see the documentation's Celery
page).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Literal, NoReturn, ParamSpec, TypeVar

from .events import BUSY, log_fields

try:
    from celery import current_task
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("idemfn.celery needs Celery: pip install 'idemfn[celery]'") from exc

from ._decorator import IdempotentFunction, decorator
from ._errors import AlreadyRunning
from ._outcome import SerializerOption
from ._policy import seconds_option, whole_option
from ._queue_retry import is_celery_task_of
from ._signing import SigningKey
from ._stores import Store

__all__ = ["idempotent_task", "task_id"]

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("idemfn")


def task_id(*args: object, **kwargs: object) -> str:
    """The id of the Celery task running this call; as ``key=``, it ignores the arguments.

    ``idempotent_task``'s default key. A message published twice with the same id,
    redelivered after a crash, or retried with ``self.retry()`` keeps its id.

    Args:
        *args: The task's arguments, ignored.
        **kwargs: The task's keyword arguments, ignored.

    Returns:
        The running task's id.

    Raises:
        ValueError: No task is running here: a task function called directly has no id.
    """
    request_id = current_task.request.id if current_task else None
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(
            "idemfn.celery.task_id: no Celery task is running here (a task function called"
            " directly has no id): run it through .delay()/.apply_async(), or pass key= to"
            " key the call on its arguments"
        )
    return request_id


def idempotent_task(
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
    countdown: float | timedelta = 5.0,
    max_retries: int | None = None,
) -> Callable[[Callable[P, R]], IdempotentFunction[P, R]]:
    """``idemfn.idempotent`` for a Celery task body; goes under ``@app.task``.

    ``key`` defaults to the task's id. When another worker is running the same key, the task
    is retried every ``countdown`` seconds (``on_running="retry"``, the default) until that
    call has finished (then it replays its outcome) or is found gone (then ``on_abandoned``
    decides). Eagerly (``apply()``, ``task_always_eager``) and when called directly, the task
    fails at once, as with ``on_running="raise"``. Every other option is ``idempotent``'s.

    Args:
        key: As ``idempotent``'s. Default None: the task's id (``task_id``), which
            redeliveries and ``self.retry()`` keep. Pass a template such as
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
        on_running: What a task does when another worker runs its key: ``"retry"``
            (default) retries it with ``self.retry(countdown=countdown)``; ``"raise"`` fails it
            with ``AlreadyRunning``.
        countdown: Seconds (>= 0) or a ``timedelta`` between those retries. Default 5.0.
        max_retries: How many of those retries at most (>= 1), after which the task fails
            with ``AlreadyRunning``. Default None: no cap, whatever the task's own
            ``max_retries`` (Celery counts them with the task's other retries in
            ``request.retries``).

    Returns:
        A decorator for the task's function, to be placed under ``@app.task``.

    Raises:
        TypeError: A bad option (as for ``idempotent``); when decorating, a coroutine
            function or anything but a plain function (a Celery task object: put this
            decorator under ``@app.task``).
        ValueError: A bad option (as for ``idempotent``), an unknown ``on_running``, a
            negative ``countdown`` or a ``max_retries`` under 1.
    """
    if on_running not in ("retry", "raise"):
        raise ValueError(f"on_running must be 'retry' or 'raise', not {on_running!r}")
    delay = seconds_option("countdown", countdown, positive=False)
    if max_retries is not None:
        whole_option("max_retries", max_retries, least=1)

    def retry_later(busy: AlreadyRunning, function: Callable[..., object]) -> NoReturn:
        task = current_task._get_current_object() if current_task else None
        # Called directly there is nothing to retry; eagerly (apply(), task_always_eager),
        # Celery would run the retry at once, recursively, while the owner still runs; a
        # nested call (not the task's own function) must not retry the whole task.
        if (
            task is None
            or task.request.called_directly
            or task.request.is_eager
            or not is_celery_task_of(task, function)
        ):
            raise busy
        logger.info(
            "idemfn: %s is running elsewhere (owner %s); task %s retries in %.3g s",
            busy.key,
            busy.owner,
            task.request.id,
            delay,
            extra=log_fields(busy.key, BUSY),
        )
        # The owner either finishes or is found gone (its lease bounds that), so by default
        # this retries until then, apart from the task's own max_retries.
        limit = task.request.retries + 1 if max_retries is None else max_retries
        try:
            # Raises Retry, or `busy` itself once `limit` is reached.
            raise task.retry(countdown=delay, max_retries=limit, exc=busy)
        finally:
            # retry() leaves its limit on the task (a per-process singleton), where Celery's
            # autoretry of a later call would take it up.
            task.__dict__.pop("override_max_retries", None)

    decorate_once = decorator(
        key=task_id if key is None else key,
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
        if inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"idempotent_task cannot decorate the coroutine function {fn.__qualname__}:"
                " Celery calls task bodies synchronously"
            )
        if not inspect.isfunction(fn):
            raise TypeError(
                "idempotent_task decorates a task's function, not"
                f" {type(fn).__name__}; put it directly above the def, under @app.task"
            )
        return decorate_once(fn)

    return decorate
