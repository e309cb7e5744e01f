"""A stateful model of the call rules (docs/outcomes.md, docs/crashes.md), driven through the
low-level engine API.

The machine keeps several claims open at once on three keys with two fingerprints and interleaves
calls, completions, failures, owner deaths, clock jumps, forget and prune at random. A small
model (key -> ``Rec`` or None) predicts every outcome; after every step the store must agree with
it, a terminal record must not have changed, and ``attempt`` must not have gone down.

Time is a fake clock read through ``store.time()``, which the engine and both stores use for every
record time and expiry check, and through ``_lease.clock``, which times the leases of
this machine's owners. ``LEASE`` is large in real seconds too, so the heartbeat (which
schedules renewals on the real monotonic clock, every ``lease / 3``) never renews a lease during a
test: leases only run out when the model moves the clock.

Owner death is simulated by rewriting the claim's stored owner (same token) with ``store.swap``:
a pid that has exited and been reaped, our own pid with another start time (a recycled pid), or
an owner on another host whose lease is out (or still running).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from idemfn import (
    AlreadyRunning,
    DeadlineExceeded,
    DiskStore,
    FingerprintMismatch,
    Halted,
    MemoryStore,
    OwnershipLost,
    Store,
    _lease,
    _owner,
)
from idemfn._engine import Claim, Finished, begin_with
from idemfn._heartbeat import heartbeat
from idemfn._outcome import load
from idemfn._policy import Policy
from idemfn._record import Entry

KEYS = ("sm:a", "sm:b", "sm:c")
FINGERPRINTS = ("fp-1", "fp-2")
LEASE = 1000.0  # fake seconds; also real seconds / 3 before the heartbeat would renew
TTL = 3000.0
START = 1_700_000_000.0
VALUES = (0, None, "", [], False, [1, 2], {"a": (1, "x")})


class Boom(Exception):
    pass


class RetryMe(Exception):
    """The one type in every policy's ``retry_on``."""


class Unrebuildable(OSError):
    """Pickles, but can't be rebuilt (OSError's own pickling calls __init__, whose required
    arguments are not passed on): replayed as Halted. (A plain Exception's is rebuilt.)"""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


def _qualname(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


# name -> (build the exception, how a replay must behave: re-raise as itself or Halted)
EXCEPTIONS = {
    "value": (lambda: ValueError("bad value 7"), True),
    "boom": (lambda: Boom("boom!"), True),
    "unrebuildable": (lambda: Unrebuildable(3, "no"), False),
    "interrupt": (lambda: KeyboardInterrupt("stop"), False),
}


def _name(outcome: object) -> str:
    if isinstance(outcome, Claim):
        return f"Claim attempt {outcome.attempt}"
    return outcome.__name__ if isinstance(outcome, type) else type(outcome).__name__


def _dead_pid() -> int:
    """A pid that ran a process which has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


ME = _owner.current()
_HOST, _MACHINE, _PID, _START_TICKS = _owner.parse(ME) or ("", "", 0, "")
# Same-host deaths are only detectable where the owner string carries a machine id (/proc).
_SAME_HOST_DEATHS = ("reaped-pid", "recycled-pid") if _MACHINE else ()
DEATHS = (*_SAME_HOST_DEATHS, "remote-lease-out", "remote-lease-running")
_DEAD_PID = _dead_pid()
REMOTE = "elsewhere.invalid/00000000deadbeef.4026531836/4242/777"


@dataclass(frozen=True)
class Rec:
    """What the model expects ``store.get(key)`` to hold (before expiry)."""

    status: str  # "processing" | "ok" | "halted"
    fingerprint: str
    token: str
    attempt: int
    owner: str
    ttl: float | None
    lease_until: float | None = None  # processing only
    dead: bool = False  # processing: the owner is gone whatever its lease says
    expires_at: float | None = None  # finished only
    value: object = None  # ok
    exc_type: str | None = None  # halted
    reason_prefix: str = ""  # halted
    reason_mentions: str = ""  # halted: e.g. the dead owner
    reraise: type[BaseException] | None = None  # halted: replays as this type, else Halted
    message: str = ""


class FakeClock:
    def __init__(self) -> None:
        self.now = START


class ClockedMemoryStore(MemoryStore):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def time(self) -> float:
        return self.clock.now


class ClockedDiskStore(DiskStore):
    def __init__(self, directory: str, clock: FakeClock) -> None:
        super().__init__(directory)
        self.clock = clock

    def time(self) -> float:
        return self.clock.now


class IdempotencyMachine(RuleBasedStateMachine):
    claims = Bundle("claims")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        # Same-machine leases are judged on the monotonic clock: drive it with the model's.
        self._lease_clock = _lease.clock
        _lease.clock = lambda: self.clock.now
        self.store = self.make_store()
        self.model: dict[str, Rec | None] = dict.fromkeys(KEYS)
        self.open: list[Claim] = []  # unsettled claims, for the invariants and teardown
        self.seen: dict[str, Entry | None] = dict.fromkeys(KEYS)  # last record observed

    def make_store(self) -> Store:
        raise NotImplementedError

    def teardown(self) -> None:
        _lease.clock = self._lease_clock
        for claim in self.open:  # never let the heartbeat renew a finished test's claims
            heartbeat.discard(claim)

    # -- the model --------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.clock.now

    def live(self, key: str) -> Rec | None:
        """The record as callers see it: an expired finished record counts as absent."""
        rec = self.model[key]
        if rec is not None and rec.expires_at is not None and rec.expires_at <= self.now:
            return None
        return rec

    def gone(self, rec: Rec) -> bool:
        assert rec.lease_until is not None
        return rec.dead or rec.lease_until <= self.now

    def owns(self, claim: Claim) -> bool:
        """The claim still holds its key: its writes must succeed."""
        rec = self.model[claim.key]
        return rec is not None and rec.status == "processing" and rec.token == claim.token

    def finished(self, rec: Rec, ttl: float | None, **fields: object) -> Rec:
        expires = None if ttl is None else self.now + ttl
        return replace(rec, expires_at=expires, lease_until=None, dead=False, **fields)

    def settle(self, claim: Claim, how: str) -> None:
        self.open.remove(claim)
        rec = self.model[claim.key]
        if rec is not None and self.owns(claim):
            standing = "owner" if rec.owner == ME else "late owner"
        elif rec is None:
            standing = "lost: record removed"
        elif rec.token == claim.token:
            standing = f"lost: record {rec.status}, same token"
        else:
            standing = f"lost: record {rec.status}, other token"
        event(f"{how} by {standing}")

    # -- rules ------------------------------------------------------------------------------

    @rule(
        target=claims,
        key=st.sampled_from(KEYS),
        fp=st.sampled_from(FINGERPRINTS),
        on_abandoned=st.sampled_from(["halt", "retry"]),
        ttl=st.sampled_from([TTL, None]),
        deadline=st.sampled_from([None, None, None, "past", "future"]),
    )
    def call(self, key, fp, on_abandoned, ttl, deadline):
        return self.begin(key, fp, on_abandoned, ttl, deadline)

    @rule(
        target=claims,
        claim=claims,
        on_abandoned=st.sampled_from(["halt", "retry"]),
        ttl=st.sampled_from([TTL, None]),
        deadline=st.sampled_from([None, None, None, "past", "future"]),
    )
    def call_again(self, claim, on_abandoned, ttl, deadline):
        """A duplicate of an earlier call (same key and arguments), e.g. a client's retry."""
        return self.begin(claim.key, claim.entry.fingerprint, on_abandoned, ttl, deadline)

    def begin(
        self, key: str, fp: str, on_abandoned: str, ttl: float | None, deadline: str | None
    ) -> object:
        """Begin a call and check its outcome against the model: a new Claim (returned, into
        the bundle), a replay, or an error."""
        policy = Policy(ttl=ttl, lease=LEASE, on_abandoned=on_abandoned, retry_on=(RetryMe,))
        deadline_ts = {None: None, "past": self.now - 1, "future": self.now + 1}[deadline]
        past = deadline == "past"
        rec = self.live(key)
        error: AlreadyRunning | FingerprintMismatch | DeadlineExceeded | None = None
        try:
            due = None if deadline_ts is None else (lambda: deadline_ts)
            got: object = begin_with(self.store, key, fp, policy, due)
        except (AlreadyRunning, FingerprintMismatch, DeadlineExceeded) as exc:
            error, got = exc, type(exc)
        assert error is None or error.key == key
        event(f"call on {self.situation(key, fp, on_abandoned, past)} -> {_name(got)}")

        if rec is None:
            if past:
                assert got is DeadlineExceeded, got
                return multiple()
            return self.claimed(got, key, fp, policy, attempt=1)
        if rec.fingerprint != fp:
            assert got is FingerprintMismatch, got
            return multiple()
        if rec.status != "processing":
            assert isinstance(got, Finished), got
            self.check_replay(key, got, rec)
            return multiple()
        if not self.gone(rec):
            # The contract's "no finished record and now > deadline" could also be read as
            # covering a live claim: either answer leaves the record alone.
            assert got is AlreadyRunning or (past and got is DeadlineExceeded), got
            return multiple()
        # Abandoned.
        if past and got is DeadlineExceeded:
            return multiple()  # never claims after the deadline; halting may also be skipped
        if on_abandoned == "halt":
            assert isinstance(got, Finished), got
            self.model[key] = self.finished(
                rec,
                rec.ttl,
                status="halted",
                reason_prefix="abandoned",
                reason_mentions=rec.owner,
                exc_type=None,
            )
            self.check_replay(key, got, self.model[key])
            return multiple()
        assert not past, "a takeover after the deadline must raise DeadlineExceeded"
        return self.claimed(got, key, fp, policy, attempt=rec.attempt + 1)

    def situation(self, key: str, fp: str, on_abandoned: str, past: bool) -> str:
        """What the caller finds, for the coverage statistics (--hypothesis-show-statistics)."""
        rec = self.live(key)
        if rec is None:
            found = "absent" if self.model[key] is None else "expired"
        elif rec.fingerprint != fp:
            found = "other fingerprint"
        elif rec.status != "processing":
            found = rec.status
        elif not self.gone(rec):
            found = "live owner"
        else:
            found = f"abandoned, {on_abandoned}"
        return f"{found}, deadline passed" if past else found

    def claimed(self, got: object, key: str, fp: str, policy: Policy, attempt: int) -> Claim:
        assert isinstance(got, Claim), got
        assert got.key == key
        assert got.attempt == attempt
        assert all(c.token != got.token for c in self.open), "a token was reused"
        self.model[key] = Rec(
            "processing", fp, got.token, attempt, ME, policy.ttl, lease_until=self.now + LEASE
        )
        self.open.append(got)
        return got

    def check_replay(self, key: str, finished: Finished, rec: Rec) -> None:
        assert finished.entry.status == rec.status
        if rec.status == "ok":
            first, second = finished.replay(), finished.replay()
            assert first == rec.value
            assert type(first) is type(rec.value)
            if isinstance(first, (list, dict)):
                assert first is not second, "a replay must return a fresh copy"
            return
        if rec.reraise is None:
            with pytest.raises(Halted) as halted:
                finished.replay()
            assert halted.value.key == key
            assert halted.value.exc_type == rec.exc_type
            assert halted.value.reason.startswith(rec.reason_prefix), halted.value.reason
            assert rec.reason_mentions in halted.value.reason, halted.value.reason
            return
        with pytest.raises(rec.reraise) as raised:
            finished.replay()
        assert type(raised.value) is rec.reraise
        assert str(raised.value) == rec.message
        notes = getattr(raised.value, "__notes__", [])
        assert any(key in note for note in notes), f"no replay note: {notes}"

    @rule(claim=consumes(claims), value=st.sampled_from(VALUES))
    def complete(self, claim, value):
        self.settle(claim, "complete")
        if not self.owns(claim):
            with pytest.raises(OwnershipLost) as lost:
                claim.complete(value)
            assert lost.value.key == claim.key
            return
        claim.complete(value)
        rec = self.model[claim.key]
        assert rec is not None
        self.model[claim.key] = self.finished(
            rec, claim.policy.ttl, status="ok", owner=ME, value=value
        )

    @rule(claim=consumes(claims), kind=st.sampled_from(sorted(EXCEPTIONS)))
    def raise_(self, claim, kind):
        build, as_itself = EXCEPTIONS[kind]
        exc = build()
        self.settle(claim, "raise")
        if not self.owns(claim):
            with pytest.raises(OwnershipLost) as lost:
                claim.fail(exc)
            assert lost.value.__cause__ is exc
            return
        claim.fail(exc)
        rec = self.model[claim.key]
        assert rec is not None
        self.model[claim.key] = self.finished(
            rec,
            claim.policy.ttl,
            status="halted",
            owner=ME,
            exc_type=_qualname(type(exc)),
            reason_prefix=(
                "the call raised" if isinstance(exc, Exception) else "the call was interrupted"
            ),
            reraise=type(exc) if as_itself else None,
            message=str(exc),
        )

    @rule(claim=consumes(claims), via_fail=st.booleans())
    def raise_retry_on(self, claim, via_fail):
        """A retry_on exception (or an explicit release): the key is released."""
        self.settle(claim, "release")
        owned = self.owns(claim)
        try:
            claim.fail(RetryMe("again")) if via_fail else claim.release()
        except OwnershipLost:
            assert not owned, "release() of a claim that still owns its key must succeed"
        else:
            assert owned, (
                f"release() of a lost claim must raise OwnershipLost and remove nothing"
                f" (model record: {self.model[claim.key]})"
            )
            self.model[claim.key] = None

    @rule(claim=claims, how=st.sampled_from(DEATHS))
    def owner_dies(self, claim, how):
        """Rewrite the claim's processing record's owner (same token): the claim becomes late.

        Nothing happens if the claim no longer holds its key (or was settled already).
        """
        key = claim.key
        rec = self.model[key]
        if claim not in self.open or not self.owns(claim):
            return
        assert rec is not None
        entry = self.store.get(key)
        assert entry is not None
        lease_until, dead = rec.lease_until, True
        if how == "reaped-pid":
            owner = f"{_HOST}/{_MACHINE}/{_DEAD_PID}/{_START_TICKS}"
        elif how == "recycled-pid":
            owner = f"{_HOST}/{_MACHINE}/{os.getpid()}/{_START_TICKS}0"
        else:
            owner, dead = REMOTE, False
            if how == "remote-lease-out":
                lease_until = self.now - 1
        dying = Entry(
            key,
            entry.status,
            entry.fingerprint,
            owner,
            entry.token,
            entry.attempt,
            entry.started_at,
            lease_until=lease_until,
            ttl=entry.ttl,
        )
        assert self.store.swap(key, entry.token, dying)
        self.model[key] = replace(rec, owner=owner, lease_until=lease_until, dead=dead)
        event(f"owner dies: {how}")

    @rule(seconds=st.sampled_from([1.0, LEASE / 2, LEASE, TTL, LEASE + TTL + 1]))
    def advance_clock(self, seconds):
        self.clock.now += seconds

    @rule(key=st.sampled_from(KEYS))
    def forget(self, key):
        # An expired record counts as absent: forgetting it removes it but answers False.
        assert self.store.delete(key) is (self.live(key) is not None)
        self.model[key] = None

    @rule()
    def prune(self):
        doomed = []
        for key, rec in self.model.items():
            if rec is None:
                continue
            if rec.expires_at is not None and rec.expires_at <= self.now:
                doomed.append(key)
            elif rec.status == "processing" and rec.ttl is not None:
                assert rec.lease_until is not None
                if rec.lease_until + rec.ttl < self.now:
                    doomed.append(key)
        assert self.store.prune() == len(doomed)
        for key in doomed:
            self.model[key] = None

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def records(self):
        """One read per key per step (a DiskStore read is the costly part of a step)."""
        for key in KEYS:
            entry = self.store.get(key)
            self.check_agrees_with_model(key, entry)
            self.check_history(key, entry)
            self.check_one_owner(key)

    def check_agrees_with_model(self, key: str, entry: Entry | None) -> None:
        rec = self.live(key)
        if rec is None:
            assert entry is None, f"{key}: expected no record, found {entry!r}"
            return
        assert entry is not None, f"{key}: expected {rec.status} record, found none"
        assert entry.status == rec.status, (key, entry, rec)
        assert entry.fingerprint == rec.fingerprint
        assert entry.token == rec.token
        assert entry.attempt == rec.attempt
        assert entry.owner == rec.owner
        assert entry.ttl == rec.ttl
        if rec.status == "processing":
            assert entry.lease_until == rec.lease_until
            assert entry.finished_at is None
            assert entry.expires_at is None
            return
        assert entry.finished_at is not None
        assert entry.expires_at == rec.expires_at
        if rec.ttl is not None:
            assert entry.finished_at + rec.ttl == entry.expires_at, "ttl counts from the finish"
        if rec.status == "ok":
            assert entry.payload is not None
            assert load(entry.payload) == rec.value
        else:
            assert entry.exc_type == rec.exc_type
            assert (entry.reason or "").startswith(rec.reason_prefix), entry.reason
            assert rec.reason_mentions in (entry.reason or ""), entry.reason

    def check_history(self, key: str, entry: Entry | None) -> None:
        """A terminal record never changes, and attempt never goes down, until the key has been
        seen absent (forget, expiry, prune or release)."""
        before = self.seen[key]
        if entry is not None and before is not None:
            if before.status != "processing":
                assert entry == before, f"{key}: terminal {before!r} became {entry!r}"
            assert entry.attempt >= before.attempt, (before, entry)
        self.seen[key] = entry

    def check_one_owner(self, key: str) -> None:
        """No two open claims hold one key, and a processing record is held by exactly one."""
        owning = [c for c in self.open if c.key == key and self.owns(c)]
        assert len(owning) <= 1, owning
        rec = self.model[key]
        if rec is not None and rec.status == "processing":
            assert len(owning) == 1, (key, rec, self.open)


class MemoryMachine(IdempotencyMachine):
    def make_store(self) -> Store:
        return ClockedMemoryStore(self.clock)


class DiskMachine(IdempotencyMachine):
    """Runs on one DiskStore per process, emptied for each example: opening one costs ~60 ms."""

    _shared: ClockedDiskStore | None = None

    def make_store(self) -> Store:
        cls = DiskMachine
        if cls._shared is None:
            directory = tempfile.mkdtemp(prefix="idemfn-sm-")
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            cls._shared = ClockedDiskStore(os.path.join(directory, "store"), self.clock)
        store = cls._shared
        store.clock = self.clock
        store.cache.clear()
        return store


# ~5 s per store when every example passes. No explain phase: it re-runs a failing stateful
# example many times and can add minutes while adding little to a shrunk step list.
_SETTINGS = settings(
    max_examples=400,
    stateful_step_count=30,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)

TestMemoryStoreStateMachine = MemoryMachine.TestCase
TestMemoryStoreStateMachine.settings = _SETTINGS
TestDiskStoreStateMachine = DiskMachine.TestCase
TestDiskStoreStateMachine.settings = _SETTINGS
