"""A claim has one owner, from the claim until its outcome is written, whatever happens meanwhile.

Regression tests of issue 13, part A: an expired row removed under a racing claim (1), a lease
that lapsed while a live owner serialised its result (2), a forked child settling its parent's
claim (3), and prune removing a live claim after the wall clock jumped (4). Each interleaving is
forced, not hoped for: the tests do not depend on how fast the machine is.

Then whose claim counts as abandoned: a dead or recycled pid on this machine at once, an owner
on another host or machine by its lease; and what a caller that finds one does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from idemfn import (
    AlreadyRunning,
    DeadlineExceeded,
    DiskStore,
    Halted,
    MemoryStore,
    Status,
    Store,
    StoreError,
    _lease,
    _owner,
    idempotent,
)
from idemfn._engine import Claim, begin
from idemfn._outcome import PICKLE
from idemfn._policy import Policy
from idemfn._record import Entry
from tests.support.records import foreign_entry
from tests.support.stores import WITH_CLUSTER, Make, make_store

PATIENCE = 60.0  # seconds a test waits for a condition before it fails: generous on purpose


def wait_for(condition: Any, what: str) -> None:
    give_up = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"gave up after {PATIENCE} s waiting for {what}")
        time.sleep(0.01)


# 1. DiskStore: a claim deletes only the expired row it looked at.


def _expired_by_idemfn_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[DiskStore]:
    """Two DiskStores on one directory (two connections, as two processes have) whose key "k"
    holds an ok record expired by idemfn's clock (an hour ahead) but not by diskcache's."""
    stores = [DiskStore(tmp_path / "store"), DiskStore(tmp_path / "store")]
    now = time.time()
    old = Entry(
        "k",
        "ok",
        "",
        "someone",
        "t0",
        1,
        now,
        ttl=60.0,
        finished_at=now,
        expires_at=now + 60.0,
        payload=b"\x80\x05K\x01.",
    )
    assert stores[0].claim(old) is None
    for store in stores:
        monkeypatch.setattr(store, "time", lambda: time.time() + 3600)
    return stores


def in_another_thread(fn: Any) -> Any:
    """``fn()`` run to its end in another thread (as another process would, between two
    statements of this one), its result returned or its exception raised here."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(_call(fn)))
    thread.start()
    thread.join(PATIENCE)
    [value] = result
    if isinstance(value, BaseException):
        raise value
    return value


def _claim_entry(store: Store, token: str) -> Entry:
    now = store.time()
    return Entry("k", "processing", "", "someone", token, 1, now, lease_until=now + 30, ttl=60.0)


def _claim_racing(second: DiskStore, meanwhile: Any, monkeypatch: pytest.MonkeyPatch) -> Entry:
    """``second.claim(...)``, with ``meanwhile()`` run to its end by another thread after
    ``second`` read the expired row and before it removes it: what it returns."""
    decode = second.decode

    def decode_then_race(key: str, data: object) -> Entry:
        monkeypatch.setattr(second, "decode", decode)
        in_another_thread(meanwhile)
        return decode(key, data)

    monkeypatch.setattr(second, "decode", decode_then_race)
    found = second.claim(_claim_entry(second, "t-second"))
    assert found is not None, "a second claim: two bodies ran at once"  # before the fix
    return found


def test_a_racing_claim_never_deletes_the_claim_another_caller_just_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = _expired_by_idemfn_only(tmp_path, monkeypatch)

    def first_claims() -> None:
        assert first.claim(_claim_entry(first, "t-first")) is None

    found = _claim_racing(second, first_claims, monkeypatch)
    assert found.token == "t-first"
    kept = first.get("k")
    assert kept is not None and kept.token == "t-first"
    first.close()
    second.close()


def test_a_racing_claim_never_deletes_a_fresh_ok_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = _expired_by_idemfn_only(tmp_path, monkeypatch)

    def first_runs() -> None:
        claim = begin("k", store=first, policy=Policy(ttl=7200.0, lease=30.0))
        assert isinstance(claim, Claim)
        claim.complete("first")

    found = _claim_racing(second, first_runs, monkeypatch)
    assert found.status == "ok"
    outcome = begin("k", store=second, policy=Policy(ttl=7200.0))
    assert not isinstance(outcome, Claim)
    assert outcome.replay() == "first"
    first.close()
    second.close()


# 2. The lease is renewed until the outcome is written.


class _Clocks:
    """A fake lease clock (monotonic) and store clock, moved by the test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: Store) -> None:
        self.offset = 0.0
        real_time = store.time
        monkeypatch.setattr(_lease, "clock", lambda: 1000.0 + self.offset)
        monkeypatch.setattr(store, "time", lambda: real_time() + self.offset)

    def jump(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture(params=["memory", "disk", "redis", "postgres", "postgres-pgbouncer"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    store = make_store(request.param, tmp_path, request)
    yield store
    store.close()


@pytest.mark.parametrize("on_abandoned", ["halt", "retry"])
def test_the_lease_is_renewed_while_a_large_result_is_serialised(
    any_store: Store, monkeypatch: pytest.MonkeyPatch, on_abandoned: str
) -> None:
    store = any_store
    clocks = _Clocks(monkeypatch, store)
    lease = 0.3  # renewed every 0.1 s of real time; judged only on the fake clocks
    runs: list[int] = []
    other: list[BaseException | object] = []

    @idempotent(key="big", store=store, lease=lease, on_abandoned=on_abandoned)  # type: ignore[arg-type]
    def produce() -> Slow:
        runs.append(1)
        return Slow()

    class Slow:
        """Takes "longer than the lease" to pickle: the clocks jump past it meanwhile."""

        def __reduce__(self) -> Any:
            if not other:
                clocks.jump(10 * lease)  # the lease ran out, unless renewed from here on
                wait_for(
                    lambda: (
                        (e := _only_entry(store)) is not None
                        and (e.lease_mono or 0) > 1000.0 + clocks.offset
                    ),
                    "the heartbeat to renew the lease while the result is serialised",
                )
                # Another caller (another thread: a context of its own) sees a live owner.
                thread = threading.Thread(target=lambda: other.append(_call(produce)))
                thread.start()
                thread.join(PATIENCE)
            return (tuple, ())

    assert produce() is not None  # before the fix: OwnershipLost (halt) or a second run
    assert runs == [1]
    [seen] = other
    assert isinstance(seen, AlreadyRunning), seen
    entry = _only_entry(store)
    assert entry is not None and entry.status == "ok"


@dataclass
class Point:
    x: int
    label: str


@pytest.mark.parametrize(
    "value",
    [
        # Text only: its pickle holds no byte that makes dump_value look closer at it.
        pytest.param(lambda: ["x" * 40 + str(i) for i in range(300_000)], id="builtins"),
        pytest.param(lambda: [Point(i, str(i)) for i in range(100_000)], id="loaded back"),
    ],
)
def test_other_threads_run_while_a_large_result_is_serialised(value: Any) -> None:
    # pickle.dumps and pickle.loads walk a container holding the GIL: the heartbeat could not
    # renew the lease while a large result was pickled (and loaded back, to check it loads),
    # however long that took. Now pickle yields between frames: other threads run meanwhile.
    big = value()
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        give_up = time.monotonic() + PATIENCE
        while True:
            start = time.monotonic()
            PICKLE.dump_value(big)
            end = time.monotonic()
            if sum(start < t < end for t in list(ticks)) >= 3:
                break  # another thread ran three times while it was serialised
            assert time.monotonic() < give_up, "no other thread ran while it was serialised"
    finally:
        stop.set()
        ticker.join()


def _call(fn: Any) -> Any:
    try:
        return fn()
    except BaseException as exc:
        return exc


def _only_entry(store: Store) -> Entry | None:
    entries = list(store.scan())
    assert len(entries) <= 1
    return entries[0] if entries else None


# 3. Only the process that claimed may settle a claim.


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
@pytest.mark.parametrize("child_ends", ["sys.exit", "return", "raise"])
@pytest.mark.parametrize("kind", ["disk", "redis", "postgres", "postgres-pgbouncer"])
def test_a_forked_child_never_settles_its_parents_claim(
    kind: str, child_ends: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = make_store(kind, tmp_path, request)
    parent = os.getpid()

    @idempotent(key="k", store=store)
    def body() -> str:
        pid = os.fork()
        if pid == 0:  # the child unwinds through the wrapper, as a forking body's child does
            if child_ends == "sys.exit":
                sys.exit(0)
            if child_ends == "raise":
                raise RuntimeError("the child failed")
            return "child"
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        return "parent"

    try:
        result = body()
    except BaseException:
        if os.getpid() != parent:
            os._exit(0)
        raise
    if os.getpid() != parent:
        os._exit(0 if result == "child" else 3)
    assert result == "parent"  # before the fix: OwnershipLost, the child having settled it
    record = body.status()
    assert record is not None and record.status is Status.OK
    assert body() == "parent"
    store.close()


# 4. prune never removes a claim whose owner is alive by the engine's rule.


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_prune_keeps_a_live_claim_after_the_wall_clock_jumps_forward(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(kind, tmp_path)
    claim = begin("k", store=store, policy=Policy(ttl=60.0, lease=30.0))
    assert isinstance(claim, Claim)
    real_time = store.time
    monkeypatch.setattr(store, "time", lambda: real_time() + 3600)  # an hour ahead
    assert store.prune() == 0  # before the fix: the live claim was removed
    claim.complete("done")
    record = store.get("k")
    assert record is not None and record.status == "ok"


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_prune_removes_a_claim_abandoned_longer_than_its_ttl(kind: str, tmp_path: Path) -> None:
    store = make_store(kind, tmp_path)
    now = store.time()
    for key, owner in [("remote", "elsewhere/x/1/1"), ("dead", _dead_owner())]:
        abandoned = Entry(
            key, "processing", "", owner, "t-" + key, 1, now - 100, lease_until=now - 90, ttl=10.0
        )
        assert store.claim(abandoned) is None
    fresh = Entry(
        "fresh",
        "processing",
        "",
        "elsewhere/x/1/1",
        "t-fresh",
        1,
        now,
        lease_until=now + 30,
        ttl=10.0,
    )
    assert store.claim(fresh) is None
    assert store.prune() == 2
    assert [e.key for e in store.scan()] == ["fresh"]


def _dead_owner() -> str:
    """The owner string of a process of this machine that has exited."""
    import subprocess

    code = "from idemfn import _owner; print(_owner.current())"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


# What a new user meets first: a store directory that cannot be created.


def test_a_store_directory_that_cannot_be_created_is_one_clear_store_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_text("")
    store = DiskStore(tmp_path / "file" / "store")

    @idempotent(store=store)
    def f(x: int) -> int:
        return x

    with pytest.raises(StoreError, match=r"could not create the directory of .*file/store") as e:
        f(1)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no internal chain
    assert "IDEMFN_STORE" in str(e.value)


# prune writes only over the record it judged: a claim halted (same token) since it looked stays.


# (Redis drops such a claim itself, at lease + ttl on its clock: prune never sees it there.)
@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_prune_never_removes_a_halted_record_that_replaced_the_claim_it_judged(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from idemfn._stores import base, disk

    store = make_store(kind, tmp_path, request)
    now = store.time()
    abandoned = Entry(
        "k", "processing", "", _dead_owner(), "t-k", 1, now - 100, lease_until=now - 90, ttl=60.0
    )
    assert store.claim(abandoned) is None
    judged: list[Entry] = []

    def judge_then_let_a_caller_halt_it(entry: Entry, now: float) -> bool:
        verdict = real_prunable(entry, now)
        if entry.key == "k" and not judged:
            judged.append(entry)
            # Between prune's read and its write, a caller finds the owner gone and halts
            # the claim: the halted record keeps the claim's token.
            halted = begin("k", store=store, policy=Policy(ttl=60.0))
            assert not isinstance(halted, Claim) and halted.entry.status == "halted"
        return verdict

    real_prunable = base.prunable
    monkeypatch.setattr(base, "prunable", judge_then_let_a_caller_halt_it)
    monkeypatch.setattr(disk, "prunable", judge_then_let_a_caller_halt_it)
    store.prune()
    assert [e.status for e in judged] == ["processing"]
    # Before the fix: prune deleted the fresh halted record on the token alone, and the next
    # call ran the body again although its first run may have had its side effect.
    kept = store.get("k")
    assert kept is not None and kept.status == "halted"
    store.close()


def test_postgres_prune_keeps_a_claim_whose_owner_is_alive_by_the_engines_rule(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = make_store("postgres", tmp_path, request)
    now = store.time()
    # This process's claim, alive on the monotonic clock, whose wall-clock lease and ttl ran
    # out long ago by the server's clock (a server clock set forwards): the engine sees a
    # live owner, so prune must not remove it.
    live = Entry(
        "live",
        "processing",
        "",
        _owner_here(),
        "t-live",
        1,
        now - 7200,
        lease_until=now - 3600,
        ttl=60.0,
        lease_mono=_lease.clock() + 3600,
    )
    gone = Entry(
        "gone",
        "processing",
        "",
        _dead_owner(),
        "t-gone",
        1,
        now - 7200,
        lease_until=now - 3600,
        ttl=60.0,
    )
    for entry in (live, gone):
        assert store.claim(entry) is None
    assert _lease.abandoned_reason(store.get("live"), now) is None  # type: ignore[arg-type]
    assert store.prune() == 1  # before the fix: 2, the live claim removed by its drop_at
    assert [e.key for e in store.scan()] == ["live"]
    store.close()


def _owner_here() -> str:
    from idemfn import _owner

    return _owner.current()


# Whose claim is abandoned: a dead owner on this machine is judged at once, an owner
# elsewhere by its lease; and what a caller that finds one does.


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# A recycled pid is dead
@pytest.mark.parametrize("store", WITH_CLUSTER, indirect=True)
def test_recycled_pid_owner_is_abandoned_at_once(make: Make, store: Store) -> None:
    host, machine, _, start = _owner.parse(_owner.current()) or ("", "", 0, "")
    if not machine:
        pytest.skip("no /proc: same-host deaths are judged by the lease")
    fn = make(lambda x: x, key="k:{x}", fingerprint=False)
    recycled = f"{host}/{machine}/{os.getpid()}/{start}0"  # our pid, another start time
    store.claim(foreign_entry(fn.key_for(1), "", lease_until=time.time() + 60, owner=recycled))
    with pytest.raises(Halted) as info:
        fn(1)
    assert "another process" in info.value.reason


# A pid is only judged on the same host AND machine; elsewhere the lease decides
@pytest.mark.parametrize("where", ["other-machine", "other-host"])
@pytest.mark.parametrize("store", WITH_CLUSTER, indirect=True)
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
    store.claim(foreign_entry(fn.key_for(1), "", lease_until=time.time() + 60, owner=owner))
    with pytest.raises(AlreadyRunning):
        fn(1)


# The machine id tells pid namespaces (containers) apart
def test_machine_id_includes_the_pid_namespace() -> None:
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pytest.skip("no /proc")
    machine = (_owner.parse(_owner.current()) or ("", "", 0, ""))[1]
    assert machine.endswith("." + ns.removeprefix("pid:[").removesuffix("]"))


# Losing the race to halt an abandoned claim replays the halt, not AlreadyRunning
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
    store.claim(foreign_entry(fn.key_for(1), "", lease_until=time.time() - 60))
    with pytest.raises(Halted, match="rival"):
        fn(1)


# An abandoned key is not taken over after the deadline
@pytest.mark.parametrize("store", WITH_CLUSTER, indirect=True)
def test_abandoned_key_is_not_retried_after_the_deadline(make: Make, store: Store) -> None:
    runs: list[int] = []

    def body(x: int) -> int:
        runs.append(x)
        return x

    past = datetime.now(timezone.utc) - timedelta(hours=1)
    fn = make(body, key="k:{x}", fingerprint=False, on_abandoned="retry", deadline=past)
    store.claim(foreign_entry(fn.key_for(1), "", lease_until=time.time() - 60))
    with pytest.raises(DeadlineExceeded):
        fn(1)
    assert runs == []
    record = fn.status(1)
    assert record is not None and record.attempt == 1  # not taken over


# A takeover keeps the fingerprint the key was first used with
@pytest.mark.parametrize("store", WITH_CLUSTER, indirect=True)
def test_takeover_keeps_the_stored_fingerprint(make: Make, store: Store) -> None:
    fn = make(lambda x: x, key="k:{x}", fingerprint=False, on_abandoned="retry")
    store.claim(foreign_entry(fn.key_for(1), "f" * 64, lease_until=time.time() - 60))
    assert fn(1) == 1
    record = fn.status(1)
    assert record is not None and record.attempt == 2 and record.fingerprint == "f" * 64


class _ClaimSentTwice(MemoryStore):
    """A store whose client sends each claim again, as redis-py does when the first try's
    answer is lost (a dropped connection, a timeout) after it landed."""

    def claim(self, entry: Entry) -> Entry | None:
        super().claim(entry)
        return super().claim(entry)


def test_a_claim_answered_with_its_own_record_is_won() -> None:
    # The second try finds the first's record: its own claim, not a rival's. Taken for a
    # rival's, the call raised AlreadyRunning and the key was halted after the lease, with
    # nothing run.
    runs: list[int] = []

    @idempotent(key="k:{x}", store=_ClaimSentTwice(), name="t.sent-twice")
    def fn(x: int) -> int:
        runs.append(x)
        return x

    assert fn(1) == 1
    assert fn(1) == 1
    assert runs == [1]
