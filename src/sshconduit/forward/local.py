"""The client's side of local forwarding (ssh -L): a listener whose connections become channels."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from types import TracebackType

from .. import limits, messages
from ..aio import SSHConnection
from ..config.forward_spec import ForwardSpec
from ..errors import ChannelOpenError, SSHError
from .bridge import ForwardCounters, StreamBridge
from .socket_stream import SocketStream, Stream, StreamListener, listen_stream, unix_listening_socket

log = logging.getLogger("sshconduit.forward")

STREAMLOCAL_BIND_MASK = 0o177  # OpenSSH's StreamLocalBindMask default: the socket is 0600


class ForwardError(SSHError):
    """A forward could not be set up; the message reads like OpenSSH's (``bind [127.0.0.1]:110: ...``)."""


def bind_error(host: str, port: int | str, exc: OSError) -> ForwardError:
    # asyncio wraps the reason in "error while attempting to bind ..."; users search for the plain one.
    text = os.strerror(exc.errno) if exc.errno else exc.strerror or "unknown error"
    message = f"bind [{host}]:{port}: {text}"
    if exc.errno == errno.EACCES and isinstance(port, int) and 0 < port < 1024:
        message += " (ports below 1024 need root)"
    return ForwardError(message)


def listen_hosts(listen_host: str | None, gateway_ports: bool) -> list[str | None]:
    """Where ssh binds a forward: loopback by default, every address with -g or an explicit '*'/''."""
    if listen_host in (None, "localhost"):
        return [None] if gateway_ports and listen_host is None else ["127.0.0.1", "::1"]
    if listen_host in ("*", ""):
        return [None]
    return [listen_host]


class LocalForward:
    """``async with conn.forward_local(...) as fwd`` — ``fwd.port`` is the bound port."""

    def __init__(
        self, conn: SSHConnection, spec: ForwardSpec, gateway_ports: bool = False, bind_unlink: bool = False
    ) -> None:
        self.conn = conn
        self.spec = spec
        self.gateway_ports = gateway_ports
        self.bind_unlink = bind_unlink  # StreamLocalBindUnlink: remove a file left at a unix listener's path
        self.counters = ForwardCounters()
        self.port: int | None = None
        self.path: str | None = None
        self._servers: list[StreamListener] = []
        self.destination = spec.connect_path or f"{spec.connect_host}:{spec.connect_port}"

    async def start(self) -> LocalForward:
        spec = self.spec
        if spec.listen_path is not None:
            try:
                sock = unix_listening_socket(
                    spec.listen_path, STREAMLOCAL_BIND_MASK, self.bind_unlink, limits.FORWARD_LISTEN_BACKLOG
                )
            except OSError as exc:
                raise ForwardError(f"bind {spec.listen_path}: {exc.strerror}") from None
            self._servers.append(StreamListener([sock], self._new_bridge))
            self.path = spec.listen_path
            return self
        port = spec.listen_port or 0
        errors: list[ForwardError] = []
        for host in listen_hosts(spec.listen_host, self.gateway_ports):
            try:
                bind_port = port if self.port is None else self.port
                sockets = await listen_stream(host, bind_port, limits.FORWARD_LISTEN_BACKLOG)
            except OSError as exc:
                if host == "::1" and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    continue  # no IPv6 loopback on this machine
                errors.append(bind_error(host or "0.0.0.0", port, exc))
                continue
            self._servers.append(StreamListener(sockets, self._new_bridge))
            if self.port is None:
                self.port = sockets[0].getsockname()[1]
        if not self._servers:
            raise errors[0]
        for err in errors:
            log.warning("%s", err)
        if port == 0:
            log.warning("Allocated port %d for local forward to %s", self.port, self.destination)
        return self

    def _new_bridge(self) -> asyncio.Protocol:
        bridge = StreamBridge("local forward", self.counters, on_open_failed=self._open_failed)
        bridge.on_socket_made = self._open_channel
        return bridge.protocol

    def _open_channel(self, bridge: StreamBridge, sock: Stream) -> None:
        spec = self.spec
        try:
            if spec.connect_path is not None:
                kind, data = "direct-streamlocal@openssh.com", messages.DirectStreamlocal(spec.connect_path, "", 0)
            else:
                peer = sock.get_extra_info("peername")
                orig_host, orig_port = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("127.0.0.1", 0)
                kind = "direct-tcpip"
                data = messages.DirectTcpip(spec.connect_host or "", spec.connect_port or 0, orig_host, orig_port)
            channel_id = self.conn.open_channel(bridge, kind, data.encode() + self._open_data(bridge, sock))
        except SSHError as exc:
            log.error("local forward: %s", exc)
            sock.abort()
            return
        bridge.label = f"channel {channel_id}: forward to {self.destination}"
        log.debug("Connection to port %s forwarding to %s requested.", self.port or self.path, self.destination)

    def _open_data(self, bridge: StreamBridge, sock: Stream) -> bytes:
        """What the client has sent already, for a server that takes it in the CHANNEL_OPEN: the first request
        then costs no round trip for OPEN_CONFIRMATION."""
        if not isinstance(sock, SocketStream) or messages.OPEN_DATA_EXTENSION not in self.conn.core.peer_extensions:
            return b""
        first = sock.read_now(limits.MAX_OPEN_DATA)
        if not first:
            return b""
        bridge.count_out(len(first))
        return messages.OpenData(first).encode()

    def _open_failed(self, bridge: StreamBridge, error: ChannelOpenError) -> None:
        log.error("channel %d: open failed: %s", bridge.channel_id, str(error).removeprefix("open failed: "))

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def __aenter__(self) -> LocalForward:
        return await self.start() if not self._servers else self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
