"""The server's side of local forwarding: direct-tcpip and direct-streamlocal channels (RFC 4254 7.2)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from typing import TYPE_CHECKING

from .. import messages
from ..errors import ChannelOpenError, ProtocolError
from .bridge import StreamBridge

if TYPE_CHECKING:
    from ..privsep import ForwardHelper

log = logging.getLogger("sshconduit.forward")

OPEN_PROHIBITED = 1
OPEN_CONNECT_FAILED = 2


def _reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return exc.strerror or "Name or service not known"
    # asyncio's "Connect call failed (...)" hides the plain reason users search for.
    return os.strerror(exc.errno) if exc.errno else exc.strerror or os.strerror(errno.EIO)


async def connect_tcp(host: str, port: int, label: str, helper: ForwardHelper | None = None) -> StreamBridge:
    """Connect to host:port (name resolution off the event loop) and return the bridge for the channel.
    With a privsep ``helper`` the socket is made and connected by the user's helper process."""
    bridge = StreamBridge(label)
    loop = asyncio.get_running_loop()
    try:
        if helper is not None:
            await loop.create_connection(lambda: bridge.protocol, sock=await helper.connect_tcp(host, port))
        else:
            await loop.create_connection(lambda: bridge.protocol, host, port)
    except OSError as exc:
        log.info("%s: connect to %s port %d failed: %s", label, host, port, _reason(exc))
        raise ChannelOpenError(OPEN_CONNECT_FAILED, _reason(exc)) from None
    return bridge


async def connect_unix(path: str, label: str, helper: ForwardHelper | None = None) -> StreamBridge:
    bridge = StreamBridge(label)
    loop = asyncio.get_running_loop()
    try:
        if helper is not None:
            await loop.create_unix_connection(lambda: bridge.protocol, sock=await helper.connect_unix(path))
        else:
            await loop.create_unix_connection(lambda: bridge.protocol, path)
    except OSError as exc:
        log.info("%s: connect to %s failed: %s", label, path, _reason(exc))
        raise ChannelOpenError(OPEN_CONNECT_FAILED, _reason(exc)) from None
    return bridge


def decode_direct_tcpip(type_data: bytes) -> messages.DirectTcpip:
    try:
        return messages.DirectTcpip.decode(type_data)
    except ProtocolError:
        raise ChannelOpenError(OPEN_CONNECT_FAILED, "bad direct-tcpip request") from None


def decode_direct_streamlocal(type_data: bytes) -> messages.DirectStreamlocal:
    try:
        return messages.DirectStreamlocal.decode(type_data)
    except ProtocolError:
        raise ChannelOpenError(OPEN_CONNECT_FAILED, "bad direct-streamlocal request") from None
