"""When a task queue will run the body again, an exception is not an outcome to record.

Celery's ``self.retry()`` raises ``celery.exceptions.Retry``; ``Reject(requeue=True)`` puts the
message back; a task's ``autoretry_for`` exceptions are retried by Celery itself; an RQ job whose
``Retry`` has retries left is run again after an exception, and a job may *return* ``rq.Retry``.
Each means "run me again". Recorded ``halted``, every later attempt would replay the failure
instead of running, and the queue's retries would be wasted. So the key is released, as for
``retry_on``. On the last attempt, when the queue will not retry, the failure is recorded as
usual.

Nothing is imported here: the checks are one dict look-up when the queue library is not loaded,
and they run only on the paths that end a claim with an exception or a returned ``rq.Retry``.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["raised_for_rerun", "returned_for_rerun"]


def raised_for_rerun(exc: BaseException) -> bool:
    """Whether the running task queue will run the body again after ``exc``."""
    return _celery_reruns(exc) or _rq_reruns()


def returned_for_rerun(value: object) -> bool:
    """Whether ``value`` asks RQ to run the job again (an ``rq.Retry``)."""
    rq_job = sys.modules.get("rq.job")
    return rq_job is not None and isinstance(value, rq_job.Retry)


def _celery_reruns(exc: BaseException) -> bool:
    exceptions = sys.modules.get("celery.exceptions")
    if exceptions is None:
        return False
    if isinstance(exc, exceptions.Retry):
        return True
    if isinstance(exc, exceptions.Reject):
        return bool(getattr(exc, "requeue", False))
    task: Any = sys.modules["celery"].current_task
    if not task or task.request.called_directly:
        return False
    autoretry = tuple(getattr(task, "autoretry_for", ()))
    if not autoretry or not isinstance(exc, autoretry):
        return False
    if isinstance(exc, (exceptions.Ignore, *getattr(task, "dont_autoretry_for", ()))):
        return False
    # Celery's autoretry gives up (raising exc) once request.retries reaches max_retries.
    limit = getattr(task, "retry_kwargs", {}).get("max_retries", task.max_retries)
    return limit is None or task.request.retries < limit


def _rq_reruns() -> bool:
    rq_job = sys.modules.get("rq.job")
    if rq_job is None:
        return False
    job = rq_job.get_current_job()
    return job is not None and bool(job.retries_left)
