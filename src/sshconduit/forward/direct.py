"""The server's side of local forwarding: direct-tcpip and direct-streamlocal channels (RFC 4254 7.2)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from typing import TYPE_CHECKING, TypeVar

from .. import limits, messages
from ..errors import ChannelOpenError, ProtocolError
from .bridge import StreamBridge
from .socket_stream import SocketStream, connect_socket, connect_stream

if TYPE_CHECKING:
    from ..privsep import ForwardHelper

log = logging.getLogger("sshconduit.forward")

_Request = TypeVar("_Request", messages.DirectTcpip, messages.DirectStreamlocal)

OPEN_PROHIBITED = 1
OPEN_CONNECT_FAILED = 2


def _reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return exc.strerror or "Name or service not known"
    # asyncio's "Connect call failed (...)" hides the plain reason users search for.
    return os.strerror(exc.errno) if exc.errno else exc.strerror or os.strerror(errno.EIO)


async def connect_tcp(
    host: str,
    port: int,
    label: str,
    helper: ForwardHelper | None = None,
    open_data: bytes = b"",
    loop: asyncio.AbstractEventLoop | None = None,
) -> StreamBridge:
    """Connect to host:port (name resolution off the event loop) and return the bridge for the channel, with
    ``open_data`` (the client's first bytes, sent in its CHANNEL_OPEN) written first.
    With a privsep ``helper`` the socket is made and connected by the user's helper process."""
    bridge = StreamBridge(label)
    try:
        sock = await helper.connect_tcp(host, port) if helper is not None else await connect_stream(host, port)
    except OSError as exc:
        log.info("%s: connect to %s port %d failed: %s", label, host, port, _reason(exc))
        raise ChannelOpenError(OPEN_CONNECT_FAILED, _reason(exc)) from None
    _start(SocketStream(sock, bridge.protocol, loop), bridge, open_data)
    return bridge


def _start(stream: SocketStream, bridge: StreamBridge, open_data: bytes) -> None:
    stream.start(open_data)
    bridge.count_in(len(open_data))


async def connect_unix(
    path: str,
    label: str,
    helper: ForwardHelper | None = None,
    open_data: bytes = b"",
    loop: asyncio.AbstractEventLoop | None = None,
) -> StreamBridge:
    bridge = StreamBridge(label)
    try:
        if helper is not None:
            sock = await helper.connect_unix(path)
        else:
            sock = await connect_socket(socket.AF_UNIX, path)
    except OSError as exc:
        log.info("%s: connect to %s failed: %s", label, path, _reason(exc))
        raise ChannelOpenError(OPEN_CONNECT_FAILED, _reason(exc)) from None
    _start(SocketStream(sock, bridge.protocol, loop), bridge, open_data)
    return bridge


def decode_direct_tcpip(type_data: bytes) -> tuple[messages.DirectTcpip, bytes]:
    """The request and its open data (messages.OpenData: what the client sent before the channel opened)."""
    return _decode_open(messages.DirectTcpip, type_data, "bad direct-tcpip request")


def decode_direct_streamlocal(type_data: bytes) -> tuple[messages.DirectStreamlocal, bytes]:
    return _decode_open(messages.DirectStreamlocal, type_data, "bad direct-streamlocal request")


def _decode_open(kind: type[_Request], type_data: bytes, complaint: str) -> tuple[_Request, bytes]:
    try:
        request, rest = kind.decode_with_rest(type_data)
        open_data = messages.OpenData.decode(rest).data if rest else b""
    except ProtocolError:
        raise ChannelOpenError(OPEN_CONNECT_FAILED, complaint) from None
    if len(open_data) > limits.MAX_OPEN_DATA:
        raise ChannelOpenError(OPEN_CONNECT_FAILED, complaint)
    return request, open_data
