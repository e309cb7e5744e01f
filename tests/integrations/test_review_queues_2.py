"""A second hostile review of the queue integrations (issue 20): arq and Huey, and the busy
hook of a nested call on every queue that has one (Dramatiq and RQ too).

Each test is an attack: the ones that found a bug (a nested call's busy key asking the queue to
retry the whole task, or handing an RQ job body an ``rq.Retry``; an exception a signal handler
raises as a claim lands) pass since their fix; the others withstood. (A decorator without
``functools.wraps`` between ``@huey.task`` and ``idempotent_task`` hides the task's function:
documented, not tested.) In-process: an ``arq.worker.Worker`` in
burst mode on the suite's redis-server, Huey tasks run on a ``MemoryHuey`` as its consumer runs
them.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis
from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Retry as ArqRetry
from arq.worker import Worker, func
from huey import MemoryHuey
from huey.api import Huey, Task
from rq import Queue, SimpleWorker

from idemfn import (
    AlreadyRunning,
    Halted,
    MemoryStore,
    RedisStore,
    Status,
    abegin,
    begin,
    idempotent,
)
from idemfn._heartbeat import heartbeat
from idemfn.arq import idempotent_job
from idemfn.dramatiq import idempotent_actor
from idemfn.huey import idempotent_task
from idemfn.rq import idempotent_job as rq_job
from tests.support.servers import RedisServer
from tests.support.workers import poll

# --- helpers ---------------------------------------------------------------------------------


def _huey() -> MemoryHuey:
    return MemoryHuey(f"h{uuid.uuid4().hex}", results=True)


def _drain(huey: Huey, limit: int = 50) -> int:
    """Run every task ``huey`` has enqueued or scheduled (its retries), as its consumer would."""
    ran = 0
    while True:
        assert ran < limit, "the task is retried forever"
        task = huey.dequeue()
        if task is None:
            due = huey.read_schedule(huey._get_timestamp().replace(year=9999))
            if not due:
                return ran
            for scheduled in due:
                scheduled.eta = None
                huey.enqueue(scheduled)
            continue
        huey.execute(task)
        ran += 1


def _run(huey: Huey, task: Task) -> Any:
    result = huey.enqueue(task)
    _drain(huey)
    return result.get(preserve=True)


async def _hold(store: Any, key: str) -> Any:
    """A live claim on ``key`` (another worker's call still running), as ``begin`` makes it."""
    return await abegin(key, store=store)


# --- arq: a nested job function that finds its key busy ---------------------------------------


def test_arq_a_nested_job_finding_its_key_busy_does_not_rerun_the_outer_side_effect() -> None:
    store = MemoryStore()
    emails: list[str] = []

    @idempotent_job(key="charge:{order}", store=store, defer=0)
    async def charge(ctx: dict[str, Any], order: str) -> str:
        return f"charged {order}"

    @idempotent_job(store=store, defer=0)  # keyed on the job's id
    async def checkout(ctx: dict[str, Any], order: str) -> str:
        emails.append(order)  # the outer job's own side effect
        return await charge(ctx, order)  # another worker's job is charging this order

    async def main() -> list[object]:
        busy = await _hold(store, charge.key_for({}, "o-1"))  # a live claim elsewhere
        outcomes: list[object] = []
        for job_try in (1, 2):  # arq's first try, then its retry of the same job
            try:
                outcomes.append(await checkout({"job_id": "j-1", "job_try": job_try}, "o-1"))
            except (ArqRetry, AlreadyRunning, Halted) as exc:
                outcomes.append(exc)
        await busy.acomplete("charged elsewhere")
        return outcomes

    outcomes = asyncio.run(main())
    # The nested call's busy key is the outer body's failure (arq retries nothing else): it
    # is recorded and replayed (as Halted) by arq's next try, never a Retry that would run the
    # outer body again.
    assert [type(o) for o in outcomes] == [AlreadyRunning, Halted], outcomes
    assert emails == ["o-1"], f"the outer job's side effect ran {len(emails)} times"


def test_huey_a_nested_task_finding_its_key_busy_does_not_rerun_the_outer_side_effect() -> None:
    huey, store = _huey(), MemoryStore()
    emails: list[str] = []

    @huey.task()
    @idempotent_task(key="charge:{order}", store=store, delay=0)
    def charge(order: str) -> str:
        return f"charged {order}"

    @huey.task()
    @idempotent_task(store=store, delay=0)
    def checkout(order: str) -> str:
        emails.append(order)
        result: str = charge.call_local(order)
        return result

    busy = begin(charge.func.key_for("o-1"), store=store)  # another consumer's call runs
    result = huey.enqueue(checkout.s("o-1", id="t-1"))
    huey.execute(huey.dequeue())  # the first run: the nested key is busy
    busy.complete("charged elsewhere")  # type: ignore[union-attr]
    _drain(huey)  # (nothing: no RetryTask for a nested call, and the task has no retries)
    # The nested call's busy key is the outer body's failure, recorded as any other.
    with pytest.raises(Exception, match=r"AlreadyRunning|running"):
        result.get(preserve=True)
    assert emails == ["o-1"], f"the outer task's side effect ran {len(emails)} times"


# --- Dramatiq: the same nested call -----------------------------------------------------------


def test_dramatiq_a_nested_actor_finding_its_key_busy_does_not_rerun_the_outer_side_effect() -> (
    None
):
    from tests.integrations.test_review_queues import _Stub

    stub = _Stub()
    store = MemoryStore()
    emails: list[str] = []
    try:

        @stub.actor(max_retries=20, min_backoff=1, max_backoff=10)
        @idempotent_actor(key="charge:{order}", store=store, delay=0.5)
        def charge(order: str) -> str:
            return f"charged {order}"

        # No retries of its own: an exception Dramatiq retries releases the key (and runs the
        # body again) whatever raised it; the nested call's busy key must not ask for one.
        @stub.actor(max_retries=0)
        @idempotent_actor(key="checkout:{order}", store=store, delay=0.5)
        def checkout(order: str) -> str:
            emails.append(order)
            result: str = charge.fn(order)  # another worker's message is charging it
            return result

        busy = begin(charge.fn.key_for("o-1"), store=store)
        sent = checkout.send("o-1")
        poll(
            lambda: [m for m, s, _ in list(stub.log.ends) if m == sent.message_id],
            "the first delivery to end",
            timeout=30,
        )
        busy.complete("charged elsewhere")  # type: ignore[union-attr]
        ends = stub.ends(sent.message_id)
        assert ends[-1][0] == "failed" and isinstance(ends[-1][1], AlreadyRunning), ends
        assert emails == ["o-1"], f"the outer actor's side effect ran {len(emails)} times"
    finally:
        stub.close()


# --- RQ: the same nested call, where the busy hook RETURNS rq.Retry ------------------------

#: The RQ jobs' store: SimpleWorker runs them in this process.
_RQ_STORE = MemoryStore()


@rq_job(key="charge:{order}", store=_RQ_STORE, interval=0)
def _rq_charge(order: str) -> str:
    return f"charge-id-for-{order}"


@rq_job(key="receipt:{order}", store=_RQ_STORE, interval=0)
def _rq_receipt(order: str) -> str:
    charge_id = _rq_charge(order)  # another worker's job is charging this order
    return f"receipt for {charge_id!r}"


def test_rq_a_nested_job_finding_its_key_busy_does_not_return_a_retry_into_the_body(
    redis_server: RedisServer,
) -> None:
    connection = redis.Redis(unix_socket_path=str(redis_server.socket))
    queue = Queue(f"q-{uuid.uuid4().hex}", connection=connection)
    order = uuid.uuid4().hex
    busy = begin(_rq_charge.key_for(order), store=_RQ_STORE)  # a live claim elsewhere
    try:
        job = queue.enqueue(_rq_receipt, order)
        SimpleWorker([queue], connection=connection).work(burst=True)
        value = job.return_value()
        assert value is None or "Retry" not in str(value), f"the outer job recorded {value!r}"
    finally:
        busy.release()  # type: ignore[union-attr]
        connection.close()


# --- Huey: exceptions Huey raises to say the task did NOT run -------------------------------


@pytest.mark.parametrize("guard", ["lock_task", "rate_limit"])
def test_huey_a_lock_or_rate_limit_above_the_helper_refuses_without_recording(guard: str) -> None:
    # Under idempotent_task a refusal would be the body's failure, recorded (the docs say to put
    # them above): there is no telling it from a lock taken mid-body, after a side effect.
    huey, store = _huey(), MemoryStore()
    reports: list[str] = []
    lock = huey.lock_task("reports")
    limit = huey.rate_limit("reports", limit=1, per=3600, retry=False)

    @huey.task()
    @(lock if guard == "lock_task" else limit)  # one report at a time / one an hour
    @idempotent_task(key="report:{day}", store=store)
    def report(day: str) -> str:
        reports.append(day)
        return f"report {day}"

    if guard == "lock_task":
        # Another report runs: this one is refused by the lock.
        with lock, pytest.raises(Exception, match="unable to acquire lock"):
            _run(huey, report.s("mon", id="t-1"))
    else:
        limit.__enter__()  # another report used up the window
        with pytest.raises(Exception, match="RateLimitExceeded"):
            _run(huey, report.s("mon", id="t-1"))
        huey.storage.flush_all()  # the window ends
    assert reports == []
    assert store.get(report.func.key_for("mon")) is None, "the refusal was recorded"
    # The lock or window is free: the operator enqueues the report again.
    assert _run(huey, report.s("mon", id="t-2")) == "report mon"
    assert reports == ["mon"]


def test_huey_a_task_timeout_landing_in_the_claim_does_not_leave_the_key_processing() -> None:
    from huey.exceptions import TaskTimeout

    class AlarmOnClaim(MemoryStore):
        """SIGALRM's handler raising TaskTimeout right after the claim landed (as when it
        fires while redis-py parses the claim's reply)."""

        armed = True

        def claim(self, entry: Any) -> Any:
            found = super().claim(entry)
            if self.armed:
                self.armed = False
                raise TaskTimeout("timeout (1s)")
            return found

    huey, store = _huey(), AlarmOnClaim()
    runs: list[str] = []

    @huey.task(retries=1, timeout=1)
    @idempotent_task(key="charge:{order}", store=store, delay=0)
    def charge(order: str) -> str:
        runs.append(order)
        return f"charged {order}"

    huey.enqueue(charge.s("o-1", id="t-1"))
    huey.execute(huey.dequeue())  # timed out in the claim
    entry = store.get(charge.func.key_for("o-1"))
    assert entry is None or entry.status != "processing", (
        f"the key is left {entry.status} by a call that never ran its body"
    )


# --- arq: a real worker (in process, burst) --------------------------------------------------


def _settings(redis_server: RedisServer) -> RedisSettings:
    return RedisSettings(unix_socket_path=str(redis_server.socket))


async def _enqueue(settings: RedisSettings, queue: str, function: str, *args: Any) -> str:
    pool = await create_pool(settings, default_queue_name=queue)
    try:
        job = await pool.enqueue_job(function, *args, _job_id=uuid.uuid4().hex)
        assert job is not None
        return job.job_id
    finally:
        await pool.aclose()


def test_arq_a_job_past_its_timeout_is_halted_and_leaves_no_heartbeat(
    redis_server: RedisServer,
) -> None:
    """arq's job timeout cancels the body mid-run: the claim is halted (not left processing),
    its heartbeat stops, and a later job for the key replays Halted without running."""
    store = RedisStore(redis_server.url)
    runs: list[int] = []
    name = f"slow-{uuid.uuid4().hex}"

    @idempotent_job(key="slow:{n}", name=name, store=store)
    async def slow(ctx: dict[str, Any], n: int) -> str:
        runs.append(ctx["job_try"])
        await asyncio.sleep(60)
        return "never"

    settings = _settings(redis_server)
    queue = f"q-{uuid.uuid4().hex}"

    async def main() -> Worker:
        await _enqueue(settings, queue, "slow", 1)
        worker = Worker(
            functions=[func(slow, name="slow", timeout=0.5)],
            redis_settings=settings,
            queue_name=queue,
            burst=True,
            handle_signals=False,
            poll_delay=0.05,
        )
        await worker.async_run()
        await _enqueue(settings, queue, "slow", 1)  # a second job for the key
        second = Worker(
            functions=[func(slow, name="slow", timeout=0.5)],
            redis_settings=settings,
            queue_name=queue,
            burst=True,
            handle_signals=False,
            poll_delay=0.05,
        )
        await second.async_run()
        await worker.close()
        await second.close()
        return second

    try:
        second = asyncio.run(main())
        record = store.get(f"{name}:slow:1")
        assert record is not None and record.record().status is Status.HALTED
        assert runs == [1]
        assert second.jobs_failed == 1 and second.jobs_complete == 0
        assert not [k for _, k in list(heartbeat._claims.values()) if name in k]
    finally:
        store.close()


def test_arq_max_retries_counts_arq_tries_then_fails_with_already_running(
    redis_server: RedisServer,
) -> None:
    """max_retries=2 with arq's max_tries=5: tries 1 and 2 of a busy job are retried, try 3
    fails with AlreadyRunning (not arq's "max retries exceeded")."""
    store = RedisStore(redis_server.url)
    name = f"capped-{uuid.uuid4().hex}"
    tries: list[int] = []

    @idempotent_job(key="k", name=name, store=store, defer=0, max_retries=2)
    async def capped(ctx: dict[str, Any]) -> str:
        return "ran"

    async def spy(ctx: dict[str, Any]) -> str:
        tries.append(ctx["job_try"])
        return await capped(ctx)

    settings = _settings(redis_server)
    queue = f"q-{uuid.uuid4().hex}"

    async def main() -> Any:
        busy = await abegin(f"{name}:k", store=store)
        job_id = await _enqueue(settings, queue, "capped")
        worker = Worker(
            functions=[func(spy, name="capped", max_tries=5)],
            redis_settings=settings,
            queue_name=queue,
            burst=True,
            handle_signals=False,
            poll_delay=0.01,
        )
        await worker.async_run()
        await worker.close()
        from arq.jobs import Job

        pool = await create_pool(settings, default_queue_name=queue)
        try:
            info = await Job(job_id, pool).result_info()
        finally:
            await pool.aclose()
        await busy.arelease()
        return info

    try:
        info = asyncio.run(main())
        assert tries == [1, 2, 3]
        assert info is not None and not info.success
        assert type(info.result).__name__ == "AlreadyRunning", info.result
    finally:
        store.close()


def test_arq_a_job_timed_out_mid_claim_leaves_the_key_free(redis_server: RedisServer) -> None:
    """arq's timeout cancels the job while its claim's answer is on the way (the claim has
    landed): the claim is undone, not left processing, and the next job runs the body."""

    class SlowAnswer(RedisStore):
        armed = True

        async def aclaim(self, entry: Any) -> Any:
            found = await super().aclaim(entry)
            if self.armed:
                self.armed = False
                await asyncio.sleep(60)  # the answer is late: arq's timeout comes first
            return found

    store = SlowAnswer(redis_server.url)
    runs: list[int] = []
    name = f"mid-claim-{uuid.uuid4().hex}"

    @idempotent_job(key="k:{n}", name=name, store=store)
    async def pay(ctx: dict[str, Any], n: int) -> str:
        runs.append(ctx["job_try"])
        return "paid"

    settings = _settings(redis_server)
    queue = f"q-{uuid.uuid4().hex}"

    async def work() -> Worker:
        worker = Worker(
            functions=[func(pay, name="pay", timeout=0.5)],
            redis_settings=settings,
            queue_name=queue,
            burst=True,
            handle_signals=False,
            poll_delay=0.05,
        )
        await worker.async_run()
        await worker.close()
        return worker

    async def main() -> tuple[Worker, Any, Worker]:
        await _enqueue(settings, queue, "pay", 1)
        first = await work()
        left = await store.aget(f"{name}:k:1")
        await _enqueue(settings, queue, "pay", 1)
        return first, left, await work()

    try:
        first, left, second = asyncio.run(main())
        assert first.jobs_failed == 1 and runs == [1]  # only the second job ran the body
        assert left is None, f"the timed-out claim was left {left.status}"
        assert second.jobs_complete == 1
    finally:
        store.close()


def test_arq_keep_result_zero_the_same_job_id_again_replays(redis_server: RedisServer) -> None:
    """keep_result=0: arq keeps no result, so it accepts the same _job_id again at once; the
    body does not run again."""
    store = RedisStore(redis_server.url)
    runs: list[str] = []
    name = f"keep0-{uuid.uuid4().hex}"

    @idempotent_job(name=name, store=store)  # keyed on the job's id
    async def ship(ctx: dict[str, Any], order: str) -> str:
        runs.append(ctx["job_id"])
        return f"shipped {order}"

    settings = _settings(redis_server)
    queue = f"q-{uuid.uuid4().hex}"
    job_id = uuid.uuid4().hex

    async def main() -> int:
        completed = 0
        for _ in range(2):
            pool = await create_pool(settings, default_queue_name=queue)
            try:
                job = await pool.enqueue_job("ship", "o-1", _job_id=job_id)
                assert job is not None, "arq refused the id: its result is kept"
            finally:
                await pool.aclose()
            worker = Worker(
                functions=[func(ship, name="ship", keep_result=0)],
                redis_settings=settings,
                queue_name=queue,
                burst=True,
                handle_signals=False,
                poll_delay=0.05,
            )
            await worker.async_run()
            await worker.close()
            completed += worker.jobs_complete
        return completed

    try:
        assert asyncio.run(main()) == 2
        assert runs == [job_id]
    finally:
        store.close()


# --- arq: the ContextVar carrying ctx ---------------------------------------------------------


def test_arq_gathered_nested_calls_each_keep_the_jobs_ctx_and_leave_none_behind() -> None:
    """asyncio.gather of two idempotent calls inside one job (business keys): both run once,
    a second try of the job replays both, and no ctx is left set for a plain call after."""
    store = MemoryStore()
    runs: list[str] = []

    @idempotent_job(key="item:{item}", store=store)
    async def item(ctx: dict[str, Any], item: str) -> str:
        await asyncio.sleep(0)
        runs.append(item)
        return item.upper()

    @idempotent_job(store=store)
    async def batch(ctx: dict[str, Any], items: list[str]) -> list[str]:
        return list(await asyncio.gather(*(item(ctx, i) for i in items)))

    @idempotent(key="plain", store=store)
    async def plain() -> str:
        from idemfn.arq import _job_ctx

        return repr(_job_ctx.get(None))

    async def main() -> list[object]:
        first = await batch({"job_id": "j-1", "job_try": 1}, ["a", "b"])
        again = await batch({"job_id": "j-2", "job_try": 1}, ["a", "b"])
        return [first, again, await plain()]

    assert asyncio.run(main()) == [["A", "B"], ["A", "B"], "None"]
    assert sorted(runs) == ["a", "b"]


# --- Huey: the frame walk ------------------------------------------------------------------


def test_huey_a_wrapping_decorator_between_task_and_helper_keeps_retries_releasing() -> None:
    """A decorator (functools.wraps) between @huey.task and idempotent_task: the default key
    still finds the task, and Huey's retries still release the key."""
    import functools

    huey, store = _huey(), MemoryStore()
    runs: list[int] = []

    def logged(fn: Any) -> Any:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        return inner

    @huey.task(retries=2)
    @logged
    @idempotent_task(store=store)
    def flaky(order: str) -> str:
        runs.append(1)
        if len(runs) < 3:
            raise ConnectionError("down")
        return f"ok {order}"

    assert _run(huey, flaky.s("o-1", id="t-1")) == "ok o-1"
    assert len(runs) == 3
    assert _run(huey, flaky.s("o-1", id="t-1")) == "ok o-1"  # replayed
    assert len(runs) == 3


def test_huey_a_pre_execute_cancel_runs_nothing_and_claims_nothing() -> None:
    from huey.exceptions import CancelExecution

    huey, store = _huey(), MemoryStore()
    runs: list[str] = []
    cancel = [True]

    @huey.pre_execute()
    def gate(task: Task) -> None:
        if cancel[0]:
            raise CancelExecution(retry=False)

    @huey.task()
    @idempotent_task(store=store)
    def work(order: str) -> str:
        runs.append(order)
        return order

    huey.enqueue(work.s("o-1", id="t-1"))
    _drain(huey)
    assert runs == []
    cancel[0] = False
    assert _run(huey, work.s("o-1", id="t-1")) == "o-1"
    assert runs == ["o-1"]
