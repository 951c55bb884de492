"""evloop.start_eagerly: a coroutine runs to its first real wait at once; only one that waits gets a Task."""

from __future__ import annotations

import asyncio

import pytest

from sshconduit.evloop import start_eagerly


def test_a_coroutine_that_never_waits_finishes_inside_the_call() -> None:
    async def main() -> None:
        done: list[str] = []

        async def nothing() -> None:
            return None

        async def quick() -> None:
            await nothing()  # an await that does not suspend
            done.append("quick")

        assert start_eagerly(quick()) is None
        assert done == ["quick"]  # no loop turn has passed

    asyncio.run(main())


def test_a_coroutine_that_waits_continues_in_a_task() -> None:
    async def main() -> None:
        steps: list[str] = []
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def slow() -> None:
            steps.append("before")
            steps.append(await fut)
            await asyncio.sleep(0.01)
            steps.append("after")

        task = start_eagerly(slow())
        assert task is not None and steps == ["before"]
        fut.set_result("result")
        await asyncio.wait_for(task, 5)
        assert steps == ["before", "result", "after"]

    asyncio.run(main())


def test_errors_and_cancellation_reach_the_coroutine() -> None:
    async def main() -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        seen: list[str] = []

        async def failing() -> None:
            try:
                await fut
            except ValueError:
                seen.append("ValueError")
                raise

        task = start_eagerly(failing())
        assert task is not None
        fut.set_exception(ValueError("boom"))
        with pytest.raises(ValueError, match="boom"):
            await asyncio.wait_for(task, 5)

        async def waiting() -> None:
            try:
                await asyncio.sleep(30)
            finally:
                seen.append("cleaned up")

        task = start_eagerly(waiting())
        assert task is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["ValueError", "cleaned up"]

    asyncio.run(main())
