"""The server's side of remote forwarding (ssh -R): tcpip-forward and streamlocal-forward listeners.

RFC 4254 7.1 and OpenSSH PROTOCOL 2.4. A client asks the server to listen; every connection the listener
accepts becomes a ``forwarded-tcpip`` (or ``forwarded-streamlocal@openssh.com``) channel back to the client,
pumped by the same StreamBridge as every other forward. Listeners belong to their SSH connection: a cancel
request closes one, the connection going away closes them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import pwd
import socket
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import audit, limits, messages
from ..aio import SSHConnection
from ..connection import GlobalRequestReceived
from ..errors import ChannelOpenError, ProtocolError, SSHError
from ..policy import ServerPolicy
from ..wire import pack_u32
from .bridge import ForwardCounters, StreamBridge
from .socket_stream import Stream, StreamListener, listening_socket, unix_listening_socket

if TYPE_CHECKING:
    from ..privsep import ForwardHelper

log = logging.getLogger("sshconduit.forward")

TCPIP_FORWARD = "tcpip-forward"
CANCEL_TCPIP_FORWARD = "cancel-tcpip-forward"
STREAMLOCAL_FORWARD = "streamlocal-forward@openssh.com"
CANCEL_STREAMLOCAL_FORWARD = "cancel-streamlocal-forward@openssh.com"
GLOBAL_REQUESTS = frozenset((TCPIP_FORWARD, CANCEL_TCPIP_FORWARD, STREAMLOCAL_FORWARD, CANCEL_STREAMLOCAL_FORWARD))

# Binding IPv6 where the machine has none is not an error while an IPv4 address of the same forward binds.
NO_IPV6 = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
LOOPBACK = ("127.0.0.1", "::1")
WILDCARD = ("0.0.0.0", "::")


def bind_addresses(requested: str, gateway_ports: str) -> tuple[str, ...]:
    """Where sshd binds a tcpip-forward for the requested address (channel_fwd_bind_addr() semantics).

    GatewayPorts no: loopback, unless the client named 127.0.0.1 or ::1 exactly; yes: every address whatever
    was asked; clientspecified: "" and "*" are every address, "localhost" both loopbacks, anything else as asked.
    """
    if gateway_ports == "yes":
        return WILDCARD
    if gateway_ports == "clientspecified":
        if requested in ("", "*"):
            return WILDCARD
        if requested != "localhost":
            return (requested,)
    elif requested in LOOPBACK:
        return (requested,)
    return LOOPBACK


def _strerror(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return exc.strerror or "Name or service not known"
    return os.strerror(exc.errno) if exc.errno else exc.strerror or "unknown error"


@dataclass
class RemoteListener:
    """One accepted tcpip-forward or streamlocal-forward: the address as the client asked, and its sockets."""

    address: str  # as requested: echoed in every forwarded-tcpip channel, matched by cancel
    port: int  # as requested (0 for "allocate one")
    bound_port: int = 0
    path: str | None = None
    servers: list[StreamListener] = field(default_factory=list)
    counters: ForwardCounters = field(default_factory=ForwardCounters)
    helper: ForwardHelper | None = None  # privsep: the socket file is the user's, removed by the user's helper

    def close(self) -> None:
        for server in self.servers:
            server.close()
        self.servers.clear()
        if self.path is not None and self.helper is not None:
            self.helper.unlink_socket(self.path)
            self.path = None
        if self.path is not None:
            # as OpenSSH, a socket left behind would need StreamLocalBindUnlink; we remove ours when it is ours
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
            self.path = None


class RemoteForwards:
    """The remote-forward listeners of one server connection, and the answers to its four global requests."""

    def __init__(self, conn: SSHConnection, policy: ServerPolicy) -> None:
        self.conn = conn
        self.policy = policy
        self.listeners: list[RemoteListener] = []
        self._closed = False
        self._binding = 0  # requests between the cap check and the bind: handlers of requests run concurrently
        self.helper: ForwardHelper | None = None  # privsep: a root server binds the user's listeners as the user
        conn.cleanup_callbacks.append(self.close_all)

    async def handle(self, event: GlobalRequestReceived) -> bytes | None:
        """The reply data for REQUEST_SUCCESS, or None for REQUEST_FAILURE."""
        try:
            if event.name == TCPIP_FORWARD:
                req = messages.TcpipForward.decode(event.data)
                return await self.tcpip_forward(req.address, req.port, event.want_reply)
            if event.name == CANCEL_TCPIP_FORWARD:
                req = messages.TcpipForward.decode(event.data)
                return self.cancel_tcpip(req.address, req.port)
            if event.name == STREAMLOCAL_FORWARD:
                path = messages.StreamlocalForward.decode(event.data).socket_path
                return await self.streamlocal_forward(path)
            if event.name == CANCEL_STREAMLOCAL_FORWARD:
                path = messages.StreamlocalForward.decode(event.data).socket_path
                return self.cancel_streamlocal(path)
        except ProtocolError as exc:
            log.info("%s: bad %s request: %s", self._who, event.name, exc)
        return None

    @property
    def _who(self) -> str:
        return f"{self.conn.user} from {self.conn.peername[0]} port {self.conn.peername[1]}"

    def _room_for_one_more(self, what: str) -> bool:
        if self._closed:
            return False
        if len(self.listeners) + self._binding >= limits.MAX_REMOTE_LISTENERS:
            log.info("refused remote forward %s for %s: too many forwards (%d)", what, self._who, len(self.listeners))
            return False
        return True

    # --- tcpip-forward ---

    async def tcpip_forward(self, address: str, port: int, want_reply: bool) -> bytes | None:
        if port > 65535:
            log.info("refused remote port forward listen %s port %d for %s: bad port", address, port, self._who)
            return None
        try:
            uid = pwd.getpwnam(self.conn.user or "").pw_uid
        except KeyError:
            return None
        denial = self.policy.remote_forwarding_denial(address, port, uid)
        if denial is None and port == 0 and not want_reply:
            denial = "port 0 without want_reply"  # the client could never learn the port (sshd refuses too)
        if denial is not None:
            if denial in ("PermitListen", "authorized_keys permitlisten"):  # sshd's own words for this case
                log.info(
                    "Received request from %s port %d to remote forward to host %s port %d, but the request was "
                    "denied.",
                    *self.conn.peername,
                    address,
                    port,
                )
            else:
                log.info("refused remote port forward listen %s port %d for %s (%s)", address, port, self._who, denial)
            audit.refused(self.conn.user, self.conn.peername[0], "tcpip-forward", f"{address}:{port}", denial)
            return None
        if not self._room_for_one_more(f"listen {address} port {port}"):
            return None
        listener = RemoteListener(address, port)
        self._binding += 1
        try:
            bound = await self._bind_tcp(listener, bind_addresses(address, self.policy.gateway_ports))
        finally:
            self._binding -= 1
        if not bound:
            return None
        if self._closed:  # the connection went while we were binding
            listener.close()
            return None
        self.listeners.append(listener)
        log.debug("%s: remote forward listening on %s port %d", self._who, address, listener.bound_port)
        return pack_u32(listener.bound_port) if port == 0 else b""

    async def _bind_tcp(self, listener: RemoteListener, hosts: tuple[str, ...]) -> bool:
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        for host in hosts:
            try:
                infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            except OSError as exc:
                if not (host == "::" or host == "::1") or len(hosts) == 1:
                    errors.append(f"getaddrinfo {host}: {_strerror(exc)}")
                continue
            for family, kind, proto, _, sockaddr in infos:
                port = listener.bound_port or listener.port
                try:
                    address = (sockaddr[0], port, *sockaddr[2:])
                    if self.helper is not None:
                        sock = await self.helper.listen_tcp(family, kind, proto, address)
                    else:
                        sock = listening_socket(family, kind, proto, address, limits.LISTEN_BACKLOG)
                    server = StreamListener([sock], lambda: self._new_tcp_bridge(listener))
                except OSError as exc:
                    if family == socket.AF_INET6 and exc.errno in NO_IPV6 and len(hosts) > 1:
                        continue
                    errors.append(f"bind [{sockaddr[0]}]:{port}: {_strerror(exc)}")
                    continue
                listener.servers.append(server)
                if not listener.bound_port:
                    listener.bound_port = server.sockets[0].getsockname()[1]
        for message in errors:
            # as sshd: a failure is only an error when no address of the forward could be bound
            (log.info if listener.servers else log.error)("%s", message)
        if not listener.servers:
            log.error("cannot listen to port: %d", listener.port)
            return False
        return True

    def _new_tcp_bridge(self, listener: RemoteListener) -> asyncio.Protocol:
        bridge = StreamBridge("forwarded-tcpip", listener.counters, on_open_failed=_open_failed)
        destination = f"{listener.address}:{listener.bound_port}"
        audit.track(bridge, self.conn.user, self.conn.peername[0], "forwarded-tcpip", destination)
        bridge.on_socket_made = lambda b, sock: self._open_tcp_channel(listener, b, sock)
        return bridge.protocol

    def _open_tcp_channel(self, listener: RemoteListener, bridge: StreamBridge, sock: Stream) -> None:
        peer = sock.get_extra_info("peername")
        orig_host, orig_port = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("", 0)
        data = messages.DirectTcpip(listener.address, listener.bound_port, orig_host, orig_port).encode()
        try:
            channel_id = self.conn.open_channel(bridge, "forwarded-tcpip", data)
        except SSHError:
            sock.abort()  # the SSH connection is going away
            return
        bridge.label = f"channel {channel_id}: forwarded-tcpip {listener.address}:{listener.bound_port}"
        log.debug("Connection from %s port %d forwarded to remote address %s port %d", orig_host, orig_port,
                  listener.address, listener.bound_port)  # fmt: skip

    # --- streamlocal-forward@openssh.com ---

    async def streamlocal_forward(self, path: str) -> bytes | None:
        denial = self.policy.remote_streamlocal_denial()
        if denial is not None:
            log.info("refused remote streamlocal forward to path %s for %s (%s)", path, self._who, denial)
            audit.refused(self.conn.user, self.conn.peername[0], "streamlocal-forward", path, denial)
            return None
        if not path or "\0" in path:
            return None
        if not self._room_for_one_more(f"path {path}"):
            return None
        listener = RemoteListener("", 0, path=None)
        self._binding += 1
        try:
            mask, unlink_first = self.policy.stream_local_bind_mask, self.policy.stream_local_bind_unlink
            if self.helper is not None:
                sock = await self.helper.listen_unix(path, mask, unlink_first)
            else:
                sock = unix_listening_socket(path, mask, unlink_first, limits.LISTEN_BACKLOG)
            server = StreamListener([sock], lambda: self._new_unix_bridge(path, listener))
        except OSError as exc:
            log.error("bind %s: %s", path, _strerror(exc))
            log.error("cannot listen to path: %s", path)
            return None
        finally:
            self._binding -= 1
        listener.path = path
        listener.helper = self.helper
        listener.servers.append(server)
        if self._closed:
            listener.close()
            return None
        self.listeners.append(listener)
        log.debug("%s: remote forward listening on path %s", self._who, path)
        return b""

    def _new_unix_bridge(self, path: str, listener: RemoteListener) -> asyncio.Protocol:
        bridge = StreamBridge("forwarded-streamlocal", listener.counters, on_open_failed=_open_failed)
        audit.track(bridge, self.conn.user, self.conn.peername[0], "forwarded-streamlocal", path)
        bridge.on_socket_made = lambda b, sock: self._open_unix_channel(path, b, sock)
        return bridge.protocol

    def _open_unix_channel(self, path: str, bridge: StreamBridge, sock: Stream) -> None:
        data = messages.ForwardedStreamlocal(path).encode()
        try:
            channel_id = self.conn.open_channel(bridge, "forwarded-streamlocal@openssh.com", data)
        except SSHError:
            sock.abort()
            return
        bridge.label = f"channel {channel_id}: forwarded-streamlocal {path}"

    # --- cancel and teardown ---

    def cancel_tcpip(self, address: str, port: int) -> bytes | None:
        for listener in self.listeners:
            if listener.path is None and listener.address == address and port in (listener.port, listener.bound_port):
                return self._cancel(listener)
        return None

    def cancel_streamlocal(self, path: str) -> bytes | None:
        for listener in self.listeners:
            if listener.path == path:
                return self._cancel(listener)
        return None

    def _cancel(self, listener: RemoteListener) -> bytes:
        self.listeners.remove(listener)
        listener.close()
        log.debug("%s: remote forward %s cancelled", self._who, listener.path or f"{listener.address}:{listener.port}")
        return b""

    def close_all(self) -> None:
        """The connection is gone: stop listening (forwarded channels already open close with it)."""
        self._closed = True
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            listener.close()


def _open_failed(bridge: StreamBridge, error: ChannelOpenError) -> None:
    log.info("%s: open failed: %s", bridge.label, str(error).removeprefix("open failed: "))
