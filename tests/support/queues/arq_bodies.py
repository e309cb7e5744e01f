"""The arq job functions the shared queue suite's workers run, and the arq tests' own.

``python -m arq tests.support.queues.arq_bodies.WorkerSettings`` runs them, configured by the
environment the adapter gives the worker: ``IDEMFN_TEST_REDIS`` (the suite's redis-server's
socket), ``IDEMFN_TEST_QUEUE`` (the test's own queue), ``IDEMFN_STORE`` and
``IDEMFN_TEST_EFFECTS``. The shared bodies are those of ``tests/support/queues/__init__.py``,
as ``async def`` taking arq's ``ctx`` first.

Deliveries are logged from arq itself: a job that ends (ok or failed, the failures arq makes up
itself included, such as "max N retries exceeded") is serialised once by the worker's
``job_serializer``, and one that asks to run again raises ``Retry`` out of the function arq
calls.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pickle
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

from arq.connections import RedisSettings
from arq.worker import Function, Retry, func

from idemfn import idempotent
from idemfn.arq import idempotent_job, job_id
from tests.support.queues import log_delivery
from tests.support.workers import effect

Ctx = dict[str, Any]

#: The tries arq gives the shared ``flaky`` body: up to 5 retries.
FLAKY_TRIES = 6
#: Seconds before arq runs again a job whose key is busy: well under a second.
BUSY_DEFER = 0.1
#: The tries of the other bodies: enough busy retries (one a BUSY_DEFER) to outlast any hold.
BUSY_TRIES = 1200


async def held(name: str) -> None:
    """``workers.held`` for a coroutine: never block the worker's event loop."""
    path = Path(os.environ["IDEMFN_TEST_EFFECTS"]) / f"release-{name}"
    give_up = time.monotonic() + 120
    while not path.exists() and time.monotonic() < give_up:
        await asyncio.sleep(0.01)


async def crash_on_first_run(name: str) -> str:
    """``workers.crash_on_first_run`` for a coroutine: hangs on its first run (the test
    SIGKILLs its worker there), returns on the others."""
    runs = effect(name, str(os.getpid()))
    if runs == 1:
        await asyncio.sleep(120)
    return f"finished on run {runs}"


# --- the shared bodies ---------------------------------------------------------------------


@idempotent_job(defer=BUSY_DEFER)  # keyed on the job's id
async def once(ctx: Ctx, name: str, hold: bool = False) -> str:
    effect(name, str(os.getpid()))
    if hold:
        await held(name)
    return f"{name}: {uuid.uuid4().hex}"


@idempotent_job(key="shared:{name}", defer=BUSY_DEFER)
async def shared(ctx: Ctx, name: str, hold: bool = False) -> str:
    effect(name, str(os.getpid()))
    if hold:
        await held(name)
    return f"{name}: {uuid.uuid4().hex}"


@idempotent_job(defer=BUSY_DEFER)
async def crash_halt(ctx: Ctx, name: str) -> str:
    return await crash_on_first_run(name)


@idempotent_job(on_abandoned="retry", defer=BUSY_DEFER)
async def crash_retry(ctx: Ctx, name: str) -> str:
    return await crash_on_first_run(name)


@idempotent_job(defer=BUSY_DEFER)
async def flaky(ctx: Ctx, name: str, failures: int) -> str:
    # arq retries only a job that raises Retry (any other exception fails it): its idiom for
    # a transient error is to raise Retry from it.
    runs = effect(name, str(os.getpid()))
    if runs <= failures:
        try:
            raise ConnectionError(f"run {runs} failed")
        except ConnectionError as exc:
            raise Retry(defer=0.05) from exc
    return f"ok on run {runs}"


# --- the arq tests' own --------------------------------------------------------------------


# The plain decorator: the job's id as key, ctx left out of the fingerprint by hand.
@idempotent(key=job_id, fingerprint=["name"])
async def plain(ctx: Ctx, name: str) -> str:
    effect(name, str(os.getpid()))
    return f"{name}: {uuid.uuid4().hex}"


# A job that finds its key busy fails with AlreadyRunning from its third try on.
@idempotent_job(key="capped:{name}", defer=BUSY_DEFER, max_retries=2)
async def capped(ctx: Ctx, name: str, hold: bool = False) -> str:
    effect(name, str(os.getpid()))
    if hold:
        await held(name)
    return f"{name}: {uuid.uuid4().hex}"


# Runs past its 1 s timeout on its first try: arq cancels it and fails the job.
@idempotent_job()
async def slow(ctx: Ctx, name: str) -> str:
    runs = effect(name, str(os.getpid()))
    if runs == 1:
        await asyncio.sleep(30)
    return f"finished on run {runs}"


# --- the worker ----------------------------------------------------------------------------


def _logged(fn: Callable[..., Awaitable[Any]]) -> Any:
    """``fn``, logging the deliveries that end by asking arq to run the job again."""

    @functools.wraps(fn)
    async def job(ctx: Ctx, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(ctx, *args, **kwargs)
        except Retry as exc:
            log_delivery(ctx["job_id"], "retry", repr(exc))
            raise

    return job


def _serialize(data: dict[str, Any]) -> bytes:
    """arq's default serializer (pickle), logging each job's end as the worker records it."""
    if "s" in data and "id" in data:  # a result, not a job (which has no success flag)
        log_delivery(data["id"], "ok" if data["s"] else "failed", repr(data["r"]))
    return pickle.dumps(data)


def _function(fn: Callable[..., Awaitable[Any]], **options: Any) -> Function:
    return func(_logged(fn), name=fn.__name__, **options)


class WorkerSettings:
    """The test workers' settings: the test's queue on the suite's redis-server, polled every
    50 ms; crashed workers' jobs are handed on by the adapter (see ``kill_mid_body``)."""

    functions: ClassVar[list[Function]] = [
        _function(once, max_tries=BUSY_TRIES),
        _function(shared, max_tries=BUSY_TRIES),
        _function(crash_halt, max_tries=BUSY_TRIES),
        _function(crash_retry, max_tries=BUSY_TRIES),
        _function(flaky, max_tries=FLAKY_TRIES),
        _function(plain),
        _function(capped, max_tries=BUSY_TRIES),
        _function(slow, timeout=1),
    ]
    queue_name = os.environ.get("IDEMFN_TEST_QUEUE", "arq:queue")
    redis_settings = RedisSettings(unix_socket_path=os.environ.get("IDEMFN_TEST_REDIS"))
    poll_delay = 0.05
    job_timeout = 150  # (arq's default: 300 s) longer than any hold
    # Seconds a worker stopped by SIGTERM lets its jobs finish (arq's default: 0, none).
    job_completion_wait = int(os.environ.get("IDEMFN_TEST_ARQ_COMPLETION_WAIT", "0"))
    job_serializer = staticmethod(_serialize)
