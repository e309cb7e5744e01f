"""One heartbeat thread per process keeps live claims' leases fresh.

The heartbeat renews on the real clock; the tests wait for renewals as conditions (60 s at
most), never for a time that "should be enough". Whether a caller may take a claim over is
judged on a lease clock the test moves itself.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from idemfn import (
    AlreadyRunning,
    Claim,
    DiskStore,
    MemoryStore,
    Policy,
    Status,
    StoreError,
    _lease,
    begin,
    idempotent,
)
from idemfn._heartbeat import heartbeat
from idemfn._record import Entry
from tests.support.forks import fork_and_wait
from tests.support.workers import poll


def _heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "idemfn-heartbeat"]


def test_many_calls_start_at_most_one_thread() -> None:
    store = MemoryStore()

    @idempotent(key="k:{i}", store=store)
    def fn(i: int) -> int:
        return i

    fn(-1)
    before = threading.active_count()
    for i in range(2000):
        fn(i)
        fn(i)
    assert threading.active_count() == before
    assert len(_heartbeat_threads()) == 1
    assert len(heartbeat) == 0  # every settled claim unregistered


def test_lease_is_renewed_while_the_body_runs() -> None:
    store = MemoryStore()
    leases: list[float] = []

    @idempotent(key="k", store=store, lease=0.3)
    def slow() -> str:
        def renewed_twice() -> bool:
            entry = store.get(slow.key_for())
            assert entry is not None and entry.status == "processing"
            assert entry.lease_until is not None
            if not leases or entry.lease_until != leases[-1]:
                leases.append(entry.lease_until)
            return len(leases) >= 3

        poll(renewed_twice, "the lease to be renewed twice", timeout=60)
        return "done"

    assert slow() == "done"
    assert leases == sorted(leases)  # each renewal moved the lease forward
    record = slow.status()
    assert record is not None and record.status is Status.OK


def test_another_caller_never_takes_a_renewed_claim_over(monkeypatch: pytest.MonkeyPatch) -> None:
    # This machine's leases are timed on the lease clock, here one that only the test moves: a
    # caller takes the claim over if and only if the renewals left its lease behind the clock.
    lease = 0.3
    now = [1000.0]
    monkeypatch.setattr(_lease, "clock", lambda: now[0])
    store = MemoryStore()
    started, release = threading.Event(), threading.Event()
    results: list[object] = []

    @idempotent(key="k", store=store, lease=lease, on_abandoned="retry")
    def slow() -> str:
        started.set()
        assert release.wait(60)
        return "owner"

    def lease_end() -> float:
        entry = store.get(slow.key_for())
        assert entry is not None and entry.status == "processing"
        assert entry.lease_mono is not None
        return entry.lease_mono

    owner = threading.Thread(target=lambda: results.append(slow()))
    owner.start()
    try:
        assert started.wait(60)
        for _ in range(3):
            ends_at = lease_end()
            now[0] = ends_at - lease / 3  # the lease is two thirds through
            poll(lambda: lease_end() == now[0] + lease, "the heartbeat to renew", timeout=60)
            now[0] = ends_at + lease / 3  # past where the lease ended before its renewal
            with pytest.raises(AlreadyRunning):
                slow()
    finally:
        release.set()
        owner.join(60)
    assert results == ["owner"]
    assert slow() == "owner"


def test_short_calls_are_never_renewed() -> None:
    swaps = []

    class Counting(MemoryStore):
        def swap(self, key: str, token: str, entry: object) -> bool:  # type: ignore[override]
            swaps.append(key)
            return super().swap(key, token, entry)  # type: ignore[arg-type]

    counting = Counting()

    @idempotent(key="k:{i}", store=counting)
    def fn(i: int) -> int:
        return i

    for i in range(200):
        fn(i)
    assert len(swaps) == 200  # exactly one write (the completion) per first call


def test_a_dropped_claim_is_not_renewed_forever(caplog: object) -> None:
    import gc

    import pytest

    import idemfn

    store = MemoryStore()
    claim = idemfn.begin("dropped", store=store, policy=idemfn.Policy(lease=0.3))
    assert isinstance(claim, idemfn.Claim)
    del claim  # the caller gave up without complete() or fail()
    gc.collect()

    def halted() -> idemfn.Finished | None:
        try:
            outcome = idemfn.begin("dropped", store=store)
        except idemfn.AlreadyRunning:
            return None  # its lease has not run out yet
        assert isinstance(outcome, idemfn.Finished)
        return outcome

    # Halted once its lease runs out, 0.3 s after the claim (within 60 s, or it was renewed).
    finished = poll(halted, "the dropped claim's lease to run out", timeout=60)
    with pytest.raises(idemfn.Halted, match="lease"):
        finished.replay()
    assert "dropped without complete()" in caplog.text  # type: ignore[attr-defined]


def test_a_failing_renewal_is_retried_and_logged(caplog: object) -> None:
    import idemfn

    class Flaky(MemoryStore):
        failures = 2
        renewed = 0  # renewals that succeeded after the failures

        def swap(self, key: str, token: str, entry: object) -> bool:  # type: ignore[override]
            if entry.status == "processing":  # type: ignore[attr-defined]
                if Flaky.failures > 0:
                    Flaky.failures -= 1
                    raise self.error("update", key, "disk full")
                Flaky.renewed += 1
            return super().swap(key, token, entry)  # type: ignore[arg-type]

    store = Flaky()

    @idempotent(key="k", store=store, lease=0.3)
    def slow() -> str:
        poll(lambda: Flaky.renewed, "two failed renewals, then one that works", timeout=60)
        return "done"

    assert slow() == "done"
    assert Flaky.failures == 0  # both failures happened, and renewal went on
    assert "could not renew the lease" in caplog.text  # type: ignore[attr-defined]
    record = slow.status()
    assert record is not None and record.status is idemfn.Status.OK


def test_a_claim_taken_over_while_running_is_noticed_by_the_heartbeat(caplog: object) -> None:
    import pytest

    import idemfn

    store = MemoryStore()

    @idempotent(key="k", store=store, lease=0.3)
    def body() -> str:
        key = body.key_for()
        entry = store.get(key)
        assert entry is not None
        assert store.swap(key, entry.token, entry._replace(token="someone-else"))
        # The heartbeat tries to renew (0.1 s into the call), and finds the claim gone.
        poll(
            lambda: "taken over or halted while its body ran" in caplog.text,  # type: ignore[attr-defined]
            "the heartbeat to notice",
            timeout=60,
        )
        return "late"

    with pytest.raises(idemfn.OwnershipLost):
        body()
    assert "taken over or halted while its body ran" in caplog.text  # type: ignore[attr-defined]


# Leases are renewed well before they run out (a third of the way), not at the last moment.
# What is checked is the schedule the heartbeat follows, not how punctual this machine keeps it.
def test_a_running_claims_lease_is_renewed_a_third_of_the_way_through() -> None:
    store = MemoryStore()
    lease = 300.0  # no renewal of the heartbeat's own comes between these steps
    before = time.monotonic()
    claim = begin("k", store=store, policy=Policy(lease=lease))
    after = time.monotonic()
    assert isinstance(claim, Claim)
    try:
        assert before + lease / 3 <= claim.renew_at <= after + lease / 3
        first = store.get("k")
        assert first is not None and first.lease_until is not None
        before = time.monotonic()
        assert claim.renew()
        after = time.monotonic()
        assert before + lease / 3 <= claim.renew_at <= after + lease / 3
        renewed = store.get("k")
        assert renewed is not None and renewed.lease_until is not None
        assert renewed.lease_until >= first.lease_until
        assert renewed.lease_until - store.time() > lease - 60  # a whole lease from now
    finally:
        claim.release()


class _FailsOnce(MemoryStore):
    """Its first renewal of a lease fails with a store error."""

    failed = 0

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        if entry.status == "processing" and not self.failed:
            self.failed += 1
            raise StoreError("transient", key=key)
        return super().swap(key, token, entry)


# A store error while renewing is retried; the lease keeps being renewed afterwards
def test_a_failed_renewal_is_retried() -> None:
    store = _FailsOnce()
    leases: set[float] = set()

    @idempotent(key="k", store=store, lease=0.3, name="t.flaky")
    def slow() -> str:
        # Until the renewal failed, and two more renewals came after it (60 s at most).
        give_up = time.monotonic() + 60
        while not (store.failed == 1 and len(leases) >= 3):
            assert time.monotonic() < give_up, f"failed {store.failed}, leases {leases}"
            entry = store.get(slow.key_for())
            assert entry is not None and entry.lease_until is not None
            if store.failed:
                leases.add(entry.lease_until)
            time.sleep(0.01)
        return "done"

    assert slow() == "done"
    assert store.failed == 1 and len(leases) >= 3


def test_a_failed_renewal_is_retried_soon_not_a_third_of_a_lease_later() -> None:
    store = _FailsOnce()
    lease = 300.0
    claim = begin("k", store=store, policy=Policy(lease=lease))
    assert isinstance(claim, Claim)
    try:
        before = store.get("k")
        assert claim.renew()  # failed, logged: the claim is still held
        assert store.failed == 1 and store.get("k") == before
        assert claim.renew_at <= time.monotonic() + min(1.0, lease / 10)
        assert claim.renew()  # and the retry renews
        renewed = store.get("k")
        assert renewed is not None and before is not None and renewed != before
    finally:
        claim.release()


# A forked child renews its own claims' leases (its heartbeat is its own)
def test_forked_child_renews_its_leases(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "s")
    fn = idempotent(key="k:{i}", store=store, lease=0.3, name="t.forkbeat")(lambda i: i)
    fn(0)  # the parent's heartbeat thread is running now
    assert heartbeat.thread is not None and heartbeat.thread.is_alive()

    def child() -> int:
        leases: set[float] = set()

        @idempotent(key="slow", store=store, lease=0.3, name="t.forkbeat.slow")
        def slow() -> None:
            give_up = time.monotonic() + 60  # until renewed twice (every 0.1 s, unless stuck)
            while len(leases) < 3 and time.monotonic() < give_up:
                entry = store.get(slow.key_for())
                assert entry is not None and entry.lease_until is not None
                leases.add(entry.lease_until)
                time.sleep(0.01)

        slow()
        return 0 if len(leases) >= 3 else 1

    assert fork_and_wait(child) == 0
