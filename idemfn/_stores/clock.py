"""The clock of a store shared by machines: the server's, without a round trip per reading.

The server's time is read when the store is first used and then every ``RESYNC`` seconds, and
advanced in between with this process's monotonic clock: a client whose wall clock is skewed,
or jumps, reads the server's time all the same.

A store whose server may change under it (a failover to a standby, another machine with its own
clock) calls ``forget()`` when it may have: the next reading is the new server's (issue 19).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Awaitable, Callable

__all__ = ["RESYNC", "ServerClock"]

RESYNC = 30.0  # seconds between reads of the server's clock


class ServerClock:
    """``now()`` is the server's time in UNIX seconds. ``read(first)`` reads the server's clock
    (one round trip; ``first`` on the first read, which may do other first-use work)."""

    def __init__(self, read: Callable[[bool], float]) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._synced: tuple[float, float] | None = None  # (server seconds, monotonic) at a read

    def now(self) -> float:
        """The server's time, in UNIX seconds: read again when the last reading is older
        than ``RESYNC`` seconds, else advanced with this process's monotonic clock."""
        synced = self._synced
        mono = time.monotonic()
        if synced is None or mono - synced[1] > RESYNC:
            synced = self._sync()
        return synced[0] + (time.monotonic() - synced[1])

    def cached(self) -> float | None:
        """The server's time from the last reading, or None when a reading is due (async
        callers then read it with ``anow``, without blocking their loop)."""
        synced = self._synced
        if synced is None:
            return None
        mono = time.monotonic()
        if mono - synced[1] > RESYNC:
            return None
        return synced[0] + (mono - synced[1])

    async def anow(self, read: Callable[[bool], Awaitable[float]]) -> float:
        """``now()`` for async callers: ``read(first)`` reads the server's clock when a reading
        is due. Two tasks that both find it due both read it; the later reading is kept."""
        now = self.cached()
        if now is not None:
            return now
        before = time.monotonic()
        server = await read(self._synced is None)
        after = time.monotonic()
        self._synced = synced = (server, (before + after) / 2)
        return synced[0] + (time.monotonic() - synced[1])

    def forget(self) -> None:
        """Read the server's clock again at the next ``now()``/``anow()``: the store may reach
        another server from now on (a connection was lost, or a new one made), whose clock is
        not the last one read. Not a first reading: ``read`` gets ``first`` False."""
        synced = self._synced
        if synced is not None:
            # Stamped long ago rather than dropped: the readings' one test (its age) sees it due.
            self._synced = (synced[0], -math.inf)

    def _sync(self) -> tuple[float, float]:
        if self._pid != os.getpid():
            # A child forked while another thread read the server's clock inherits the lock
            # held, and no thread of its own will ever release it.
            self._lock, self._pid = threading.Lock(), os.getpid()
        with self._lock:
            before = time.monotonic()
            server = self._read(self._synced is None)
            after = time.monotonic()
            # The server read its clock somewhere in the round trip: assume the middle.
            self._synced = (server, (before + after) / 2)
            return self._synced
