"""conduitd's listening sockets by (address, port), so that SIGHUP can rebind them as sshd's re-exec does.

sshd re-executes itself on SIGHUP and binds the new ListenAddress/Port set; its connections live on in their
own processes. conduitd keeps one process: a reload closes the listeners no longer configured and binds the new
ones, and established connections (which do not belong to a listener) carry on. If a new address cannot be
bound, the old set is restored and the reload is refused, leaving the previous configuration in force.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

log = logging.getLogger("sshconduit.conduitd")

Endpoint = tuple[str | None, int]


class Closable(Protocol):
    def close(self) -> None: ...


# binds one endpoint; raises OSError whose message names the address ("Bind to port 22 on :: failed: ...")
Binder = Callable[[Endpoint], Awaitable[Sequence[Closable]]]


class ListenerSet:
    def __init__(self, bind: Binder) -> None:
        self.bind = bind
        self.bound: dict[Endpoint, Sequence[Closable]] = {}

    async def start(self, endpoints: Sequence[Endpoint]) -> None:
        """Bind every endpoint; on a failure close what was bound and raise."""
        try:
            for endpoint in _unique(endpoints):
                self.bound[endpoint] = await self.bind(endpoint)
        except OSError:
            self.close()
            raise

    async def rebind(self, endpoints: Sequence[Endpoint]) -> bool:
        """Listen on exactly ``endpoints``; False (and the old set listening again) when one cannot be bound."""
        wanted = _unique(endpoints)
        dropped = [e for e in self.bound if e not in wanted]
        added = [e for e in wanted if e not in self.bound]
        # close first: the new set may overlap the old one (0.0.0.0:22 -> 127.0.0.1:22 needs 0.0.0.0:22 gone)
        for endpoint in dropped:
            _close_all(self.bound.pop(endpoint))
        made: dict[Endpoint, Sequence[Closable]] = {}
        try:
            for endpoint in added:
                made[endpoint] = await self.bind(endpoint)
        except OSError as exc:
            log.error("%s; keeping the previous configuration", exc)
            for listeners in made.values():
                _close_all(listeners)
            for endpoint in dropped:
                try:
                    self.bound[endpoint] = await self.bind(endpoint)
                except OSError as again:  # taken by someone else in the meantime: nothing we can do but say so
                    log.error("%s", again)
            return False
        for host, port in dropped:
            log.info("Server no longer listening on %s port %d.", host or "0.0.0.0", port)
        self.bound.update(made)
        return True

    def close(self) -> None:
        for listeners in self.bound.values():
            _close_all(listeners)
        self.bound.clear()


def _unique(endpoints: Sequence[Endpoint]) -> list[Endpoint]:
    return list(dict.fromkeys(endpoints))


def _close_all(listeners: Sequence[Closable]) -> None:
    for listener in listeners:
        listener.close()
