"""``UsePrivilegeSeparation yes``: a root conduitd runs each connection in a process of its own that holds no
privileges while the client is unauthenticated.

The root listener accepts, then has the fork server (forkserver.py: an interpreter of its own that loaded the
configuration and every module, not a fork of the running event loop) fork a process for the connection with the
socket and one end of a socketpair to its monitor. The child asks the monitor for the host keys' public halves,
drops to the ``sshd`` user (``nobody`` without one) and runs the protocol. The
monitor, in the root process, answers a small fixed vocabulary: host_keys, sign (the child never holds a private
key; the first hash signed is the session id), check_publickey (a query), check_signed (the monitor verifies the
signature over that session id itself, so a subverted child cannot claim a login), check_password, and, once these
passed every method AuthenticationMethods asks for, start_helper: the monitor forks the user's helper (privsep.py)
and passes its socket to the child, which from then on opens the user's sockets and starts the user's sessions
through it. With UsePAM yes the monitor also runs PAM for the child (pam_monitor.py): the keyboard-interactive
conversation, the account check a key login needs before start_helper, and the connection's PAM session.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import functools
import grp
import json
import logging
import os
import pwd
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import pam_session, privsep
from .aio import failure_floor
from .auth import publickey_signed_data
from .authmethods import MethodLists
from .chroot import ChrootError, chroot_path
from .config.authorized_keys import KeyOptions
from .config.sshd_config import ServerConfig
from .crypto import keys
from .errors import KeyError_
from .forkserver import ForkServer, recv_ready, wait_exit
from .pam_monitor import PAM_OPS, MonitorExchange, PamMonitorOps, monitor_pam_session
from .policy import ServerPolicy
from .server import ServerOptions, bind_listen_address
from .server_config import StartupGate

log = logging.getLogger("sshconduit.privsep")

MAX_MONITOR_MESSAGE = 65536  # one request on the monitor socket: a key blob and a signature, or a password
EXCHANGE_HASH_SIZES = (20, 32, 48, 64)  # SHA-1, SHA-256, SHA-384, SHA-512 exchange hashes
UNPRIVILEGED_USERS = ("sshd", "nobody")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    return base64.b64decode(str(text))


# --- the root side: listener and monitors ---


class PrivsepListener:
    """Accepts on every listen address; each connection gets a child process and a monitor."""

    def __init__(
        self,
        options: ServerOptions,
        forkserver: ForkServer,
        current: Callable[[], ServerOptions] | None = None,
        startups: tuple[StartupGate, Callable[[], ServerConfig]] | None = None,
    ) -> None:
        self.options = options
        self.current = current or (lambda: options)  # after SIGHUP: new connections' monitors use the new options
        self.startups = startups  # MaxStartups, PerSourceMaxStartups: the gate, and the current config
        self.forkserver = forkserver  # shared by every listen address; makes the connection processes
        self.sockets: list[socket.socket] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.options.listen:
            try:
                sockets = await bind_listen_address(host, port)
            except OSError:
                self.close()
                raise
            for sock in sockets:
                loop.add_reader(sock.fileno(), self._accept, sock)
                self.sockets.append(sock)
                address = sock.getsockname()
                log.info("Server listening on %s port %d (privilege separation).", address[0], address[1])

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, peer = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            log.error("accept: %s", exc.strerror)
            return
        release = None  # counted as a startup until authenticated or gone
        if self.startups is not None:
            gate, config_now = self.startups
            release = gate.enter(str(peer[0]), config_now())
            if release is None:
                local = conn.getsockname()
                log.info(
                    "drop connection #%d from [%s]:%d on [%s]:%d past MaxStartups",
                    gate.unauthenticated, peer[0], peer[1], local[0], local[1],
                )  # fmt: skip
                conn.close()
                return
        task = asyncio.get_running_loop().create_task(self._run_child(conn, peer, release))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run_child(self, conn: socket.socket, peer: tuple[Any, ...], uncount: Callable[[], None] | None) -> None:
        options = self.current()  # as the fork server's config: a reload after this is for later connections
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        local = conn.getsockname()  # Match LocalAddress/LocalPort: the monitor must resolve Match as the child does
        try:
            pidfd = await self.forkserver.fork(conn, theirs)
        except OSError as exc:
            log.error("cannot start a process for %s: %s", peer[0], exc.strerror or exc)
            ours.close()
            if uncount is not None:
                uncount()
            return
        finally:
            conn.close()
            theirs.close()
        monitor = Monitor(ours, options, str(peer[0]), on_auth=uncount)
        monitor.policy.local_address, monitor.policy.local_port = str(local[0]), int(local[1])
        try:
            await wait_exit(pidfd)
        finally:
            self.forkserver.release(pidfd)
            if uncount is not None:
                uncount()
            monitor.close()

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets.clear()


class Monitor(PamMonitorOps):
    """The root end of one connection's monitor socket: answers the child's few requests."""

    def __init__(
        self,
        sock: socket.socket,
        options: ServerOptions,
        client_address: str,
        on_auth: Callable[[], None] | None = None,
    ) -> None:
        self.sock = sock
        self.on_auth = on_auth
        self.policy = copy.copy(options.policy)
        self.policy.client_address = client_address
        self.host_keys = {key.public.blob: key for key in options.host_keys}
        self.session_id: bytes | None = None
        self.user: str | None = None  # authenticated: set once every method AuthenticationMethods asks for passed
        self.lists: MethodLists | None = None
        self.used_keys: list[bytes] = []
        self.password_task: asyncio.Task[None] | None = None
        self._pam_init()
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        message = recv_ready(self.sock, MAX_MONITOR_MESSAGE, 1)
        if message is None:
            return
        data, received = message
        if not data:
            for fd in received:
                os.close(fd)
            self.close()
            return
        fds: list[int] = []
        try:
            request = json.loads(data)
            if isinstance(request, dict) and request.get("op") in PAM_OPS:  # UsePAM: answered from a task
                if not self.pam_request(request):
                    self.close()
                return
            if isinstance(request, dict) and request.get("op") == "check_password":
                # PAM and crypt block: answered from a thread; the child waits for this reply before asking more
                if self.password_task is not None and not self.password_task.done():
                    log.info("monitor: a second password check before the first was answered")
                    self.close()
                    return
                self.password_task = asyncio.get_running_loop().create_task(self._check_password(request))
                return
            reply = self._answer(request, fds, received)
        except (ValueError, KeyError, TypeError, OSError, KeyError_) as exc:
            log.info("monitor: bad request from the connection process: %s", type(exc).__name__)
            reply = {"ok": False}
        finally:
            for fd in received:
                os.close(fd)
        try:
            socket.send_fds(self.sock, [json.dumps(reply).encode()], fds)
        except OSError:
            self.close()
        finally:
            for fd in fds:
                os.close(fd)

    def _answer(self, request: dict[str, Any], fds: list[int], received: list[int]) -> dict[str, Any]:
        op = request["op"]
        if op == "host_keys":
            return {"ok": True, "keys": [_b64(blob) for blob in self.host_keys]}
        if op == "sign":
            data = _unb64(request["data"])
            if len(data) not in EXCHANGE_HASH_SIZES:  # as sshd's monitor: an exchange hash, not any message
                return {"ok": False}
            if self.session_id is None:
                self.session_id = data  # the first exchange hash is the session id (RFC 4253 7.2)
            key = self.host_keys[_unb64(request["key"])]
            return {"ok": True, "signature": _b64(key.sign(data, str(request["alg"])))}
        if op == "check_publickey":
            key = keys.parse_public_blob(_unb64(request["key"]))
            return {"ok": self.policy.check_publickey(str(request["user"]), key)}
        if op == "check_signed":
            user, alg, blob = str(request["user"]), str(request["alg"]), _unb64(request["key"])
            key = keys.parse_public_blob(blob)
            if self.session_id is None or blob in self.used_keys:
                return {"ok": False}
            signed = publickey_signed_data(self.session_id, user, alg, blob)
            ok = key.verify(signed, _unb64(request["signature"]), alg) and self.policy.check_publickey(user, key)
            if not ok:
                return {"ok": False}
            self.used_keys.append(blob)
            self._method_succeeded(user, "publickey")
            options = self.policy.key_options
            return {"ok": True, "options": dataclasses.asdict(options) if options is not None else None}
        if op == "own_pty" and self.user is not None and len(received) == 1:
            # as sshd's pty_setowner(): only a pty slave, to the authenticated user, group tty, 0620
            if not os.isatty(received[0]) or not os.ttyname(received[0]).startswith("/dev/pts/"):
                return {"ok": False}
            entry = pwd.getpwnam(self.user)
            try:
                tty_gid = grp.getgrnam("tty").gr_gid
            except KeyError:
                tty_gid = entry.pw_gid
            os.fchown(received[0], entry.pw_uid, tty_gid)
            os.fchmod(received[0], 0o620)
            return {"ok": True}
        if op == "start_helper" and self.user is not None:
            entry = pwd.getpwnam(self.user)
            groups = tuple(os.getgrouplist(self.user, entry.pw_gid))
            try:  # ChrootDirectory as Match set it for this user (the policy bound the user when it authenticated)
                jail = chroot_path(self.policy.chroot_directory, entry)
                creds = privsep.Credentials(self.user, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir, jail)
                helper_sock, pid = privsep.fork_helper(creds)
            except ChrootError as exc:
                log.error("%s", exc)
                return {"ok": False}
            privsep.reap_later(pid)
            fds.append(os.dup(helper_sock.fileno()))
            helper_sock.close()
            return {"ok": True}
        return {"ok": False}

    async def _check_password(self, request: dict[str, Any]) -> None:
        started = time.monotonic()
        ok = False
        try:
            user, method, password = str(request["user"]), str(request["method"]), str(request["password"])
            if method in ("password", "keyboard-interactive"):
                ok = await asyncio.get_running_loop().run_in_executor(None, self.policy.check_password, user, password)
            if ok:
                self._method_succeeded(user, method)
        except (KeyError, TypeError, OSError) as exc:
            log.info("monitor: bad password request from the connection process: %s", type(exc).__name__)
            ok = False
        if not ok:  # here too: a subverted child must not guess faster than an honest one
            await failure_floor(started)
        if self.sock.fileno() >= 0:
            try:
                self.sock.send(json.dumps({"ok": ok}).encode())
            except OSError:
                self.close()

    def _method_succeeded(self, user: str, method: str) -> None:
        """Only a login that passed every method AuthenticationMethods asks for may start the user's helper."""
        if self.lists is None:
            self.lists = MethodLists(
                self.policy.authentication_methods, lambda name: name in self.policy.allowed_methods(user)
            )
        if self.lists.succeeded(method):
            if self.policy.account_check_needed(method):
                self.account_pending = user  # UsePAM: pam_acct_mgmt first (check_account)
            else:
                self._authenticated(user)

    def _authenticated(self, user: str) -> None:
        self.user = user
        if self.on_auth is not None:
            self.on_auth()

    def close(self) -> None:
        self.pam_close()
        if self.sock.fileno() >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()


# --- the child side ---


class MonitorClient:
    """The child's end: blocking calls (the child serves one connection, and the monitor answers at once)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()  # a password check runs in a thread: one request and its reply at a time

    def call(self, op: str, fds: Sequence[int] = (), **fields: Any) -> tuple[dict[str, Any], list[int]]:
        with self.lock:
            socket.send_fds(self.sock, [json.dumps({"op": op, **fields}).encode()], fds)
            data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MONITOR_MESSAGE, 1)
        if not data:
            raise ConnectionError("monitor gone")
        return json.loads(data), fds

    def own_pty(self, slave: int) -> None:
        self.call("own_pty", fds=(slave,))

    def start_helper(self) -> socket.socket:
        reply, fds = self.call("start_helper")
        if not reply.get("ok") or not fds:
            raise OSError("the monitor refused to start a helper")
        return socket.socket(fileno=fds[0])


class MonitorKey:
    """A host key whose private half stays in the monitor: ``sign`` asks it."""

    def __init__(self, public: keys.PublicKey, monitor: MonitorClient) -> None:
        self.public = public
        self._monitor = monitor

    def sign(self, data: bytes, algorithm: str | None = None) -> bytes:
        alg = algorithm or self.public.signature_algorithms()[0]
        reply, _ = self._monitor.call("sign", key=_b64(self.public.blob), data=_b64(data), alg=alg)
        if not reply.get("ok"):
            raise KeyError_("the monitor refused to sign")
        return _unb64(reply["signature"])


_monitor: MonitorClient | None = None


class MonitoredPolicy(ServerPolicy):
    """The child's policy: Match blocks and forwarding rules apply here; every authentication goes to the monitor."""

    def check_publickey(self, user: str, key: keys.PublicKey) -> bool:
        assert _monitor is not None
        reply, _ = _monitor.call("check_publickey", user=user, key=_b64(key.blob))
        return bool(reply.get("ok"))

    def check_signed_publickey(
        self, user: str, key: keys.PublicKey, signed: bytes, signature: bytes, algorithm: str
    ) -> bool:
        assert _monitor is not None
        del signed  # the monitor rebuilds it from the session id it signed
        reply, _ = _monitor.call(
            "check_signed", user=user, key=_b64(key.blob), alg=algorithm, signature=_b64(signature)
        )
        if not reply.get("ok"):
            return False
        options = reply.get("options")
        self.key_options = KeyOptions(**options) if options is not None else None
        return True

    @property
    def password_check_blocks(self) -> bool:
        return True  # the monitor answers after its check (PAM) and its failure delay

    def check_password(self, user: str, password: str, method: str = "password") -> bool:
        assert _monitor is not None
        if self.password_checker is None:
            return False
        reply, _ = _monitor.call("check_password", user=user, password=password, method=method)
        return bool(reply.get("ok"))

    # --- UsePAM: the monitor runs PAM (pam_monitor.py) ---

    def kbd_interactive_exchange(self, user: str) -> MonitorExchange:
        assert _monitor is not None
        return MonitorExchange(_monitor.call, user)

    def check_account(self, user: str) -> bool:
        assert _monitor is not None
        reply, _ = _monitor.call("check_account", user=user)
        return bool(reply.get("ok"))


def _load_everything() -> None:
    """Import now what the connection will need: after the drop the interpreter's own tree may be unreadable
    (a pyenv under /root), and imports are lazy in places (cryptography's backend, the event loop)."""
    import pkgutil

    from cryptography.hazmat.primitives.asymmetric import ec, x25519

    from . import evloop

    for info in pkgutil.walk_packages([os.path.dirname(os.path.abspath(__file__))], "sshconduit."):
        if not info.name.endswith("__main__"):
            with contextlib.suppress(ImportError):
                __import__(info.name)
    x25519.X25519PrivateKey.generate().public_key()
    for curve in (ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()):
        ec.generate_private_key(curve).public_key()
    evloop.loop_factory()


def _drop_to_unprivileged() -> None:
    for name in UNPRIVILEGED_USERS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        os.chdir("/")
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
        if os.getuid() == 0 or os.geteuid() == 0:
            raise OSError("setuid failed")
        return
    raise OSError("no unprivileged user (sshd or nobody) to run as")


def load_for_children(params: dict[str, Any]) -> ServerConfig:
    """In the fork server (root): logging, the configuration, and every import a connection will need."""
    from .cli.logs import setup_logging
    from .config.sshd_config import load_server_config

    setup_logging(int(params["level"]), program="conduitd", syslog=False, logfile=params.get("logfile"))
    cfg = load_server_config(params["config"], list(params["options"]))
    _load_everything()
    return cfg


def child_setup(cfg: ServerConfig, conn_fd: int, monitor_fd: int) -> tuple[ServerOptions, socket.socket]:
    """In the forked connection process, still root: what needs root, then shed it before the first client
    byte is read. Exits the process on failure."""
    global _monitor
    from . import audit, server_config

    conn = socket.socket(fileno=conn_fd)
    _monitor = MonitorClient(socket.socket(fileno=monitor_fd))
    try:
        reply, _ = _monitor.call("host_keys")
        host_keys: list[Any] = [MonitorKey(keys.parse_public_blob(_unb64(b)), _monitor) for b in reply["keys"]]
        options = server_config.server_options(cfg, host_keys, ())
        base = options.policy
        options.policy = MonitoredPolicy(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
        options.policy.banner_texts = server_config.read_banners(cfg)
        privsep.helper_source = _monitor.start_helper
        privsep.pty_owner = _monitor.own_pty
        pam_session.remote_opener = functools.partial(monitor_pam_session, _monitor.call)
        audit.configure(cfg.audit_log)  # opened as root; the descriptor stays writable after the drop
        _drop_to_unprivileged()
    except Exception as exc:
        log.error("connection process: %s", exc)
        os._exit(1)
    return options, conn


def child_serve(options: ServerOptions, conn: socket.socket) -> None:
    """The connection process, unprivileged: serve the one connection."""
    from . import evloop
    from .server import make_server_connection

    async def serve() -> None:
        connection = make_server_connection(options)
        loop = asyncio.get_running_loop()
        # the daemon got SIGTERM: disconnect the client as it does the connections it serves itself
        loop.add_signal_handler(signal.SIGTERM, connection.drop, "Received signal; terminating.")
        await loop.connect_accepted_socket(lambda: connection, conn)
        await connection.closed

    evloop.run(serve())
