"""Huey task bodies that run once, however often their task is enqueued or run again.

Huey runs a task again when its ``retries`` are left after an exception, when the body raises
``RetryTask``, and when a producer or an operator enqueues the same task id again (Huey itself
never redelivers a task whose consumer died: its Redis storage removes a task when a worker
takes it). ``idempotent_task`` guards the *execution*, keyed by default on the task's id::

    from huey import RedisHuey
    from idemfn.huey import idempotent_task

    huey = RedisHuey("shop", url="redis://localhost:6379/0")

    @huey.task(retries=3, retry_delay=10)
    @idempotent_task(key="charge:{order_id}")   # UNDER @huey.task
    def charge(order_id: str, amount: int) -> str:
        ...

What it adds to ``idemfn.idempotent``, whose options it takes:

- ``key`` defaults to the running task's id (``task_id``), which Huey's retries keep; no
  ``context=True`` is needed.
- ``AlreadyRunning`` (another worker is running the same key) raises Huey's
  ``RetryTask(delay=delay)``: the task runs again after ``delay`` seconds, and then replays
  the outcome, instead of failing; ``on_running="raise"`` fails it.
- Coroutine functions are refused: Huey calls task bodies synchronously.

Huey's own retries work with the plain decorator too: an exception escaping the task's function
while the task has ``retries`` left, and ``RetryTask`` anywhere, release the key (see the
documentation's Huey page).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from types import FrameType
from typing import Literal, NoReturn, ParamSpec, TypeVar

from .events import BUSY, log_fields

try:
    from huey.api import Huey, Task  # type: ignore[import-untyped]
    from huey.exceptions import RetryTask  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("idemfn.huey needs Huey: pip install 'idemfn[huey]'") from exc

from ._decorator import IdempotentFunction, decorator
from ._errors import AlreadyRunning
from ._outcome import SerializerOption
from ._policy import seconds_option
from ._queue_retry import is_huey_task_of
from ._signing import SigningKey
from ._stores import Store

__all__ = ["idempotent_task", "task_id"]

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("idemfn")


def _running_task() -> tuple[Huey, Task] | None:
    """The Huey instance and the task it is executing in this thread (or greenlet), or None.

    Huey keeps no "current task" and passes the task to the body only with ``context=True``,
    so this looks for the frame of ``Huey.execute`` (or ``Huey._execute``, which integrations
    such as Sentry's wrap) below the caller, on the caller's own stack: it works for every
    worker type (thread, process, greenlet) and in immediate mode, with nothing to register.
    Only frames named so have their locals read, and those must be a Huey and a Task.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in ("execute", "_execute"):
            found = frame.f_locals
            huey, task = found.get("self"), found.get("task")
            if isinstance(huey, Huey) and isinstance(task, Task):
                return huey, task
        frame = frame.f_back
    return None


def task_id(*args: object, **kwargs: object) -> str:
    """The id of the Huey task running this call; as ``key=``, it ignores the arguments.

    ``idempotent_task``'s default key. Huey's retries (``retries=``, ``RetryTask``) keep the
    task's id, and so does a task enqueued again with the same id
    (``fn.s(..., id=...)``, ``fn.schedule(..., id=...)``).

    Args:
        *args: The task's arguments, ignored.
        **kwargs: The task's keyword arguments, ignored.

    Returns:
        The running task's id.

    Raises:
        ValueError: No Huey task is running here (the function was called directly, or
            through ``call_local()``).
    """
    running = _running_task()
    if running is None:
        raise ValueError(
            "idemfn.huey.task_id: no Huey task is running here (the function was called"
            " directly or through call_local()): enqueue it, or pass key= to key the call on"
            " its arguments"
        )
    return str(running[1].id)


class _OwnTaskId:
    """``idempotent_task``'s default key: ``task_id``, for a call of the running task's own
    function only. A task's function called directly (``call_local()``) inside another task
    has no task of its own: keyed on the other's id, a second such call would replay the
    first."""

    def __init__(self) -> None:
        self.functions: list[object] = []  # what this idempotent_task(...) decorated

    def __call__(self, *args: object, **kwargs: object) -> str:
        running = _running_task()
        if running is None:
            return task_id()  # raises, saying what to do
        task = running[1]
        if not any(is_huey_task_of(task, f) for f in self.functions):
            raise ValueError(
                f"idemfn.huey.task_id: the task running here is {task.name!r}: a task's function"
                " called directly (call_local()) inside another task has no task of its own."
                " Enqueue it, or pass key= to key the call on its arguments"
            )
        return str(task.id)


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
    delay: float | timedelta = 5.0,
) -> Callable[[Callable[P, R]], IdempotentFunction[P, R]]:
    """``idemfn.idempotent`` for a Huey task's function; goes under ``@huey.task``.

    ``key`` defaults to the running task's id. When another worker is running the same key,
    the body raises ``huey.exceptions.RetryTask(delay=delay)`` (``on_running="retry"``, the
    default): Huey runs the task again ``delay`` seconds later (its scheduler enqueues it at
    its next tick, every second by default), whatever the task's ``retries`` (a ``RetryTask``
    does not use them up), until that call has finished (then it replays its outcome) or is
    found gone (then ``on_abandoned`` decides). In immediate mode and when called directly,
    it raises ``AlreadyRunning`` instead, as with ``on_running="raise"``. Every other option
    is ``idempotent``'s.

    Args:
        key: As ``idempotent``'s. Default None: the task's id (``task_id``), which Huey's
            retries keep. Pass a template such as ``"charge:{order_id}"`` so that two tasks
            for one order run once.
        name: As ``idempotent``'s: the namespace of the keys.
        store: As ``idempotent``'s: where records live; one every worker reaches (a
            ``RedisStore`` or ``PostgresStore``) when consumers run on several machines.
        ttl: As ``idempotent``'s: seconds a finished record is kept. Default a day.
        fingerprint: As ``idempotent``'s: what a key's record is checked against. With
            ``@huey.task(context=True)``, name the arguments to check (the ``task=`` Huey
            passes cannot be fingerprinted).
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
        on_running: What a task does when another worker runs its key: ``"retry"`` (default)
            raises ``RetryTask(delay=delay)``; ``"raise"`` fails it with ``AlreadyRunning``.
        delay: Seconds (>= 0) or a ``timedelta`` before Huey runs a task whose key was busy
            again. Default 5.0.

    Returns:
        A decorator for the task's function, to be placed under ``@huey.task`` (or
        ``@huey.periodic_task``).

    Raises:
        TypeError: A bad option (as for ``idempotent``); when decorating, a coroutine
            function or anything but a plain function (a Huey task: put this decorator under
            ``@huey.task``).
        ValueError: A bad option (as for ``idempotent``), an unknown ``on_running`` or a
            negative ``delay``.
    """
    if on_running not in ("retry", "raise"):
        raise ValueError(f"on_running must be 'retry' or 'raise', not {on_running!r}")
    seconds = seconds_option("delay", delay, positive=False)

    def retry_later(busy: AlreadyRunning, function: Callable[..., object]) -> NoReturn:
        running = _running_task()
        # Called directly there is nothing to retry; in immediate mode Huey would run the
        # retry at once, recursively (or never, with a delay: no scheduler runs); a nested
        # call (not the task's own function) must not retry the whole task.
        if running is None or running[0].immediate or not is_huey_task_of(running[1], function):
            raise busy
        logger.info(
            "idemfn: %s is running elsewhere (owner %s); Huey task %s runs again in %.3g s",
            busy.key,
            busy.owner,
            running[1].id,
            seconds,
            extra=log_fields(busy.key, BUSY),
        )
        # A RetryTask never uses up the task's retries: this retries until the owner has
        # finished or is found gone (its lease bounds that).
        raise RetryTask(f"{busy.key} is running elsewhere", delay=seconds) from busy

    own_key = _OwnTaskId() if key is None else None
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
        if inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"idempotent_task cannot decorate the coroutine function {fn.__qualname__}:"
                " Huey calls task bodies synchronously"
            )
        if not inspect.isfunction(fn):
            raise TypeError(
                "idempotent_task decorates a task's function, not"
                f" {type(fn).__name__}; put it directly above the def, under @huey.task"
            )
        if own_key is not None:
            own_key.functions.append(fn)
        return decorate_once(fn)

    return decorate
