"""conduitd's glue between sshd_config and the server core: per-connection Match, reload, MaxStartups.

The daemon keeps one :class:`Serving` (config + options); SIGHUP swaps it for a new one. Each connection takes
the Serving current when it is accepted and, at its first USERAUTH_REQUEST, applies that config's Match blocks
for the user, client address and local endpoint to its own policy. Connections never see a later reload.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections.abc import Sequence
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

# ServerConfig attributes copied onto a ServerPolicy of the same name (the Match-able ones)
_POLICY_FIELDS = (
    "authorized_keys_files",
    "pubkey_authentication",
    "password_authentication",
    "kbd_interactive_authentication",
    "permit_root_login",
    "allow_tcp_forwarding",
    "disable_forwarding",
    "permit_open",
    "permit_listen",
    "gateway_ports",
    "allow_stream_local_forwarding",
    "stream_local_bind_mask",
    "stream_local_bind_unlink",
    "allow_users",
    "deny_users",
    "allow_groups",
    "deny_groups",
    "permit_tty",
    "max_sessions",
    "max_auth_tries",
    "authentication_methods",
    "client_alive_interval",
    "client_alive_count_max",
)


def _policy_values(cfg: ServerConfig) -> dict[str, object]:
    fields = {f.name for f in dataclasses.fields(ServerPolicy)}
    return {name: getattr(cfg, name) for name in _POLICY_FIELDS if name in fields}


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


def server_options(
    cfg: ServerConfig, host_keys: list[keys.PrivateKey], trusted_keys: Sequence[keys.PublicKey] = ()
) -> ServerOptions:
    banner = None
    if cfg.banner and cfg.banner != "none" and os.path.exists(cfg.banner):
        banner = Path(cfg.banner).read_text(errors="replace")
    return ServerOptions(
        listen=cfg.listen_endpoints(),
        host_keys=host_keys,
        policy=policy_from_config(cfg, trusted_keys),
        transport=TransportConfig(
            kex_algorithms=cfg.kex_algorithms,
            host_key_algorithms=cfg.host_key_algorithms,
            ciphers=cfg.ciphers,
            macs=cfg.macs,
        ),
        max_auth_tries=cfg.max_auth_tries,
        login_grace_time=float(cfg.login_grace_time or 1e9),
        banner=banner,
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


class StartupGate:
    """MaxStartups start:rate:full over connections that have not finished authentication."""

    def __init__(self) -> None:
        self.unauthenticated = 0
        self.dropped = 0

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

    def reload(self, serving: Serving) -> None:
        self.serving = serving  # established connections keep the options and policy they were made with

    def make_connection(self) -> SSHConnection:
        serving = self.serving
        conn = make_server_connection(serving.options)
        made, authed = conn.connection_made_hook, conn.auth_succeeded_hook
        state = {"counted": False}

        def done_auth() -> None:
            if state["counted"]:
                state["counted"] = False
                self.gate.unauthenticated -= 1

        def on_made() -> None:
            if made is not None:
                made()
            if not self.gate.admit(serving.cfg.max_startups):
                self.gate.dropped += 1
                log.info(
                    "drop connection #%d from [%s]:%d on [%s]:%d past MaxStartups",
                    self.gate.unauthenticated,
                    *conn.peername,
                    conn.local_address,
                    conn.local_port,
                )
                conn.abort(Disconnected(DisconnectReason.TOO_MANY_CONNECTIONS, "past MaxStartups"))
                return
            state["counted"] = True
            self.gate.unauthenticated += 1
            conn.closed.add_done_callback(lambda _: done_auth())

        def on_auth() -> None:
            done_auth()
            if authed is not None:
                authed()

        conn.connection_made_hook = on_made
        conn.auth_succeeded_hook = on_auth
        return conn
