"""Read by mypy only (``mypy --strict tests/typing``): the wrapper keeps the signature."""

from __future__ import annotations

from typing_extensions import assert_type

from idemfn import MemoryStore, Record, idempotent


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
