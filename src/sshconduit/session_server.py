"""The server end of a session channel (RFC 4254 section 6): runs one shell or command, with or without a pty.

Flow control runs end to end: output of the process is read only while the peer's window has room, and bytes
the peer sent are reported consumed only once the process's stdin took them, so neither side buffers without
bound. The process gets its own session (process group), so closing the channel can signal all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import grp
import logging
import os
import pwd
import signal
import subprocess
import termios
from collections.abc import Callable, Mapping, Sequence
from typing import cast

from . import limits
from .aio import ChannelHandler
from .connection import ChannelClosedError
from .errors import ProtocolError
from .limits import KILL_GRACE, MAX_ACCEPTED_ENV, PTY_DRAIN_GRACE
from .messages import EnvReq, ExecReq, ExitSignal, ExitStatus, PtyReq, SignalReq, WindowChange
from .privsep import Credentials, Spawner, drop_privileges
from .session_policy import ACCEPTED_ENV, env_accepted
from .ttymodes import apply_terminal_modes, winsize

log = logging.getLogger("sshconduit.session")

EXTENDED_DATA_STDERR = 1
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# RFC 4254 6.10 signal names a peer may send or report, without the "SIG" prefix.
SIGNAL_NAMES = frozenset({"ABRT", "ALRM", "FPE", "HUP", "ILL", "INT", "KILL", "PIPE", "QUIT", "SEGV", "TERM"})
SIGNAL_NAMES |= {"USR1", "USR2"}


def signal_name(number: int) -> str:
    """``TERM`` for 15: the RFC's name for a signal, or ``SIG<n>`` style fallback for the rest."""
    try:
        return signal.Signals(number).name.removeprefix("SIG")
    except ValueError:
        return f"SIG{number}"


class _ProcessOutput(asyncio.Protocol):
    """One output of the process (stdout, stderr or the pty master), read into the channel."""

    def __init__(self, session: ServerSession, data_type: int | None) -> None:
        self.session = session
        self.data_type = data_type
        self.transport: asyncio.ReadTransport | None = None
        self.pending = b""  # read but not yet taken by the peer's window; reading is paused meanwhile
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.ReadTransport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.session._output(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        # A pty master reports EIO once the last slave fd closes: that is its EOF.
        self.closed = True
        self.session._maybe_finish()


class _ProcessInput(asyncio.Protocol):
    """The process's stdin (a pipe, or the pty master); tells the session when its buffer drains."""

    def __init__(self, session: ServerSession) -> None:
        self.session = session
        self.paused = False
        self.closed = False

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.session._stdin_drained()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.paused = False
        self.session._stdin_drained()


class _PtyWriter:
    """Writes the process's input to the pty master.

    Not a write-pipe transport: uvloop's watches its fd for reads to notice the far end closing, and on a pty
    master that read would swallow the process's output.
    """

    HIGH_WATER = 64 * 1024
    LOW_WATER = 16 * 1024

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, protocol: _ProcessInput) -> None:
        self._loop = loop
        self._fd = fd
        self._protocol = protocol
        self._buffer = bytearray()
        self._paused = False
        self._closing = False
        os.set_blocking(fd, False)

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._buffer:
            try:
                data = data[os.write(self._fd, data) :]
            except BlockingIOError:
                pass
            except OSError:  # EIO: the slave side is gone
                self.close()
                return
            if not data:
                return
            self._loop.add_writer(self._fd, self._write_ready)
        self._buffer += data
        if not self._paused and len(self._buffer) > self.HIGH_WATER:
            self._paused = True
            self._protocol.pause_writing()

    def _write_ready(self) -> None:
        try:
            del self._buffer[: os.write(self._fd, self._buffer)]
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not self._buffer:
            self._loop.remove_writer(self._fd)
        if self._paused and len(self._buffer) <= self.LOW_WATER:
            self._paused = False
            self._protocol.resume_writing()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._buffer.clear()
        self._loop.remove_writer(self._fd)
        os.close(self._fd)
        self._protocol.connection_lost(None)


class ServerSession(ChannelHandler):
    """A "session" channel on the server: runs one shell or command, with or without a pty."""

    window = limits.DEFAULT_WINDOW
    max_packet = limits.DEFAULT_MAX_PACKET

    def __init__(
        self,
        user_shell: str | None = None,
        env: dict[str, str] | None = None,
        allow_pty: bool = True,
        forced_command: str | None = None,
        accept_env: Sequence[str] = ACCEPTED_ENV,
        subsystems: Mapping[str, str] | None = None,
        on_exit: Callable[[int | None], None] | None = None,
        credentials: Credentials | None = None,
        spawner: Spawner | None = None,
    ) -> None:
        self.user_shell = user_shell or _default_shell()
        self.credentials = credentials  # a root server's user: the process runs with these ids
        self.spawner = spawner  # privsep child: the user's helper starts the process (we are not root)
        self.env = dict(env or {})
        self.env.setdefault("PATH", DEFAULT_PATH)
        self.allow_pty = allow_pty
        self.forced_command = forced_command
        self.accept_env = tuple(accept_env)  # AcceptEnv patterns
        self.subsystems = dict(subsystems or {})  # Subsystem name -> command line
        self.on_exit = on_exit
        self.pty: PtyReq | None = None
        self.accepted_env: dict[str, str] = {}
        self.process: asyncio.subprocess.Process | None = None
        self.returncode: int | None = None  # negative: killed by that signal (subprocess convention)
        self._master_fd = -1  # owned by the read transport once connected
        self._outputs: list[_ProcessOutput] = []
        self._stdin: asyncio.WriteTransport | _PtyWriter | None = None
        self._stdin_side: _ProcessInput | None = None
        self._early_input: list[bytes] = []  # channel data before the process runs
        self._unconsumed = 0  # written to stdin while it was full: consumed() once it drains
        self._started = False
        self._eof_received = False
        self._closed = False  # the channel is gone: no more sends
        self._finished = False
        self._exit_reported = False
        self._pty_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    # --- channel events ---

    def data_received(self, data: bytes, data_type: int | None) -> None:
        if data_type is not None:  # a client has no business sending extended data: drop it
            self.conn.consumed(self.channel_id, len(data))
        elif self._stdin is None and not self._finished:
            self._early_input.append(data)
        else:
            self._write_stdin(data)

    def eof_received(self) -> None:
        self._eof_received = True
        if self._stdin is not None:
            self._close_stdin()

    def window_opened(self) -> None:
        for output in self._outputs:
            if output.pending:
                sent = self._send(output.pending, output.data_type)
                output.pending = output.pending[sent:]
                if not output.pending and output.transport is not None and not output.closed:
                    output.transport.resume_reading()
        self._maybe_finish()

    def close_received(self) -> None:
        self._closed = True
        self._kill()
        self._release_io()
        self._report_exit()

    def request_received(self, request_type: str, data: bytes) -> bool:
        handler = self._REQUESTS.get(request_type)
        if handler is None:
            return False  # subsystem, x11-req, auth-agent-req@openssh.com, eow@openssh.com, keepalive...
        try:
            return handler(self, data)
        except ProtocolError:
            log.info("channel %d: malformed %s request", self.channel_id, request_type)
            return False

    # --- requests ---

    def _pty_req(self, data: bytes) -> bool:
        if not self.allow_pty or self.pty is not None or self._started:
            return False
        self.pty = PtyReq.decode(data)
        return True

    def _env(self, data: bytes) -> bool:
        req = EnvReq.decode(data)
        if self._started or len(self.accepted_env) >= MAX_ACCEPTED_ENV or "\0" in req.name + req.value:
            return False
        if not env_accepted(self.accept_env, req.name):
            log.debug("channel %d: ignoring env request %s: not in AcceptEnv", self.channel_id, req.name)
            return False
        self.accepted_env[req.name] = req.value
        return True

    def _window_change(self, data: bytes) -> bool:
        size = WindowChange.decode(data)
        if self.pty is None:
            return False
        self.pty = PtyReq(self.pty.term, size.columns, size.rows, size.width_px, size.height_px, self.pty.modes)
        if self._master_fd >= 0:
            # The kernel signals SIGWINCH to the terminal's foreground process group itself.
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._master_fd, termios.TIOCSWINSZ, winsize(*_size_of(self.pty)))
        return True

    def _exec(self, data: bytes) -> bool:
        return self._start(os.fsdecode(ExecReq.decode(data).command))

    def _shell(self, data: bytes) -> bool:
        return self._start(None)

    def _subsystem(self, data: bytes) -> bool:
        name = os.fsdecode(ExecReq.decode(data).command)  # same layout: one string
        command = self.subsystems.get(name)
        if command is None:
            log.info("channel %d: subsystem request for %s failed, subsystem not found", self.channel_id, name)
            return False
        return self._start(command)  # run by the user's shell, as sshd runs an external subsystem

    def _signal(self, data: bytes) -> bool:
        name = SignalReq.decode(data).signal
        process = self.process
        if name not in SIGNAL_NAMES or process is None or process.returncode is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(getattr(signal, "SIG" + name))
        return True

    _REQUESTS: dict[str, Callable[[ServerSession, bytes], bool]] = {
        "pty-req": _pty_req,
        "env": _env,
        "window-change": _window_change,
        "exec": _exec,
        "shell": _shell,
        "subsystem": _subsystem,
        "signal": _signal,
    }

    # --- starting the process ---

    def _start(self, command: str | None) -> bool:
        if self._started or self._closed:
            return False
        env = {**self.accepted_env, **self.env}  # the server's own variables win over the client's, as in sshd
        if self.forced_command is not None:
            if command is not None:
                env["SSH_ORIGINAL_COMMAND"] = command
            command = self.forced_command
        if command is not None and command.split(maxsplit=1)[:1] == ["internal-sftp"]:
            log.info("channel %d: internal-sftp is not implemented by conduitd", self.channel_id)
            return False
        self._started = True
        if command is None and _keeps_argv0(asyncio.get_running_loop()):
            argv = ["-" + os.path.basename(self.user_shell)]  # argv0 "-sh": a login shell, as sshd starts it
        elif command is None:
            argv = [self.user_shell, "-l"]
        else:
            argv = [os.path.basename(self.user_shell), "-c", command]
        self._task = asyncio.get_running_loop().create_task(self._run(argv, env))
        return True

    async def _run(self, argv: list[str], env: dict[str, str]) -> None:
        loop = asyncio.get_running_loop()
        home = env.get("HOME", "/")
        cwd = home if os.path.isdir(home) else "/"
        child_fds: list[int] = []
        parent_fds: list[int] = []
        try:
            if self.pty is not None:
                master, slave = os.openpty()
                parent_fds.append(master)
                child_fds.append(slave)
                self._setup_pty(slave)
                if self.credentials is not None:  # as sshd's pty_setowner(): the user's terminal, group-writable
                    os.fchown(slave, self.credentials.uid, _tty_gid(self.credentials.gid))
                    os.fchmod(slave, 0o620)
                env["TERM"] = self.pty.term or "vt100"
                env["SSH_TTY"] = os.ttyname(slave)
                stdio = (slave, slave, slave)
                preexec: Callable[[], None] | None = functools.partial(_take_controlling_tty, slave)
            else:
                pipes = [os.pipe() for _ in range(3)]
                stdio = (pipes[0][0], pipes[1][1], pipes[2][1])
                child_fds += stdio
                parent_fds += (pipes[0][1], pipes[1][0], pipes[2][0])
                preexec = None
            if self.credentials is not None:
                preexec = _then_drop(preexec, self.credentials)
            if self.spawner is not None:
                process = await self.spawner(argv, self.user_shell, stdio, env, cwd, self.pty is not None)
            else:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    executable=self.user_shell,
                    stdin=stdio[0],
                    stdout=stdio[1],
                    stderr=stdio[2],
                    env=env,
                    # in a ChrootDirectory the preexec enters the jail, then the home inside it (drop_privileges)
                    cwd=None if self.credentials is not None and self.credentials.chroot is not None else cwd,
                    start_new_session=self.pty is None,  # else the preexec makes the session itself
                    preexec_fn=preexec,
                )
        except (OSError, subprocess.SubprocessError) as exc:  # SubprocessError: the pty preexec failed
            for fd in child_fds + parent_fds:
                os.close(fd)
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            log.info("channel %d: cannot run %s: %s", self.channel_id, self.user_shell, reason)
            self._send(f"{self.user_shell}: {reason}\r\n".encode(), EXTENDED_DATA_STDERR)
            self.returncode = 127
            self._maybe_finish()
            return
        finally:
            for fd in child_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.process = process
        await self._connect_io(loop, parent_fds)
        if self._closed:
            self._kill()
            self._release_io()
        self.returncode = await process.wait()
        if self._pty_timer is None and self.pty is not None and not self._closed:
            self._pty_timer = loop.call_later(PTY_DRAIN_GRACE, self._pty_drain_expired)
        self._maybe_finish()

    def _setup_pty(self, slave: int) -> None:
        assert self.pty is not None
        with contextlib.suppress(OSError, termios.error, ProtocolError):
            termios.tcsetattr(slave, termios.TCSANOW, apply_terminal_modes(termios.tcgetattr(slave), self.pty.modes))
        with contextlib.suppress(OSError):
            fcntl.ioctl(slave, termios.TIOCSWINSZ, winsize(*_size_of(self.pty)))

    async def _connect_io(self, loop: asyncio.AbstractEventLoop, parent_fds: list[int]) -> None:
        if self.pty is not None:
            master = parent_fds[0]
            self._master_fd = master
            stdin_fd, outputs = os.dup(master), ((master, None),)  # two transports, two fds to own
        else:
            stdin_fd, outputs = parent_fds[0], ((parent_fds[1], None), (parent_fds[2], EXTENDED_DATA_STDERR))
        for fd, data_type in outputs:
            output = _ProcessOutput(self, data_type)
            self._outputs.append(output)
            await loop.connect_read_pipe(lambda output=output: output, os.fdopen(fd, "rb", buffering=0))
        self._stdin_side = side = _ProcessInput(self)
        if self.pty is not None:
            self._stdin = _PtyWriter(loop, stdin_fd, side)
        else:
            self._stdin, _ = await loop.connect_write_pipe(lambda: side, os.fdopen(stdin_fd, "wb", buffering=0))
        early, self._early_input = self._early_input, []
        for data in early:
            self._write_stdin(data)
        if self._eof_received:
            self._close_stdin()

    # --- stdin ---

    def _write_stdin(self, data: bytes) -> None:
        side = self._stdin_side
        if self._stdin is None or side is None or side.closed or self._stdin.is_closing():
            self.conn.consumed(self.channel_id, len(data))  # nobody will read it: don't stall the peer
            return
        self._stdin.write(data)
        if side.paused:
            self._unconsumed += len(data)
        else:
            self.conn.consumed(self.channel_id, len(data))

    def _stdin_drained(self) -> None:
        if self._unconsumed and not self._closed:
            self.conn.consumed(self.channel_id, self._unconsumed)
        self._unconsumed = 0

    def _close_stdin(self) -> None:
        stdin = self._stdin
        if stdin is None or stdin.is_closing():
            return
        if self.pty is None:
            stdin.write_eof()
            return
        veof = b"\x04"
        with contextlib.suppress(OSError, termios.error):
            char = termios.tcgetattr(self._master_fd)[6][termios.VEOF]
            veof = char if isinstance(char, bytes) else bytes((char,))
        stdin.write(veof)

    # --- output ---

    def _send(self, data: bytes, data_type: int | None) -> int:
        if self._closed:
            return len(data)  # the channel is gone: drop, so the process never blocks on us
        try:
            return self.conn.send_data(self.channel_id, data, data_type)
        except ChannelClosedError:
            return len(data)

    def _output(self, output: _ProcessOutput, data: bytes) -> None:
        if output.pending:  # only if the transport delivered after pause_reading: keep order
            output.pending += data
            return
        sent = self._send(data, output.data_type)
        if sent < len(data):
            output.pending = data[sent:]
            assert output.transport is not None
            output.transport.pause_reading()

    def _pty_drain_expired(self) -> None:
        if any(output.pending for output in self._outputs):
            self._pty_timer = asyncio.get_running_loop().call_later(PTY_DRAIN_GRACE, self._pty_drain_expired)
            return
        for output in self._outputs:  # a background process still holds the slave: stop waiting for it
            if output.transport is not None and not output.closed:
                output.transport.close()

    # --- the end ---

    def _maybe_finish(self) -> None:
        if self._finished or self.returncode is None:
            return
        if any(not output.closed or output.pending for output in self._outputs):
            return
        self._finished = True
        if not self._closed:
            if self.returncode < 0:
                request = ExitSignal(signal_name(-self.returncode), False, "", "")
                self.conn.send_request(self.channel_id, "exit-signal", False, request.encode())
            else:
                self.conn.send_request(self.channel_id, "exit-status", False, ExitStatus(self.returncode).encode())
            self.conn.send_eof(self.channel_id)
            self.conn.close_channel(self.channel_id)
        self._release_io()
        self._report_exit()

    def _report_exit(self) -> None:
        if self._exit_reported or (self.process is not None and self.returncode is None):
            return  # a process still running reports when it exits
        self._exit_reported = True
        if self.on_exit is not None:
            self.on_exit(self.returncode)

    def _release_io(self) -> None:
        if self._pty_timer is not None:
            self._pty_timer.cancel()
        if self._stdin is not None:
            self._stdin.close()
        for output in self._outputs:
            output.pending = b""
            if output.transport is not None:
                output.transport.close()
        self._master_fd = -1
        self._early_input.clear()

    def _kill(self) -> None:
        """SIGHUP the process group now and SIGKILL it shortly, so a closed channel leaves nothing behind."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        _signal_group(process, signal.SIGHUP)
        asyncio.get_running_loop().call_later(KILL_GRACE, self._kill_hard)

    def _kill_hard(self) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            _signal_group(process, signal.SIGKILL)


def _signal_group(process: asyncio.subprocess.Process, signum: int) -> None:
    # the child leads its own session and process group (start_new_session, or setsid in the pty preexec)
    signal_group = getattr(process, "signal_group", None)  # a privsep helper's process: it signals as the user
    if signal_group is not None:
        signal_group(signum)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _take_controlling_tty(slave: int) -> None:
    """In the child: a new session whose controlling terminal is the pty slave.

    By its number, and with its own setsid(): uvloop runs this before stdio is set up, the stdlib after.
    """
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)


def _tty_gid(default: int) -> int:
    try:
        return grp.getgrnam("tty").gr_gid
    except KeyError:
        return default


def _then_drop(first: Callable[[], None] | None, creds: Credentials) -> Callable[[], None]:
    """In the child: ``first`` (the pty's setsid) with root's rights, then become the user."""

    def run() -> None:
        if first is not None:
            first()
        drop_privileges(creds)

    return run


def _keeps_argv0(loop: asyncio.AbstractEventLoop) -> bool:
    """uvloop replaces argv[0] with ``executable``, so a login shell has to be asked for with -l there."""
    return not type(loop).__module__.startswith("uvloop")


def _size_of(pty: PtyReq) -> tuple[int, int, int, int]:
    return pty.columns, pty.rows, pty.width_px, pty.height_px


def _default_shell() -> str:
    try:
        shell = pwd.getpwuid(os.getuid()).pw_shell
    except KeyError:
        shell = ""
    return shell if shell and os.path.isabs(shell) else "/bin/sh"
