"""conduitd: the server, with sshd(8)'s flags and sshd_config(5)'s file format."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import getopt
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from .. import audit, authmethods, evloop, server_config
from ..config.sshd_config import ServerConfig, default_server_config, load_server_config
from ..crypto import keys
from ..daemon_listeners import Binder, Closable, Endpoint, ListenerSet
from ..errors import ConfigError, SSHError
from ..forkserver import ForkServer
from ..rlimits import raise_nofile
from ..server import ServerOptions, listen
from ..session_policy import ACCEPTED_ENV
from .logs import setup_logging

log = logging.getLogger("sshconduit.conduitd")

SSHD_OPTIONS = "C:E:b:c:f:g:h:k:o:p:u:46DGQRTdeiqrtV"
SUPPORTED = set("EfghopDTdeqtVC46")
EMBEDDED_PORT = 2222
VERSION = "conduitd (sshconduit 0.1.0)"


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sshconduit"


def embedded_config() -> ServerConfig:
    """No -f at all: serve the current user on 127.0.0.1:2222 with a host key of our own."""
    cfg = default_server_config()
    cfg.port = [EMBEDDED_PORT]
    cfg.listen_addresses = [("127.0.0.1", None)]
    cfg.host_keys = [str(state_dir() / "ssh_host_ed25519_key")]
    cfg.password_authentication = False
    cfg.kbd_interactive_authentication = False
    cfg.pid_file = None
    cfg.accept_env = list(ACCEPTED_ENV)  # sshd's default accepts nothing; Debian's sshd_config ships LANG LC_*
    return cfg


def own_public_keys() -> list[keys.PublicKey]:
    """The serving user's own ~/.ssh/id_*.pub: trusted by the embedded default, so ``conduit localhost`` works."""
    found = []
    for path in sorted((Path.home() / ".ssh").glob("id_*.pub")):
        try:
            found.append(keys.load_public_key_file(path))
        except SSHError:
            continue
    return found


def load_host_keys(paths: list[str], generate_missing: bool) -> list[keys.PrivateKey]:
    loaded = []
    for path in paths:
        if not os.path.exists(path):
            if not generate_missing:
                continue
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            kind = "ssh-rsa" if "rsa" in os.path.basename(path) else "ssh-ed25519"
            keys.write_private_key(keys.generate_private_key(kind), path, comment="conduitd host key")
            log.warning("Generated host key %s", path)
        try:
            loaded.append(keys.load_private_key(path))
        except SSHError as exc:
            log.error('Unable to load host key "%s": %s', path, exc)
    return loaded


def server_options(cfg: ServerConfig, host_keys: list[keys.PrivateKey], embedded: bool) -> ServerOptions:
    return server_config.server_options(cfg, host_keys, own_public_keys() if embedded else ())


def usage_error(message: str) -> int:
    print(f"conduitd: {message}", file=sys.stderr)
    print(
        "usage: conduitd [-46DdeqTtV] [-C connection_spec] [-E log_file] [-f config_file]\n"
        "                [-g login_grace_time] [-h host_key_file] [-o option] [-p port]",
        file=sys.stderr,
    )
    return 1


async def serve(
    options: ServerOptions,
    cfg: ServerConfig,
    reload: Callable[[], server_config.Serving | None] | None = None,
    privsep_params: dict[str, object] | None = None,
) -> None:
    daemon = server_config.Daemon(server_config.Serving(cfg, options))
    forkserver = ForkServer(privsep_params) if privsep_params is not None else None
    try:
        await _serve(daemon, options, cfg, reload, forkserver)
    finally:
        if forkserver is not None:  # as the listeners: no new connection processes once we go
            await forkserver.close()


async def _serve(
    daemon: server_config.Daemon,
    options: ServerOptions,
    cfg: ServerConfig,
    reload: Callable[[], server_config.Serving | None] | None,
    forkserver: ForkServer | None,
) -> None:
    if forkserver is not None:
        forkserver.start()  # it imports while we bind: the first login need not wait for it
    listeners = ListenerSet(_binder(daemon, options, forkserver))
    await listeners.start(cfg.listen_endpoints())
    stop = asyncio.Event()
    received: list[int] = []
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda sig=sig: (received.append(sig), stop.set()))
    reloads: set[asyncio.Task[None]] = set()
    if reload is not None:
        one_at_a_time = asyncio.Lock()

        def on_hup() -> None:
            task = loop.create_task(_reload(daemon, listeners, reload, one_at_a_time, forkserver))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
    pid_file = cfg.pid_file if cfg.pid_file and cfg.pid_file != "none" else None
    if pid_file is not None:
        try:
            Path(pid_file).write_text(f"{os.getpid()}\n")
        except OSError as exc:
            log.warning('Couldn\'t create pid file "%s": %s', pid_file, exc.strerror)
            pid_file = None
    await stop.wait()
    log.info("Received signal %d; terminating.", received[0])
    for task in reloads:
        task.cancel()
    listeners.close()
    if forkserver is not None:
        forkserver.terminate_children()
    await daemon.disconnect_all("Received signal; terminating.")
    if pid_file is not None:  # as sshd: the pid file goes with the daemon
        with contextlib.suppress(OSError):
            os.unlink(pid_file)


def _binder(daemon: server_config.Daemon, options: ServerOptions, forkserver: ForkServer | None) -> Binder:
    """How one (address, port) is bound: asyncio servers, or with UsePrivilegeSeparation a process per
    connection (privsep_child.py), forked by the one fork server."""

    async def bind(endpoint: Endpoint) -> list[Closable]:
        one = dataclasses.replace(options, listen=[endpoint])
        if forkserver is None:
            return list(await listen(one, daemon.make_connection))
        from ..privsep_child import PrivsepListener

        listener = PrivsepListener(
            one, forkserver, lambda: daemon.serving.options, (daemon.gate, lambda: daemon.serving.cfg)
        )
        await listener.start()
        return [listener]

    return bind


async def _reload(
    daemon: server_config.Daemon,
    listeners: ListenerSet,
    reload: Callable[[], server_config.Serving | None],
    one_at_a_time: asyncio.Lock,
    forkserver: ForkServer | None,
) -> None:
    """SIGHUP: new connections get the re-read config and the listeners follow ListenAddress/Port; a bad file,
    or an address that cannot be bound, leaves the old config in force. Established connections carry on."""
    async with one_at_a_time:
        log.info("Received SIGHUP; reloading configuration.")
        serving = reload()
        if serving is None:
            return
        if not await listeners.rebind(serving.cfg.listen_endpoints()):
            return
        audit.configure(serving.cfg.audit_log)
        daemon.reload(serving)
        if forkserver is not None:  # its connection processes take the config it loaded: a new one loads this
            forkserver.reload()
        log.info("Configuration reloaded.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    raise_nofile()  # one socket per forwarded connection: 10,000 of them need more than 1024
    try:
        opts, rest = getopt.getopt(argv, SSHD_OPTIONS)
    except getopt.GetoptError as exc:
        return usage_error(str(exc))
    if rest:
        return usage_error(f"extra argument {rest[0]}")
    config_file: str | None = None
    cli_options: list[str] = []
    foreground = to_stderr = test_only = dump = False
    debug = 0
    logfile = None
    spec: dict[str, str] | None = None
    for flag, value in opts:
        letter = flag[1]
        if letter not in SUPPORTED:
            return usage_error(f"option -{letter} is not supported by conduitd")
        if letter == "f":
            config_file = value
        elif letter == "p":
            cli_options.append(f"Port={value}")
        elif letter == "h":
            cli_options.append(f"HostKey={value}")
        elif letter == "o":
            cli_options.append(value)
        elif letter == "g":
            cli_options.append(f"LoginGraceTime={value}")
        elif letter == "D":
            foreground = True
        elif letter == "d":
            debug += 1
            foreground = to_stderr = True
        elif letter == "e":
            to_stderr = True
        elif letter == "E":
            logfile = value
        elif letter == "t":
            test_only = True
        elif letter == "T":
            dump = True
        elif letter == "C":
            try:
                spec = server_config.parse_connection_spec(value)
            except ConfigError as exc:
                return usage_error(str(exc))
        elif letter == "V":
            print(VERSION, file=sys.stderr)
            return 0
    embedded = config_file is None
    try:
        cfg = embedded_config() if embedded else load_server_config(config_file, cli_options)  # type: ignore[arg-type]
        if embedded and cli_options:
            cfg = _apply_cli_options(cfg, cli_options)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 255
    level = logging.DEBUG if debug else _log_level(cfg.log_level)
    syslog = not (to_stderr or logfile or test_only or dump)  # -t and -T report to the terminal, as sshd's
    setup_logging(level, program="conduitd", syslog=syslog, logfile=logfile)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    problem = authmethods.config_problem(cfg)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 255
    if dump:
        print((server_config.config_for_spec(cfg, spec) if spec is not None else cfg).dump(), end="")
        return 0
    host_keys = load_host_keys(cfg.host_keys, generate_missing=embedded or any(f == "-h" for f, _ in opts))
    if not host_keys:
        print("conduitd: no hostkeys available -- exiting.", file=sys.stderr)
        return 1
    if test_only:
        return 0
    options = server_options(cfg, host_keys, embedded)
    audit.configure(cfg.audit_log)

    def reload() -> server_config.Serving | None:
        if embedded:
            return None
        try:
            new_cfg = load_server_config(config_file, cli_options)  # type: ignore[arg-type]
        except ConfigError as exc:
            log.error("%s; keeping the previous configuration", exc)
            return None
        for warning in new_cfg.warnings:
            log.warning("%s", warning)
        problem = authmethods.config_problem(new_cfg)
        if problem is not None:
            log.error("%s; keeping the previous configuration", problem)
            return None
        new_keys = load_host_keys(new_cfg.host_keys, generate_missing=False) or list(host_keys)
        return server_config.Serving(new_cfg, server_options(new_cfg, new_keys, embedded))

    if embedded:
        log.warning(
            "conduitd: serving %s on 127.0.0.1 port %d (embedded default: host key %s, trusting "
            "~/.ssh/authorized_keys and your own ~/.ssh/id_*.pub)",
            os.environ.get("USER", "you"),
            cfg.port[0],
            cfg.host_keys[0],
        )
    if not foreground:
        _daemonize()
    try:
        privsep_params = None
        if cfg.use_privilege_separation and os.geteuid() == 0 and not embedded:
            privsep_params = {"config": config_file, "options": cli_options, "level": level, "logfile": logfile}
        evloop.run(serve(options, cfg, reload, privsep_params))
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        return 255
    return 0


def _apply_cli_options(cfg: ServerConfig, options: list[str]) -> ServerConfig:
    from ..config.sshd_config import parse_server_options

    return parse_server_options(options, cfg)


def _log_level(name: str) -> int:
    name = name.upper()
    if name.startswith("DEBUG"):
        return logging.DEBUG
    if name in ("QUIET", "FATAL", "ERROR"):
        return logging.ERROR
    return logging.INFO


def _daemonize() -> None:
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)


if __name__ == "__main__":
    sys.exit(main())
