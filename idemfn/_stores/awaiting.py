"""Awaiting store calls without losing a cancellation, and without losing what they did.

Two rules the async paths keep (issue 16, review):

- A caller's cancellation is never swallowed. Before Python 3.12, ``asyncio.wait_for`` returned
  the result when it arrived together with the cancellation (CPython gh-86296): a cancelled
  call then went on to claim its key and run its body. ``within`` is ``wait_for`` without that.
- Some steps must finish once started, whatever the caller: undoing a claim of an interrupted
  call, writing an outcome again, letting a worker thread's call land before it is undone.
  ``to_the_end`` awaits such a step through any number of cancellations, then raises the
  cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["to_the_end", "within"]

T = TypeVar("T")


async def within(
    awaitable: Awaitable[T], seconds: float, dispose: Callable[[T], object] | None = None
) -> T:
    """``asyncio.wait_for(awaitable, seconds)`` that never loses the caller's cancellation.

    Args:
        awaitable: What to wait for; cancelled when time runs out or the caller is cancelled.
        seconds: How long to wait.
        dispose: Called with a result that arrived as the caller was cancelled (a connection
            to close), which the caller will never use.

    Returns:
        What ``awaitable`` gave.

    Raises:
        asyncio.TimeoutError: ``seconds`` ran out first.
        asyncio.CancelledError: The caller was cancelled.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait((task,), timeout=seconds)
    except asyncio.CancelledError:
        arrived = not task.cancel() and not task.cancelled() and task.exception() is None
        if arrived and dispose is not None:
            dispose(task.result())
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()


async def to_the_end(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` to its end even when the caller is cancelled (once or more), then
    raise the caller's cancellation; else return what it gave."""
    task: asyncio.Future[T] = asyncio.ensure_future(awaitable)
    interrupted: BaseException | None = None
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError as exc:
            interrupted = exc
    if interrupted is not None:
        if not task.cancelled() and task.exception() is not None:
            _retrieved(task)
        raise interrupted
    return task.result()


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark ``task``'s exception as seen: the caller's cancellation is raised instead."""
    task.exception()
