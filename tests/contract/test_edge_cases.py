"""Edge cases found by a mutation review of the suite (2026-11-22): each test here failed on at
least one deliberately broken copy of idemfn that every other test let pass."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from idemfn import (
    AlreadyRunning,
    Claim,
    DeadlineExceeded,
    DiskStore,
    Finished,
    Halted,
    MemoryStore,
    Policy,
    Status,
    Store,
    StoreError,
    _owner,
    begin,
    idempotent,
)
from idemfn._heartbeat import heartbeat
from idemfn._record import Entry
from tests.support.stores import Make, StoreClock

from .test_calls import Transient, _foreign_entry
from .test_stores import finished, processing


class SubTransient(Transient):
    pass


# E06: retry_on is isinstance-based
def test_retry_on_releases_subclasses_too(make: Make) -> None:
    runs: list[int] = []

    def body(x: int) -> str:
        runs.append(x)
        if len(runs) == 1:
            raise SubTransient("again")
        return "done"

    fn = make(body, key="k:{x}", retry_on=Transient)
    with pytest.raises(SubTransient):
        fn(1)
    assert fn.status(1) is None
    assert fn(1) == "done"
    assert runs == [1, 1]


# E20: losing the race to halt an abandoned claim replays the halt, not AlreadyRunning
def test_losing_the_race_to_halt_an_abandoned_claim_replays_the_halt() -> None:
    class Raced(MemoryStore):
        """The first swap loses to a rival that wrote the same transition first."""

        raced = False

        def swap(self, key: str, token: str, entry: Entry) -> bool:
            if not self.raced:
                self.raced = True
                assert super().swap(key, token, entry._replace(reason="abandoned: by a rival"))
            return super().swap(key, token, entry)

    store = Raced()
    fn = idempotent(key="k:{x}", store=store, fingerprint=False, name="t.raced")(lambda x: x)
    store.claim(_foreign_entry(fn.key_for(1), "", lease_until=time.time() - 60))
    with pytest.raises(Halted, match="rival"):
        fn(1)


# E22: CancelledError is a BaseException: recorded halted, replayed as Halted
def test_cancelled_async_call_is_recorded_halted_and_replayed_as_halted(store: Store) -> None:
    runs: list[int] = []

    @idempotent(key="k:{x}", store=store, name="t.cancel")
    async def fn(x: int) -> None:
        runs.append(x)
        await asyncio.sleep(30)

    async def main() -> None:
        task = asyncio.create_task(fn(1))
        while not runs:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    record = fn.status(1)
    assert record is not None and record.status is Status.HALTED
    assert record.exc_type is not None and "CancelledError" in record.exc_type
    with pytest.raises(Halted, match="CancelledError"):
        asyncio.run(fn(1))
    assert runs == [1]


# E23 / D02: an async caller waiting for a busy key must not block the event loop
def test_async_wait_does_not_block_the_event_loop(store: Store) -> None:
    runs: list[int] = []

    # A waiter that blocked the loop would never let the owner finish: it would give up after
    # its wait= (60 s, far past any slow machine) with AlreadyRunning.
    @idempotent(key="k:{x}", store=store, wait=60, name="t.await")
    async def fn(x: int) -> str:
        runs.append(x)
        await asyncio.sleep(0.2)  # needs the loop: a blocked loop never finishes it
        return f"v{x}"

    async def main() -> tuple[str, str, float]:
        owner = asyncio.create_task(fn(1))
        while not runs:
            await asyncio.sleep(0.001)
        t0 = time.monotonic()
        replayed = await fn(1)
        return await owner, replayed, time.monotonic() - t0

    first, replayed, took = asyncio.run(main())
    assert first == replayed == "v1"
    assert runs == [1]
    assert took < 30  # replayed when the owner finished, not when the wait ran out


# E24: the replay note says which key and when
def test_replay_note_names_the_key_and_the_time(make: Make) -> None:
    def body(x: int) -> None:
        raise ValueError("bad")

    fn = make(body, key="k:{x}")
    with pytest.raises(ValueError):
        fn(1)
    with pytest.raises(ValueError) as info:
        fn(1)
    record = fn.status(1)
    assert record is not None and record.finished_at is not None
    (note,) = info.value.__notes__
    assert fn.key_for(1) in note
    assert record.finished_at.isoformat(timespec="seconds") in note


# S18: prune removes only the entry it looked at (fenced on its token)
def test_prune_leaves_a_record_claimed_again_since_it_looked(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = finished("k", "old")._replace(expires_at=time.time() - 60)  # what prune's scan saw
    assert store.claim(processing("k", "new")) is None  # then the key was claimed again
    monkeypatch.setattr(store, "scan", lambda prefix="", corrupt=None: iter([stale]))
    store.prune()
    entry = store.get("k")
    assert entry is not None and entry.token == "new"


# K01: defaults applied on the slow binder path (*args/**kwargs signatures)
def test_defaults_are_applied_for_signatures_with_var_arguments(make: Make) -> None:
    def body(a: int, b: int = 2, *rest: int, **extra: int) -> int:
        return a + b

    fn = make(body, key="k:{a}:{b}")
    assert fn.key_for(1) == fn.key_for(1, 2) == fn.key_for(1, b=2)
    assert fn(1) == 3
    assert fn(1, b=2) == 3  # same fingerprint: a replay, not a mismatch


# K12: memoiser mode keys on ALL arguments whatever fingerprint= says
@pytest.mark.parametrize("fingerprint", [False, ["x"]])
def test_memoiser_mode_keys_on_all_arguments_whatever_the_fingerprint(
    make: Make, fingerprint: object
) -> None:
    runs: list[tuple[int, int]] = []

    def body(x: int, y: int = 0) -> int:
        runs.append((x, y))
        return x * 10 + y

    fn = make(body, fingerprint=fingerprint)
    assert fn(1, 1) == 11
    assert fn(2, 1) == 21
    assert fn(1, 2) == 12
    assert fn(1, 1) == 11
    assert runs == [(1, 1), (2, 1), (1, 2)]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# O01 (deterministic; today only the hypothesis machine can find it): a recycled pid is dead
def test_recycled_pid_owner_is_abandoned_at_once(make: Make, store: Store) -> None:
    host, machine, _, start = _owner.parse(_owner.current()) or ("", "", 0, "")
    if not machine:
        pytest.skip("no /proc: same-host deaths are judged by the lease")
    fn = make(lambda x: x, key="k:{x}", fingerprint=False)
    recycled = f"{host}/{machine}/{os.getpid()}/{start}0"  # our pid, another start time
    store.claim(_foreign_entry(fn.key_for(1), "", lease_until=time.time() + 60, owner=recycled))
    with pytest.raises(Halted) as info:
        fn(1)
    assert "another process" in info.value.reason


# O03 / O04: a pid is only judged on the same host AND machine; elsewhere the lease decides
@pytest.mark.parametrize("where", ["other-machine", "other-host"])
def test_same_pid_elsewhere_is_judged_by_its_lease(make: Make, store: Store, where: str) -> None:
    host, machine, _, start = _owner.parse(_owner.current()) or ("", "", 0, "")
    if not machine:
        pytest.skip("no /proc")
    dead = _dead_pid()
    owner = (
        f"{host}/0123456789abcdef.999/{dead}/{start}"
        if where == "other-machine"
        else f"not-{host}/{machine}/{dead}/{start}"
    )
    fn = make(lambda x: x, key="k:{x}", fingerprint=False)
    store.claim(_foreign_entry(fn.key_for(1), "", lease_until=time.time() + 60, owner=owner))
    with pytest.raises(AlreadyRunning):
        fn(1)


# O07: the machine id tells pid namespaces (containers) apart
def test_machine_id_includes_the_pid_namespace() -> None:
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pytest.skip("no /proc")
    machine = (_owner.parse(_owner.current()) or ("", "", 0, ""))[1]
    assert machine.endswith("." + ns.removeprefix("pid:[").removesuffix("]"))


# E12 (deterministic): an abandoned key is not taken over after the deadline
def test_abandoned_key_is_not_retried_after_the_deadline(make: Make, store: Store) -> None:
    runs: list[int] = []

    def body(x: int) -> int:
        runs.append(x)
        return x

    past = datetime.now(timezone.utc) - timedelta(hours=1)
    fn = make(body, key="k:{x}", fingerprint=False, on_abandoned="retry", deadline=past)
    store.claim(_foreign_entry(fn.key_for(1), "", lease_until=time.time() - 60))
    with pytest.raises(DeadlineExceeded):
        fn(1)
    assert runs == []
    record = fn.status(1)
    assert record is not None and record.attempt == 1  # not taken over


# E13 / E14 / E15 (deterministic): ttl counts from the finish, for ok and abandoned-halted
def test_ttl_counts_from_the_finish(make: Make, store: Store, store_clock: StoreClock) -> None:
    def body(x: int) -> int:
        store_clock.advance(10)  # the body takes 10 s
        return x

    fn = make(body, key="k:{x}", ttl=60)
    fn(1)
    record = fn.status(1)
    assert record is not None and record.finished_at is not None and record.expires_at is not None
    assert record.finished_at - record.started_at >= timedelta(seconds=10)
    assert abs((record.expires_at - record.finished_at) - timedelta(seconds=60)) < timedelta(
        milliseconds=5
    )
    halt = make(lambda x: x, key="h:{x}", fingerprint=False, name="test.halt")
    store.claim(_foreign_entry(halt.key_for(1), "", lease_until=time.time() - 60))  # ttl=3600
    with pytest.raises(Halted):
        halt(1)
    halted = halt.status(1)
    assert halted is not None and halted.finished_at is not None
    assert halted.expires_at is not None
    assert abs((halted.expires_at - halted.finished_at) - timedelta(hours=1)) < timedelta(
        milliseconds=5
    )


# H03: leases are renewed well before they run out (a third of the way), not at the last moment.
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


# H06: a store error while renewing is retried; the lease keeps being renewed afterwards
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


def _fork_and_wait(child: Any, timeout: float = 120.0) -> int:
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            code = child()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(raw)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child hung")


# F04: a forked child renews its own claims' leases (its heartbeat is its own)
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

    assert _fork_and_wait(child) == 0


# F02: a forked child never uses its parent's SQLite connection
def test_forked_child_opens_its_own_disk_connection(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "s")
    store.get("k")
    parent_cache = store.cache
    assert _fork_and_wait(lambda: 0 if store.cache is not parent_cache else 1) == 0


# F05: a MemoryStore stays usable in a child forked while another thread holds its lock
def test_memory_store_usable_in_a_child_forked_while_locked() -> None:
    store = MemoryStore()
    store._lock.acquire()  # as if another thread were inside a store operation at fork time
    try:
        assert _fork_and_wait(lambda: 0 if store.claim(processing("k")) is None else 1) == 0
    finally:
        store._lock.release()


# E25: a takeover keeps the fingerprint the key was first used with
def test_takeover_keeps_the_stored_fingerprint(make: Make, store: Store) -> None:
    fn = make(lambda x: x, key="k:{x}", fingerprint=False, on_abandoned="retry")
    store.claim(_foreign_entry(fn.key_for(1), "f" * 64, lease_until=time.time() - 60))
    assert fn(1) == 1
    record = fn.status(1)
    assert record is not None and record.attempt == 2 and record.fingerprint == "f" * 64


# K06 / K07: `python -m pkg` and `python -m pkg.tool` name keys after the module
def test_module_run_with_dash_m_is_named_after_the_module(tmp_path: Path) -> None:
    pkg = tmp_path / "nightly"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    code = (
        "from idemfn import idempotent, MemoryStore\n"
        "@idempotent(key='k', store=MemoryStore())\n"
        "def step(): ...\n"
        "print(step.key_for())\n"
    )
    (pkg / "__main__.py").write_text(code)
    (pkg / "tool.py").write_text(code)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    for module, expected in [
        ("nightly", "nightly.__main__.step:k"),  # as when imported: not the package's
        ("nightly.tool", "nightly.tool.step:k"),
    ]:
        out = subprocess.run(
            [sys.executable, "-m", module], capture_output=True, text=True, check=True, env=env
        ).stdout
        assert out.strip() == expected


# E07: defence in depth: even a stored interrupt payload (older writer, tampering) never raises
def test_a_stored_interrupt_payload_is_replayed_as_halted(store: Store) -> None:
    now = time.time()
    store.claim(
        Entry(
            "t:k",
            "halted",
            "",
            "h/m/1/1",
            "tok",
            1,
            now,
            ttl=None,
            finished_at=now,
            payload=pickle.dumps(KeyboardInterrupt("stop")),
            exc_type="KeyboardInterrupt",
            message="stop",
            reason="the call was interrupted by KeyboardInterrupt",
        )
    )
    outcome = begin("t:k", store=store)
    assert isinstance(outcome, Finished)
    try:
        with pytest.raises(Halted) as info:
            outcome.replay()
    except KeyboardInterrupt:
        raise AssertionError("a replay raised KeyboardInterrupt") from None
    assert info.value.exc_type == "KeyboardInterrupt"
