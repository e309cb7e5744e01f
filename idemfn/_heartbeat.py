"""One heartbeat thread per process renews the leases of every in-flight claim.

A call registers its claim (a dict insert under a lock) and unregisters it when it settles; the
thread, started by the first claim and never once per call, sleeps until the earliest renewal is
due. A call shorter than a third of its lease is never renewed at all. Claims are held weakly: a
claim dropped without being settled (a low-level ``begin`` whose caller gave up) stops being
renewed, so its lease runs out and it is handled as abandoned, instead of blocking its key for
the life of the process.

The renewals themselves run in one lane per store, each store's due claims in turn, on renewal
threads that wait for work when there is none: a second one starts only while every one is busy
(so usually there is one). A renewal that blocks (a store that does not answer, a lock) holds up
only the claims of its own store, never those of the others, nor the heartbeat's schedule
(issue 14).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from typing import Protocol

from ._logs import DROPPED, RENEW_FAILED
from .events import log_fields

__all__ = ["Renewable", "heartbeat"]

logger = logging.getLogger("idemfn")


class Renewable(Protocol):
    renew_at: float  # time.monotonic() when the lease should next be renewed

    @property
    def key(self) -> str: ...

    @property
    def store(self) -> object:
        """Where the lease is renewed: one store's renewals run in turn, stores' side by side."""
        ...

    def renew(self) -> bool:
        """Renew the lease; False once the claim is lost and needs no more renewals."""
        ...


class Heartbeat:
    def __init__(self) -> None:
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # the schedule: the heartbeat thread waits here
        self._work = threading.Condition(lock)  # renewal threads wait here for a lane
        # id(claim) -> (weak reference, key): settled claims are removed, dropped ones lapse.
        self._claims: dict[int, tuple[weakref.ref[Renewable], str]] = {}
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")
        # id(store) -> its claims waiting for renewal, while a renewal thread has (or will
        # take) that lane; _ready: lanes no thread has taken yet. Claims queued or being
        # renewed are in _renewing (the schedule skips them until they are back).
        self._lanes: dict[int, deque[Renewable]] = {}
        self._ready: deque[int] = deque()
        self._renewing: set[int] = set()
        self._idle = 0  # renewal threads waiting for a lane

    def add(self, claim: Renewable) -> None:
        with self._cond:
            self._claims[id(claim)] = (weakref.ref(claim), claim.key)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._schedule, name="idemfn-heartbeat", daemon=True
                )
                self._thread.start()
            elif claim.renew_at < self._wake_at:
                self._cond.notify()

    def discard(self, claim: Renewable) -> None:
        with self._cond:
            self._claims.pop(id(claim), None)

    def __len__(self) -> int:
        return len(self._claims)

    @property
    def thread(self) -> threading.Thread | None:
        """This process's heartbeat thread, once a claim has started it."""
        return self._thread

    def _schedule(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                wake_at = float("inf")
                for ident, (ref, key) in list(self._claims.items()):
                    claim = ref()
                    if claim is None:
                        del self._claims[ident]
                        logger.warning(
                            "idemfn: the claim on %r was dropped without complete() or fail();"
                            " its lease will run out and the key will count as abandoned",
                            key,
                            extra=log_fields(key, DROPPED),
                        )
                    elif ident in self._renewing:
                        pass  # its lane reports back when renewed
                    elif claim.renew_at <= now:
                        self._queue(claim)
                    else:
                        wake_at = min(wake_at, claim.renew_at)
                    del claim
                self._wake_at = wake_at
                self._cond.wait(None if wake_at == float("inf") else wake_at - now)

    def _queue(self, claim: Renewable) -> None:
        """Hand ``claim`` to its store's lane (under the lock); a lane no thread has gets an
        idle renewal thread, or a new one when all are busy."""
        self._renewing.add(id(claim))
        lane = id(claim.store)
        queue = self._lanes.get(lane)
        if queue is not None:
            queue.append(claim)
            return
        self._lanes[lane] = deque([claim])
        self._ready.append(lane)
        if self._idle > len(self._ready) - 1:
            self._work.notify()
        else:
            threading.Thread(target=self._renewals, name="idemfn-renewal", daemon=True).start()

    def _renewals(self) -> None:
        """A renewal thread: take a lane, renew its claims in turn until it is empty; repeat."""
        with self._work:
            while True:
                while not self._ready:
                    self._idle += 1
                    self._work.wait()
                    self._idle -= 1
                lane = self._ready.popleft()
                queue = self._lanes[lane]
                while queue:
                    claim = queue.popleft()
                    self._work.release()  # store I/O happens outside the lock
                    try:
                        keep = claim.renew()
                    except Exception:  # the thread must outlive any one failure
                        logger.exception(
                            "idemfn heartbeat: renewing %r failed",
                            claim,
                            extra=log_fields(claim.key, RENEW_FAILED),
                        )
                        keep = True
                    finally:
                        self._work.acquire()
                    self._renewing.discard(id(claim))
                    if not keep:
                        self._claims.pop(id(claim), None)
                    del claim
                    self._cond.notify()  # its next renewal is due at its new renew_at
                del self._lanes[lane]

    def _reset_after_fork(self) -> None:
        # The child has no heartbeat thread, and its parent's claims are not its own.
        self.__init__()  # type: ignore[misc]


heartbeat = Heartbeat()
os.register_at_fork(after_in_child=heartbeat._reset_after_fork)
