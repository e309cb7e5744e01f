"""Read by mypy only (``mypy --strict tests/typing``): the wrapper keeps the signature."""

from __future__ import annotations

from typing_extensions import assert_type

import idemfn
from idemfn import Event, MemoryStore, Record, Subscription, idempotent


@idempotent(key="charge:{order_id}", store=MemoryStore())
def charge(order_id: str, amount: int) -> float:
    return amount / 100


@idempotent(store=MemoryStore())
async def fetch(url: str) -> bytes:
    return url.encode()


def check() -> None:
    assert_type(charge("o1", 5), float)
    assert_type(charge.key_for("o1", amount=5), str)
    assert_type(charge.status("o1", 5), Record | None)
    assert_type(charge.forget("o1", 5), bool)


def on_event(event: Event) -> None:
    assert_type(event.name, str)
    assert_type(event.duration, float | None)


def check_events() -> None:
    assert_type(charge.subscribe(on_event, events=["replayed"]), Subscription)
    with idemfn.subscribe(on_event) as subscription:
        assert_type(subscription, Subscription)
    charge.subscribe(42)  # type: ignore[arg-type]


async def check_async() -> None:
    assert_type(await fetch("x"), bytes)


def misuse() -> None:
    charge(5, 5)  # type: ignore[arg-type]
    charge("o1")  # type: ignore[call-arg]
    charge.key_for("o1", amount="5")  # type: ignore[arg-type]


class Mailer:
    @idempotent(key="welcome:{user_id}", store=MemoryStore())
    def welcome(self, user_id: int) -> str:
        return f"sent to {user_id}"


def check_methods(m: Mailer) -> None:
    assert_type(m.welcome(7), str)
    assert_type(Mailer.welcome.key_for(m, 7), str)
    m.welcome("7")  # type: ignore[arg-type]
    # On an instance, key_for, status and forget bind self like the call.
    assert_type(m.welcome.key_for(7), str)
    assert_type(m.welcome.status(user_id=7), Record | None)
    assert_type(m.welcome.forget(7), bool)
    m.welcome.key_for("7")  # type: ignore[arg-type]
    m.welcome.key_for(m, 7)  # type: ignore[arg-type, call-arg]


def check_options_are_keyword_only() -> None:
    idempotent("charge:{order_id}")  # type: ignore[call-arg]


# The integrations keep the signature too; an RQ job function may return rq.Retry.
from rq import Retry  # noqa: E402

from idemfn.celery import idempotent_task  # noqa: E402
from idemfn.rq import idempotent_job  # noqa: E402


@idempotent_task(key="refund:{order_id}", store=MemoryStore())
def refund(order_id: str, amount: int) -> int:
    return amount


@idempotent_job(key="ship:{order_id}", store=MemoryStore())
def ship(order_id: str) -> str:
    return order_id


def check_integrations() -> None:
    assert_type(refund("o1", 5), int)
    assert_type(refund.key_for("o1", amount=5), str)
    assert_type(ship("o1"), str | Retry)
    refund("o1", "5")  # type: ignore[arg-type]
    ship(1)  # type: ignore[arg-type]


def cluster_clients() -> None:
    """``RedisStore`` takes a Redis Cluster's clients (issue 19)."""
    import redis.asyncio.cluster
    import redis.cluster

    from idemfn import RedisStore

    assert_type(RedisStore(redis.cluster.RedisCluster(host="h", port=7000)), RedisStore)
    assert_type(RedisStore(redis.asyncio.cluster.RedisCluster(host="h", port=7000)), RedisStore)
    assert_type(RedisStore("redis+cluster://h:7000,h:7001"), RedisStore)


# A Dramatiq actor over idempotent_actor keeps the function's signature (issue 20).
import dramatiq  # noqa: E402
from dramatiq.brokers.stub import StubBroker  # noqa: E402

from idemfn.dramatiq import idempotent_actor, message_id  # noqa: E402


@dramatiq.actor(broker=StubBroker())
@idempotent_actor(key="bill:{order_id}", store=MemoryStore())
def bill(order_id: str, amount: int) -> int:
    return amount


def check_dramatiq() -> None:
    assert_type(bill("o1", 5), int)
    assert_type(bill.send("o1", 5), dramatiq.Message[int])
    assert_type(message_id(), str)
    bill.send("o1", "5")  # type: ignore[arg-type]


# An arq job function keeps its signature, and arq's func() takes it (issue 20).
from arq.worker import func  # noqa: E402

from idemfn.arq import idempotent_job as idempotent_arq_job  # noqa: E402


@idempotent_arq_job(key="pay:{invoice}", store=MemoryStore())
async def pay(ctx: dict[str, object], invoice: str) -> str:
    return invoice


async def check_arq() -> None:
    assert_type(await pay({}, "i1"), str)
    func(pay, max_tries=3)
    await pay({}, 1)  # type: ignore[arg-type]


# idemfn.huey's decorator keeps the function's signature (Huey itself is untyped: a
# TaskWrapper is Any to a type checker) (issue 20).
from idemfn.huey import idempotent_task as huey_task  # noqa: E402
from idemfn.huey import task_id  # noqa: E402


@huey_task(key="pack:{order_id}", store=MemoryStore(), delay=1)
def pack(order_id: str, boxes: int) -> int:
    return boxes


def check_huey() -> None:
    assert_type(pack("o1", 2), int)
    assert_type(pack.key_for("o1", boxes=2), str)
    assert_type(task_id(), str)
    pack("o1", "2")  # type: ignore[arg-type]
    huey_task(delay="5")  # type: ignore[arg-type]
