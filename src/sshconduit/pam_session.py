"""``UsePAM yes`` after authentication: the account check for logins PAM did not see, and the PAM session.

sshd runs pam_acct_mgmt after every successful login (pam_nologin, expired accounts refuse a key login too),
and opens a PAM session (pam_setcred, pam_open_session) as root before the first session's process starts,
closing it when the connection ends. Session modules act on the calling process (pam_limits sets its limits,
pam_loginuid its audit id, pam_systemd moves it into the user's scope), and conduitd serves many connections in
one root process: so each connection's PAM session lives in a forked root process of its own, which opens it,
reports the environment PAM set (pam_env), and closes it when the connection drops its end of the socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import NoReturn

from . import limits, pam, privsep

log = logging.getLogger("sshconduit.pam")

MAX_REPLY = 196608  # the holder's one reply: PAM's environment
ENV_DENYLIST = ("SSH_AUTH_INFO", "SSH_CONNECTION")  # as sshd: PAM may not forge these


def check_account(user: str, rhost: str) -> bool:
    """pam_acct_mgmt for ``user`` (blocks: run it in a thread); False when PAM refuses or is unavailable."""
    try:
        libpam, _ = pam.libraries()
        started = pam.start(user, pam.quiet_conversation(), rhost)
    except pam.PamUnavailable:
        return False
    if started is None:
        return False
    handle, _kept = started
    status = pam.PAM_ABORT
    try:
        status = pam.account(libpam, handle, user, pam.PAM_SILENT)
        return status == pam.PAM_SUCCESS
    finally:
        libpam.pam_end(handle, status)


# privsep connection process: the monitor (root) opens the session and answers its environment; None elsewhere
remote_opener: Callable[[], dict[str, str]] | None = None


async def open_for(user: str, rhost: str, cleanup: list[Callable[[], None]]) -> dict[str, str]:
    """Open ``user``'s PAM session for a connection (``cleanup``: closes it); PAM's environment. Raises OSError."""
    if remote_opener is not None:
        return await asyncio.get_running_loop().run_in_executor(None, remote_opener)
    session = PamSession(user, rhost)
    cleanup.append(session.close)
    return await session.open()


def session_environment(env: dict[str, str]) -> dict[str, str]:
    """What of PAM's environment a session gets (sshd's PAM_ENV_DENYLIST)."""
    return {k: v for k, v in env.items() if not k.startswith(ENV_DENYLIST)}


class PamSession:
    """One connection's PAM session, held by a forked root process until ``close``."""

    def __init__(self, user: str, rhost: str) -> None:
        self.user = user
        self.rhost = rhost
        self._sock: socket.socket | None = None
        self._pid = 0

    async def open(self) -> dict[str, str]:
        """Open the session; PAM's environment. Raises OSError when PAM refuses or takes too long."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            _holder(theirs, self.user, self.rhost)
        theirs.close()
        ours.setblocking(False)
        self._sock, self._pid = ours, pid
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.sock_recv(ours, MAX_REPLY), limits.PAM_SESSION_TIMEOUT)
            reply = json.loads(data) if data else {}
        except (TimeoutError, ValueError, OSError):
            reply = {}
        if not reply.get("ok"):
            self.close()
            raise OSError("PAM session refused")
        env = reply.get("env")
        return session_environment({str(k): str(v) for k, v in env.items()}) if isinstance(env, dict) else {}

    def close(self) -> None:
        """The connection is over: the holder sees EOF, closes the session and exits."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._pid:
            privsep.reap_later(self._pid)
            self._pid = 0


def _holder(channel: socket.socket, user: str, rhost: str) -> NoReturn:
    """In the forked root process: open the session, report, wait for the connection's end, close it."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        keep = channel.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, privsep.MAX_FD)
        channel.setblocking(True)
        code = _hold(channel, user, rhost)
    except BaseException:
        pass
    os._exit(code)


def _hold(channel: socket.socket, user: str, rhost: str) -> int:
    libpam, libc = pam.libraries()
    started = pam.start(user, pam.quiet_conversation(), rhost)
    if started is None:
        channel.send(json.dumps({"ok": False}).encode())
        return 1
    handle, _kept = started
    status = libpam.pam_setcred(handle, pam.PAM_ESTABLISH_CRED)
    if status == pam.PAM_SUCCESS:
        status = libpam.pam_open_session(handle, 0)
        if status != pam.PAM_SUCCESS:
            log.error("PAM: pam_open_session(): %s", pam.strerror(libpam, handle, status))
            libpam.pam_setcred(handle, pam.PAM_DELETE_CRED)
    else:
        log.error("PAM: pam_setcred(): %s", pam.strerror(libpam, handle, status))
    if status != pam.PAM_SUCCESS:
        libpam.pam_end(handle, status)
        channel.send(json.dumps({"ok": False}).encode())
        return 1
    channel.send(json.dumps({"ok": True, "env": pam.environment(libpam, libc, handle)}).encode())
    while True:  # until the connection's end closes: EOF (or an error) ends the session
        try:
            if not channel.recv(1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    status = libpam.pam_close_session(handle, 0)
    libpam.pam_setcred(handle, pam.PAM_DELETE_CRED)
    libpam.pam_end(handle, status)
    return 0
