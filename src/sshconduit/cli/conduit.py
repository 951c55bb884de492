"""conduit: the client, with ssh(1)'s flags and ssh_config(5)'s files."""

from __future__ import annotations

import asyncio
import getopt
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field

from .. import evloop
from ..client import ClientOptions, SSHClient, connect_with_options
from ..config.forward_spec import ForwardSpec, parse_forward
from ..config.ssh_config import ClientConfig, resolve_client_config
from ..errors import ConfigError, SSHError
from ..forward.local import ForwardError, LocalForward
from ..rlimits import raise_nofile
from ..transport import TransportConfig
from .logs import setup_logging, verbosity_level

log = logging.getLogger("sshconduit")

SSH_OPTIONS = "1246ACGKMNTVXYZafgknqstvxyB:D:E:F:I:J:L:O:P:Q:R:S:W:b:c:e:i:l:m:o:p:w:"
SUPPORTED = set("46CNTVgnqtvEFLceilmop")
VERSION = "conduit (sshconduit 0.1.0)"
EXIT_CONNECTION_ERROR = 255


@dataclass
class Invocation:
    """What the command line asked for."""

    destination: str = ""
    command: str | None = None
    user: str | None = None
    port: int | None = None
    config_file: str | None = None
    options: list[str] = field(default_factory=list)
    identity_files: list[str] = field(default_factory=list)
    local_forwards: list[str] = field(default_factory=list)
    no_command: bool = False
    gateway_ports: bool = False
    request_tty: int = 0  # -t count; -1 for -T
    stdin_null: bool = False
    verbose: int = 0
    quiet: bool = False
    logfile: str | None = None


class UsageError(Exception):
    pass


def parse_args(argv: list[str]) -> Invocation:
    inv = Invocation()
    args = list(argv)
    while True:  # ssh takes options both before and right after the destination
        try:
            opts, args = getopt.getopt(args, SSH_OPTIONS)
        except getopt.GetoptError as exc:
            raise UsageError(str(exc)) from None
        for flag, value in opts:
            _apply_flag(inv, flag[1], value)
        if inv.destination or not args:
            break
        inv.destination, args = args[0], args[1:]
        if not args or not args[0].startswith("-"):
            break
    if not inv.destination:
        raise UsageError("no destination given")
    if args:
        inv.command = " ".join(args)
    return inv


def _apply_flag(inv: Invocation, letter: str, value: str) -> None:
    if letter not in SUPPORTED:
        raise UsageError(f"option -{letter} is not supported yet by conduit")
    match letter:
        case "L":
            inv.local_forwards.append(value)
        case "N":
            inv.no_command = True
        case "p":
            try:
                inv.port = int(value)
            except ValueError:
                raise UsageError(f"Bad port '{value}'") from None
        case "l":
            inv.user = value
        case "i":
            inv.identity_files.append(value)
        case "o":
            inv.options.append(value)
        case "F":
            inv.config_file = value
        case "v":
            inv.verbose += 1
        case "q":
            inv.quiet = True
        case "g":
            inv.gateway_ports = True
        case "t":
            inv.request_tty = max(inv.request_tty, 0) + 1
        case "T":
            inv.request_tty = -1
        case "n":
            inv.stdin_null = True
        case "c":
            inv.options.append(f"Ciphers={value}")
        case "m":
            inv.options.append(f"MACs={value}")
        case "E":
            inv.logfile = value
        case "4":
            inv.options.append("AddressFamily=inet")
        case "6":
            inv.options.append("AddressFamily=inet6")
        case "C":
            log.debug("compression is not supported; continuing without it")
        case "V":
            print(VERSION, file=sys.stderr)
            raise SystemExit(0)


def split_destination(destination: str) -> tuple[str | None, str, int | None]:
    """user@host, ssh://user@host:port."""
    port = None
    if destination.startswith("ssh://"):
        destination = destination[6:].rstrip("/")
        if destination.rfind(":") > destination.rfind("]"):
            destination, _, port_text = destination.rpartition(":")
            port = int(port_text)
        destination = destination.strip("[]") if "@" not in destination else destination
    user, _, host = destination.rpartition("@")
    return (user or None), host.strip("[]"), port


def build_options(inv: Invocation, cfg: ClientConfig) -> ClientOptions:
    identity_files = inv.identity_files + [f for f in cfg.identity_files if f not in inv.identity_files]
    transport = TransportConfig(
        kex_algorithms=cfg.kex_algorithms,
        host_key_algorithms=cfg.host_key_algorithms,
        ciphers=cfg.cipher_preference,
        macs=cfg.macs,
    )
    transport.set_rekey_limit(cfg.rekey_limit)
    methods = list(cfg.preferred_authentications)
    if not cfg.pubkey_authentication:
        methods = [m for m in methods if m != "publickey"]
    if not cfg.password_authentication:
        methods = [m for m in methods if m != "password"]
    if not cfg.kbd_interactive_authentication:
        methods = [m for m in methods if m != "keyboard-interactive"]
    return ClientOptions(
        host=cfg.hostname,
        port=cfg.port,
        user=cfg.user,
        host_key_alias=cfg.host_key_alias,
        identity_files=identity_files or None,
        identities_only=cfg.identities_only,
        agent_path=cfg.identity_agent,
        use_agent=cfg.identity_agent != "none",
        preferred_auth=methods,
        known_hosts=cfg.user_known_hosts_files,
        global_known_hosts=cfg.global_known_hosts_files,
        strict_host_key_checking=cfg.strict_host_key_checking,
        transport=transport,
        connect_timeout=cfg.connect_timeout,
        batch_mode=cfg.batch_mode,
    )


# The forwards stay referenced here: uvloop's loop does not keep a listening server alive, so a dropped
# LocalForward would be collected and its socket closed.
_active_forwards: list[LocalForward] = []


async def start_forwards(client: SSHClient, specs: list[ForwardSpec], cfg: ClientConfig, gateway: bool) -> None:
    for spec in specs:
        try:
            forward = LocalForward(client.conn, spec, gateway, cfg.stream_local_bind_unlink)
            _active_forwards.append(await forward.start())
        except ForwardError as exc:
            log.error("%s", exc)
            if cfg.exit_on_forward_failure:
                raise ForwardError("Could not request local forwarding.") from None
            log.error("Could not request local forwarding.")


async def run(inv: Invocation, cfg: ClientConfig) -> int:
    options = build_options(inv, cfg)
    specs = list(cfg.local_forwards)
    try:
        client = await connect_with_options(options)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
        if isinstance(exc, socket.gaierror):
            print(f"ssh: Could not resolve hostname {options.host}: {reason}", file=sys.stderr)
        else:
            print(f"ssh: connect to host {options.host} port {options.port}: {reason}", file=sys.stderr)
        return EXIT_CONNECTION_ERROR
    except TimeoutError:
        print(f"ssh: connect to host {options.host} port {options.port}: Connection timed out", file=sys.stderr)
        return EXIT_CONNECTION_ERROR
    except SSHError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONNECTION_ERROR
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        await start_forwards(client, specs, cfg, inv.gateway_ports or cfg.gateway_ports)
        if inv.no_command:
            closed = asyncio.ensure_future(client.wait_closed())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if closed.done():
                return _report_close(client)
            return 0
        from ..session import run_interactive

        request_tty = {-1: False, 0: None}.get(inv.request_tty, True)
        if cfg.request_tty in ("yes", "force") and inv.request_tty == 0:
            request_tty = True
        status = await run_interactive(client.conn, inv.command, request_tty=request_tty, env={})
        return status
    except ForwardError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONNECTION_ERROR
    except SSHError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONNECTION_ERROR
    finally:
        client.conn.close()


def _report_close(client: SSHClient) -> int:
    reason = client.conn.close_reason
    if reason is not None:
        print(f"Connection to {client.options.host} closed: {reason}", file=sys.stderr)
    return EXIT_CONNECTION_ERROR


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    raise_nofile()  # one socket per forwarded connection: 10,000 of them need more than 1024
    try:
        inv = parse_args(argv)
    except UsageError as exc:
        print(f"conduit: {exc}", file=sys.stderr)
        print(
            "usage: conduit [-46gNnqTtv] [-c cipher_spec] [-E log_file] [-F configfile] [-i identity_file]\n"
            "               [-L address] [-l login_name] [-m mac_spec] [-o option] [-p port]\n"
            "               destination [command [argument ...]]",
            file=sys.stderr,
        )
        return EXIT_CONNECTION_ERROR
    user, host, url_port = split_destination(inv.destination)
    try:
        cfg = resolve_client_config(
            host,
            user=inv.user or user,
            port=inv.port or url_port,
            config_file=inv.config_file,
            options=inv.options,
        )
        extra = [parse_forward(spec, "local") for spec in inv.local_forwards]
    except (ConfigError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONNECTION_ERROR
    cfg.local_forwards = extra + list(cfg.local_forwards)
    level = verbosity_level(inv.verbose, inv.quiet)
    setup_logging(level, logfile=inv.logfile)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    if inv.stdin_null:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
    try:
        return evloop.run(run(inv, cfg))
    except KeyboardInterrupt:
        return EXIT_CONNECTION_ERROR


if __name__ == "__main__":
    sys.exit(main())
