"""Cancellations that come while a store call is under way: a store with only sync primitives,
driven from async callers through worker threads (the ``Store`` base's ``offload``), and a
watch that awaits as it closes (issue 16, review)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from idemfn import Claim, MemoryStore, abegin, idempotent
from idemfn._record import Entry
from idemfn._stores.base import Corrupt, Store
from idemfn._wakeups import AsyncWatch, LocalAsyncWatch


class SlowClaims(Store):
    """Sync primitives only; ``claim`` waits for the test's go-ahead."""

    def __init__(self) -> None:
        self.records = MemoryStore()
        self.entered = threading.Event()
        self.proceed = threading.Event()
        self.landed = threading.Event()

    def claim(self, entry: Entry) -> Entry | None:
        self.entered.set()
        assert self.proceed.wait(60)
        try:
            return self.records.claim(entry)
        finally:
            self.landed.set()

    def get(self, key: str) -> Entry | None:
        return self.records.get(key)

    def swap(self, key: str, token: str, entry: Entry) -> bool:
        return self.records.swap(key, token, entry)

    def release(self, key: str, token: str) -> bool:
        return self.records.release(key, token)

    def delete(self, key: str, token: str | None = None) -> bool:
        return self.records.delete(key, token)

    def scan(self, prefix: str = "", *, corrupt: Corrupt | None = None) -> Iterator[Entry]:
        return self.records.scan(prefix)


def test_a_call_cancelled_while_its_claim_runs_in_a_worker_thread_leaves_no_claim() -> None:
    # The claim lands in the thread after the cancellation: the engine's undo (a release) must
    # come after it, or the claim stays processing with no one to run it, and halts later as
    # abandoned although its body never ran. So a cancelled offloaded call waits for its thread.
    store = SlowClaims()
    runs: list[int] = []

    @idempotent(key="k", name="t", store=store)
    async def body() -> int:
        runs.append(1)
        return 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(body())
        assert await loop.run_in_executor(None, store.entered.wait, 60)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.2)
        assert not done  # still waiting for the claim in the thread
        store.proceed.set()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the call was not cancelled")
        assert await loop.run_in_executor(None, store.landed.wait, 60)

    asyncio.run(main())
    assert store.records.get("t:k") is None  # undone: the next call runs the body
    assert runs == []


def test_a_call_cancelled_twice_while_its_claim_runs_in_a_worker_thread_leaves_no_claim() -> None:
    # A second cancellation (an enclosing TaskGroup, a server shutting down) made offload stop
    # waiting for the thread: the undo ran first, then the claim landed (issue 16, review).
    store = SlowClaims()

    @idempotent(key="k", name="t", store=store)
    async def body() -> int:
        return 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(body())
        assert await loop.run_in_executor(None, store.entered.wait, 60)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.2)
        assert not done  # still waiting for the claim in the thread
        store.proceed.set()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the call was not cancelled")

    asyncio.run(main())
    assert store.landed.is_set()
    assert store.records.get("t:k") is None


class SlowToStopWatching(MemoryStore):
    """A store whose async watch awaits as it closes (an UNSUBSCRIBE's answer), until the test
    lets it go: a cancellation point after the waiter's claim is made."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = asyncio.Event()

    def awatch(self, key: str) -> AsyncWatch:
        store = self

        class Watch(LocalAsyncWatch):
            async def aclose(self) -> None:
                await super().aclose()
                store.closing.set()
                await asyncio.Event().wait()  # until cancelled

        return Watch(key)


def test_a_waiter_cancelled_as_its_watch_closes_after_it_claimed_leaves_no_claim() -> None:
    # The claim is made inside the watch's block; a cancellation in the watch's exit dropped
    # it unsettled: processing, no longer renewed, halted later, its body never run.
    runs: list[int] = []

    async def main() -> SlowToStopWatching:
        store = SlowToStopWatching()

        @idempotent(key="k", name="t", store=store, wait=60)
        async def body() -> int:
            runs.append(1)
            return 1

        owner = await abegin("t:k", store=store)
        assert isinstance(owner, Claim)
        waiter = asyncio.ensure_future(body())
        await asyncio.sleep(0)
        await owner.arelease()  # the waiter now claims the key, then closes its watch
        await asyncio.wait_for(store.closing.wait(), 60)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return store

    store = asyncio.run(main())
    assert runs == []
    assert store.get("t:k") is None  # released: the next call runs the body


class ClaimAnswerLost(MemoryStore):
    """A store whose claim lands but whose answer never comes (a reply in flight when the
    caller is cancelled), and whose release waits for the test's go-ahead."""

    def __init__(self) -> None:
        super().__init__()
        self.claimed = asyncio.Event()
        self.releasing = asyncio.Event()
        self.proceed = asyncio.Event()

    async def aclaim(self, entry: Entry) -> Entry | None:
        self.claim(entry)
        self.claimed.set()
        await asyncio.Event().wait()  # the answer never comes
        raise AssertionError("unreachable")

    async def arelease(self, key: str, token: str) -> bool:
        self.releasing.set()
        await self.proceed.wait()
        return self.release(key, token)


def test_a_call_cancelled_again_while_it_undoes_its_claim_still_undoes_it() -> None:
    # A timeout fires while the claim's answer is in flight (the claim landed), then a second
    # cancellation reaches the undo's release: the release must still run, or the claim stays
    # processing with no one to run it (issue 16, review).
    async def main() -> ClaimAnswerLost:
        store = ClaimAnswerLost()

        @idempotent(key="k", name="t", store=store)
        async def body() -> int:
            return 1

        task = asyncio.ensure_future(body())
        await asyncio.wait_for(store.claimed.wait(), 60)
        task.cancel()
        await asyncio.wait_for(store.releasing.wait(), 60)
        task.cancel()
        await asyncio.sleep(0)
        store.proceed.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return store

    store = asyncio.run(main())
    assert store.get("t:k") is None
