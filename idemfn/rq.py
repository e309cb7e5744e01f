"""RQ job functions that run once, however often the job is enqueued or run again.

RQ runs a job again when it is re-queued after its worker died, when its ``Retry`` has retries
left, or when a producer enqueues the same work twice. ``idempotent_job`` guards the
*execution*, keyed by default on the job's id::

    from idemfn.rq import idempotent_job

    @idempotent_job(key="charge:{order_id}")   # two jobs for one order charge once
    def charge(order_id: str, amount: int) -> str:
        ...

    queue.enqueue(charge, "A-17", 4200)

What it adds to ``idemfn.idempotent``, whose options it takes:

- ``key`` defaults to the job's id (``job_id``), which a re-queued or retried job keeps.
- ``AlreadyRunning`` (another worker is running the same key) asks RQ to run the job again
  later: the function returns ``rq.Retry(max=max_retries, interval=interval)``. RQ schedules a
  retry with an interval, so the worker needs ``--with-scheduler``. ``on_running="raise"`` fails
  the job instead.

The plain decorator works on RQ job functions too, in either order with ``rq.decorators.job``:
RQ enqueues a function by its import path, which names the decorated function.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Literal, ParamSpec, TypeVar

from .events import BUSY, log_fields

try:
    from rq import Retry, get_current_job
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("idemfn.rq needs RQ: pip install 'idemfn[rq]'") from exc

from ._decorator import IdempotentFunction, decorator
from ._errors import AlreadyRunning
from ._outcome import SerializerOption
from ._policy import whole_option
from ._queue_retry import is_rq_job_of
from ._signing import SigningKey
from ._stores import Store

__all__ = ["idempotent_job", "job_id"]

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("idemfn")


def job_id(*args: object, **kwargs: object) -> str:
    """The id of the RQ job running this call; as ``key=``, it ignores the arguments.

    ``idempotent_job``'s default key. A job re-queued after its worker died, or retried,
    keeps its id.

    Args:
        *args: The job's arguments, ignored.
        **kwargs: The job's keyword arguments, ignored.

    Returns:
        The running job's id.

    Raises:
        ValueError: No job is running here (the function was called directly).
    """
    job = get_current_job()
    if job is None:
        raise ValueError(
            "idemfn.rq.job_id: no RQ job is running here (the function was called directly):"
            " enqueue it, or pass key= to key the call on its arguments"
        )
    return job.id


class _OwnJobId:
    """``idempotent_job``'s default key: ``job_id``, for a call of the running job's own
    function only. A job function called directly inside another job has no job of its own:
    keyed on the other's id, a second such call would replay the first."""

    def __init__(self) -> None:
        self.functions: list[object] = []  # what this idempotent_job(...) decorated

    def __call__(self, *args: object, **kwargs: object) -> str:
        job = get_current_job()
        if job is None:
            return job_id()  # raises, saying what to do
        if not any(is_rq_job_of(job, f) for f in self.functions):
            raise ValueError(
                f"idemfn.rq.job_id: the job running here runs {job.func_name!r}: a job function"
                " called directly inside another job has no job of its own. Enqueue it, or pass"
                " key= to key the call on its arguments"
            )
        return str(job.id)


def idempotent_job(
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
    interval: int = 5,
    max_retries: int = 12,
) -> Callable[[Callable[P, R]], IdempotentFunction[P, R | Retry]]:
    """``idemfn.idempotent`` for an RQ job function.

    ``key`` defaults to the job's id. When another worker is running the same key, the
    function returns ``rq.Retry(max=max_retries, interval=interval)`` (``on_running="retry"``,
    the default): RQ runs the job again after ``interval`` whole seconds (0: re-queued at
    once; a worker needs ``--with-scheduler`` for an interval), and fails it once the job has
    been retried ``max_retries`` times. Called directly, not by a worker, it raises
    ``AlreadyRunning`` instead. Every other option is ``idempotent``'s.

    Args:
        key: As ``idempotent``'s. Default None: the job's id (``job_id``), which a re-queued
            or retried job keeps. Pass a template such as ``"charge:{order_id}"`` so that
            two jobs for one order run once.
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
        on_running: What a job does when another worker runs its key: ``"retry"`` (default)
            returns ``rq.Retry``; ``"raise"`` fails it with ``AlreadyRunning``.
        interval: Whole seconds (>= 0) before RQ runs the job again. Default 5.
        max_retries: How many times (>= 1) the job is run again before it fails. Default 12.

    Returns:
        A decorator for the job's function; the function it returns may also return
        ``rq.Retry``.

    Raises:
        TypeError: A bad option (as for ``idempotent``); when decorating, a staticmethod,
            classmethod or anything not callable.
        ValueError: A bad option (as for ``idempotent``), an unknown ``on_running``, or an
            ``interval`` or ``max_retries`` out of range.
    """
    if on_running not in ("retry", "raise"):
        raise ValueError(f"on_running must be 'retry' or 'raise', not {on_running!r}")
    retry = Retry(
        max=whole_option("max_retries", max_retries, least=1),
        interval=whole_option("interval", interval, least=0),
    )

    def retry_later(busy: AlreadyRunning, function: Callable[..., object]) -> Retry:
        job = get_current_job()
        # Called directly, not by a worker, nothing can retry it; a nested call (not the
        # job's own function) must not hand the job's body an rq.Retry as its value.
        if job is None or not is_rq_job_of(job, function):
            raise busy
        logger.info(
            "idemfn: %s is running elsewhere (owner %s); job %s will run again in %d s",
            busy.key,
            busy.owner,
            job.id,
            retry.intervals[0],
            extra=log_fields(busy.key, BUSY),
        )
        return retry

    own_key = _OwnJobId() if key is None else None
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

    def decorate(fn: Callable[P, R]) -> IdempotentFunction[P, R | Retry]:
        if isinstance(fn, (staticmethod, classmethod)) or not callable(fn):
            raise TypeError(f"idempotent_job decorates a job's function, not {type(fn).__name__}")
        if own_key is not None:
            own_key.functions.append(fn)
        return decorate_once(fn)

    return decorate
