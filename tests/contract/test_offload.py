"""A store with only sync primitives, driven from async callers through worker threads (the
``Store`` base's ``offload``), when the caller is cancelled while a call runs in the thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

from idemfn import MemoryStore, idempotent
from idemfn._record import Entry
from idemfn._stores.base import Corrupt, Store


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
