"""arq job functions that run once, however often their job is run.

arq runs a job more than once, as its documentation warns. A worker that dies mid-job leaves
the job queued, and another worker runs it again once the job's in-progress key expires; a job
that raises ``Retry`` is run again; a worker stopped by a signal cancels its jobs and they are
run again; and a custom job id stops a second enqueue only while the first job is queued or its
result kept. ``idempotent_job`` guards the
*execution*, keyed by default on the job's id::

    from arq.worker import func
    from idemfn.arq import idempotent_job

    @idempotent_job(key="charge:{order_id}")   # two jobs for one order charge once
    async def charge(ctx: dict, order_id: str, amount: int) -> str:
        ...

    class WorkerSettings:
        functions = [charge]                # or func(charge, max_tries=...)

What it adds to ``idemfn.idempotent``, whose options it takes:

- ``key`` defaults to the job's id (``job_id``: ``ctx["job_id"]``), which arq keeps when it
  runs a job again.
- ``ctx``, arq's first argument, is never fingerprinted (it holds the Redis pool and the
  try number, which differs on every try): the default fingerprint is of the job's
  arguments.
- ``AlreadyRunning`` (another worker is running the same key) raises arq's
  ``Retry(defer=defer)``, so arq runs the job again later and it then replays the outcome;
  ``on_running="raise"`` fails the job instead. Each of those tries counts towards the
  job's ``max_tries``.
- Only coroutine functions: arq awaits its job functions, and idemfn's async path never
  blocks the worker's event loop.

A ``Retry`` raised by the body releases the key, with the plain decorator too, so the retried
job runs the body (see the documentation's arq page).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal, NoReturn, ParamSpec, TypeVar, cast

from .events import BUSY, log_fields

try:
    from arq.worker import Function, Retry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("idemfn.arq needs arq: pip install 'idemfn[arq]'") from exc

from ._decorator import IdempotentFunction, decorator
from ._errors import AlreadyRunning
from ._outcome import SerializerOption
from ._policy import seconds_option, whole_option
from ._signing import SigningKey
from ._stores import Store

__all__ = ["idempotent_job", "job_id"]

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("idemfn")

# The ctx of the job whose call is running, for the busy hook, which gets only the error.
# The running job's ctx, and whether this call is the outermost idempotent job function of
# its task (the job's own), for the busy hook, which gets only the error.
_job_ctx: contextvars.ContextVar[tuple[object, bool]] = contextvars.ContextVar("idemfn_arq_ctx")


def job_id(ctx: object, *args: object, **kwargs: object) -> str:
    """The id of the arq job running this call (``ctx["job_id"]``); as ``key=``, it ignores
    the job's other arguments.

    ``idempotent_job``'s default key. arq gives every job function its ``ctx`` as first
    argument; a job run again (after ``Retry``, a cancellation, or a worker's death) keeps its
    id, and a job enqueued with ``_job_id=`` has that id.

    Args:
        ctx: arq's job context, the job function's first argument.
        *args: The job's arguments, ignored.
        **kwargs: The job's keyword arguments, ignored.

    Returns:
        The running job's id.

    Raises:
        ValueError: ``ctx`` is not the context of a running arq job (the function was called
            directly, with no ``job_id`` in its first argument).
    """
    found = ctx.get("job_id") if isinstance(ctx, dict) else None
    if not isinstance(found, str) or not found:
        raise ValueError(
            "idemfn.arq.job_id: no arq job is running here (the first argument has no"
            " 'job_id': the function was called directly): enqueue it with"
            " enqueue_job(), or pass key= to key the call on its arguments"
        )
    return found


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
    defer: float | timedelta = 5.0,
    max_retries: int | None = None,
) -> Callable[[Callable[P, R]], IdempotentFunction[P, R]]:
    """``idemfn.idempotent`` for an arq job function (an ``async def`` taking ``ctx`` first).

    ``key`` defaults to the job's id, and the fingerprint leaves ``ctx`` out. When another
    worker is running the same key, the job raises ``arq.worker.Retry(defer=defer)``
    (``on_running="retry"``, the default): arq runs it again ``defer`` seconds later, until
    that call has finished (then it replays its outcome) or is found gone (then
    ``on_abandoned`` decides). Each try counts in ``ctx["job_try"]`` towards the job's
    ``max_tries`` (arq's default: 5 tries in all), past which arq fails the job with
    ``JobExecutionFailed("max N retries exceeded")`` without calling it. Called directly, not
    by a worker, it raises ``AlreadyRunning`` instead. Every other option is ``idempotent``'s.

    Args:
        key: As ``idempotent``'s (a template's fields and a callable see ``ctx`` too).
            Default None: the job's id (``job_id``), which arq keeps when it runs the job
            again. Pass a template such as ``"charge:{order_id}"`` so that two jobs for one
            order run once.
        name: As ``idempotent``'s: the namespace of the keys.
        store: As ``idempotent``'s: where records live; one every worker reaches (a
            ``RedisStore`` or ``PostgresStore``) when workers run on several machines. Its
            async operations serve the job: the worker's event loop is never blocked.
        ttl: As ``idempotent``'s: seconds a finished record is kept. Default a day.
        fingerprint: As ``idempotent``'s: what a key's record is checked against. Default
            None: every argument but ``ctx``.
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
            raises ``Retry(defer=defer)``; ``"raise"`` fails it with ``AlreadyRunning``.
        defer: Seconds (>= 0) or a ``timedelta`` before arq runs the job again. Default 5.0.
        max_retries: The last try (>= 1) on which a busy key is retried: a job that finds
            its key busy on a later try (``ctx["job_try"] > max_retries``) fails with
            ``AlreadyRunning``. Default None: retried until arq's ``max_tries`` ends it
            (set ``max_retries`` below ``max_tries`` to fail with ``AlreadyRunning`` instead).

    Returns:
        A decorator for the job's coroutine function, to be listed in the worker's
        ``functions`` (directly, or in ``arq.worker.func(...)``).

    Raises:
        TypeError: A bad option (as for ``idempotent``); when decorating, anything but a
            coroutine function (a plain function, or an ``arq.worker.Function``: decorate
            the coroutine function, then pass the result to ``func``).
        ValueError: A bad option (as for ``idempotent``), an unknown ``on_running``, a
            negative ``defer`` or a ``max_retries`` under 1.
    """
    if on_running not in ("retry", "raise"):
        raise ValueError(f"on_running must be 'retry' or 'raise', not {on_running!r}")
    delay = seconds_option("defer", defer, positive=False)
    if max_retries is not None:
        whole_option("max_retries", max_retries, least=1)

    def retry_later(busy: AlreadyRunning, function: Callable[..., object]) -> NoReturn:
        ctx, outermost = _job_ctx.get((None, False))
        tries = ctx.get("job_try") if isinstance(ctx, dict) else None
        # Called directly (no try number in ctx) there is nothing to retry it; a nested job
        # function, awaited inside another's job, must not retry the whole job.
        if (
            not outermost
            or not isinstance(tries, int)
            or (max_retries is not None and tries > max_retries)
        ):
            raise busy
        logger.info(
            "idemfn: %s is running elsewhere (owner %s); job %s (try %d) runs again in %.3g s",
            busy.key,
            busy.owner,
            cast(dict[str, Any], ctx).get("job_id"),
            tries,
            delay,
            extra=log_fields(busy.key, BUSY),
        )
        raise Retry(defer=delay) from busy

    def decorate(fn: Callable[P, R]) -> IdempotentFunction[P, R]:
        if isinstance(fn, Function):
            raise TypeError(
                "idempotent_job decorates a job's coroutine function, not an arq Function"
                f" ({fn.name!r}): decorate the function, then wrap the result,"
                " func(idempotent_job(...)(fn), ...)"
            )
        is_coroutine_function = inspect.iscoroutinefunction(fn)  # (no narrowing of fn's type)
        if not is_coroutine_function:
            raise TypeError(
                f"idempotent_job decorates an arq job's coroutine function (async def), not"
                f" {getattr(fn, '__qualname__', type(fn).__name__)}: arq awaits its jobs"
            )
        parameters = list(inspect.signature(fn).parameters.values())
        if not parameters or parameters[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            raise TypeError(
                f"idempotent_job: {fn.__qualname__} must take arq's ctx as its first"
                " argument: async def job(ctx, ...)"
            )
        # ctx holds the Redis pool and the try number: never part of the fingerprint.
        of_arguments = [p.name for p in parameters[1:]]
        once = decorator(
            key=job_id if key is None else key,
            name=name,
            store=store,
            ttl=ttl,
            fingerprint=of_arguments if fingerprint is None else fingerprint,
            wait=wait,
            lease=lease,
            on_abandoned=on_abandoned,
            retry_on=retry_on,
            deadline=deadline,
            transactional=transactional,
            signing_key=signing_key,
            serializer=serializer,
            on_busy=retry_later if on_running == "retry" else None,
        )(fn)
        if on_running == "raise":
            return once
        call = cast(Callable[..., Any], once)

        # (wraps copies once's __dict__: key_for, status, forget and store come along.)
        @functools.wraps(once)
        async def job(ctx: object, *args: Any, **kwargs: Any) -> Any:
            # The outermost idempotent job function of this task is taken for the job's own.
            token = _job_ctx.set((ctx, _job_ctx.get(None) is None))
            try:
                return await call(ctx, *args, **kwargs)
            finally:
                _job_ctx.reset(token)

        return cast(IdempotentFunction[P, R], job)

    return decorate
