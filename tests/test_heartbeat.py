"""One heartbeat thread per process keeps live claims' leases fresh."""

from __future__ import annotations

import threading
import time

import pytest

from idemfn import AlreadyRunning, MemoryStore, Status, idempotent
from idemfn._heartbeat import heartbeat


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
        for _ in range(8):
            time.sleep(0.1)
            entry = store.get(slow.key_for())
            assert entry is not None and entry.status == "processing"
            assert entry.lease_until is not None
            leases.append(entry.lease_until)
        return "done"

    assert slow() == "done"
    # Run for ~0.8 s, well past the 0.3 s lease: the lease moved forward and never ran out.
    assert len(set(leases)) >= 3
    record = slow.status()
    assert record is not None and record.status is Status.OK


def test_another_caller_never_takes_a_renewed_claim_over() -> None:
    store = MemoryStore()
    started = threading.Event()
    results: list[object] = []

    @idempotent(key="k", store=store, lease=0.3, on_abandoned="retry")
    def slow() -> str:
        started.set()
        time.sleep(1.0)
        return "owner"

    owner = threading.Thread(target=lambda: results.append(slow()))
    owner.start()
    assert started.wait(5)
    # Callers keep coming past the lease: the heartbeat renewed it, so none may take over.
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:
        with pytest.raises(AlreadyRunning):
            slow()
        time.sleep(0.05)
    owner.join(5)
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
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entry = store.get("dropped")
        assert entry is not None and entry.lease_until is not None
        if entry.lease_until < store.time():
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the dropped claim's lease kept being renewed")
    with pytest.raises(idemfn.Halted, match="lease"):
        idemfn.begin("dropped", store=store).replay()  # type: ignore[union-attr]
    assert "dropped without complete()" in caplog.text  # type: ignore[attr-defined]


def test_a_failing_renewal_is_retried_and_logged(caplog: object) -> None:
    import idemfn

    class Flaky(MemoryStore):
        failures = 2

        def swap(self, key: str, token: str, entry: object) -> bool:  # type: ignore[override]
            if entry.status == "processing" and Flaky.failures > 0:  # type: ignore[attr-defined]
                Flaky.failures -= 1
                raise self.error("update", key, "disk full")
            return super().swap(key, token, entry)  # type: ignore[arg-type]

    store = Flaky()

    @idempotent(key="k", store=store, lease=0.3)
    def slow() -> str:
        time.sleep(0.6)
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
        time.sleep(0.4)  # the heartbeat tries to renew, and finds the claim gone
        return "late"

    with pytest.raises(idemfn.OwnershipLost):
        body()
    assert "taken over or halted while its body ran" in caplog.text  # type: ignore[attr-defined]
