"""SocketStream and StreamListener on real sockets, under asyncio's own loop and uvloop: what the bridge relies on
(buffering with pause/resume, half-close, close after the buffer drains, abort, errors with plain reasons)."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable

import pytest
import uvloop
from conftest import recv_until_eof

from sshconduit.forward.socket_stream import (
    SocketStream,
    StreamListener,
    _ipv4_literal,
    connect_stream,
    listen_stream,
)

BIG = 8 * 1024 * 1024  # far over any socket buffer: writes must queue


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.events: list[str] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.keep_open_on_eof = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append("made")
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.events.append("eof")
        return self.keep_open_on_eof

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)


def stream_pair() -> tuple[SocketStream, Recorder, socket.socket]:
    """A stream, not yet started, over one end of a socketpair, its protocol, and the other end."""
    ours, theirs = socket.socketpair()
    proto = Recorder()
    return SocketStream(ours, proto), proto, theirs


def started_pair() -> tuple[SocketStream, Recorder, socket.socket]:
    stream, proto, theirs = stream_pair()
    stream.start()
    return stream, proto, theirs


def run(loop_kind: str, main: Callable[[], Awaitable[None]]) -> None:
    if loop_kind == "uvloop":
        uvloop.run(asyncio.wait_for(main(), 20))
    else:
        asyncio.run(asyncio.wait_for(main(), 20))


async def read_all(sock: socket.socket, timeout: float = 15) -> bytes:
    """Everything the peer sends until its EOF, read off the loop's thread."""

    return await asyncio.to_thread(recv_until_eof, sock, timeout)


LOOPS = pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])


@LOOPS
def test_writes_queue_pause_and_resume_then_close_delivers_everything(loop_kind: str) -> None:
    payload = bytes(range(256)) * (BIG // 256)

    async def main() -> None:
        stream, proto, theirs = started_pair()
        stream.set_write_buffer_limits(high=256 * 1024)
        stream.write(payload[:1000])
        stream.writelines([payload[1000:5000], memoryview(payload)[5000:]])
        assert stream.get_write_buffer_size() > 0, "8 MiB cannot fit in a socketpair's buffer"
        assert proto.events == ["made", "pause"]
        stream.close()  # after the buffer drains
        got = await read_all(theirs)
        assert await proto.lost is None
        assert got == payload
        assert proto.events == ["made", "pause", "resume", "lost"]
        theirs.close()

    run(loop_kind, main)


@LOOPS
def test_write_eof_waits_for_the_buffer_and_reading_goes_on(loop_kind: str) -> None:
    async def main() -> None:
        stream, proto, theirs = started_pair()
        stream.write(b"x" * BIG)
        stream.write_eof()
        got = await read_all(theirs)  # returns at the EOF, which must come after every byte
        assert got == b"x" * BIG
        theirs.sendall(b"after our eof")  # half-close: we still read
        theirs.shutdown(socket.SHUT_WR)
        for _ in range(200):
            if "eof" in proto.events:
                break
            await asyncio.sleep(0.01)
        assert bytes(proto.data) == b"after our eof"
        assert proto.events == ["made", "pause", "resume", "eof"]  # eof_received returned True: still open
        stream.close()
        assert await proto.lost is None
        theirs.close()

    run(loop_kind, main)


@LOOPS
def test_peer_eof_closes_when_the_protocol_says_so_and_abort_drops_the_buffer(loop_kind: str) -> None:
    async def main() -> None:
        stream, proto, theirs = stream_pair()
        proto.keep_open_on_eof = False
        stream.start()
        theirs.shutdown(socket.SHUT_WR)
        assert await proto.lost is None
        assert proto.events == ["made", "eof", "lost"]
        theirs.close()

        stream, proto, theirs = started_pair()
        stream.write(b"y" * BIG)
        stream.abort()
        assert stream.is_closing()
        assert await proto.lost is None
        got = await read_all(theirs, timeout=5)
        assert 0 < len(got) < BIG  # what the kernel took before the abort, and no more
        theirs.close()

    run(loop_kind, main)


@LOOPS
def test_a_reset_peer_is_reported_to_connection_lost(loop_kind: str) -> None:
    async def main() -> None:
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        proto = Recorder()
        stream = SocketStream(client, proto)
        stream.start()
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        accepted.close()  # linger 0: RST
        exc = await proto.lost
        assert isinstance(exc, ConnectionResetError)
        server.close()

    run(loop_kind, main)


@LOOPS
def test_read_now_takes_what_was_sent_before_the_stream_reads(loop_kind: str) -> None:
    async def main() -> None:
        stream, proto, theirs = stream_pair()
        assert stream.read_now(100) == b""  # not started, nothing sent: no wait, no error
        theirs.sendall(b"first request")
        stream.start()
        assert stream.read_now(5) == b"first"
        await asyncio.sleep(0.05)
        assert bytes(proto.data) == b" request"
        stream.close()
        await proto.lost
        theirs.close()

    run(loop_kind, main)


@LOOPS
def test_listener_hands_out_started_streams_and_stops_on_close(loop_kind: str) -> None:
    async def main() -> None:
        made: list[Recorder] = []

        def factory() -> Recorder:
            made.append(Recorder())
            return made[-1]

        sockets = await listen_stream("127.0.0.1", 0, 16)
        listener = StreamListener(sockets, factory)
        port = sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for c in clients:
            c.sendall(b"hi")
        for _ in range(200):
            if len(made) == 3 and all(p.data == b"hi" for p in made):
                break
            await asyncio.sleep(0.01)
        assert [bytes(p.data) for p in made] == [b"hi"] * 3
        # what a forward asks of its socket: Nagle off (set on the listener, inherited), the peer from accept()
        for proto in made:
            assert isinstance(proto.transport, SocketStream)
            assert proto.transport._sock is not None
            assert proto.transport._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        peers = sorted(p.transport.get_extra_info("peername") for p in made)  # type: ignore[attr-defined]
        assert peers == sorted(c.getsockname() for c in clients)
        listener.close()
        await listener.wait_closed()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        for c in clients:
            c.close()

    run(loop_kind, main)


@LOOPS
def test_connect_and_bind_errors_keep_the_plain_reason(loop_kind: str) -> None:
    async def main() -> None:
        taken = socket.create_server(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as bind_err:
            await listen_stream("127.0.0.1", port, 16)
        assert bind_err.value.errno == errno.EADDRINUSE
        taken.close()  # nobody listens there now
        with pytest.raises(ConnectionRefusedError) as connect_err:
            await connect_stream("127.0.0.1", port)
        assert connect_err.value.strerror == "Connection refused"
        server = socket.create_server(("127.0.0.1", 0))
        sock = await connect_stream("localhost", server.getsockname()[1])  # a name: resolved off the loop
        assert sock.getpeername()[0] in ("127.0.0.1", "::1")
        sock.close()
        server.close()

    run(loop_kind, main)


def test_a_dotted_quad_skips_getaddrinfo_with_its_answer_and_anything_else_goes_to_it() -> None:
    for host in ("127.0.0.1", "0.0.0.0", "192.0.2.255"):
        expected = socket.getaddrinfo(host, 22, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        assert _ipv4_literal(host, 22) == expected
    for host, port in (("localhost", 22), ("::1", 22), ("127.1", 22), ("256.0.0.1", 22), ("127.0.0.1", 65536)):
        assert _ipv4_literal(host, port) == []  # getaddrinfo decides (or refuses) these
