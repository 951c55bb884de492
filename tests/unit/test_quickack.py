"""A bulk read on the SSH socket is ACKed at once (TCP_QUICKACK), from our process: on the same host a delayed ACK is
sent while the kernel handles the peer's next send, on the peer's CPU time (conduit→sshd download: +20%)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sshconduit import aio
from sshconduit.aio import SSHConnection
from sshconduit.transport import Role

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux only")


class RecordingSocket:
    def __init__(self, family: socket.AddressFamily) -> None:
        self.family = family
        self.options: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))


class FakeTransport:
    def __init__(self, sock: RecordingSocket) -> None:
        self.sock = sock
        self.written: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None

    def writelines(self, parts: list[bytes]) -> None:
        self.written.append(b"".join(parts))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


QUICKACK = (socket.IPPROTO_TCP, getattr(socket, "TCP_QUICKACK", 0), 1)


def received(family: socket.AddressFamily, data: bytes) -> RecordingSocket:
    """A client on a ``family`` socket reads a version line, then ``data`` (the ACK rule runs before parsing)."""

    async def run() -> RecordingSocket:
        sock = RecordingSocket(family)
        conn = SSHConnection(Role.CLIENT)
        conn.connection_made(FakeTransport(sock))  # type: ignore[arg-type]
        conn.data_received(b"SSH-2.0-OpenSSH_9.2p1\r\n")
        conn.data_received(data)
        return sock

    return asyncio.run(asyncio.wait_for(run(), 10))


def test_a_bulk_read_on_tcp_is_acked_at_once() -> None:
    assert received(socket.AF_INET, bytes(aio.BULK_READ)).options == [QUICKACK]
    assert received(socket.AF_INET6, bytes(aio.BULK_READ)).options == [QUICKACK]


def test_a_small_read_keeps_delayed_acks() -> None:
    assert received(socket.AF_INET, bytes(aio.BULK_READ - 1)).options == []


def test_a_unix_socket_is_left_alone() -> None:
    assert received(socket.AF_UNIX, bytes(aio.BULK_READ)).options == []
