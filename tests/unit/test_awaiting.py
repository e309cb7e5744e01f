"""``idemfn._stores.awaiting``: waiting on store calls without losing a cancellation (before
Python 3.12, ``asyncio.wait_for`` could) and finishing the steps that must finish."""

from __future__ import annotations

import asyncio

import pytest

from idemfn._stores.awaiting import to_the_end, within


def test_within_raises_a_cancellation_that_came_with_the_result() -> None:
    disposed: list[str] = []

    async def main() -> None:
        given: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(within(given, 60, dispose=disposed.append))
        await asyncio.sleep(0)  # it waits
        given.set_result("a connection")  # the result arrives...
        task.cancel()  # ...with the cancellation
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert disposed == ["a connection"]  # handed to dispose, not lost


def test_within_times_out_and_cancels_what_it_waited_for() -> None:
    async def main() -> None:
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with pytest.raises(asyncio.TimeoutError):
            await within(never, 0)
        assert never.cancelled()
        assert await within(asyncio.sleep(0, "done"), 60) == "done"

    asyncio.run(main())


def test_to_the_end_finishes_through_two_cancellations_then_raises() -> None:
    finished: list[str] = []

    async def step(go: asyncio.Event) -> str:
        await go.wait()
        finished.append("released")
        return "released"

    async def main() -> None:
        go = asyncio.Event()
        task = asyncio.ensure_future(to_the_end(step(go)))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0)
        assert not task.done()  # still finishing the step
        go.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished == ["released"]
        assert await to_the_end(step(go)) == "released"

    asyncio.run(main())
