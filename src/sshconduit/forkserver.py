"""The fork server behind ``UsePrivilegeSeparation``: connection processes without an interpreter start each.

A fresh interpreter per connection costs ~0.4 s of imports. Instead the root daemon starts ONE fork server: a
fresh interpreter (not a fork of the daemon's running event loop) that loads the configuration, imports
everything a connection needs, and then only waits on its control socket. For each accepted connection the
daemon sends the client socket and the child's end of its monitor socket; the fork server forks, and the child
(privsep_child.child_setup) asks the monitor for the host keys, drops to the unprivileged user and only then
reads from the client. The fork server replies with a pidfd of the child, so the daemon counts the process
(MaxStartups) until it is authenticated or gone, exactly as for a process it started itself.

The fork server never reads a byte from a client and holds no private key (the monitor, in the daemon, signs).
Its children get the configuration it loaded, as sshd's children get the listener's: when the daemon accepts a
SIGHUP reload it tells the fork server to load the file again, in order with the forks, so every connection
accepted after the reload gets the new configuration. There is one fork server (a new one only if it died);
it stays the parent of, and reaps, the connection processes. On SIGTERM the daemon signals each of them (they
disconnect their clients, as the daemon does those it serves itself) and the fork server exits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from typing import Any

log = logging.getLogger("sshconduit.privsep")

START = (
    "import sys; sys.path.insert(0, sys.argv[1]); from sshconduit.forkserver import forkserver_main; "
    "forkserver_main(sys.argv[2:])"
)
REQUEST_FORK = b"fork"
REQUEST_RELOAD = b"reload"
REQUEST_QUIT = b"quit"
MAX_CONTROL_MESSAGE = 1024
REAP_INTERVAL = 1.0  # seconds between collecting exited children when no connection arrives
STOP_WAIT = 5.0  # seconds a retired fork server has to exit before it is killed


def recv_ready(sock: socket.socket, max_size: int, max_fds: int) -> tuple[bytes, list[int]] | None:
    """One message and the descriptors that came with it from a non-blocking socket; None when nothing is there
    yet. An error reads as the peer gone: (b"", [])."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, max_size, max_fds)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b"", []
    return data, fds


# --- the daemon's side ---


class ForkServer:
    """The root daemon's handle: ``fork`` a connection process; ``restart`` after a reload; ``close`` at exit."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = json.dumps(params)
        self.current: _Server | None = None
        self.children: set[int] = set()  # pidfds of the connection processes still running

    def start(self) -> None:
        """Start the fork server now (it imports while the daemon binds): the first login need not wait."""
        if self.current is None or self.current.gone:
            self.current = _Server(self.params)

    async def fork(self, conn: socket.socket, monitor_end: socket.socket) -> int:
        """A pidfd of a new connection process serving ``conn`` (OSError when none could be made)."""
        self.start()
        assert self.current is not None
        pidfd = await self.current.fork(conn, monitor_end)
        self.children.add(pidfd)
        return pidfd

    def release(self, pidfd: int) -> None:
        """The caller of ``fork`` is done with this process (it has exited)."""
        self.children.discard(pidfd)
        os.close(pidfd)

    def terminate_children(self) -> None:
        """SIGTERM to the daemon: each connection process disconnects its client, as the daemon does its own."""
        for pidfd in self.children:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)

    def reload(self) -> None:
        """A reload was accepted: the connections accepted from now on get the new configuration."""
        if self.current is not None and not self.current.gone:
            self.current.reload()
        else:
            self.start()  # a new one loads the file anyway

    async def close(self) -> None:
        if self.current is not None:
            await self.current.stop()
            self.current = None


class _Server:
    """One fork server process and the daemon's end of its control socket."""

    def __init__(self, params: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", START, package_parent, str(theirs.fileno()), params],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.sock.setblocking(False)
        self.pending: collections.deque[asyncio.Future[int]] = collections.deque()  # replies come in order
        self.gone = False  # the control socket is closed: no more forks from this one
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self._readable)
        self.pidfd = os.pidfd_open(self.process.pid)
        loop.add_reader(self.pidfd, self._exited)

    async def fork(self, conn: socket.socket, monitor_end: socket.socket) -> int:
        if self.gone:
            raise OSError("the fork server is gone")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        socket.send_fds(self.sock, [REQUEST_FORK], [conn.fileno(), monitor_end.fileno()])  # never blocks long
        self.pending.append(future)
        return await future

    def reload(self) -> None:
        try:
            self.sock.send(REQUEST_RELOAD)
        except OSError:
            self._close_control()  # the next fork starts a new one, which loads the file

    def _readable(self) -> None:
        received = recv_ready(self.sock, MAX_CONTROL_MESSAGE, 1)
        if received is None:
            return
        data, fds = received
        if not data:
            self._close_control()
            return
        future = self.pending.popleft() if self.pending else None
        if future is None or future.done() or data != b"ok" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            if future is not None and not future.done():
                future.set_exception(OSError(data.decode(errors="replace")))
            return
        future.set_result(fds[0])

    def _close_control(self) -> None:
        if self.gone:
            return
        self.gone = True
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        self.sock.close()
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(OSError("the fork server is gone"))

    def _exited(self) -> None:
        asyncio.get_running_loop().remove_reader(self.pidfd)
        os.close(self.pidfd)
        returncode = self.process.wait()
        if returncode and not self.gone:
            log.error("the connection process server exited with status %d", returncode)
        if not self.exited.done():
            self.exited.set_result(None)

    async def stop(self) -> None:
        """Let it fork what it was already sent, then exit; kill it if it does not within STOP_WAIT."""
        if not self.gone:
            with contextlib.suppress(OSError):
                self.sock.send(REQUEST_QUIT)
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), STOP_WAIT)
        except TimeoutError:
            self.process.kill()
            await self.exited
        self._close_control()


async def wait_exit(pidfd: int) -> None:
    """Until the process behind ``pidfd`` has exited (not our child: its fork server's, or init's, to reap)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(pidfd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(pidfd)


# --- the fork server process (root, never touching a client byte) ---


def forkserver_main(argv: list[str]) -> None:
    from .privsep_child import load_for_children

    control = socket.socket(fileno=int(argv[0]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C on a foreground daemon: it closes us, in order
    params = json.loads(argv[1])
    try:
        cfg = load_for_children(params)
    except Exception as exc:
        log.error("connection process server: %s", exc)
        os._exit(1)
    gc.freeze()  # what is loaded now stays shared with the children: their collections do not copy it
    with contextlib.suppress(OSError):  # the control socket failed: the daemon is gone
        _serve_forks(control, cfg, params)
    _reap()
    os._exit(0)


def _serve_forks(control: socket.socket, cfg: Any, params: dict[str, Any]) -> None:
    from .config.sshd_config import load_server_config
    from .privsep_child import child_serve, child_setup

    while True:
        _reap()
        if not select.select([control], [], [], REAP_INTERVAL)[0]:
            continue
        try:
            data, fds, _flags, _addr = socket.recv_fds(control, MAX_CONTROL_MESSAGE, 2)
        except InterruptedError:
            continue
        if data == REQUEST_RELOAD:
            try:
                cfg = load_server_config(params["config"], list(params["options"]))
            except Exception as exc:  # the daemon read it a moment ago: changed since, or unreadable
                log.error("connection processes: %s; keeping the previous configuration", exc)
            continue
        if data != REQUEST_FORK:
            for fd in fds:
                os.close(fd)
            return  # REQUEST_QUIT, or the daemon is gone
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            control.send(b"bad request")
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            control.send(f"fork: {exc.strerror}".encode())
            continue
        if pid == 0:
            control.close()  # the child must not be able to ask for more processes
            signal.signal(signal.SIGINT, signal.default_int_handler)
            options, conn = child_setup(cfg, fds[0], fds[1])  # exits on failure
            try:
                child_serve(options, conn)
            finally:
                os._exit(0)  # never back into this loop
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)  # not reaped yet, so it is that child
        try:
            socket.send_fds(control, [b"ok"], [pidfd])
        finally:
            os.close(pidfd)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
