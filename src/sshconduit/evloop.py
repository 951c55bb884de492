"""The event loop the command-line tools run on: uvloop when it is installed, else asyncio's default.

uvloop's transports do the socket reads and writes of the data path in C. ``SSHCONDUIT_UVLOOP=0`` turns it
off (to compare the two, or to rule it out when chasing a bug).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
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
