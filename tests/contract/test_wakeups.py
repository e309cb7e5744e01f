"""A caller waiting for a busy key (``wait=``) wakes as soon as the owner settles it (issue 16).

The waiters here would look again only after a minute: the engine's poll back-off is made 60 s
from the first pause (``_FIRST_POLL`` and ``_MAX_POLL``). A waiter that returns within 20 s of
the owner's settle was therefore woken by it, not by polling; a busy machine cannot make that
pass by chance, nor fail it (20 s is far more than a wake-up takes).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from idemfn import AlreadyRunning, DiskStore, Store, idempotent
from idemfn._wakeups import _watchers
from tests.support.concurrency import HELD, HeldElsewhere, WatchSpy, fresh, spec_of
from tests.support.records import foreign_entry
from tests.support.stores import WITH_CLUSTER, Make

WOKEN_WITHIN = 20.0  # seconds: a waiter left to its back-off would sleep 60


class Transient(Exception):
    pass


@pytest.fixture
def slow_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiters look again only a minute after they last looked, unless woken."""
    import idemfn._engine as engine

    monkeypatch.setattr(engine, "_FIRST_POLL", 60.0)
    monkeypatch.setattr(engine, "_MAX_POLL", 60.0)


class Party:
    """``call()`` in a thread of its own; ``outcome(timeout)`` is what it returned (or raises
    what it raised), and fails if it has not returned within ``timeout`` seconds."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._outcome: list[tuple[bool, Any]] = []
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self._outcome.append((True, call()))
        except BaseException as exc:
            self._outcome.append((False, exc))

    def outcome(self, timeout: float) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still waiting after {timeout} s: not woken"
        returned, value = self._outcome[0]
        if not returned:
            raise value
        return value


class Owned:
    """A key's function, sync and async (one stored key): its first run holds the key until
    ``let_go`` is set, then settles as ``settle`` says ("ok", "halt" or "retry", a ``retry_on``
    exception that releases the key); later runs return "again" at once."""

    def __init__(self, store: Store, settle: str, **options: Any) -> None:
        self.started = threading.Event()
        self.let_go = threading.Event()
        self.runs = 0
        options = {"key": "k:{x}", "name": fresh("t.owned"), "retry_on": Transient, **options}

        def first() -> bool:
            self.runs += 1
            if self.runs > 1:
                return False
            self.started.set()
            return True

        def outcome() -> str:
            if settle == "halt":
                raise ValueError("the owner failed")
            if settle == "retry":
                raise Transient()
            return "owner"

        @idempotent(store=store, **options)
        def sync(x: int) -> str:
            if not first():
                return "again"
            assert self.let_go.wait(60)
            return outcome()

        @idempotent(store=store, **options)
        async def aio(x: int) -> str:
            if not first():
                return "again"
            give_up = time.monotonic() + 60
            while not self.let_go.is_set():  # (polls: the waiter may be a task of this loop)
                assert time.monotonic() < give_up
                await asyncio.sleep(0.001)
            return outcome()

        self.sync = sync
        self.aio = aio

    def call(self, how: str) -> Callable[[], Any]:
        """A call of key 1 from sync code ("thread"), or from a task on a loop of its own."""
        if how == "thread":
            return lambda: self.sync(1)
        return lambda: asyncio.run(self.aio(1))

    def owner_and_waiter_on_one_loop(self) -> Callable[[], Any]:
        """Both calls as tasks of one loop; returns the owner's and the waiter's outcomes, as
        callables that return or raise them."""

        async def both() -> tuple[Callable[[], Any], Callable[[], Any]]:
            owner = asyncio.create_task(self.aio(1))
            while not self.started.is_set():
                await asyncio.sleep(0.001)
            waiter = asyncio.create_task(self.aio(1))
            await asyncio.wait([owner, waiter])
            return owner.result, waiter.result

        return lambda: asyncio.run(both())


def check(outcome: Callable[[], Any], settle: str, *, waiter: bool) -> None:
    """What the owner (``waiter=False``) or its waiter got when the owner settled so."""
    if settle == "halt":  # the waiter: replayed
        with pytest.raises(ValueError, match="the owner failed"):
            outcome()
    elif settle == "retry" and not waiter:
        with pytest.raises(Transient):
            outcome()
    elif settle == "retry":
        assert outcome() == "again"  # released: the waiter claimed the key and ran the body
    else:
        assert outcome() == "owner"


PARTIES = [
    ("thread", "thread"),
    ("thread", "task"),
    ("task", "thread"),
    ("task", "task"),  # each on a loop of its own
    ("task", "one loop"),  # both tasks of one loop
]


@pytest.mark.usefixtures("slow_polls")
@pytest.mark.parametrize("settle", ["ok", "halt", "retry"])
@pytest.mark.parametrize(("waiter", "owner"), PARTIES, ids=[f"{w}-{o}" for w, o in PARTIES])
@pytest.mark.parametrize("store", WITH_CLUSTER, indirect=True)
def test_a_waiter_wakes_when_the_owner_settles(
    store: Store, monkeypatch: pytest.MonkeyPatch, settle: str, waiter: str, owner: str
) -> None:
    spy = WatchSpy(store, monkeypatch)
    owned = Owned(store, settle, wait=120)
    if owner == "one loop":
        both = Party(owned.owner_and_waiter_on_one_loop())
        assert owned.started.wait(60)
        spy.wait_for_a_waiter()
        owned.let_go.set()
        owner_got, waiter_got = both.outcome(WOKEN_WITHIN)
    else:
        owner_party = Party(owned.call(owner))
        assert owned.started.wait(60)
        waiter_party = Party(owned.call(waiter))
        spy.wait_for_a_waiter()
        owned.let_go.set()
        waiter_got = functools.partial(waiter_party.outcome, WOKEN_WITHIN)
        owner_got = functools.partial(owner_party.outcome, 60)
    check(waiter_got, settle, waiter=True)
    check(owner_got, settle, waiter=False)
    assert spy.waits == 1  # woken once, it looked once more, and that was it
    assert spy.closed == spy.opened == 1
    assert owned.sync.key_for(1) not in _watchers  # no watch left behind
    assert owned.runs == (2 if settle == "retry" else 1)


@pytest.mark.usefixtures("slow_polls")
@pytest.mark.parametrize("store", ["disk"], indirect=True)
@pytest.mark.parametrize("waiter", ["thread", "task"])
def test_a_waiter_on_an_owner_in_another_process_here_looks_often(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    waiter: str,
) -> None:
    # A DiskStore's watch hears only this process's settles; the owner is another process of
    # this machine, so the waiter looks every _NEAR_POLL (10 ms) instead of backing off.
    assert isinstance(store, DiskStore)
    spy = WatchSpy(store, monkeypatch)

    @idempotent(store=store, wait=120, **HELD)
    def held(k: int) -> str:
        raise AssertionError("the other process holds the key")

    @idempotent(store=store, wait=120, **HELD)
    async def aheld(k: int) -> str:
        raise AssertionError("the other process holds the key")

    with HeldElsewhere(spec_of(store, request), tmp_path, 1) as holder:
        party = Party((lambda: held(1)) if waiter == "thread" else (lambda: asyncio.run(aheld(1))))
        spy.wait_for_a_waiter()
        holder.let_go()
        assert party.outcome(WOKEN_WITHIN) == "held:1"
    assert spy.closed == spy.opened == 1


def held_elsewhere(store: Store, key: str) -> None:
    """A claim of ``key`` by an owner on another machine, live for 10 minutes."""
    assert store.claim(foreign_entry(key, "", lease_until=time.time() + 600)) is None


@pytest.mark.parametrize("store", WITH_CLUSTER, indirect=True)
def test_no_watch_is_opened_without_wait_nor_by_a_first_call_or_a_replay(
    make: Make, store: Store, monkeypatch: pytest.MonkeyPatch, counter: Any
) -> None:
    spy = WatchSpy(store, monkeypatch)
    fn = make(counter, key="k:{x}", wait=120)
    assert fn(1) == fn(1)  # a first call, then a replay
    busy = make(counter, key="busy:{x}", wait=0, name="t.busy")
    held_elsewhere(store, busy.key_for(1))
    with pytest.raises(AlreadyRunning):
        busy(1)  # wait=0: at once
    assert spy.opened == 0


@pytest.mark.parametrize("store", WITH_CLUSTER, indirect=True)
def test_a_waiter_that_gives_up_closes_its_watch(
    make: Make, store: Store, monkeypatch: pytest.MonkeyPatch, counter: Any
) -> None:
    spy = WatchSpy(store, monkeypatch)
    fn = make(counter, key="k:{x}", wait=0.05, name=fresh("t.gives-up"))
    held_elsewhere(store, fn.key_for(1))
    with pytest.raises(AlreadyRunning):
        fn(1)
    # (Not how often it waited: on a busy machine opening the watch can outlast the 50 ms,
    # and the waiter then gives up without one wait; seen once under suite-under-load.)
    assert spy.closed == spy.opened == 1
    assert fn.key_for(1) not in _watchers
