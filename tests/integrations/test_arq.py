"""arq job functions: what is arq's own (the shared scenarios are in test_queues.py).

The worker tests run real ``python -m arq`` workers of ``tests.support.queues.arq_bodies`` on a
queue of their own on the suite's redis-server (through the shared suite's adapter), their
records in a DiskStore; the others call job functions in-process with a ctx such as arq gives
them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from arq.worker import Retry, func

from idemfn import AlreadyRunning, FingerprintMismatch, MemoryStore, Status, idempotent, open_store
from idemfn.arq import idempotent_job, job_id
from tests.support.queues.arq import ArqQueue
from tests.support.servers import RedisServer
from tests.support.workers import poll


def ctx(job: str = "job-1", job_try: int = 1) -> dict[str, Any]:
    """A ctx as arq's worker gives a job function (its Redis pool stood in for)."""
    return {"job_id": job, "job_try": job_try, "redis": object(), "score": 0}


# --- real workers -------------------------------------------------------------------------


@pytest.fixture
def arq(tmp_path: Path, redis_server: RedisServer) -> Iterator[ArqQueue]:
    # A DiskStore shared by the workers' processes, driven by their event loops (the shared
    # suite gives arq's workers a RedisStore).
    location = str(tmp_path / "store")
    queue = ArqQueue(tmp_path, redis_server.socket, open_store(location), location)
    try:
        yield queue
    finally:
        queue.close()


@pytest.mark.slow
def test_a_retry_on_the_last_try_fails_the_job_and_leaves_the_key_free(arq: ArqQueue) -> None:
    arq.start_worker()
    name = f"flaky-{uuid.uuid4().hex}"
    job = arq.send("flaky", name, 100)  # arq_bodies.FLAKY_TRIES: 6 tries

    (failure,) = arq.wait(job, "failed")
    assert failure == "JobExecutionFailed('max 6 retries exceeded')"
    assert len(arq.wait(job, "retry", 6)) == 6  # the sixth asked again: arq failed it unrun
    assert len(arq.runs(name)) == 6
    assert arq.record("flaky", job) is None  # every Retry released the key

    again = arq.send("flaky", name, 0, message_id=job)  # so the job may run once more
    assert arq.wait(again, "ok") == [repr("ok on run 7")]


@pytest.mark.slow
def test_a_busy_key_past_max_retries_fails_with_already_running(arq: ArqQueue) -> None:
    arq.start_worker()
    name = f"capped-{uuid.uuid4().hex}"
    first = arq.send("capped", name, True)
    poll(lambda: arq.runs(name), "the first job to start")
    second = arq.send("capped", name, True)

    (failure,) = arq.wait(second, "failed")
    assert failure.startswith("AlreadyRunning("), failure
    assert len(arq.wait(second, "retry", 2)) == 2  # tries 1 and 2 (max_retries=2) retried
    arq.release(name)
    assert arq.wait(first, "ok")
    assert len(arq.runs(name)) == 1


@pytest.mark.slow
def test_the_plain_decorator_keyed_on_job_id_replays_a_job_sent_again(arq: ArqQueue) -> None:
    arq.start_worker()
    name = f"plain-{uuid.uuid4().hex}"
    job = arq.send("plain", name)
    (value,) = arq.wait(job, "ok")
    arq.send("plain", name, message_id=job)

    assert arq.wait(job, "ok", 2) == [value, value]
    assert len(arq.runs(name)) == 1
    entry = arq.store.get(f"tests.support.queues.arq_bodies.plain:{job}")
    assert entry is not None and entry.record().status is Status.OK


@pytest.mark.slow
def test_a_job_past_its_timeout_is_halted_not_run_again(arq: ArqQueue) -> None:
    arq.start_worker()
    name = f"slow-{uuid.uuid4().hex}"
    job = arq.send("slow", name)  # func(slow, timeout=1): its first run sleeps 30 s

    assert arq.wait(job, "failed") == ["TimeoutError()"]
    record = arq.record("slow", job)
    assert record is not None and record.status is Status.HALTED
    assert record.exc_type is not None and "CancelledError" in record.exc_type

    arq.send("slow", name, message_id=job)
    (replay,) = arq.wait(job, "failed", 2)[1:]
    assert replay.startswith("Halted("), replay
    assert len(arq.runs(name)) == 1


@pytest.mark.slow
def test_a_worker_stopped_mid_body_halts_the_job_arq_runs_again(arq: ArqQueue) -> None:
    worker = arq.start_worker()
    name = f"stop-{uuid.uuid4().hex}"
    job = arq.send("once", name, True)
    poll(lambda: arq.runs(name), "the body to start")
    os.kill(worker.pid, signal.SIGTERM)  # arq cancels its jobs, and runs them again later
    worker.wait_for_log("cancelled, will be run again")
    arq.start_worker()

    (failure,) = arq.wait(job, "failed")
    assert failure.startswith("Halted("), failure
    assert "CancelledError" in failure
    assert len(arq.runs(name)) == 1


@pytest.mark.slow
def test_a_worker_stopped_with_job_completion_wait_lets_the_body_finish(arq: ArqQueue) -> None:
    arq.env["IDEMFN_TEST_ARQ_COMPLETION_WAIT"] = "60"
    worker = arq.start_worker()
    name = f"stop-{uuid.uuid4().hex}"
    job = arq.send("once", name, True)
    poll(lambda: arq.runs(name), "the body to start")
    os.kill(worker.pid, signal.SIGTERM)  # arq takes no more jobs, and waits for this one
    worker.wait_for_log("Setting allow_pick_jobs to `False`")
    arq.release(name)

    (value,) = arq.wait(job, "ok")
    assert value.startswith(repr(f"{name}: ")[:-1])
    assert worker.process.wait(timeout=60) == 0
    record = arq.record("once", job)
    assert record is not None and record.status is Status.OK


# --- in-process: no worker needed ---------------------------------------------------------


def test_job_id_is_the_job_s_id_from_ctx() -> None:
    assert job_id(ctx("j-7"), "ignored", amount=3) == "j-7"


@pytest.mark.parametrize("outside", [{}, {"job_id": ""}, None, "j-7"])
def test_job_id_outside_a_worker_says_what_to_do(outside: object) -> None:
    with pytest.raises(ValueError, match=r"no arq job is running here.*pass key="):
        job_id(outside)


def test_ctx_is_not_fingerprinted() -> None:
    store = MemoryStore()
    runs: list[int] = []

    @idempotent_job(key="charge:{order}", store=store)
    async def charge(ctx: dict[str, Any], order: str, amount: int) -> int:
        runs.append(amount)
        return amount

    async def main() -> None:
        assert await charge(ctx("a", 1), "o-1", 5) == 5
        assert await charge(ctx("b", 3), "o-1", 5) == 5  # another job, try and pool: replayed
        with pytest.raises(FingerprintMismatch):
            await charge(ctx("c", 1), "o-1", 6)

    asyncio.run(main())
    assert runs == [5]


async def _busy(options: dict[str, Any], context: object) -> BaseException:
    """What a job of ``options`` raises for ``context`` while another call holds its key."""
    holding, free = asyncio.Event(), asyncio.Event()

    @idempotent_job(key="busy:{name}", store=MemoryStore(), **options)
    async def job(ctx: object, name: str) -> str:
        holding.set()
        await free.wait()
        return name

    first = asyncio.create_task(job(ctx("owner"), "k"))
    await holding.wait()
    try:
        await job(context, "k")
    except BaseException as exc:
        return exc
    finally:
        free.set()
        await first
    raise AssertionError("the busy call ran")


def test_a_busy_key_raises_arq_s_retry_with_the_defer() -> None:
    busy = asyncio.run(_busy({"defer": 0.25}, ctx("dup", 2)))
    assert isinstance(busy, Retry) and busy.defer_score == 250
    assert isinstance(busy.__cause__, AlreadyRunning)


@pytest.mark.parametrize(
    ("options", "context"),
    [
        ({}, {}),  # called directly: no try number, nothing to retry it
        ({"max_retries": 2}, ctx("dup", 3)),  # tries past max_retries
        ({"on_running": "raise"}, ctx("dup", 1)),
    ],
)
def test_a_busy_key_raises_already_running(options: dict[str, Any], context: object) -> None:
    assert isinstance(asyncio.run(_busy(options, context)), AlreadyRunning)


def test_a_retry_raised_by_the_body_releases_the_key_and_another_error_is_recorded() -> None:
    store = MemoryStore()

    @idempotent_job(store=store)
    async def job(ctx: dict[str, Any], fail: str) -> None:
        raise Retry(defer=1) if fail == "retry" else ValueError(fail)

    async def main() -> None:
        with pytest.raises(Retry):
            await job(ctx("r"), "retry")
        assert job.status(ctx("r"), "retry") is None
        with pytest.raises(ValueError):
            await job(ctx("v"), "value")
        record = job.status(ctx("v"), "value")
        assert record is not None and record.status is Status.HALTED

    asyncio.run(main())


async def _body(ctx: dict[str, Any]) -> None: ...


def test_a_sync_function_is_refused() -> None:
    def sync(ctx: dict[str, Any]) -> None: ...

    with pytest.raises(TypeError, match=r"coroutine function \(async def\), not .*sync"):
        idempotent_job(store=MemoryStore())(sync)


def test_a_function_without_ctx_is_refused() -> None:
    async def no_ctx(*, name: str) -> None: ...

    with pytest.raises(TypeError, match=r"must take arq's ctx as its first argument"):
        idempotent_job(store=MemoryStore())(no_ctx)


def test_idempotent_job_over_arq_func_is_refused_with_the_way_out() -> None:
    with pytest.raises(TypeError, match=r"not an arq Function.*func\(idempotent_job\(...\)\(fn\)"):
        idempotent_job(store=MemoryStore())(func(_body))  # type: ignore[arg-type]


def test_idempotent_over_arq_func_is_refused_with_the_way_out() -> None:
    with pytest.raises(
        TypeError, match=r"must go under arq.worker.func.*idemfn.arq.idempotent_job"
    ):
        idempotent(store=MemoryStore())(func(_body))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"on_running": "wait"}, "on_running must be 'retry' or 'raise'"),
        ({"defer": -1}, "defer must be >= 0 seconds"),
        ({"defer": "5"}, "defer must be a number of seconds or a timedelta"),
        ({"max_retries": 0}, "max_retries must be a whole number >= 1"),
        ({"lease": 0}, "lease must be > 0"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, Any], error: str) -> None:
    with pytest.raises((TypeError, ValueError), match=error):
        idempotent_job(store=MemoryStore(), **options)(_body)


def test_the_module_exports_what_it_defines_and_idemfn_imports_no_arq() -> None:
    import subprocess
    import sys

    import idemfn.arq

    assert idemfn.arq.__all__ == ["idempotent_job", "job_id"]
    code = "import sys, idemfn; print('arq' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
