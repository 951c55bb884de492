"""Sessions without a peer: ServerSession runs real processes (/bin/sh, ptys), ClientSession builds requests.

``RecordingConn`` stands in for our own asyncio adapter (aio.SSHConnection): it records what a handler asks
it to send, in order, and models the peer's window so flow control can be checked. Interop with OpenSSH is
tested end to end elsewhere.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import subprocess
import termios
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sshconduit.aio import ChannelHandler
from sshconduit.errors import ChannelOpenError, SSHError
from sshconduit.messages import EnvReq, ExecReq, ExitSignal, ExitStatus, PtyReq, SignalReq, WindowChange
from sshconduit.session import ClientSession, PtyRequest, ServerSession
from sshconduit.ttymodes import apply_terminal_modes, encode_terminal_modes

SH = "/bin/sh"
TIMEOUT = 10.0


def run_async(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), TIMEOUT))

    return wrapper


class RecordingConn:
    """Our adapter's channel API, recording calls; ``window`` is the peer's receive window."""

    def __init__(self, window: int = 1 << 20) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.window = window
        self.consumed_total = 0
        self.handler: ChannelHandler | None = None
        self.closed = asyncio.Event()

    def attach(self, handler: ChannelHandler) -> None:
        self.handler = handler
        handler.bind(self, 0)  # type: ignore[arg-type]

    def send_data(self, channel_id: int, data: bytes | memoryview, data_type: int | None = None) -> int:
        taken = min(len(data), self.window)
        self.window -= taken
        if taken:
            self.events.append(("data", data_type, bytes(data[:taken])))
        return taken

    def consumed(self, channel_id: int, nbytes: int) -> None:
        self.consumed_total += nbytes

    def send_eof(self, channel_id: int) -> None:
        self.events.append(("eof",))

    def close_channel(self, channel_id: int) -> None:
        self.events.append(("close",))
        if not self.closed.is_set():
            self.closed.set()
            # the peer answers CLOSE with CLOSE, and the adapter then reports close_received
            assert self.handler is not None
            asyncio.get_running_loop().call_soon(self.handler.close_received)

    def send_request(self, channel_id: int, request_type: str, want_reply: bool, data: bytes = b"") -> None:
        self.events.append(("request", request_type, want_reply, data))

    def open_window(self, nbytes: int) -> None:
        self.window += nbytes
        assert self.handler is not None
        self.handler.window_opened()

    def output(self, data_type: int | None = None) -> bytes:
        return b"".join(e[2] for e in self.events if e[0] == "data" and e[1] == data_type)

    def kinds(self) -> list[str]:
        """Event kinds with consecutive data collapsed: e.g. ['data', 'exit-status', 'eof', 'close']."""
        out: list[str] = []
        for event in self.events:
            kind = event[1] if event[0] == "request" else event[0]
            if not out or out[-1] != kind or kind != "data":
                out.append(kind)
        return out

    def requests(self, request_type: str) -> list[bytes]:
        return [e[3] for e in self.events if e[0] == "request" and e[1] == request_type]


def server(tmp_path: Any, **kwargs: Any) -> tuple[ServerSession, RecordingConn]:
    env = {"HOME": str(tmp_path), "USER": "tester", "PATH": "/usr/bin:/bin"}
    kwargs.setdefault("user_shell", SH)
    window = kwargs.pop("window", 1 << 20)
    session = ServerSession(env=env, **kwargs)
    conn = RecordingConn(window)
    conn.attach(session)
    session.opened(b"")
    return session, conn


def exec_req(command: str) -> bytes:
    return ExecReq(command.encode()).encode()


async def wait_until(predicate: Callable[[], bool]) -> None:
    for _ in range(int(TIMEOUT / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


# ============================== server ==============================


@run_async
async def test_exec_output_then_status_eof_close_in_order(tmp_path: Any) -> None:
    session, conn = server(tmp_path)
    assert session.request_received("exec", exec_req("echo ok-$((6*7)); exit 3"))
    await conn.closed.wait()
    assert conn.output() == b"ok-42\n"
    assert conn.kinds() == ["data", "exit-status", "eof", "close"]
    assert ExitStatus.decode(conn.requests("exit-status")[0]).status == 3
    assert conn.events[1][2] is False  # exit-status wants no reply


@run_async
async def test_stderr_is_extended_data_type_1(tmp_path: Any) -> None:
    session, conn = server(tmp_path)
    session.request_received("exec", exec_req("echo out; echo err >&2"))
    await conn.closed.wait()
    assert conn.output() == b"out\n"
    assert conn.output(1) == b"err\n"


@run_async
async def test_pty_exec_runs_on_a_pts_with_term_and_size(tmp_path: Any) -> None:
    session, conn = server(tmp_path)
    assert session.request_received("pty-req", PtyReq("xterm-test", 132, 43, 0, 0, b"\x00").encode())
    session.request_received("exec", exec_req("tty; echo $TERM; stty size"))
    await conn.closed.wait()
    lines = conn.output().decode().split("\r\n")  # the pty's ONLCR turns \n into \r\n
    assert re.fullmatch(r"/dev/pts/\d+", lines[0]), lines
    assert lines[1:3] == ["xterm-test", "43 132"]


@run_async
async def test_window_change_resizes_the_pty(tmp_path: Any) -> None:
    session, conn = server(tmp_path)
    session.request_received("pty-req", PtyReq("vt100", 80, 24, 0, 0, b"").encode())
    # the shell reports its size on SIGWINCH, which the kernel sends when the size changes
    session.request_received(
        "exec", exec_req("trap 'stty size; exit 0' WINCH; echo ready; while :; do sleep 0.05; done")
    )
    await wait_until(lambda: b"ready" in conn.output())
    assert session.request_received("window-change", WindowChange(100, 40, 0, 0).encode())
    await conn.closed.wait()
    assert b"40 100" in conn.output()


@run_async
async def test_stdin_is_delivered_and_eof_closes_it(tmp_path: Any) -> None:
    session, conn = server(tmp_path)
    session.data_received(b"early ", None)  # before exec: held until the process runs
    session.request_received("exec", exec_req("cat"))
    session.data_received(b"hello\n", None)
    session.eof_received()
    await conn.closed.wait()
    assert conn.output() == b"early hello\n"
    assert ExitStatus.decode(conn.requests("exit-status")[0]).status == 0
    assert conn.consumed_total == 12


@run_async
async def test_pty_eof_sends_veof(tmp_path: Any) -> None:
    session, conn = server(tmp_path)
    session.request_received("pty-req", PtyReq("vt100", 80, 24, 0, 0, b"").encode())
    session.request_received("exec", exec_req("cat; echo done"))
    session.data_received(b"abc\n", None)
    session.eof_received()
    await conn.closed.wait()
    assert conn.output().endswith(b"done\r\n")
    assert b"abc" in conn.output()
    assert ExitStatus.decode(conn.requests("exit-status")[0]).status == 0


@run_async
async def test_full_stdin_holds_back_consumed_until_it_drains(tmp_path: Any) -> None:
    session, conn = server(tmp_path)
    session.request_received("exec", exec_req("sleep 0.5; wc -c"))
    await wait_until(lambda: session.process is not None)
    total = 1 << 20
    for _ in range(total // 65536):
        session.data_received(b"x" * 65536, None)
    assert conn.consumed_total < total // 2  # the pipe is full while wc sleeps: the peer's window stays shut
    session.eof_received()
    await conn.closed.wait()
    assert conn.consumed_total == total
    assert conn.output().strip() == str(total).encode()


@run_async
async def test_small_window_makes_output_wait_without_loss(tmp_path: Any) -> None:
    expected = subprocess.run(["seq", "1", "300"], capture_output=True, check=True).stdout
    session, conn = server(tmp_path, window=10)
    session.request_received("exec", exec_req("seq 1 300"))
    await wait_until(lambda: session.returncode is not None)
    await asyncio.sleep(0.05)
    assert conn.output() == expected[:10]
    assert conn.kinds() == ["data"]  # no exit-status while output is still held back
    while not conn.closed.is_set():
        conn.open_window(7)
        await asyncio.sleep(0)
    assert conn.output() == expected
    assert conn.kinds() == ["data", "exit-status", "eof", "close"]


@run_async
async def test_killed_process_reports_exit_signal(tmp_path: Any) -> None:
    session, conn = server(tmp_path)
    session.request_received("exec", exec_req("echo x; kill -TERM $$"))
    await conn.closed.wait()
    assert conn.kinds() == ["data", "exit-signal", "eof", "close"]
    assert ExitSignal.decode(conn.requests("exit-signal")[0]).signal == "TERM"


@run_async
async def test_signal_request_reaches_the_process(tmp_path: Any) -> None:
    session, conn = server(tmp_path)
    session.request_received("exec", exec_req("exec sleep 30"))
    await wait_until(lambda: session.process is not None)
    assert not session.request_received("signal", SignalReq("NOTASIG").encode())
    assert session.request_received("signal", SignalReq("INT").encode())
    await conn.closed.wait()
    assert ExitSignal.decode(conn.requests("exit-signal")[0]).signal == "INT"


@run_async
async def test_close_kills_the_process_group(tmp_path: Any) -> None:
    exits: list[int | None] = []
    session, conn = server(tmp_path, on_exit=exits.append)
    session.request_received("exec", exec_req("sleep 30 & echo $!; wait"))
    await wait_until(lambda: conn.output().endswith(b"\n"))
    child = int(conn.output())
    session.close_received()
    await wait_until(lambda: bool(exits))
    assert exits[0] is not None and exits[0] < 0  # killed (SIGHUP)
    await wait_until(lambda: not _alive(child))  # the background child went with its group


@run_async
async def test_close_without_process_reports_none(tmp_path: Any) -> None:
    exits: list[int | None] = []
    session, _ = server(tmp_path, on_exit=exits.append)
    session.connection_lost()
    assert exits == [None]


@run_async
async def test_shell_is_a_login_shell_in_home(tmp_path: Any) -> None:
    session, conn = server(tmp_path)
    assert session.request_received("shell", b"")
    session.data_received(b'echo "$0"; pwd; echo "$USER"\n', None)
    session.eof_received()
    await conn.closed.wait()
    assert conn.output().decode().split("\n")[:3] == ["-sh", str(tmp_path), "tester"]


@run_async
async def test_env_allow_list(tmp_path: Any) -> None:
    session, conn = server(tmp_path)
    assert session.request_received("env", EnvReq("LANG", "C.UTF-8").encode())
    assert session.request_received("env", EnvReq("LC_TIME", "C").encode())
    assert not session.request_received("env", EnvReq("LD_PRELOAD", "/tmp/x.so").encode())
    assert not session.request_received("env", EnvReq("PATH", "/tmp").encode())
    session.request_received("exec", exec_req('echo "$LANG|$LC_TIME|$LD_PRELOAD|$PATH"'))
    await conn.closed.wait()
    assert conn.output() == b"C.UTF-8|C||/usr/bin:/bin\n"


@run_async
async def test_refusals(tmp_path: Any) -> None:
    session, conn = server(tmp_path, allow_pty=False)
    assert not session.request_received("pty-req", PtyReq("vt100", 80, 24, 0, 0, b"").encode())
    assert not session.request_received("subsystem", b"\x00\x00\x00\x04sftp")
    assert not session.request_received("keepalive@openssh.com", b"")
    assert not session.request_received("eow@openssh.com", b"")
    assert not session.request_received("exec", b"\x00\x00")  # malformed: refused, not raised
    assert session.request_received("exec", exec_req("true"))
    assert not session.request_received("exec", exec_req("true"))  # one program per channel
    assert not session.request_received("shell", b"")
    await conn.closed.wait()
    assert conn.kinds() == ["exit-status", "eof", "close"]


@run_async
async def test_forced_command_sees_the_original(tmp_path: Any) -> None:
    session, conn = server(tmp_path, forced_command='echo "forced:$SSH_ORIGINAL_COMMAND"')
    session.request_received("exec", exec_req("rm -rf /nothing"))
    await conn.closed.wait()
    assert conn.output() == b"forced:rm -rf /nothing\n"


@run_async
async def test_missing_shell_exits_127(tmp_path: Any) -> None:
    session, conn = server(tmp_path, user_shell=str(tmp_path / "no-such-shell"))
    session.request_received("exec", exec_req("true"))
    await conn.closed.wait()
    assert ExitStatus.decode(conn.requests("exit-status")[0]).status == 127
    assert b"no-such-shell" in conn.output(1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


# ============================== terminal modes ==============================


def test_terminal_modes_round_trip_between_two_ptys() -> None:
    fds = [*os.openpty(), *os.openpty()]
    try:
        source, target = fds[1], fds[3]
        attrs = termios.tcgetattr(source)
        attrs[6][termios.VERASE] = b"\x08"
        attrs[6][termios.VINTR] = b"\x07"
        attrs[3] &= ~termios.ECHO
        attrs[1] &= ~termios.ONLCR
        attrs[0] |= termios.IXANY
        termios.tcsetattr(source, termios.TCSANOW, attrs)
        modes = encode_terminal_modes(termios.tcgetattr(source))
        assert modes[-1] == 0
        termios.tcsetattr(target, termios.TCSANOW, apply_terminal_modes(termios.tcgetattr(target), modes))
        got = termios.tcgetattr(target)
        assert got[6][termios.VERASE] == b"\x08" and got[6][termios.VINTR] == b"\x07"
        assert not got[3] & termios.ECHO and not got[1] & termios.ONLCR and got[0] & termios.IXANY
    finally:
        for fd in fds:
            os.close(fd)


def test_character_size_is_a_field_not_a_bit() -> None:
    attrs = [0, 0, termios.CS8 | termios.CREAD, 0, termios.B38400, termios.B38400, [b"\x00"] * 32]
    cs7_on_cs8_off = b"\x5a\x00\x00\x00\x01\x5b\x00\x00\x00\x00\x00"  # CS7 (90) = 1, CS8 (91) = 0
    applied = apply_terminal_modes(attrs, cs7_on_cs8_off)
    assert applied[2] == termios.CS7 | termios.CREAD
    cs7_off_cs8_on = b"\x5a\x00\x00\x00\x00\x5b\x00\x00\x00\x01\x00"
    assert apply_terminal_modes(applied, cs7_off_cs8_on)[2] == termios.CS8 | termios.CREAD
    encoded = encode_terminal_modes(applied)
    assert b"\x5a\x00\x00\x00\x01" in encoded and b"\x5b\x00\x00\x00\x00" in encoded


def test_terminal_modes_wire_layout() -> None:
    # VERASE (3) = 0x7f, ECHO (53) = 0, ISPEED (128) = 38400, then TTY_OP_END
    modes = b"\x03\x00\x00\x00\x7f" + b"\x35\x00\x00\x00\x00" + b"\x80\x00\x00\x96\x00" + b"\x00"
    fd_master, fd_slave = os.openpty()
    try:
        attrs = termios.tcgetattr(fd_slave)
        attrs[3] |= termios.ECHO
        applied = apply_terminal_modes(attrs, modes)
        assert applied[6][termios.VERASE] == b"\x7f"
        assert not applied[3] & termios.ECHO
        assert attrs[3] & termios.ECHO  # the input list is not modified
        encoded = encode_terminal_modes(applied)
        assert b"\x03\x00\x00\x00\x7f" in encoded and b"\x35\x00\x00\x00\x00" in encoded
    finally:
        os.close(fd_master)
        os.close(fd_slave)


# ============================== client ==============================


def client(command: str | None, **kwargs: Any) -> tuple[ClientSession, RecordingConn, list[bytes], list[bytes]]:
    out: list[bytes] = []
    err: list[bytes] = []
    window = kwargs.pop("window", 1 << 20)
    session = ClientSession(command, stdout=out.append, stderr=err.append, **kwargs)
    conn = RecordingConn(window)
    conn.attach(session)
    return session, conn, out, err


@run_async
async def test_client_sends_pty_env_exec_in_order() -> None:
    pty = PtyRequest("xterm", 100, 30)
    session, conn, _, _ = client("uname -a", pty=pty, env={"LANG": "C"})
    session.opened(b"")
    assert [(e[1], e[2]) for e in conn.events] == [("pty-req", True), ("env", False), ("exec", True)]
    assert PtyReq.decode(conn.events[0][3]) == PtyReq("xterm", 100, 30, 0, 0, b"\x00")
    assert EnvReq.decode(conn.events[1][3]) == EnvReq("LANG", "C")
    assert ExecReq.decode(conn.events[2][3]).command == b"uname -a"
    session.request_replied(False)  # pty refused: noted, the session goes on
    session.request_replied(True)
    await session.wait_started()
    assert session.pty_refused


@run_async
async def test_client_shell_and_output_routing() -> None:
    session, conn, out, err = client(None)
    session.opened(b"")
    assert conn.events == [("request", "shell", True, b"")]
    session.request_replied(True)
    await session.wait_started()
    session.data_received(b"to-stdout", None)
    session.data_received(b"to-stderr", 1)
    assert out == [b"to-stdout"] and err == [b"to-stderr"]
    assert conn.consumed_total == 18
    session.request_received("exit-status", ExitStatus(7).encode())
    session.close_received()
    assert await session.wait_closed() == 7


@run_async
async def test_client_stdin_respects_window_and_eof_follows_data() -> None:
    session, conn, _, _ = client("cat", window=4)
    session.opened(b"")
    session.write_stdin(b"before-start ")  # held until exec is accepted
    assert conn.output() == b""
    session.request_replied(True)
    session.write_stdin(b"and after")
    session.stdin_eof()
    assert conn.output() == b"befo"
    drained = asyncio.ensure_future(session.drain_stdin())
    await asyncio.sleep(0)
    assert not drained.done()
    while not drained.done():
        conn.open_window(5)
        await asyncio.sleep(0)
    assert conn.output() == b"before-start and after"
    assert conn.events[-1] == ("eof",)
    assert conn.kinds() == ["exec", "data", "eof"]


@run_async
async def test_client_exit_signal_is_255() -> None:
    session, _, _, _ = client("sleep 9")
    session.opened(b"")
    session.request_replied(True)
    session.request_received("exit-signal", ExitSignal("TERM", False, "", "").encode())
    session.close_received()
    assert await session.wait_closed() == 255
    assert session.exit_signal == "TERM"


@run_async
async def test_client_exec_refused() -> None:
    session, conn, _, _ = client("x")
    session.opened(b"")
    session.request_replied(False)
    with pytest.raises(SSHError, match="exec request failed on channel 0"):
        await session.wait_started()
    assert conn.events[-1] == ("close",)
    await conn.closed.wait()
    assert await session.wait_closed() == 255


@run_async
async def test_client_open_failed() -> None:
    session, _, _, _ = client("x")
    session.open_failed(ChannelOpenError(1, "no sessions"))
    with pytest.raises(ChannelOpenError, match="administratively prohibited"):
        await session.wait_started()
    assert await session.wait_closed() == 255


@run_async
async def test_client_window_change_only_with_pty() -> None:
    session, conn, _, _ = client(None, pty=PtyRequest())
    session.opened(b"")
    session.request_replied(True)
    session.request_replied(True)
    session.change_window_size(120, 50)
    assert WindowChange.decode(conn.requests("window-change")[0]) == WindowChange(120, 50, 0, 0)


# ============================== client against server ==============================


@run_async
async def test_client_and_server_sessions_joined(tmp_path: Any) -> None:
    """Each side's sends are delivered to the other, through a window of 1000 bytes per direction."""
    out: list[bytes] = []
    client_session = ClientSession("tr a-z A-Z; exit 5", stdout=out.append, stderr=out.append)
    server_session = ServerSession(user_shell=SH, env={"HOME": str(tmp_path)})
    _join(client_session, server_session, window=1000)
    client_session.opened(b"")
    server_session.opened(b"")
    await client_session.wait_started()
    payload = b"abcdefghij" * 5000
    for start in range(0, len(payload), 4096):
        client_session.write_stdin(payload[start : start + 4096])
        await client_session.drain_stdin()
    client_session.stdin_eof()
    assert await client_session.wait_closed() == 5
    assert b"".join(out) == payload.upper()


def _join(a: ChannelHandler, b: ChannelHandler, window: int) -> None:
    """A minimal in-memory channel: calls on one side's conn become events on the other, delivered later."""
    loop = asyncio.get_running_loop()

    class Half:
        def __init__(self, me: ChannelHandler) -> None:
            self.me = me
            self.peer_window = window
            self.closed = False
            self.other: Half

        def send_data(self, _cid: int, data: bytes, data_type: int | None = None) -> int:
            n = min(len(data), self.peer_window)
            self.peer_window -= n
            if n:
                loop.call_soon(self.other.me.data_received, bytes(data[:n]), data_type)
            return n

        def consumed(self, _cid: int, n: int) -> None:
            loop.call_soon(self.other.grow, n)

        def grow(self, n: int) -> None:
            self.peer_window += n
            self.me.window_opened()

        def send_eof(self, _cid: int) -> None:
            loop.call_soon(self.other.me.eof_received)

        def close_channel(self, _cid: int) -> None:
            if not self.closed:
                self.closed = True
                loop.call_soon(self.other.peer_closed)

        def peer_closed(self) -> None:
            self.close_channel(0)
            self.me.close_received()

        def send_request(self, _cid: int, request_type: str, want_reply: bool, data: bytes = b"") -> None:
            def deliver() -> None:
                ok = self.other.me.request_received(request_type, data)
                if want_reply:
                    loop.call_soon(self.me.request_replied, ok)

            loop.call_soon(deliver)

    half_a, half_b = Half(a), Half(b)
    half_a.other, half_b.other = half_b, half_a
    a.bind(half_a, 0)  # type: ignore[arg-type]
    b.bind(half_b, 0)  # type: ignore[arg-type]
