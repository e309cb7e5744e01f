"""idemfn with Dramatiq: an actor that runs once, however often its work is sent.

Needs a Redis server (`apt-get install redis-server`, or REDIS_URL) and `pip install
'idemfn[dramatiq]'`. From the repository's root, in two terminals:

    dramatiq dramatiq_actors --path examples --processes 1     # the worker
    python examples/dramatiq_actors.py                         # sends, prints

The script sends the same payment three times, as a producer retrying after a timeout would.
The worker pays once: every message gets the same receipt, and the worker's log shows one
"paying". Run the script again: nothing is paid, the records replay.
"""

from __future__ import annotations

import os
import sys
import uuid

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from idemfn.dramatiq import idempotent_actor

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

broker = RedisBroker(url=REDIS_URL)
broker.add_middleware(CurrentMessage())  # how a body reaches its message's id (the default key)
# Results, so that the script sees the receipts. A blocking get_result waits on the socket:
# no read timeout (redis-py 8 times reads out after 5 s by default).
results = RedisBackend(client=redis.Redis.from_url(REDIS_URL, socket_timeout=None))
broker.add_middleware(Results(backend=results))
dramatiq.set_broker(broker)


# Records live in the default store (or IDEMFN_STORE), which every worker on this machine
# shares; use a RedisStore when workers run on several machines.
@dramatiq.actor(store_results=True, max_retries=3)
@idempotent_actor(key="pay:{invoice}", name="shop.pay", delay=1)  # busy: retried in 1 s
def pay(invoice: str, amount_cents: int) -> str:
    print(f"paying {invoice}: {amount_cents} cents", flush=True)  # the side effect
    return f"receipt {uuid.uuid4().hex[:8]} for {invoice}"


def main() -> None:
    invoice = sys.argv[1] if len(sys.argv) > 1 else "invoice-1001"
    messages = [pay.send(invoice, 2500) for _ in range(3)]  # three messages, three ids
    for message in messages:
        print(f"message {message.message_id}: {message.get_result(block=True, timeout=60_000)}")


if __name__ == "__main__":
    main()
