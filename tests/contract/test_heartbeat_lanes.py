"""Renewals run in one lane per store (issue 14): a renewal that blocks holds up the claims of
its own store only, never another store's, nor the heartbeat's schedule.

Renewals are awaited as conditions (60 s at most); the blocked store is released by the test."""

from __future__ import annotations

import threading

from idemfn import MemoryStore, Policy, begin
from idemfn._engine import Claim
from idemfn._record import Entry
from tests.support.workers import poll


class _Stuck(MemoryStore):
    """A store whose lease renewals block until the test lets them go on."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.go_on = threading.Event()

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        if entry.status == "processing" and entry.token == token:  # a renewal
            self.entered.set()
            assert self.go_on.wait(120)
        return super().swap(key, token, entry)


def _lease_end(store: MemoryStore, key: str) -> float:
    entry = store.get(key)
    assert entry is not None and entry.lease_until is not None
    return entry.lease_until


def test_a_blocked_renewal_holds_up_only_its_own_stores_claims() -> None:
    stuck, other = _Stuck(), MemoryStore()
    policy = Policy(lease=0.3)  # renewed every 0.1 s; nobody judges these claims
    blocked = begin("blocked", store=stuck, policy=policy)
    alive = begin("alive", store=other, policy=policy)
    assert isinstance(blocked, Claim) and isinstance(alive, Claim)
    try:
        assert stuck.entered.wait(60), "the stuck store's first renewal did not start"
        seen = [_lease_end(other, "alive")]

        def renewed_twice_more() -> bool:
            end = _lease_end(other, "alive")
            if end != seen[-1]:
                seen.append(end)
            return len(seen) >= 3

        poll(renewed_twice_more, "the other store's claim to be renewed while one is stuck")
    finally:
        stuck.go_on.set()
        blocked.release()
        alive.release()
