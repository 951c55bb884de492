"""The server's public API: ``listen()`` and the per-connection answers to channel and global requests."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import pwd
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from . import audit, chroot, connection, keepalive, limits, messages, pam_session, privsep, session_policy
from .aio import ChannelHandler, SSHConnection
from .crypto import keys
from .errors import ChannelOpenError, Disconnected, DisconnectReason
from .forward import direct, remote
from .forward.bridge import StreamBridge
from .forward.socket_stream import listen_stream
from .policy import ServerPolicy
from .transport import Role, TransportConfig

log = logging.getLogger("sshconduit.server")

OPEN_PROHIBITED = 1
OPEN_UNKNOWN_TYPE = 3


@dataclass
class ServerOptions:
    listen: Sequence[tuple[str | None, int]] = (("127.0.0.1", 2222),)
    host_keys: Sequence[keys.PrivateKey] = ()
    policy: ServerPolicy = field(default_factory=ServerPolicy)
    transport: TransportConfig = field(default_factory=TransportConfig)
    max_auth_tries: int = 6
    login_grace_time: float = 120.0
    banner: str | None = None
    permit_tty: bool = True


class ServerConnectionHandler:
    """Opens channels for one authenticated connection according to its own copy of the policy."""

    def __init__(self, options: ServerOptions, policy: ServerPolicy) -> None:
        self.options = options
        self.policy = policy
        self.remote_forwards: remote.RemoteForwards | None = None  # made on the first -R request
        self.helper: privsep.ForwardHelper | None = None  # root serving another user: makes that user's sockets
        self._helper_needed: bool | None = None  # decided once per connection (a passwd lookup per channel costs)
        self.pam_opening: asyncio.Future[dict[str, str]] | None = None  # UsePAM: the session's environment

    def _helper(self, conn: SSHConnection) -> privsep.ForwardHelper | None:
        """The user's privsep helper when the server is root and the user is not (started on first use)."""
        if self.helper is None and self._helper_needed is not False:
            creds = privsep.credentials_for(conn.user or "", self.policy.chroot_directory)
            self._helper_needed = creds is not None
            if creds is None:
                return None
            self.helper = privsep.ForwardHelper(creds)
            # after this turn of the loop: the connection's listeners close first and may still need it
            helper = self.helper
            conn.cleanup_callbacks.append(lambda: asyncio.get_running_loop().call_soon(helper.close))
        return self.helper

    def enter_chroot(self, conn: SSHConnection) -> bool:
        """ChrootDirectory: start the user's helper (it enters the jail) as soon as the user is in, as sshd chroots
        its post-auth process: an unsafe directory ends the connection now (logged by whoever checked it)."""
        try:
            helper = self._helper(conn)
            if helper is not None:
                helper.start()
        except OSError as exc:
            if isinstance(exc, chroot.ChrootError):
                log.error("%s", exc)
            conn.abort(Disconnected(DisconnectReason.BY_APPLICATION, "ChrootDirectory"))  # as sshd: no reason given
            return False
        return True

    async def open_channel(self, conn: SSHConnection, event: connection.ChannelOpenRequest) -> ChannelHandler:
        kind = event.channel_type
        if kind == "session":
            return self._session(conn, await self._pam_environment(conn))
        if kind == "direct-tcpip":
            req, open_data = direct.decode_direct_tcpip(event.type_data)
            denial = self.policy.local_forwarding_denial(req.host, req.port)
            label = f"{conn.user}@{conn.peername[0]}: direct-tcpip to {req.host}:{req.port}"
            destination = f"{req.host}:{req.port}"
            if denial is not None:
                log.info("refused local port forward to %s port %d for %s (%s)", req.host, req.port, conn.user, denial)
                audit.refused(conn.user, conn.peername[0], kind, destination, denial)
                raise ChannelOpenError(OPEN_PROHIBITED, "open failed")
            log.debug("%s: originator %s port %d", label, req.originator_host, req.originator_port)
            opening = direct.connect_tcp(req.host, req.port, label, self._helper(conn), open_data, conn.loop)
            bridge = await _open_audited(conn, kind, destination, opening)
            return audit.track(bridge, conn.user, conn.peername[0], kind, destination)
        if kind == "direct-streamlocal@openssh.com":
            req_unix, open_data = direct.decode_direct_streamlocal(event.type_data)
            path = req_unix.socket_path
            denial = self.policy.streamlocal_forwarding_denial()
            if denial is not None:
                log.info("refused streamlocal forward to %s for %s (%s)", path, conn.user, denial)
                audit.refused(conn.user, conn.peername[0], kind, path, denial)
                raise ChannelOpenError(OPEN_PROHIBITED, "open failed")
            label = f"{conn.user}: streamlocal {path}"
            opening = direct.connect_unix(path, label, self._helper(conn), open_data, conn.loop)
            bridge = await _open_audited(conn, kind, path, opening)
            return audit.track(bridge, conn.user, conn.peername[0], kind, path)
        raise ChannelOpenError(OPEN_UNKNOWN_TYPE, f"unknown channel type: {kind}")

    async def _pam_environment(self, conn: SSHConnection) -> dict[str, str]:
        """UsePAM: the connection's PAM session, opened as root with the first session channel; its environment."""
        if not self.policy.use_pam:
            return {}
        if self.pam_opening is None:  # one session per connection, as sshd; later channels wait for it
            opening = pam_session.open_for(conn.user or "", conn.peername[0], conn.cleanup_callbacks)
            self.pam_opening = asyncio.ensure_future(opening)
            conn.cleanup_callbacks.append(self.pam_opening.cancel)
        try:
            return await asyncio.shield(self.pam_opening)
        except OSError:
            log.error("PAM: no session for %s: session refused", conn.user)
            raise ChannelOpenError(OPEN_PROHIBITED, "open failed") from None

    def _session(self, conn: SSHConnection, pam_env: dict[str, str]) -> ChannelHandler:
        from .session import ServerSession  # sessions are not needed by a forward-only server

        user = conn.user or ""
        entry = pwd.getpwnam(user)
        key_options = self.policy.key_options
        # sshd's order: its own variables, then authorized_keys environment=, then SSH_* (the client's accepted
        # AcceptEnv variables go under all of these, in the session)
        env = {
            "USER": user,
            "LOGNAME": user,
            "HOME": entry.pw_dir,
            "SHELL": entry.pw_shell or "/bin/sh",
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            **pam_env,  # as sshd: PAM's environment after its own variables, before the user's
            **session_policy.key_environment(self.policy.permit_user_environment, key_options, user),
            "SSH_CLIENT": f"{conn.peername[0]} {conn.peername[1]} {conn.local_port}",
            "SSH_CONNECTION": f"{conn.peername[0]} {conn.peername[1]} {conn.local_address} {conn.local_port}",
        }
        sessions = sum(isinstance(h, ServerSession) for h in conn.handlers.values())
        if sessions >= self.policy.max_sessions:
            log.info("refused session for %s: MaxSessions %d reached", user, self.policy.max_sessions)
            audit.refused(user, conn.peername[0], "session", "", "MaxSessions")
            raise ChannelOpenError(OPEN_PROHIBITED, "open failed")
        allow_pty = self.options.permit_tty and self.policy.permit_tty
        allow_pty = allow_pty and (key_options is None or key_options.allows_pty())
        command, source = session_policy.forced_command(self.policy.force_command, key_options)
        if command is not None:
            log.debug("session for %s: forced command %s", user, source)
        return ServerSession(
            entry.pw_shell or "/bin/sh",
            env,
            allow_pty=allow_pty,
            forced_command=command,
            accept_env=self.policy.accept_env,
            subsystems=self.policy.subsystems,
            # a root server drops to the user in the child; a privsep connection process asks the user's helper
            credentials=None
            if privsep.helper_source is not None
            else privsep.credentials_for(user, self.policy.chroot_directory),
            spawner=helper.spawn if privsep.helper_source is not None and (helper := self._helper(conn)) else None,
        )

    async def global_request(self, conn: SSHConnection, event: connection.GlobalRequestReceived) -> bytes | None:
        if event.name in remote.GLOBAL_REQUESTS:
            if self.remote_forwards is None:
                self.remote_forwards = remote.RemoteForwards(conn, self.policy)
                self.remote_forwards.helper = self._helper(conn)
            return await self.remote_forwards.handle(event)
        if event.name == "keepalive@openssh.com":
            return None  # OpenSSH answers failure: the reply itself is the keepalive
        log.debug("unsupported global request %s", event.name)
        return None


def make_server_connection(options: ServerOptions) -> SSHConnection:
    policy = copy.copy(options.policy)  # each connection keeps the policy it started with
    handler = ServerConnectionHandler(options, policy)
    conn = SSHConnection(
        Role.SERVER,
        options.transport,
        host_keys=tuple(options.host_keys),
        auth_policy=policy,
        channel_opener=handler.open_channel,
        global_request_handler=handler.global_request,
        max_auth_tries=options.max_auth_tries,
        banner=options.banner,
        login_grace_time=options.login_grace_time,
        max_channels=limits.MAX_SERVER_CHANNELS,
    )

    def made() -> None:
        policy.client_address = conn.peername[0]
        policy.local_address, policy.local_port = conn.local_address, conn.local_port

    conn.connection_made_hook = made
    conn.core.ext_info[messages.OPEN_DATA_EXTENSION] = b"0"  # open_channel writes a forward's open data

    def authenticated() -> None:
        conn.set_rekey_limit(policy.rekey_limit)  # Match resolved for the user: as sshd, from here on
        if policy.chroot_directory is None or handler.enter_chroot(conn):
            keepalive.start(conn, policy.client_alive_interval, policy.client_alive_count_max)

    conn.auth_succeeded_hook = authenticated
    return conn


async def _open_audited(
    conn: SSHConnection, kind: str, destination: str, opening: Awaitable[StreamBridge]
) -> StreamBridge:
    try:
        return await opening
    except ChannelOpenError as exc:
        audit.refused(conn.user, conn.peername[0], kind, destination, exc.description)
        raise


async def listen(options: ServerOptions, factory: Callable[[], SSHConnection] | None = None) -> list[asyncio.Server]:
    """Bind every listen address; raises OSError naming the address that failed. ``factory`` (conduitd: reload,
    MaxStartups) makes each connection instead of ``make_server_connection(options)``."""
    if not options.host_keys:
        raise ValueError("a server needs at least one host key")
    loop = asyncio.get_running_loop()
    make = factory or (lambda: make_server_connection(options))
    servers: list[asyncio.Server] = []
    pending: list[socket.socket] = []  # bound, not yet handed to a server: ours to close on failure
    try:
        for host, port in options.listen:
            pending = await bind_listen_address(host, port)
            while pending:
                servers.append(await loop.create_server(make, sock=pending[0], backlog=limits.LISTEN_BACKLOG))
                address = pending.pop(0).getsockname()
                log.info("Server listening on %s port %d.", address[0], address[1])
    except BaseException:
        for server in servers:
            server.close()
        for sock in pending:
            sock.close()
        raise
    return servers


async def bind_listen_address(host: str | None, port: int) -> list[socket.socket]:
    """conduitd's listening sockets for one ListenAddress, with and without privilege separation: every address
    of ``host``, "::" IPv6-only so that sshd_config's default ("::" and "0.0.0.0") binds both. OSError says which
    address failed and why, as sshd does."""
    try:
        return await listen_stream(host, port, limits.LISTEN_BACKLOG)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else exc.strerror
        raise OSError(exc.errno, f"Bind to port {port} on {host or '0.0.0.0'} failed: {reason}") from None
