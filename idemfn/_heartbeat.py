"""One heartbeat thread per process renews the leases of every in-flight claim.

A call registers its claim (a dict insert under a lock) and unregisters it when it settles; the
thread, started by the first claim and never once per call, sleeps until the earliest renewal is
due. A call shorter than a third of its lease is never renewed at all. Claims are held weakly: a
claim dropped without being settled (a low-level ``begin`` whose caller gave up) stops being
renewed, so its lease runs out and it is handled as abandoned, instead of blocking its key for
the life of the process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Protocol

__all__ = ["Renewable", "heartbeat"]

logger = logging.getLogger("idemfn")


class Renewable(Protocol):
    renew_at: float  # time.monotonic() when the lease should next be renewed

    @property
    def key(self) -> str: ...

    def renew(self) -> bool:
        """Renew the lease; False once the claim is lost and needs no more renewals."""
        ...


class Heartbeat:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        # id(claim) -> (weak reference, key): settled claims are removed, dropped ones lapse.
        self._claims: dict[int, tuple[weakref.ref[Renewable], str]] = {}
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")

    def add(self, claim: Renewable) -> None:
        with self._cond:
            self._claims[id(claim)] = (weakref.ref(claim), claim.key)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="idemfn-heartbeat", daemon=True
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

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                live = []
                for ident, (ref, key) in list(self._claims.items()):
                    claim = ref()
                    if claim is None:
                        del self._claims[ident]
                        logger.warning(
                            "idemfn: the claim on %r was dropped without complete() or fail();"
                            " its lease will run out and the key will count as abandoned",
                            key,
                        )
                    else:
                        live.append(claim)
                due = [c for c in live if c.renew_at <= now]
                if not due:
                    self._wake_at = min((c.renew_at for c in live), default=float("inf"))
                    timeout = None if self._wake_at == float("inf") else self._wake_at - now
                    del live
                    self._cond.wait(timeout)
                    continue
                self._wake_at = now
                del live
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
