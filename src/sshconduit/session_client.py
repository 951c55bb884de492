"""The client end of a session channel (RFC 4254 section 6), and the relay of the local terminal for the CLI.

Stdin goes out as the peer's window allows from a buffer its feeder bounds by awaiting ``drain_stdin``; stdout
and stderr are handed to writers, and only once a writer returned is the peer's window reopened.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import select
import signal
import termios
import tty
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import limits
from .aio import ChannelHandler
from .errors import ChannelOpenError, SSHError
from .messages import EnvReq, ExecReq, ExitSignal, ExitStatus, PtyReq, SignalReq, WindowChange
from .ttymodes import TTY_OP_END, encode_terminal_modes

if TYPE_CHECKING:
    from .aio import SSHConnection

EXTENDED_DATA_STDERR = 1
STDIN_READ_SIZE = 32 * 1024
Writer = Callable[[bytes], None]


@dataclass(frozen=True)
class PtyRequest:
    """What the client asks for in pty-req; ``modes`` is an encoded RFC 4254 section 8 string."""

    term: str = "vt100"
    columns: int = 80
    rows: int = 24
    width_px: int = 0
    height_px: int = 0
    modes: bytes = bytes((TTY_OP_END,))

    def encode(self) -> bytes:
        return PtyReq(self.term, self.columns, self.rows, self.width_px, self.height_px, self.modes).encode()


class ClientSession(ChannelHandler):
    """The client end of a session channel: one command or shell, stdin out, stdout/stderr in."""

    window = limits.DEFAULT_WINDOW
    max_packet = limits.DEFAULT_MAX_PACKET

    def __init__(
        self,
        command: str | None,
        *,
        pty: PtyRequest | None = None,
        env: dict[str, str] | None = None,
        stdout: Writer,
        stderr: Writer,
    ) -> None:
        self.command = command
        self.pty = pty
        self.env = dict(env or {})
        self.stdout = stdout
        self.stderr = stderr
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.exit_message = ""
        self.pty_refused = False
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[None] = loop.create_future()
        self._closed: asyncio.Future[None] = loop.create_future()
        self._replies: list[str] = []  # request types awaiting a reply, oldest first
        self._stdin: collections.deque[bytes] = collections.deque()  # immutable: the core may hold a view
        self._stdin_size = 0
        self._stdin_eof = False
        self._eof_sent = False
        self._drained: asyncio.Future[None] | None = None
        self._gone = False  # closed or failed: nothing more is sent

    # --- API ---

    async def wait_started(self) -> None:
        """Returns once exec/shell is accepted; raises ChannelOpenError or SSHError otherwise."""
        await asyncio.shield(self._started)

    async def wait_closed(self) -> int:
        """The exit status as ssh(1) reports it: the remote status, else 255 (signal, or no status)."""
        await asyncio.shield(self._closed)
        if self.exit_status is not None:
            return self.exit_status
        return 255

    def write_stdin(self, data: bytes) -> None:
        if self._stdin_eof:
            raise SSHError("stdin already closed")
        if data and not self._gone:
            self._stdin.append(bytes(data))
            self._stdin_size += len(data)
            self._flush_stdin()

    def stdin_eof(self) -> None:
        self._stdin_eof = True
        self._flush_stdin()

    async def drain_stdin(self) -> None:
        """Waits until every buffered stdin byte went out (or the channel is gone)."""
        while self._stdin and not self._gone:
            if self._drained is None or self._drained.done():
                self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def change_window_size(self, columns: int, rows: int, width_px: int = 0, height_px: int = 0) -> None:
        if self.pty is not None and self._started.done() and not self._gone:
            size = WindowChange(columns, rows, width_px, height_px)
            self.conn.send_request(self.channel_id, "window-change", False, size.encode())

    def send_signal(self, name: str) -> None:
        if not self._gone:
            self.conn.send_request(self.channel_id, "signal", False, SignalReq(name).encode())

    def close(self) -> None:
        if not self._gone:
            self.conn.close_channel(self.channel_id)

    # --- channel events ---

    def opened(self, type_data: bytes) -> None:
        send = self.conn.send_request
        if self.pty is not None:
            send(self.channel_id, "pty-req", True, self.pty.encode())
            self._replies.append("pty")
        for name, value in self.env.items():
            send(self.channel_id, "env", False, EnvReq(name, value).encode())
        if self.command is None:
            send(self.channel_id, "shell", True, b"")
            self._replies.append("shell")
        else:
            send(self.channel_id, "exec", True, ExecReq(os.fsencode(self.command)).encode())
            self._replies.append("exec")

    def open_failed(self, error: ChannelOpenError) -> None:
        self._gone = True
        _fail(self._started, error)
        self._wake_drain()
        if not self._closed.done():
            self._closed.set_result(None)

    def request_replied(self, ok: bool) -> None:
        if not self._replies:
            return
        kind = self._replies.pop(0)
        if kind == "pty":
            self.pty_refused = not ok
        elif ok:
            if not self._started.done():
                self._started.set_result(None)
            self._flush_stdin()
        else:
            _fail(self._started, SSHError(f"{kind} request failed on channel {self.channel_id}"))
            self.conn.close_channel(self.channel_id)

    def request_received(self, request_type: str, data: bytes) -> bool:
        if request_type == "exit-status":
            self.exit_status = ExitStatus.decode(data).status
            return True
        if request_type == "exit-signal":
            status = ExitSignal.decode(data)
            self.exit_signal = status.signal
            self.exit_message = status.message
            return True
        return False  # keepalive@openssh.com and the like

    def data_received(self, data: bytes, data_type: int | None) -> None:
        if data_type is None:
            self.stdout(data)
        elif data_type == EXTENDED_DATA_STDERR:
            self.stderr(data)
        # The writer returned: the bytes are delivered, so the peer may send more.
        self.conn.consumed(self.channel_id, len(data))

    def window_opened(self) -> None:
        self._flush_stdin()

    def close_received(self) -> None:
        self._gone = True
        _fail(self._started, SSHError(f"channel {getattr(self, 'channel_id', '?')}: closed before start"))
        self._stdin.clear()
        self._stdin_size = 0
        self._wake_drain()
        if not self._closed.done():
            self._closed.set_result(None)

    # --- stdin ---

    def _flush_stdin(self) -> None:
        if self._gone or not self._started.done() or self._started.exception() is not None:
            return
        stdin = self._stdin
        while stdin:
            chunk = stdin[0]
            sent = self.conn.send_data(self.channel_id, chunk)
            self._stdin_size -= sent
            if sent < len(chunk):
                stdin[0] = chunk[sent:]
                break
            stdin.popleft()
        if not stdin:
            self._wake_drain()
            if self._stdin_eof and not self._eof_sent:
                self._eof_sent = True
                self.conn.send_eof(self.channel_id)

    def _wake_drain(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)


def _fail(future: asyncio.Future[None], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # retrieved: a caller who only waits for the close is not warned about it


# ============================== the local terminal (for the CLI) ==============================


async def run_interactive(
    conn: SSHConnection, command: str | None, *, request_tty: bool | None, env: dict[str, str]
) -> int:
    """Runs ``command`` (or a shell) over ``conn`` wired to our stdin/stdout/stderr; returns the exit status.

    ``request_tty``: True is ssh -t, False is -T, None lets it follow ssh's default (a pty for a shell). A pty
    is only asked for when stdin is a terminal; the local terminal is then raw until the session ends.
    """
    stdin_is_tty = os.isatty(0)
    want_tty = request_tty if request_tty is not None else command is None
    if want_tty and not stdin_is_tty and request_tty:
        _write_fd(2, b"Pseudo-terminal will not be allocated because stdin is not a terminal.\r\n")
    use_tty = want_tty and stdin_is_tty
    saved_attrs = termios.tcgetattr(0) if use_tty else None
    pty = None
    if saved_attrs is not None:
        columns, rows = _terminal_size()
        pty = PtyRequest(os.environ.get("TERM", "vt100"), columns, rows, 0, 0, encode_terminal_modes(saved_attrs))
    session = ClientSession(
        command,
        pty=pty,
        env=env,
        stdout=lambda data: _write_fd(1, data),
        stderr=lambda data: _write_fd(2, data),
    )
    loop = asyncio.get_running_loop()
    conn.open_channel(session, "session")
    pump: asyncio.Task[None] | None = None
    try:
        await session.wait_started()
        if session.pty_refused:
            _write_fd(2, f"PTY allocation request failed on channel {session.channel_id}\r\n".encode())
        if saved_attrs is not None:
            tty.setraw(0, termios.TCSADRAIN)
            loop.add_signal_handler(signal.SIGWINCH, lambda: session.change_window_size(*_terminal_size(), 0, 0))
        pump = loop.create_task(_pump_stdin(session))
        return await session.wait_closed()
    finally:
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        if saved_attrs is not None:
            loop.remove_signal_handler(signal.SIGWINCH)
            termios.tcsetattr(0, termios.TCSADRAIN, saved_attrs)
        session.close()


async def _pump_stdin(session: ClientSession) -> None:
    """Feeds fd 0 to the session, never holding more than one read beyond what the peer's window took."""
    loop = asyncio.get_running_loop()
    read = _read_stdin_polled
    try:
        loop.add_reader(0, lambda: None)
        loop.remove_reader(0)
    except OSError:  # epoll refuses regular files and /dev/null; a read of those never blocks anyway
        read = _read_stdin_in_thread
    while True:
        try:
            data = await read()
        except OSError:  # EIO once the terminal is gone: the same as end of input
            data = b""
        if not data:
            session.stdin_eof()
            return
        session.write_stdin(data)
        await session.drain_stdin()


async def _read_stdin_polled() -> bytes:
    # add_reader leaves fd 0's flags alone; connect_read_pipe would make the shared tty non-blocking for
    # stdout and stderr too. After readiness a read does not block.
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(0, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(0)
    try:
        return os.read(0, STDIN_READ_SIZE)
    except BlockingIOError:
        return await _read_stdin_polled()


async def _read_stdin_in_thread() -> bytes:
    return await asyncio.get_running_loop().run_in_executor(None, os.read, 0, STDIN_READ_SIZE)


def _write_fd(fd: int, data: bytes) -> None:
    """Writes all of ``data``; waits out a full non-blocking fd (the terminal is a slow consumer: that is
    back-pressure, and the peer's window stays shut meanwhile)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)


def _terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(0)
    except OSError:
        return 80, 24
    return size.columns, size.lines
