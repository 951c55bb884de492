"""conduitd's glue between sshd_config and the server core: per-connection Match, reload, MaxStartups.

The daemon keeps one :class:`Serving` (config + options); SIGHUP swaps it for a new one. Each connection takes
the Serving current when it is accepted and, at its first USERAUTH_REQUEST, applies that config's Match blocks
for the user, client address and local endpoint to its own policy. Connections never see a later reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from .access import user_groups
from .aio import SSHConnection
from .config.sshd_config import ServerConfig
from .crypto import keys
from .errors import ConfigError, Disconnected, DisconnectReason
from .policy import ServerPolicy
from .server import ServerOptions, make_server_connection
from .system_password import system_password_checker
from .transport import TransportConfig

log = logging.getLogger("sshconduit.conduitd")

SHUTDOWN_WAIT = 5.0  # seconds SIGTERM waits for aborted connections to finish closing (one loop turn, normally)

# Every ServerConfig attribute a ServerPolicy of the same name has: the main section's value, then the
# connection's Match-resolved one, so a keyword Match can set applies per connection as soon as the policy has it.
_POLICY_FIELDS = tuple(
    f.name for f in dataclasses.fields(ServerPolicy) if f.name in {c.name for c in dataclasses.fields(ServerConfig)}
)
# Keywords sshd allows in Match that conduitd does not apply per connection, and why (tests audit this list).
NOT_PER_CONNECTION = {
    "log_level": "one log level for the daemon",
    "x11_forwarding": "X11 forwarding is never offered",
}


def _policy_values(cfg: ServerConfig) -> dict[str, object]:
    return {name: getattr(cfg, name) for name in _POLICY_FIELDS}


def policy_from_config(cfg: ServerConfig, trusted_keys: Sequence[keys.PublicKey] = ()) -> ServerPolicy:
    """The main section's policy, which applies the Match blocks once the connection names its user."""

    def on_user(policy: ServerPolicy, user: str) -> None:
        address = policy.client_address or ""
        effective = cfg.for_connection(
            user, address, address, policy.local_address or "", policy.local_port, user_groups(user)
        )
        for name, value in _policy_values(effective).items():
            setattr(policy, name, value)

    checker = system_password_checker(cfg.use_pam, cfg.permit_empty_passwords)  # root: system users' passwords
    return ServerPolicy(
        trusted_keys=tuple(trusted_keys), on_user=on_user, password_checker=checker, **_policy_values(cfg)
    )  # type: ignore[arg-type]


def read_banners(cfg: ServerConfig) -> dict[str, str]:
    """Every Banner file the config names, main section and Match blocks: a privsep connection process reads
    them while still root (sshd's monitor reads the banner), since it serves the client unprivileged."""
    texts: dict[str, str] = {}
    for path in {cfg.banner, *cfg.match_values("banner")}:
        if path is None:
            continue
        with contextlib.suppress(OSError):
            texts[path] = Path(path).read_text(errors="replace")
    return texts


def server_options(
    cfg: ServerConfig, host_keys: list[keys.PrivateKey], trusted_keys: Sequence[keys.PublicKey] = ()
) -> ServerOptions:
    transport = TransportConfig(
        kex_algorithms=cfg.kex_algorithms,
        host_key_algorithms=cfg.host_key_algorithms,
        ciphers=cfg.ciphers,
        macs=cfg.macs,
    )
    transport.set_rekey_limit(cfg.rekey_limit)  # a Match block's applies after auth (server.py)
    return ServerOptions(
        listen=cfg.listen_endpoints(),
        host_keys=host_keys,
        policy=policy_from_config(cfg, trusted_keys),
        transport=transport,
        max_auth_tries=cfg.max_auth_tries,
        login_grace_time=float(cfg.login_grace_time or 1e9),
        permit_tty=True,  # per connection: PermitTTY is in the policy, so Match can change it
    )


def parse_connection_spec(spec: str) -> dict[str, str]:
    """``sshd -C user=alice,host=h,addr=1.2.3.4,laddr=...,lport=22``; ConfigError on a bad entry."""
    known = {"user", "host", "addr", "laddr", "lport", "rdomain"}
    out: dict[str, str] = {}
    for entry in spec.split(","):
        key, sep, value = entry.partition("=")
        if not sep or key not in known:
            raise ConfigError(f"Invalid test mode specification {entry}")
        out[key] = value
    if "lport" in out and not out["lport"].isdigit():
        raise ConfigError(f"Invalid test mode specification lport={out['lport']}")
    return out


def config_for_spec(cfg: ServerConfig, spec: dict[str, str]) -> ServerConfig:
    user = spec.get("user", "")
    addr = spec.get("addr", "")
    return cfg.for_connection(
        user, spec.get("host", addr), addr, spec.get("laddr", ""), int(spec.get("lport", "0")), user_groups(user)
    )


@dataclasses.dataclass
class Serving:
    cfg: ServerConfig
    options: ServerOptions


def source_block(address: str, bits: tuple[int, int]) -> str:
    """The netblock PerSourceNetBlockSize (IPv4 bits, IPv6 bits) puts ``address`` in, as "net/bits"."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address  # not an IP address (a unix socket): a source of its own
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = bits[0] if ip.version == 4 else bits[1]
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class StartupGate:
    """MaxStartups start:rate:full over connections that have not finished authentication, and
    PerSourceMaxStartups over those from one PerSourceNetBlockSize netblock (whichever is lower applies)."""

    def __init__(self) -> None:
        self.unauthenticated = 0
        self.dropped = 0
        self.per_source: dict[str, int] = {}  # netblock -> its unauthenticated connections

    def enter(self, address: str, cfg: ServerConfig) -> Callable[[], None] | None:
        """Count a new connection from ``address``: its release (call once authenticated or gone; calling it
        again does nothing), or None when MaxStartups or PerSourceMaxStartups says drop it."""
        block = source_block(address, cfg.per_source_net_block_size)
        limit = cfg.per_source_max_startups
        if not self.admit(cfg.max_startups) or (limit is not None and self.per_source.get(block, 0) >= limit):
            self.dropped += 1
            return None
        self.unauthenticated += 1
        self.per_source[block] = self.per_source.get(block, 0) + 1
        counted = True

        def release() -> None:
            nonlocal counted
            if counted:
                counted = False
                self.unauthenticated -= 1
                self.per_source[block] -= 1
                if not self.per_source[block]:
                    del self.per_source[block]

        return release

    def admit(self, limits: tuple[int, int, int]) -> bool:
        start, rate, full = limits
        n = self.unauthenticated
        if n >= full:
            return False
        if n < start:
            return True
        # refuse with probability rate% at start, rising linearly to 100% at full
        p = rate + (100 - rate) * (n - start) / max(1, full - start)
        return random.random() * 100 >= p


class Daemon:
    """The listeners' connection factory: the current Serving, MaxStartups, reload."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self.gate = StartupGate()
        self.connections: set[SSHConnection] = set()  # SIGTERM disconnects them

    def reload(self, serving: Serving) -> None:
        self.serving = serving  # established connections keep the options and policy they were made with

    async def disconnect_all(self, description: str) -> None:
        """SIGTERM: disconnect every client without waiting on any (a dead one would never drain); their
        forwarded sockets close with their channels."""
        conns = list(self.connections)
        for conn in conns:
            conn.drop(description)
        if conns:
            await asyncio.wait([conn.closed for conn in conns], timeout=SHUTDOWN_WAIT)

    def make_connection(self) -> SSHConnection:
        serving = self.serving
        conn = make_server_connection(serving.options)
        made, authed = conn.connection_made_hook, conn.auth_succeeded_hook
        release: Callable[[], None] | None = None

        def on_made() -> None:
            nonlocal release
            if made is not None:
                made()
            release = self.gate.enter(conn.peername[0], serving.cfg)
            if release is None:
                log.info(
                    "drop connection #%d from [%s]:%d on [%s]:%d past MaxStartups",
                    self.gate.unauthenticated,
                    *conn.peername,
                    conn.local_address,
                    conn.local_port,
                )
                conn.abort(Disconnected(DisconnectReason.TOO_MANY_CONNECTIONS, "past MaxStartups"))
                return
            self.connections.add(conn)
            conn.closed.add_done_callback(lambda _: self.connections.discard(conn))
            conn.closed.add_done_callback(lambda _, release=release: release())

        def on_auth() -> None:
            if release is not None:
                release()
            if authed is not None:
                authed()

        conn.connection_made_hook = on_made
        conn.auth_succeeded_hook = on_auth
        return conn
