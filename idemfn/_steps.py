"""Code written once for sync and async callers, as steps (issue 16).

Steps are a generator that yields the operations it needs and gets each one's answer back; it
does no I/O itself. ``run`` executes each operation with a sync function, ``arun`` with an async
one, so the same steps serve both kinds of caller (the sans-I/O shape of stamina's and
tenacity's shared cores). An operation's exception is thrown into the steps, so that their
``try``/``finally`` blocks see it where it happened. The engine's decision table and the settling
of claims are steps of store primitives; a server store's primitive that takes several round
trips is steps of its commands.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

__all__ = ["arun", "run"]

C = TypeVar("C")
Op = TypeVar("Op")
T = TypeVar("T")


def run(steps: Generator[Op, Any, T], execute: Callable[[C, Op], Any], context: C) -> T:
    """Run ``steps`` to their end, each operation as ``execute(context, op)``; return what
    the steps return."""
    try:
        op = steps.send(None)
        while True:
            try:
                answer = execute(context, op)
            except BaseException as exc:
                op = steps.throw(exc)
            else:
                op = steps.send(answer)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def arun(
    steps: Generator[Op, Any, T], execute: Callable[[C, Op], Awaitable[Any]], context: C
) -> T:
    """``run``, each operation as ``await execute(context, op)``."""
    try:
        op = steps.send(None)
        while True:
            try:
                answer = await execute(context, op)
            except BaseException as exc:
                op = steps.throw(exc)
            else:
                op = steps.send(answer)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
