"""idemfn with Celery: task bodies that run once, whatever the broker delivers.

Needs a Redis server (`apt-get install redis-server`, or BROKER_URL) and `pip install
'idemfn[celery]'` (which brings Celery's Redis transport). From the repository's root, in two
terminals:

    celery --workdir examples -A celery_app worker --loglevel INFO     # the worker
    python examples/celery_app.py                                       # publishes, prints

The script publishes one message three times with the same task id (as a broker redelivering
it would) and two messages with new ids for the same order (as a producer retrying would). The
worker charges once: every result is the same receipt, and the worker's log shows one
"charging". Run the script again: nothing is charged, the records replay.
"""

from __future__ import annotations

import os
import sys
import uuid

from celery import Celery

from idemfn.celery import idempotent_task

app = Celery(
    "shop",
    broker=os.environ.get("BROKER_URL", "redis://localhost:6379/0"),
    backend=os.environ.get("BROKER_URL", "redis://localhost:6379/0"),
)
app.conf.update(
    task_acks_late=True,  # a task whose worker dies is delivered again...
    task_reject_on_worker_lost=True,  # ...at once, to another worker process
    worker_prefetch_multiplier=1,
)


# Keyed on the order, so a new message for the same order charges once too. Leave key= out to
# key on the task's id instead. Records live in the default store (or IDEMFN_STORE), which every
# worker on this machine shares; use a RedisStore when workers run on several machines.
@app.task(name="shop.charge")
@idempotent_task(key="charge:{order_id}", name="shop.charge")
def charge(order_id: str, amount_cents: int) -> str:
    print(f"charging {order_id}: {amount_cents} cents")  # the side effect
    return f"receipt {uuid.uuid4().hex[:8]} for {order_id}"


def main() -> None:
    order = sys.argv[1] if len(sys.argv) > 1 else "order-1001"
    task_id = f"charge-{order}"
    results = [charge.apply_async((order, 2500), task_id=task_id) for _ in range(3)]
    results += [charge.apply_async((order, 2500)) for _ in range(2)]
    for result in results:
        print(f"task {result.id}: {result.get(timeout=60)}")


if __name__ == "__main__":
    main()
