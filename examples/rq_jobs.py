"""idemfn with RQ: job functions that run once, however often they are enqueued.

Needs a Redis server (`apt-get install redis-server`, or REDIS_URL) and `pip install
'idemfn[rq]'`. From the repository's root, in two terminals:

    rq worker --with-scheduler --path examples        # the worker (its scheduler runs retries)
    python examples/rq_jobs.py                        # enqueues, prints

The script enqueues the same payment three times, as a producer retrying after a timeout
would. The worker pays once: every job returns the same receipt, and the worker's log shows one
"paying". Run the script again: nothing is paid, the records replay.
"""

from __future__ import annotations

import os
import sys
import time
import uuid

from idemfn.rq import idempotent_job


# Records live in the default store (or IDEMFN_STORE), which every worker on this machine
# shares; use a RedisStore when workers run on several machines.
@idempotent_job(key="pay:{invoice}", name="shop.pay")
def pay(invoice: str, amount_cents: int) -> str:
    print(f"paying {invoice}: {amount_cents} cents")  # the side effect
    return f"receipt {uuid.uuid4().hex[:8]} for {invoice}"


def main() -> None:
    from redis import Redis
    from rq import Queue

    queue = Queue(
        connection=Redis.from_url(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    )
    invoice = sys.argv[1] if len(sys.argv) > 1 else "invoice-1001"
    # By import path: the worker imports rq_jobs.pay (this file run as a script is __main__).
    jobs = [queue.enqueue("rq_jobs.pay", invoice, 2500) for _ in range(3)]
    for job in jobs:
        while not job.is_finished:
            if job.is_failed:
                raise SystemExit(f"job {job.id} failed: {job.latest_result()}")
            time.sleep(0.05)
        print(f"job {job.id}: {job.return_value()}")


if __name__ == "__main__":
    main()
