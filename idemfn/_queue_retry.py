"""When a task queue will run the body again, an exception is not an outcome to record.

Celery's ``self.retry()`` raises ``celery.exceptions.Retry``; ``Reject(requeue=True)`` puts the
message back; an exception of a type in the task's ``autoretry_for`` is retried by Celery; an
exception escaping an RQ job whose ``Retry`` has retries left is run again by RQ, and a job may
*return* ``rq.Retry``. Each means "run me again". Recorded ``halted``, every later attempt would
replay the failure instead of running, and the queue's retries would be wasted. So the key is
released, as for ``retry_on``.

``Retry``, ``Reject`` and a returned ``rq.Retry`` are requests made on purpose, so they release
wherever they are raised. An ordinary exception releases only the key of the task's own
function, and only while the queue has retries left: the last attempt's failure is recorded, and
a nested idempotent call (whose exception the task may catch) records its failure as usual, so
a caught failure never lets the side effect run twice.

Dramatiq's Retries middleware enqueues a message again after any exception escaping its actor
while it has retries left (by its ``throws``, ``retry_when`` and ``max_retries``), and
``dramatiq.Retry`` asks for that on purpose: it releases wherever it is raised, even on the last
attempt (nothing is recorded: the body said it is not done). Dramatiq enqueues the retry after
the exception has left the body, so the retried message never finds the key still held.

arq runs a job again only when it raises ``arq.worker.Retry`` (any other exception fails the
job): a request made on purpose, it releases wherever it is raised, even on the last try, which
arq then fails ("max N retries exceeded") without calling the job.

Celery's ``self.retry()`` publishes the retry *before* raising ``Retry``, so the retried
delivery can find the key still held by the attempt that asked for it: ``is_queue_retry_of``
tells the decorator to wait for that attempt to let go instead of failing as busy.

Nothing is imported here: the checks are one dict look-up when the queue library is not loaded,
and they run only on the paths that end a claim with an exception or a returned ``rq.Retry``,
and on the path of a call that finds its key busy.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from ._logs import QUEUE_SETUP, no_key
from .events import HALTED

__all__ = [
    "dramatiq_running",
    "is_celery_task_of",
    "is_dramatiq_actor_of",
    "is_huey_task_of",
    "is_queue_retry_of",
    "is_retry_request",
    "is_rq_job_of",
    "queue_will_retry",
]

logger = logging.getLogger("idemfn")


def queue_will_retry(exc: BaseException, function: object) -> bool:
    """Whether the running task queue will run ``function``'s call again after ``exc``.

    ``function`` is the decorated function whose claim ``exc`` ends (None: unknown). Never
    raises: a queue's rule that fails (a user's ``retry_when`` predicate, a task that cannot be
    read) is logged, and the failure is recorded, as it would be outside a queue: raising here
    would leave the claim unsettled, its lease renewed for as long as the worker lives.
    """
    try:
        return (
            _celery_will_retry(exc, function)
            or _rq_will_retry(function)
            or _dramatiq_will_retry(exc, function)
            or _arq_will_retry(exc)
            or _huey_will_retry(exc, function)
        )
    except Exception:
        logger.exception(
            "idemfn: could not tell whether the task queue retries after %s; recording it",
            type(exc).__name__,
            extra=no_key(HALTED),
        )
        return False


def is_queue_retry_of(function: object) -> bool:
    """Whether this call is the task queue's retry of ``function``: a delivery of a Celery task
    whose run is ``function``, retried (``request.retries`` > 0), not called directly.

    Its previous attempt may still hold the key: ``Task.retry()`` publishes the retry, then
    raises ``Retry``, which releases the key only once it has left the body. Autoretry, a
    requeued ``Reject`` and RQ's retries requeue after the release, so they never race; they
    are retries too, and waiting costs them nothing, as their key is free. For the busy path
    only: it looks the task up.
    """
    celery = sys.modules.get("celery")
    if celery is None:
        return False
    task: Any = celery.current_task
    if not task or task.request.called_directly or not task.request.retries:
        return False
    return is_celery_task_of(task, function)


def is_celery_task_of(task: Any, function: object) -> bool:
    """Whether Celery ``task`` runs ``function`` (maybe wrapped)."""
    # Celery's autoretry wraps run and keeps the original as _orig_run.
    return _is(getattr(task, "_orig_run", task.run), function)


def is_retry_request(value: object) -> bool:
    """Whether ``value`` asks RQ to run the job again (an ``rq.Retry``)."""
    rq_job = sys.modules.get("rq.job")
    return rq_job is not None and isinstance(value, rq_job.Retry)


def _is(candidate: object, function: object) -> bool:
    """Whether ``candidate`` (a task's run, maybe bound or wrapped by Celery) is ``function``."""
    for _ in range(8):  # a short chain of wrappers; never loop on a cyclic __wrapped__
        candidate = getattr(candidate, "__func__", candidate)
        if candidate is function:
            return True
        candidate = getattr(candidate, "__wrapped__", None)
        if candidate is None:
            return False
    return False


def _celery_will_retry(exc: BaseException, function: object) -> bool:
    exceptions = sys.modules.get("celery.exceptions")
    if exceptions is None:
        return False
    if isinstance(exc, exceptions.Retry):
        return True
    if isinstance(exc, exceptions.Reject):
        return bool(getattr(exc, "requeue", False))
    task: Any = sys.modules["celery"].current_task
    if function is None or not task or task.request.called_directly:
        return False
    autoretry = tuple(getattr(task, "autoretry_for", ()))
    if not autoretry or not isinstance(exc, autoretry):
        return False
    if isinstance(exc, (exceptions.Ignore, *getattr(task, "dont_autoretry_for", ()))):
        return False
    # Celery's autoretry wraps run and keeps the original as _orig_run.
    if not _is(getattr(task, "_orig_run", task.run), function):
        return False
    # Autoretry gives up (raising exc) once request.retries reaches its limit; a limit of None
    # in retry_kwargs means the task's own max_retries, as in Task.retry.
    limit = getattr(task, "retry_kwargs", {}).get("max_retries")
    if limit is None:
        limit = task.max_retries
    return limit is None or task.request.retries < limit


def _rq_will_retry(function: object) -> bool:
    rq_job = sys.modules.get("rq.job")
    if rq_job is None or function is None:
        return False
    job = rq_job.get_current_job()
    if job is None or not job.retries_left:
        return False
    return is_rq_job_of(job, function)


def is_rq_job_of(job: Any, function: object) -> bool:
    """Whether RQ ``job`` runs ``function`` (maybe wrapped)."""
    try:
        return _is(job.func, function)
    except Exception:  # the job's function cannot be resolved here: don't guess
        return False


def _dramatiq_will_retry(exc: BaseException, function: object) -> bool:
    errors = sys.modules.get("dramatiq.errors")
    if errors is None:
        return False
    if isinstance(exc, errors.Retry):  # raised on purpose: Dramatiq runs the message again
        return True
    return function is not None and _dramatiq_retries_left(exc, function)


def _dramatiq_retries_left(exc: BaseException, function: object = None) -> bool:
    """Whether Dramatiq's ``Retries`` middleware enqueues the running message again after
    ``exc`` escapes its actor (whose function must be ``function``, unless None): its own rule,
    in its order (``throws``, then ``retry_when``, else ``retries < max_retries``, the message's
    options before the actor's before the middleware's). Needs the ``CurrentMessage``
    middleware; without it, or outside a worker, False."""
    running = dramatiq_running()
    if running is None:
        return False
    broker, message, actor = running
    retries_class = sys.modules["dramatiq.middleware.retries"].Retries
    middleware = [m for m in getattr(broker, "middleware", ()) if isinstance(m, retries_class)]
    if not middleware:  # no Retries middleware: a failed message is done
        return False
    if actor is None:  # an actor this broker does not know: don't guess
        return False
    if function is not None and not is_dramatiq_actor_of(actor, function):
        return False
    throws = message.options.get("throws") or actor.options.get("throws")
    if throws and isinstance(exc, throws):
        return False
    retries = message.options.get("retries", 0)
    retry_when = actor.options.get("retry_when", middleware[0].retry_when)
    if retry_when is not None:
        return bool(retry_when(retries, exc))
    limit = message.options.get(
        "max_retries", actor.options.get("max_retries", middleware[0].max_retries)
    )
    return limit is None or retries < limit


def dramatiq_running() -> tuple[Any, Any, Any] | None:
    """The broker, message and actor (None: one the broker does not know) of the Dramatiq
    message running here, or None: no message (outside a worker, or a broker without the
    ``CurrentMessage`` middleware, which is then logged once: see ``_no_current_message``)."""
    current = sys.modules.get("dramatiq.middleware.current_message")
    if current is None:
        return None
    worker = sys.modules.get("dramatiq.worker")
    # (Dramatiq 1.x names it _WorkerThread.)
    thread_class: Any = getattr(worker, "WorkerThread", None) or getattr(
        worker, "_WorkerThread", ()
    )
    thread = threading.current_thread()
    in_worker = isinstance(thread, thread_class)
    message: Any = current.CurrentMessage.get_current_message()
    if message is None:
        if in_worker:
            _no_current_message(thread, current.CurrentMessage)
        return None
    if in_worker:
        broker: Any = thread.broker  # type: ignore[attr-defined]
    else:  # an async actor, on the event loop's thread: the global broker, if any (never
        # get_broker(), which would create one)
        broker = sys.modules["dramatiq.broker"].global_broker
    try:
        actor: Any = broker.get_actor(message.actor_name)
    except Exception:
        actor = None
    return broker, message, actor


def is_dramatiq_actor_of(actor: Any, function: object) -> bool:
    """Whether Dramatiq ``actor`` runs ``function`` (a ``GenericActor``'s is its ``perform``)."""
    target = actor.fn
    generic = sys.modules.get("dramatiq.generic")
    if generic is not None and isinstance(target, generic.GenericActor):
        target = type(target).perform
    return _is(target, function)


_warned_current_message: set[int] = set()


def _no_current_message(thread: Any, current_message: type) -> None:
    """Say once per broker that a Dramatiq worker without ``CurrentMessage`` hides from idemfn
    whether Dramatiq retries a failure: idemfn records it, and Dramatiq's retries replay it."""
    broker = getattr(thread, "broker", None)
    if broker is None or id(broker) in _warned_current_message:
        return
    if any(isinstance(m, current_message) for m in getattr(broker, "middleware", ())):
        return
    _warned_current_message.add(id(broker))
    logger.error(
        "idemfn: this Dramatiq worker's broker has no CurrentMessage middleware, so idemfn"
        " cannot tell whether Dramatiq retries a failure: it records the failure, and"
        " Dramatiq's retries replay it instead of running the body again. Add it:"
        " broker.add_middleware(dramatiq.middleware.CurrentMessage()), where the broker is"
        " created",
        extra=no_key(QUEUE_SETUP),
    )


def _arq_will_retry(exc: BaseException) -> bool:
    # arq runs a job again whenever it raises arq.worker.Retry (its only retry: any other
    # exception fails the job), on the last try too, which it then fails ("max N retries
    # exceeded") without calling the job: a request made on purpose, released wherever raised.
    worker = sys.modules.get("arq.worker")
    return worker is not None and isinstance(exc, worker.Retry)


def _huey_will_retry(exc: BaseException, function: object) -> bool:
    # Huey runs a task again after RetryTask, and after an exception while its retries are
    # left. (Once Huey is loaded, its check imports idemfn.huey, which finds the running task.)
    exceptions = sys.modules.get("huey.exceptions")
    if exceptions is None:
        return False
    # Huey's _execute: RetryTask, and CancelExecution or RateLimitExceeded with retry=True,
    # are retried whatever the task's retries; KeyboardInterrupt drops the task.
    if isinstance(exc, exceptions.RetryTask):
        return True
    retry = getattr(exc, "retry", None)
    requests = (exceptions.CancelExecution, getattr(exceptions, "RateLimitExceeded", ()))  # 3.0+
    if isinstance(exc, requests) and retry:
        return True
    if isinstance(exc, exceptions.CancelExecution) and retry is not None:
        return False
    if function is None or not isinstance(exc, Exception):
        return False
    from .huey import _running_task  # loaded with Huey: huey.exceptions is

    running = _running_task()
    if running is None or not running[1].retries:
        return False
    return is_huey_task_of(running[1], function)


def is_huey_task_of(task: object, function: object) -> bool:
    """Whether Huey ``task`` runs ``function`` (maybe wrapped)."""
    # The task's class runs its function from a closure (TaskWrapper.create_task's execute).
    execute: Any = getattr(type(task), "execute", None)
    names = getattr(getattr(execute, "__code__", None), "co_freevars", ())
    if "func" not in names:
        return False
    return _is(execute.__closure__[names.index("func")].cell_contents, function)
