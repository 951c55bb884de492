"""What the connection writes to the SSH socket per forwarded connection: a channel's EOF waits a few loop turns
so it shares one write with the next connection's CHANNEL_OPEN (rr workload: one system call fewer each)."""

from __future__ import annotations

import asyncio

import pytest

from sshconduit import aio, messages
from sshconduit.aio import ChannelHandler, SSHConnection
from sshconduit.errors import ProtocolError
from sshconduit.forward.bridge import StreamBridge
from sshconduit.transport import Role


class FakeSocket:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writelines(self, parts: list[bytes]) -> None:
        self.writes.append(b"".join(parts))

    def is_closing(self) -> bool:
        return False


class LoggingSocket:
    """A forwarded socket that notes, in a list shared with the others, what its bridge does to it."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.log.append(f"{self.name} write {data!r}")

    def writelines(self, parts: list[bytes]) -> None:
        self.write(b"".join(parts))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.log.append(f"{self.name} eof")

    def close(self) -> None:
        self.log.append(f"{self.name} close")


async def connected() -> tuple[SSHConnection, FakeSocket]:
    conn = SSHConnection(Role.CLIENT)
    sock = FakeSocket()
    conn._socket = sock  # type: ignore[assignment]
    conn.start_connection_layer()  # packets go out under the initial null cipher: lengths are all we check
    return conn, sock


def confirm(conn: SSHConnection, channel_id: int) -> None:
    assert conn.channels is not None
    conn._handle_channel_events(conn.channels.handle(messages.ChannelOpenConfirmation(channel_id, 7, 1 << 20, 32768)))


async def turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_eof_and_the_next_open_share_one_write() -> None:
    async def run() -> None:
        conn, sock = await connected()
        first = conn.open_channel(ChannelHandler(), "direct-tcpip")
        confirm(conn, first)
        sock.writes.clear()
        loop = asyncio.get_running_loop()
        # As uvloop runs them: the old socket's EOF, then (call_soon) the accepted socket's connection_made.
        conn.send_eof(first)
        loop.call_soon(conn.open_channel, ChannelHandler(), "direct-tcpip")
        await turns(aio.LATE_FLUSH_TURNS + 2)
        assert len(sock.writes) == 1
        assert len(sock.writes[0]) > 2 * 16  # two packets

    asyncio.run(asyncio.wait_for(run(), 10))


def test_an_eof_and_close_alone_still_go_out_within_a_few_turns() -> None:
    async def run() -> None:
        conn, sock = await connected()
        channel = conn.open_channel(ChannelHandler(), "direct-tcpip")
        confirm(conn, channel)
        sock.writes.clear()
        conn.send_eof(channel)
        conn.close_channel(channel)
        await turns(aio.LATE_FLUSH_TURNS + 1)
        assert len(sock.writes) == 1
        assert conn.core.data_to_send() == []

    asyncio.run(asyncio.wait_for(run(), 10))


def test_a_write_before_the_late_flush_ends_its_idle_loop_turns() -> None:
    """The server's EOF and CLOSE usually leave with the next reply's write; the late flush's turns after that
    were each a loop iteration (an epoll_wait) for nothing."""

    async def run() -> None:
        conn, sock = await connected()
        channel = conn.open_channel(ChannelHandler(), "direct-tcpip")
        confirm(conn, channel)
        conn.send_eof(channel)
        conn._flush()  # as a read's or an open's own flush
        flushes = 0
        real_flush = conn._flush

        def counting_flush() -> None:
            nonlocal flushes
            flushes += 1
            real_flush()

        conn._flush = counting_flush  # type: ignore[method-assign]
        await turns(aio.LATE_FLUSH_TURNS + 2)
        assert flushes == 0
        assert len(sock.writes) == 2  # the open, then the EOF with that flush

    asyncio.run(asyncio.wait_for(run(), 10))


def test_replies_to_one_read_go_out_in_one_write_at_its_end() -> None:
    async def run() -> None:
        conn, sock = await connected()
        channel = conn.open_channel(ChannelHandler(), "direct-tcpip")
        confirm(conn, channel)
        sock.writes.clear()
        conn._flush_scheduled = True  # as data_received sets it while handling a read
        conn.send_data(channel, b"a")
        conn.send_data(channel, b"b")
        await turns(2)
        assert sock.writes == []  # nothing scheduled: the read's own flush sends them
        conn._flush()
        assert len(sock.writes) == 1

    asyncio.run(asyncio.wait_for(run(), 10))


def test_one_channel_s_socket_is_closed_after_another_channel_s_data_of_the_same_read() -> None:
    """rr: the previous connection's EOF and CLOSE arrive in the read that brings the next one's reply. The
    reply's write is on that connection's critical path; the old socket's close is not. No shutdown before that
    close: the close sends the FIN."""

    async def run() -> None:
        conn, _sock = await connected()
        log: list[str] = []
        old, new = (conn.open_channel(StreamBridge(name), "direct-tcpip") for name in ("old", "new"))
        for name, channel in (("old", old), ("new", new)):
            bridge = conn.handlers[channel]
            assert isinstance(bridge, StreamBridge)
            bridge.socket_made(LoggingSocket(name, log))  # type: ignore[arg-type]
            confirm(conn, channel)
        conn._handle_events([messages.ChannelEof(old), messages.ChannelClose(old), messages.ChannelData(new, b"ok")])
        assert log == ["new write b'ok'", "old close"]

    asyncio.run(asyncio.wait_for(run(), 10))


def test_a_socket_whose_channel_closed_is_closed_even_when_a_later_message_of_the_read_breaks_the_protocol() -> None:
    async def run() -> None:
        conn, _sock = await connected()
        log: list[str] = []
        channel = conn.open_channel(StreamBridge("old"), "direct-tcpip")
        bridge = conn.handlers[channel]
        assert isinstance(bridge, StreamBridge)
        bridge.socket_made(LoggingSocket("old", log))  # type: ignore[arg-type]
        confirm(conn, channel)
        with pytest.raises(ProtocolError):  # EOF for a channel that is not open
            conn._handle_events([messages.ChannelClose(channel), messages.ChannelEof(channel + 1)])
        assert log == ["old close"]  # the handler is gone with its CLOSE: connection_lost will not reach it

    asyncio.run(asyncio.wait_for(run(), 10))
