"""What the adapter asks of the SSH connection's TCP socket.

A bulk read is ACKed at once (TCP_QUICKACK), from our process: on the same host a delayed ACK is sent while the
kernel handles the peer's next send, on the peer's CPU time (conduit→sshd download: +20%). So is every read before
the channels start: a peer without TCP_NODELAY (ssh -N, sshd) waits for the ACK of its last small packet before
it sends the next (Nagle), and a delayed ACK held ssh's SERVICE_REQUEST 40 ms. And TCP's minimum round trip goes
to the connection layer for window auto-tuning (``path_rtt``)."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from sshconduit import aio, connection
from sshconduit.aio import SSHConnection
from sshconduit.transport import Role

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux only")


class FakeTransport:
    """A transport over a real socket, as uvloop's: ``get_extra_info("socket")`` gives the connected socket."""

    def __init__(self, sock: socket.socket) -> None:
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


TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 0)


def connected_pair(family: socket.AddressFamily) -> tuple[socket.socket, socket.socket]:
    if family == socket.AF_UNIX:
        return socket.socketpair()
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.create_server((host, 0), family=family) as listener:
        ours = socket.create_connection(listener.getsockname()[:2], timeout=5)
        theirs, _ = listener.accept()
    return ours, theirs


def quickack_after(family: socket.AddressFamily, data: bytes, channels_started: bool = True) -> int | None:
    """A client on a real ``family`` socket reads a version line, then its ACKs are made lazy (TCP_QUICKACK 0)
    and it reads ``data`` (the ACK rule runs before parsing), after auth unless ``channels_started`` is false.
    The socket's TCP_QUICKACK afterwards (None off TCP)."""

    async def run() -> int | None:
        ours, theirs = connected_pair(family)
        with ours, theirs:
            tcp = family != socket.AF_UNIX
            conn = SSHConnection(Role.CLIENT)
            conn.connection_made(FakeTransport(ours))  # type: ignore[arg-type]
            conn.data_received(b"SSH-2.0-OpenSSH_9.2p1\r\n")
            if channels_started:
                conn.channels = connection.ConnectionLayer(lambda *parts: None)
            if tcp:
                ours.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 0)
            conn.data_received(data)
            quickack = ours.getsockopt(socket.IPPROTO_TCP, TCP_QUICKACK) if tcp else None
            conn.connection_lost(None)  # closes its duplicate descriptor
            return quickack

    return asyncio.run(asyncio.wait_for(run(), 10))


def test_a_bulk_read_on_tcp_is_acked_at_once() -> None:
    assert quickack_after(socket.AF_INET, bytes(aio.BULK_READ)) == 1
    assert quickack_after(socket.AF_INET6, bytes(aio.BULK_READ)) == 1


def test_a_small_read_keeps_delayed_acks_once_the_channels_run() -> None:
    assert quickack_after(socket.AF_INET, bytes(aio.BULK_READ - 1)) == 0


def test_a_small_read_before_the_channels_start_is_acked_at_once() -> None:
    assert quickack_after(socket.AF_INET, bytes(aio.BULK_READ - 1), channels_started=False) == 1
    assert quickack_after(socket.AF_INET6, bytes(aio.BULK_READ - 1), channels_started=False) == 1


def test_a_unix_socket_is_left_alone() -> None:
    assert quickack_after(socket.AF_UNIX, bytes(aio.BULK_READ)) is None  # a TCP option there would raise


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_the_socket_kept_for_acks_is_closed_with_the_connection_and_the_peer_sees_the_close() -> None:
    async def run() -> bytes:
        ours, theirs = connected_pair(socket.AF_INET)
        with theirs:
            before = open_descriptors()
            conn = SSHConnection(Role.CLIENT)
            conn.connection_made(FakeTransport(ours))  # type: ignore[arg-type]
            assert open_descriptors() == before + 1  # the duplicate descriptor
            ours.close()  # the transport closes its descriptor, then tells the protocol
            conn.connection_lost(None)
            assert open_descriptors() == before - 1
            theirs.settimeout(5)
            return theirs.recv(4096)  # EOF once no descriptor holds the socket (a timeout error otherwise)

    assert asyncio.run(asyncio.wait_for(run(), 10)) == b""


def test_tcp_min_rtt_is_the_kernels_on_tcp_and_unknown_elsewhere() -> None:
    ours, theirs = connected_pair(socket.AF_INET)
    with ours, theirs:
        ours.sendall(b"ping")
        assert theirs.recv(4) == b"ping"  # acknowledged by now or soon: the handshake gave a sample already
        assert 0.0 < aio.tcp_min_rtt(ours) < 0.05  # loopback: microseconds
    assert aio.tcp_min_rtt(ours) == 0.0  # closed
    unix_ours, unix_theirs = connected_pair(socket.AF_UNIX)
    with unix_ours, unix_theirs:
        assert aio.tcp_min_rtt(unix_ours) == 0.0


def test_connection_gives_the_connection_layer_tcps_round_trip() -> None:
    async def run() -> float:
        ours, theirs = connected_pair(socket.AF_INET)
        with ours, theirs:
            conn = SSHConnection(Role.CLIENT)
            conn.connection_made(FakeTransport(ours))  # type: ignore[arg-type]
            conn.channels = connection.ConnectionLayer(lambda *parts: None)
            conn.data_received(b"SSH-2.0-OpenSSH_9.2p1\r\n")
            path_rtt = conn.channels.path_rtt
            conn.connection_lost(None)  # closes its duplicate descriptor
            return path_rtt

    assert 0.0 < asyncio.run(asyncio.wait_for(run(), 10)) < 0.05
