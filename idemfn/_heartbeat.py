"""One heartbeat thread per process renews the leases of every in-flight claim.

A call registers its claim (a dict insert under a lock) and unregisters it when it settles; the
thread, started by the first claim and never once per call, sleeps until the earliest renewal is
due. A call shorter than a third of its lease is never renewed at all.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Protocol

__all__ = ["Renewable", "heartbeat"]

logger = logging.getLogger("idemfn")


class Renewable(Protocol):
    renew_at: float  # time.monotonic() when the lease should next be renewed

    def renew(self) -> bool:
        """Renew the lease; False once the claim is lost and needs no more renewals."""
        ...


class Heartbeat:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._claims: dict[Renewable, None] = {}  # an insertion-ordered set
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")

    def add(self, claim: Renewable) -> None:
        with self._cond:
            self._claims[claim] = None
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="idemfn-heartbeat", daemon=True
                )
                self._thread.start()
            elif claim.renew_at < self._wake_at:
                self._cond.notify()

    def discard(self, claim: Renewable) -> None:
        with self._cond:
            self._claims.pop(claim, None)

    def __len__(self) -> int:
        return len(self._claims)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [c for c in self._claims if c.renew_at <= now]
                if not due:
                    self._wake_at = min((c.renew_at for c in self._claims), default=float("inf"))
                    timeout = None if self._wake_at == float("inf") else self._wake_at - now
                    self._cond.wait(timeout)
                    continue
                self._wake_at = now
            for claim in due:  # store I/O happens outside the lock
                try:
                    keep = claim.renew()
                except Exception:  # the thread must outlive any one failure
                    logger.exception("idemfn heartbeat: renewing %r failed", claim)
                    keep = True
                if not keep:
                    self.discard(claim)

    def _reset_after_fork(self) -> None:
        # The child has no heartbeat thread, and its parent's claims are not its own.
        self.__init__()  # type: ignore[misc]


heartbeat = Heartbeat()
os.register_at_fork(after_in_child=heartbeat._reset_after_fork)
