"""open-data@sshconduit: a -L connection's first bytes ride in its CHANNEL_OPEN to a conduitd that advertised the
extension (no round trip for OPEN_CONFIRMATION first), and never to an sshd, which did not."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest
from conftest import USER, recv_until_eof, serve_each

import sshconduit
from sshconduit import limits, messages
from sshconduit.errors import ChannelOpenError
from sshconduit.forward import direct, local


class Probe:
    """Records what each forwarded connection sent inside its CHANNEL_OPEN (b"" when nothing)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open_data: list[bytes] = []
        original = local.LocalForward._open_data

        def recording(forward: local.LocalForward, bridge, sock) -> bytes:  # type: ignore[no-untyped-def]
            tail = original(forward, bridge, sock)
            self.open_data.append(messages.OpenData.decode(tail).data if tail else b"")
            return tail

        monkeypatch.setattr(local.LocalForward, "_open_data", recording)


def hash_service() -> tuple[socket.socket, list[bytes]]:
    """Reads each connection to EOF, then answers with the SHA-256 of what it got; keeps what it got."""
    server = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def one(conn: socket.socket) -> None:
        with conn:
            data = recv_until_eof(conn, 20)
            received.append(data)
            conn.sendall(hashlib.sha256(data).digest())

    serve_each(server, one)
    return server, received


FIRST_PART = 1000  # bytes a client has sent before the forward can accept it


async def send_first_then_read(family: socket.AddressFamily, address: object, payload: bytes) -> bytes:
    """The client speaks first: everything sent right after connect, then EOF; returns the answer.

    The connect and the first FIRST_PART bytes happen here, on the event loop's thread, so the forward (on the
    same loop) cannot accept before they are in its socket: what it finds at accept is then known. The rest,
    which may not fit the socket buffers before anyone reads, goes from a thread."""
    sock = socket.socket(family)
    sock.connect(address)
    sock.sendall(payload[:FIRST_PART])

    def finish() -> bytes:
        with sock:
            sock.settimeout(20)
            sock.sendall(payload[FIRST_PART:])
            sock.shutdown(socket.SHUT_WR)
            return recv_until_eof(sock, 20)

    return await asyncio.to_thread(finish)


@pytest.mark.parametrize("server_kind", ["conduitd", "sshd"])
def test_first_bytes_ride_in_the_open_only_to_conduitd(
    server_kind, keyset, conduitd_server, openssh_server, monkeypatch
):
    probe = Probe(monkeypatch)
    service, received = hash_service()
    payload = os.urandom(100 * 1024)  # more than MAX_OPEN_DATA: the rest must follow in order

    async def main(port: int) -> tuple[bytes, bytes, dict[str, bytes]]:
        client = await sshconduit.connect("127.0.0.1", port, username=USER, client_keys=[str(keyset.client_key)],
                                          known_hosts=(), strict_host_key_checking="no")  # fmt: skip
        async with client, client.forward_local(0, "127.0.0.1", service.getsockname()[1]) as fwd:
            small = await send_first_then_read(socket.AF_INET, ("127.0.0.1", fwd.port), b"hello")
            big = await send_first_then_read(socket.AF_INET, ("127.0.0.1", fwd.port), payload)
            return small, big, dict(client.conn.core.peer_extensions)

    start = conduitd_server if server_kind == "conduitd" else openssh_server
    with start() as daemon:
        small, big, extensions = asyncio.run(main(daemon.port))
    service.close()
    assert small == hashlib.sha256(b"hello").digest()
    assert big == hashlib.sha256(payload).digest()
    assert sorted(received, key=len) == [b"hello", payload]
    if server_kind == "conduitd":
        assert messages.OPEN_DATA_EXTENSION in extensions
        # what was there at accept time went in the open (at least the part sent before the loop could accept),
        # and never more than the limit
        assert len(probe.open_data) == 2
        assert probe.open_data[0] == b"hello"
        assert FIRST_PART <= len(probe.open_data[1]) <= limits.MAX_OPEN_DATA
        assert payload.startswith(probe.open_data[1])
    else:
        assert messages.OPEN_DATA_EXTENSION not in extensions
        assert probe.open_data == [b"", b""]


def test_open_data_decoding_and_its_limit() -> None:
    request = messages.DirectTcpip("10.0.0.1", 80, "127.0.0.1", 5555)
    plain = request.encode()
    assert direct.decode_direct_tcpip(plain) == (request, b"")
    assert direct.decode_direct_tcpip(plain + messages.OpenData(b"GET /").encode()) == (request, b"GET /")
    streamlocal = messages.DirectStreamlocal("/run/x.sock")
    tail = messages.OpenData(b"x" * limits.MAX_OPEN_DATA).encode()
    assert direct.decode_direct_streamlocal(streamlocal.encode() + tail) == (streamlocal, b"x" * limits.MAX_OPEN_DATA)
    too_much = messages.OpenData(b"x" * (limits.MAX_OPEN_DATA + 1)).encode()
    for bad in (plain + too_much, plain + b"\x00\x00\x00\x09abc", plain + tail + b"!"):
        with pytest.raises(ChannelOpenError, match="bad direct-tcpip request"):
            direct.decode_direct_tcpip(bad)


def test_a_unix_socket_listener_sends_open_data_too(keyset, conduitd_server, monkeypatch, tmp_path) -> None:
    """-L /path:host:port: the listener is a StreamListener as for TCP, so its first bytes ride in the open too."""
    probe = Probe(monkeypatch)
    service, received = hash_service()
    path = str(tmp_path / "fwd.sock")

    async def main(port: int) -> bytes:
        client = await sshconduit.connect("127.0.0.1", port, username=USER, client_keys=[str(keyset.client_key)],
                                          known_hosts=(), strict_host_key_checking="no")  # fmt: skip
        async with client, client.forward_local(f"{path}:127.0.0.1:{service.getsockname()[1]}"):
            return await send_first_then_read(socket.AF_UNIX, path, b"over unix")

    with conduitd_server() as daemon:
        answer = asyncio.run(main(daemon.port))
    service.close()
    assert answer == hashlib.sha256(b"over unix").digest()
    assert received == [b"over unix"]
    assert probe.open_data == [b"over unix"]
