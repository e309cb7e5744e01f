"""Waking a caller that waits for a busy key as soon as the key's owner settles it.

A caller that finds a live owner (``wait=``) watches the key, looks once more (a settle that
came before the watch began is seen then), and waits on its watch between looks instead of
only sleeping: ``wait(seconds)`` returns as soon as the key may have settled, or after
``seconds``. Looking again is always what decides; a watch only says when to look, so a
wake-up that is missed or spurious can delay a waiter, never mislead it.

``Store.watch`` and ``Store.awatch`` give a store's watch. The defaults here hear the claims of
this process (the engine calls ``settled(key)`` after each of its settling writes); a server
store overrides them with what its server tells every machine (Redis pub/sub, PostgreSQL
``LISTEN``), and ``hears_others`` says so. Waiters on a watch that does not hear other
processes poll faster while the owner runs on this machine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

__all__ = ["AsyncWatch", "LocalAsyncWatch", "LocalWatch", "Watch", "settled"]

_lock = threading.Lock()
# key -> the wake-up callbacks of this process's watches on it
_watchers: dict[str, set[Callable[[], None]]] = {}


def settled(key: str) -> None:
    """A claim of this process on ``key`` was settled (or a stale one halted): wake its
    watchers. Costs one dict check when nobody watches, as on every first call."""
    if not _watchers:
        return
    with _lock:
        wakes = list(_watchers.get(key, ()))
    for wake in wakes:
        wake()


def _add(key: str, wake: Callable[[], None]) -> None:
    with _lock:
        _watchers.setdefault(key, set()).add(wake)


def _remove(key: str, wake: Callable[[], None]) -> None:
    with _lock:
        wakes = _watchers.get(key)
        if wakes is not None:
            wakes.discard(wake)
            if not wakes:
                del _watchers[key]


class Watch:
    """A sync waiter's watch on one key (a context manager): ``wait(seconds)`` returns when the
    key may have settled, or after ``seconds``. This base only sleeps (polling).

    Attributes:
        hears_others: Whether settles by other processes (and machines) wake this watch, not
            only this process's. When False, the engine looks again every 10 ms while the
            owner is another process of this machine.
    """

    hears_others: bool = False

    def wait(self, seconds: float) -> None:
        """Block until the key may have settled, or for ``seconds``."""
        import time

        time.sleep(seconds)

    def close(self) -> None:
        """Stop watching (the context manager's exit calls it)."""

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncWatch:
    """An async waiter's watch on one key (an async context manager): ``await wait(seconds)``
    returns when the key may have settled, or after ``seconds``, never blocking the event loop.
    This base only sleeps (polling).

    Attributes:
        hears_others: As ``Watch.hears_others``.
    """

    hears_others: bool = False

    async def wait(self, seconds: float) -> None:
        """Wait until the key may have settled, or for ``seconds``."""
        import asyncio

        await asyncio.sleep(seconds)

    async def aclose(self) -> None:
        """Stop watching (the context manager's exit awaits it)."""

    async def __aenter__(self) -> AsyncWatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class LocalWatch(Watch):
    """Woken by this process's settles of the key (the default ``Store.watch``)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._event = threading.Event()
        _add(key, self._event.set)

    def wait(self, seconds: float) -> None:
        self._event.wait(seconds)
        self._event.clear()

    def close(self) -> None:
        _remove(self.key, self._event.set)


class LocalAsyncWatch(AsyncWatch):
    """Woken by this process's settles of the key, from any thread or event loop (the default
    ``Store.awatch``)."""

    def __init__(self, key: str) -> None:
        import asyncio

        self.key = key
        self._loop = asyncio.get_running_loop()
        self._woken = False
        self._waiting: asyncio.Future[None] | None = None
        _add(key, self._wake_threadsafe)

    def _wake_threadsafe(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # its loop is closed: nobody waits any more
            pass

    def _wake(self) -> None:
        self._woken = True
        waiting = self._waiting
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    async def wait(self, seconds: float) -> None:
        if not self._woken:
            self._waiting = self._loop.create_future()
            handle = self._loop.call_later(seconds, _resolve, self._waiting)
            try:
                await self._waiting
            finally:
                handle.cancel()
                self._waiting = None
        self._woken = False

    async def aclose(self) -> None:
        _remove(self.key, self._wake_threadsafe)


def _resolve(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)
