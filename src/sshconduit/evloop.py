"""The event loop the command-line tools run on: uvloop when it is installed, else asyncio's default.

uvloop's transports do the socket reads and writes of the data path in C. ``SSHCONDUIT_UVLOOP=0`` turns it
off (to compare the two, or to rule it out when chasing a bug).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

from . import memtune

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if os.environ.get("SSHCONDUIT_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the preferred loop."""
    memtune.tune_malloc()  # the command-line tools only: a library user's process keeps its own settings
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` up to its first real wait now, not a loop turn later; it gets a Task only if it waits.

    Python 3.12's eager tasks, for 3.11: a channel open whose connect completes at once (loopback) is answered
    in the same callback, without a Task and the loop turn its first step costs.
    """
    try:
        waiting_on = coro.send(None)
    except StopIteration:
        return None
    task = asyncio.ensure_future(_resume(coro, waiting_on))
    task.add_done_callback(lambda _: coro.close())  # cancelled before its first step, the Task never reached coro
    return task


async def _resume(coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    await _Delegate(coro, waiting_on)


class _Delegate:
    """``yield from`` a coroutine whose first yield has already been taken: the Task now waits on that."""

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, None]:
        value = self._first
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # cancellation and the like go to the coroutine, as with yield from
                try:
                    value = self._coro.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                value = self._coro.send(sent)
            except StopIteration:
                return
