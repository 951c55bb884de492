"""sshd's ClientAliveInterval / ClientAliveCountMax: probe a silent client, drop one that stopped answering."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from .aio import SSHConnection
from .errors import SSHError

log = logging.getLogger("sshconduit.server")

KEEPALIVE_REQUEST = "keepalive@openssh.com"


async def client_alive(conn: SSHConnection, interval: float, count_max: int) -> None:
    """Every ``interval`` seconds of silence send a keepalive wanting a reply; any byte from the client (the reply
    included) resets the count. More than ``count_max`` unanswered probes: log as sshd and close."""
    unanswered = 0
    probes: set[asyncio.Task[tuple[bool, bytes]]] = set()
    try:
        while not conn.closed.done():
            silent_for = time.monotonic() - conn.last_received
            if silent_for < interval:
                await asyncio.wait([conn.closed], timeout=interval - silent_for)
                unanswered = 0
                continue
            if unanswered >= count_max:
                log.info("Timeout, client not responding from user %s %s port %d", conn.user, *conn.peername)
                conn.drop("Timeout, client not responding")
                return
            unanswered += 1
            sent_at = time.monotonic()
            log.debug("client alive probe %d of %d for %s port %d", unanswered, count_max, *conn.peername)
            probe = asyncio.ensure_future(conn.global_request(KEEPALIVE_REQUEST))
            probes.add(probe)
            probe.add_done_callback(_forget(probes))
            await asyncio.wait([conn.closed], timeout=interval)
            if conn.last_received > sent_at:  # answered (the reply, or anything else)
                unanswered = 0
    finally:
        for probe in probes:
            probe.cancel()


def _forget(probes: set[asyncio.Task[tuple[bool, bytes]]]):  # type: ignore[no-untyped-def]
    def done(task: asyncio.Task[tuple[bool, bytes]]) -> None:
        probes.discard(task)
        if not task.cancelled():
            with contextlib.suppress(SSHError):
                task.exception()  # a probe that dies with the connection is expected

    return done


def start(conn: SSHConnection, interval: float, count_max: int) -> None:
    """Run the probe loop for the life of the connection (no-op when interval is 0)."""
    if interval <= 0:
        return
    task = conn.loop.create_task(client_alive(conn, interval, count_max))
    conn.closed.add_done_callback(lambda _: task.cancel())
