"""idemfn with arq: job functions that run once, however often they are enqueued.

Needs a Redis server (`apt-get install redis-server`, or REDIS_URL) and `pip install
'idemfn[arq]'`. From the repository's root, in two terminals:

    cd examples && arq arq_jobs.WorkerSettings      # the worker
    python examples/arq_jobs.py                     # enqueues, prints

The script enqueues the same payment three times, as a producer retrying after a timeout
would. The worker pays once: every job returns the same receipt, and the worker's log shows one
"paying". Run the script again: nothing is paid, the records replay.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from typing import Any, ClassVar

from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Function, func

from idemfn.arq import idempotent_job

REDIS = RedisSettings.from_dsn(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))


# Records live in the default store (or IDEMFN_STORE), which every worker on this machine
# shares; use a RedisStore when workers run on several machines.
@idempotent_job(key="pay:{invoice}", name="shop.pay")
async def pay(ctx: dict[str, Any], invoice: str, amount_cents: int) -> str:
    print(f"paying {invoice}: {amount_cents} cents")  # the side effect
    return f"receipt {uuid.uuid4().hex[:8]} for {invoice}"


class WorkerSettings:
    """What `arq arq_jobs.WorkerSettings` runs."""

    functions: ClassVar[list[Function]] = [func(pay, max_tries=10)]
    redis_settings = REDIS


async def main() -> None:
    pool = await create_pool(REDIS)
    invoice = sys.argv[1] if len(sys.argv) > 1 else "invoice-1001"
    jobs = [await pool.enqueue_job("pay", invoice, 2500) for _ in range(3)]
    for job in jobs:
        assert job is not None  # (None: a job with this id is already queued)
        print(f"job {job.job_id}: {await job.result(timeout=60)}")
    await pool.aclose()


if __name__ == "__main__":
    asyncio.run(main())
