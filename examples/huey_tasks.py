"""idemfn with Huey: task bodies that run once, however often they are enqueued.

Needs a Redis server (`apt-get install redis-server`, or REDIS_URL) and `pip install
'idemfn[huey]'`. From the repository's root, in two terminals:

    cd examples && huey_consumer huey_tasks.huey -k process     # the consumer
    python examples/huey_tasks.py                              # enqueues, prints

The script enqueues one task twice with the same id (as a SIGNAL_INTERRUPTED handler or an
operator re-enqueueing it would) and once more with a new id for the same invoice (as a
producer retrying after a timeout would). The consumer pays once: every task returns the same
receipt, and the consumer's log shows one "paying". Run the script again: nothing is paid, the
records replay.
"""

from __future__ import annotations

import os
import sys
import uuid

from huey import RedisHuey

from idemfn.huey import idempotent_task

huey = RedisHuey("shop", url=os.environ.get("REDIS_URL", "redis://localhost:6379/0"))


# Records live in the default store (or IDEMFN_STORE), which every worker on this machine
# shares; use a RedisStore when consumers run on several machines.
@huey.task(retries=3, retry_delay=5)
@idempotent_task(key="pay:{invoice}", name="shop.pay", delay=1)
def pay(invoice: str, amount_cents: int) -> str:
    print(f"paying {invoice}: {amount_cents} cents", flush=True)  # the side effect
    return f"receipt {uuid.uuid4().hex[:8]} for {invoice}"


def main() -> None:
    # The consumer imports this file as huey_tasks: enqueue its tasks (run as a script, this
    # module is __main__, whose task names the consumer does not know).
    import huey_tasks

    invoice = sys.argv[1] if len(sys.argv) > 1 else "invoice-1001"
    task = huey_tasks.pay.s(invoice, 2500)
    results = [
        huey_tasks.huey.enqueue(task),
        huey_tasks.huey.enqueue(huey_tasks.pay.s(invoice, 2500, id=task.id)),  # the same id
        huey_tasks.pay(invoice, 2500),  # a new id, the same invoice
    ]
    for result in results:
        print(f"task {result.id}: {result(blocking=True, timeout=60, preserve=True)}")


if __name__ == "__main__":
    main()
