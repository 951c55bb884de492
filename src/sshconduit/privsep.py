"""Privilege separation for a root conduitd: what an authenticated user does runs with that user's ids.

Sessions are spawned with the user's uid, gid and groups (``drop_privileges`` as the preexec). Outbound sockets
for the user's forwards are made by a helper process running as the user (one per connection, started on the
first forward): it creates and connects (or binds) the socket and passes the descriptor back over a
SOCK_SEQPACKET socketpair with SCM_RIGHTS, so the kernel checks the user's rights (unix socket modes, ports
below 1024) and the socket is owned by the user's uid. The event loop never blocks: the helper does the
blocking connect in a thread of its own, and the server awaits the reply on a non-blocking socket. A TCP connect
to an address needs no check of the caller's ids, only a socket the user made (the kernel keeps its creator's
ids, which owner-match firewall rules go by): for those the helper makes sockets ahead, in batches, and the
server connects them itself, with no round trip to the helper per forwarded connection.
With a ChrootDirectory both enter the jail as root just before the ids drop (chroot.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import pwd
import signal
import socket
import stat
import subprocess
import termios
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from . import chroot, limits
from .forkserver import recv_ready
from .forward.socket_stream import connect_socket, listening_socket, unix_listening_socket

log = logging.getLogger("sshconduit.privsep")

HELPER_EXIT_GRACE = 5.0  # seconds a helper has to exit after its connection closed
MAX_MESSAGE = 196608  # one request or reply on the helper socket (a spawn carries a command and its environment)
MAX_FD = 1 << 20  # above any descriptor the server can hold


# privsep child: how to start the user's helper (the monitor forks it); None in a server that is root itself
helper_source: Callable[[], socket.socket] | None = None

# privsep child: has the monitor give a session's pty slave to the user (we may not chown it ourselves)
pty_owner: Callable[[int], None] | None = None

Spawner = Callable[[list[str], str, tuple[int, int, int], dict[str, str], str, bool], Awaitable["HelperProcess"]]


@dataclass(frozen=True)
class Credentials:
    """Whom to become: the user's uid, primary gid and supplementary groups, looked up before any fork."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    chroot: str | None = None  # ChrootDirectory, expanded: entered as root just before the ids drop


def credentials_for(user: str, chroot_directory: str | None = None) -> Credentials | None:
    """The ids to switch to for ``user``, or None when there is nothing to switch (not root, or the user is root
    and no ChrootDirectory applies). ``chroot_directory``: the policy's, tokens unexpanded."""
    if helper_source is None and os.geteuid() != 0:
        if chroot_directory is not None:
            raise chroot.ChrootError("server lacks privileges to chroot to ChrootDirectory")
        return None
    entry = pwd.getpwnam(user)
    jail = chroot.chroot_path(chroot_directory, entry)
    if entry.pw_uid == 0 and helper_source is None and jail is None:
        return None
    groups = tuple(os.getgrouplist(user, entry.pw_gid))
    return Credentials(user, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir, jail)


def drop_privileges(creds: Credentials) -> None:
    """In a child before exec: become the user for good (groups first, uid last: after it nothing else may change).
    With a ChrootDirectory the jail is entered first, as root, and the home inside it after, as the user."""
    if creds.chroot is not None:
        chroot.enter(creds.chroot)
    os.setgroups(list(creds.groups))
    os.setgid(creds.gid)
    os.setuid(creds.uid)
    if os.getuid() != creds.uid or os.geteuid() != creds.uid:
        raise OSError(errno.EPERM, "setuid failed")
    if creds.chroot is not None:
        chroot.enter_home(creds.home)


# --- the server's side ---


class ForwardHelper:
    """The per-connection helper running as the user; ``connect_tcp``/``connect_unix``/``listen_*`` return sockets."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        self._sock: socket.socket | None = None
        self._pid = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._processes: dict[int, HelperProcess] = {}
        self._next_id = 0
        self._closed = False
        self._writable: asyncio.Future[None] | None = None  # requests wait on this while the socket is full
        # per address family: sockets the helper made as the user, not yet connected; the batch being fetched;
        # how many were taken (the next batch's size: a connection that forwards once holds no more)
        self._spares: dict[int, list[socket.socket]] = {}
        self._refills: dict[int, asyncio.Task[None]] = {}
        self._taken: dict[int, int] = {}

    def start(self) -> None:
        """Start the helper now, not at the first request (ChrootDirectory: an unsafe jail ends the login)."""
        if self._sock is None:
            self._start()

    def _start(self) -> None:
        if helper_source is not None:
            ours, pid = helper_source(), 0  # the monitor forked it: its child, not ours
        else:
            ours, pid = fork_helper(self.creds)
        ours.setblocking(False)
        self._sock = ours
        self._pid = pid
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_readable)

    async def _request(self, request: dict[str, Any], fds: Sequence[int] = ()) -> Any:
        if self._closed:
            raise OSError(errno.ECONNABORTED, "connection closed")
        if self._sock is None:
            self._start()
        assert self._sock is not None
        if len(self._pending) >= limits.MAX_SERVER_CHANNELS:
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        self._next_id += 1
        request["id"] = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = fut
        try:
            await self._send(json.dumps(request).encode(), fds)
            return await fut
        finally:
            self._pending.pop(request["id"], None)

    async def _send(self, data: bytes, fds: Sequence[int]) -> None:
        """One datagram; when the helper is behind (a burst of channel opens fills the socket), wait until the
        socket takes it rather than fail the request."""
        while True:
            if self._closed or self._sock is None:
                raise OSError(errno.ECONNABORTED, "connection closed")
            try:
                socket.send_fds(self._sock, [data], fds)
                return
            except BlockingIOError:
                pass
            if self._writable is None:
                loop = asyncio.get_running_loop()
                self._writable = loop.create_future()
                loop.add_writer(self._sock.fileno(), self._on_writable)
            await asyncio.shield(self._writable)

    def _on_writable(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_writer(self._sock.fileno())
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def _on_readable(self) -> None:
        assert self._sock is not None
        received = recv_ready(self._sock, MAX_MESSAGE, limits.MAX_SPARE_SOCKETS)
        if received is None:
            return
        data, fds = received
        if not data:
            self.close()
            return
        socks = [socket.socket(fileno=fd) for fd in fds]
        taken = self._deliver(data, socks)
        for sock in socks[taken:]:  # none, from our own helper; a reply that carries more leaks nothing
            sock.close()

    def _deliver(self, data: bytes, socks: list[socket.socket]) -> int:
        """Hand one reply to the request that waits for it; returns how many of ``socks`` it took."""
        try:
            reply = json.loads(data)
            if "exited" in reply:
                process = self._processes.pop(int(reply["exited"]), None)
                if process is not None:
                    process.exited(int(reply["returncode"]))
                return 0
            fut = self._pending.get(int(reply["id"]))
        except (ValueError, KeyError, TypeError):
            fut = None
        if fut is None or fut.done():
            return 0
        for sock in socks:
            sock.setblocking(False)
        if reply.get("batch"):
            fut.set_result(socks)
            return len(socks)
        if socks:
            fut.set_result(socks[0])
            return 1
        if reply.get("pid"):
            process = HelperProcess(self, int(reply["pid"]))
            self._processes[process.pid] = process
            fut.set_result(process)
        else:
            code = int(reply.get("errno") or errno.EIO)
            name_error = str(reply.get("name_error") or "")
            fut.set_exception(socket.gaierror(code, name_error) if name_error else OSError(code, os.strerror(code)))
        return 0

    async def connect_tcp(self, host: str, port: int) -> socket.socket:
        family = _numeric_family(host)
        if family is None:  # a name: the helper resolves it as the user and connects, in a thread of its own
            named: socket.socket = await self._request({"op": "connect_tcp", "host": host, "port": port})
            return named
        return await connect_socket(family, (host, port), sock=await self._spare_socket(family))

    async def _spare_socket(self, family: int) -> socket.socket:
        """One of the sockets the helper made ahead; the next batch is fetched as the last one is taken."""
        spares = self._spares.setdefault(family, [])
        while not spares:
            await asyncio.shield(self._refill(family))  # a cancelled open leaves the batch to the others
        self._taken[family] = self._taken.get(family, 0) + 1
        sock = spares.pop()
        if not spares:
            self._refill(family)  # in the background: a failure is the next open's to report
        return sock

    def _refill(self, family: int) -> asyncio.Task[None]:
        task = self._refills.get(family)
        if task is None:
            count = min(limits.MAX_SPARE_SOCKETS, max(1, self._taken.get(family, 0)))
            task = self._refills[family] = asyncio.ensure_future(self._fetch_spares(family, count))
            task.add_done_callback(_retrieve)  # its waiters may all be gone (their opens cancelled)
        return task

    async def _fetch_spares(self, family: int, count: int) -> None:
        try:
            socks: list[socket.socket] = await self._request({"op": "sockets", "family": family, "count": count})
        finally:
            self._refills.pop(family, None)
        if self._closed:
            for sock in socks:
                sock.close()
        else:
            self._spares.setdefault(family, []).extend(socks)

    async def connect_unix(self, path: str) -> socket.socket:
        return await self._request({"op": "connect_unix", "path": path})

    async def listen_tcp(self, family: int, kind: int, proto: int, sockaddr: tuple[Any, ...]) -> socket.socket:
        return await self._request(
            {"op": "listen_tcp", "family": family, "kind": kind, "proto": proto, "sockaddr": list(sockaddr)}
        )

    async def listen_unix(self, path: str, mask: int, unlink_first: bool) -> socket.socket:
        return await self._request({"op": "listen_unix", "path": path, "mask": mask, "unlink": unlink_first})

    async def spawn(
        self, argv: list[str], executable: str, stdio: tuple[int, int, int], env: dict[str, str], cwd: str, pty: bool
    ) -> HelperProcess:
        """Start a session's process as the user; stdio (pipe ends or the pty slave) go to the helper with it."""
        if pty and pty_owner is not None:
            pty_owner(stdio[0])
        request = {"op": "spawn", "argv": argv, "executable": executable, "env": env, "cwd": cwd, "pty": pty}
        process: HelperProcess = await self._request(request, stdio)
        return process

    def signal(self, pid: int, signum: int, group: bool) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.send(json.dumps({"op": "signal", "pid": pid, "signum": signum, "group": group}).encode())

    def unlink_socket(self, path: str) -> None:
        """Remove a unix socket the helper bound (only if it still is a socket), as the user; no reply."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.send(json.dumps({"op": "unlink_socket", "path": path}).encode())

    def close(self) -> None:
        """The connection is gone: the helper sees EOF and exits; requests still waiting fail."""
        self._closed = True
        if self._writable is not None:
            self._on_writable()  # the senders waiting find the helper closed
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(OSError(errno.ECONNABORTED, "connection closed"))
        self._pending.clear()
        for process in self._processes.values():
            process.exited(-signal.SIGHUP)  # the helper's exit hangs up the sessions it started
        self._processes.clear()
        for spares in self._spares.values():
            for sock in spares:
                sock.close()
        self._spares.clear()
        if self._pid:
            reap_later(self._pid)
            self._pid = 0


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # asyncio would warn of an exception nobody awaited


class HelperProcess:
    """A session's process started by the helper: what ServerSession needs of an asyncio Process."""

    def __init__(self, helper: ForwardHelper, pid: int) -> None:
        self.helper = helper
        self.pid = pid
        self.returncode: int | None = None
        self._done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def exited(self, returncode: int) -> None:
        if not self._done.done():
            self.returncode = returncode
            self._done.set_result(returncode)

    async def wait(self) -> int:
        return await self._done

    def send_signal(self, signum: int) -> None:
        self.helper.signal(self.pid, signum, group=False)

    def signal_group(self, signum: int) -> None:
        self.helper.signal(self.pid, signum, group=True)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def fork_helper(creds: Credentials) -> tuple[socket.socket, int]:
    """Fork the helper for ``creds``: our end of its socket, and its pid (to reap)."""
    # fork without exec: the server's interpreter may live where the user cannot read it (a pyenv under
    # /root). The child touches no event loop; after setuid the kernel makes it non-dumpable, so the user
    # cannot ptrace it or read its memory.
    if creds.chroot is not None:
        chroot.check(creds.chroot)  # here, where the caller can log why: the helper cannot
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        _helper_child(theirs, creds)  # never returns
    theirs.close()
    return ours, pid


def reap_later(pid: int) -> None:
    """Collect the helper's exit status once it has seen EOF, without blocking the loop (a pidfd says when)."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return

    def exited() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    loop.add_reader(pidfd, exited)


# --- the helper process (runs as the user) ---


def _serve_one(channel: socket.socket, send_lock: threading.Lock, request: dict[str, Any]) -> None:
    made: socket.socket | None = None
    code = 0
    name_error = ""
    try:
        op = request.get("op")
        if op == "connect_tcp":
            made = socket.create_connection((str(request["host"]), int(request["port"])))
        elif op == "connect_unix":
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                unix.connect(str(request["path"]))
            except OSError:
                unix.close()
                raise
            made = unix
        elif op == "listen_tcp":
            family, kind, proto = int(request["family"]), int(request["kind"]), int(request["proto"])
            made = listening_socket(family, kind, proto, tuple(request["sockaddr"]), limits.LISTEN_BACKLOG)
        elif op == "listen_unix":
            made = unix_listening_socket(
                str(request["path"]), int(request["mask"]), bool(request["unlink"]), limits.LISTEN_BACKLOG
            )
        else:
            code = errno.EINVAL
    except socket.gaierror as exc:
        code, name_error = errno.EHOSTUNREACH, exc.strerror or "Name or service not known"
    except OSError as exc:
        code = exc.errno or errno.EIO
    except (KeyError, ValueError, TypeError):
        code = errno.EINVAL
    except Exception:  # a reply must go back whatever happened, or the channel open would wait forever
        code = errno.EIO
    reply = {"id": request.get("id"), "errno": code, "name_error": name_error}
    _reply(channel, send_lock, reply, *([] if made is None else [made]))


def _numeric_family(host: str) -> int | None:
    for family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            socket.inet_pton(family, host)
            return family
    return None


def _make_sockets(channel: socket.socket, send_lock: threading.Lock, request: dict[str, Any]) -> None:
    """Sockets for the server to connect, made as the user; one reply carries them all."""
    made: list[socket.socket] = []
    code = 0
    try:
        family, count = int(request["family"]), int(request["count"])
        if family not in (socket.AF_INET, socket.AF_INET6) or not 1 <= count <= limits.MAX_SPARE_SOCKETS:
            raise ValueError(family, count)
        for _ in range(count):
            made.append(socket.socket(family, socket.SOCK_STREAM))
    except OSError as exc:
        code = exc.errno or errno.EIO
    except (KeyError, ValueError, TypeError):
        code = errno.EINVAL
    if code:
        for sock in made:
            sock.close()
    _reply(channel, send_lock, {"id": request.get("id"), "errno": code, "batch": not code}, *([] if code else made))


def _helper_child(channel: socket.socket, creds: Credentials) -> NoReturn:
    """In the forked helper: shed the server's descriptors and signal handling, become the user, serve."""
    try:  # nothing may escape into the copy of the server's stack
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        keep = channel.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, MAX_FD)
        os.chdir("/")
        # lazy imports would read the server's tree: the user may not, and inside a ChrootDirectory it is gone
        "localhost".encode("idna")  # getaddrinfo's codec
        drop_privileges(creds)  # enters the ChrootDirectory, if any
        _serve(channel, creds)
    except BaseException:
        os._exit(1)
    os._exit(0)


def _spawn(
    channel: socket.socket,
    send_lock: threading.Lock,
    request: dict[str, Any],
    fds: list[int],
    children: dict,
    creds: Credentials,
) -> None:
    """Start a session's process (its own session; with a pty, that terminal controls it), report its exit."""
    code, pid = 0, 0
    try:
        pty = bool(request["pty"])
        process = subprocess.Popen(
            [str(arg) for arg in request["argv"]],
            executable=str(request["executable"]),
            stdin=fds[0],
            stdout=fds[1],
            stderr=fds[2],
            env={str(k): str(v) for k, v in dict(request["env"]).items()},
            # in a jail the connection process's answer (outside it) means nothing: ask here, as the user
            cwd=chroot.session_cwd(creds.home) if creds.chroot is not None else str(request["cwd"]),
            start_new_session=not pty,
            preexec_fn=_take_terminal if pty else None,
        )
        pid = process.pid
        children[pid] = process
    except OSError as exc:
        code = exc.errno or errno.EIO
    except (subprocess.SubprocessError, KeyError, ValueError, TypeError, IndexError):
        code = errno.EINVAL
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    _reply(channel, send_lock, {"id": request.get("id"), "errno": code, "pid": pid})
    if pid:
        returncode = process.wait()
        children.pop(pid, None)
        _reply(channel, send_lock, {"exited": pid, "returncode": returncode})


def _take_terminal() -> None:
    # stdlib Popen runs this after stdio is in place: fd 0 is the pty slave
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _reply(channel: socket.socket, send_lock: threading.Lock, reply: dict[str, Any], *made: socket.socket) -> None:
    """One reply, with the descriptors of the sockets made for it (ours are closed: the server has its own)."""
    data = json.dumps(reply).encode()
    try:
        with send_lock:
            if made:
                socket.send_fds(channel, [data], [sock.fileno() for sock in made])
            else:
                channel.send(data)
    except OSError:
        pass  # the server went away: nothing to tell
    finally:
        for sock in made:
            sock.close()


def _serve(channel: socket.socket, creds: Credentials) -> None:
    """Serve requests until the server closes its end; then hang up the sessions still running."""
    send_lock = threading.Lock()
    children: dict[int, subprocess.Popen] = {}
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(channel, MAX_MESSAGE, 3)
        except OSError:
            break
        if not data:
            break
        try:
            request = json.loads(data)
        except ValueError:
            request = None
        op = request.get("op") if isinstance(request, dict) else None
        if op == "spawn" and len(fds) == 3:
            spawn_args = (channel, send_lock, request, fds, children, creds)
            threading.Thread(target=_spawn, args=spawn_args, daemon=True).start()
            continue
        for fd in fds:
            os.close(fd)
        if not isinstance(request, dict):
            continue
        if op == "unlink_socket":  # here, not in a thread: it must happen before EOF ends us
            with contextlib.suppress(OSError, KeyError, ValueError, TypeError):
                if stat.S_ISSOCK(os.lstat(str(request["path"])).st_mode):
                    os.unlink(str(request["path"]))
        elif op == "signal":
            with contextlib.suppress(OSError, KeyError, ValueError, TypeError):
                pid, signum = int(request["pid"]), int(request["signum"])
                if pid in children:  # only processes it started itself
                    (os.killpg if request.get("group") else os.kill)(pid, signum)
        elif op == "sockets":
            _make_sockets(channel, send_lock, request)  # does not block
        else:
            threading.Thread(target=_serve_one, args=(channel, send_lock, request), daemon=True).start()
    for pid in list(children):
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGHUP)
    # returning ends the process: connects still in progress are abandoned with the connection
