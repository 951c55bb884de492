"""Bad input never crashes conduitd: each hostile connection is closed (after a DISCONNECT where one can be
sent), the daemon logs a line naming it, and a real conduit login right after still works."""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import USER, Daemon, KeySet, conduit_argv, feed_client_transport, run_client

from sshconduit import limits, messages
from sshconduit.crypto import ciphers, keys
from sshconduit.errors import DisconnectReason
from sshconduit.transport import (
    KexComplete,
    PeerDisconnected,
    Role,
    Transport,
    TransportConfig,
)

IO_TIMEOUT = 10.0  # seconds for the daemon to answer or close
MAX_READ = 1 << 20  # bytes we accept from one connection before calling it a runaway
LOG_NOISE = ("Traceback", "Fatal error", "Exception in callback", "never retrieved")


@contextlib.contextmanager
def raw_connection(port: int) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        yield sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes; fails if it keeps the connection open."""
    deadline = time.monotonic() + IO_TIMEOUT
    data = bytearray()
    while len(data) < MAX_READ:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError(f"conduitd kept the connection open for {IO_TIMEOUT}s") from None
        if not chunk:
            break
        data += chunk
    else:
        raise AssertionError("conduitd sent more than MAX_READ bytes")
    return bytes(data)


def plaintext_payloads(data: bytes) -> tuple[bytes, list[bytes]]:
    """The version line and every complete unencrypted packet's payload."""
    version, sep, rest = data.partition(b"\r\n")
    assert sep and version.startswith(b"SSH-2.0-"), data[:64]
    payloads = []
    while len(rest) >= 4:
        opener = ciphers.null_opener()
        total = 4 + opener.packet_length(0, rest[:4])
        if len(rest) < total:
            break
        payloads.append(opener.open(0, rest[:total]))
        rest = rest[total:]
    return version, payloads


def disconnect_reasons(payloads: list[bytes]) -> list[int]:
    return [messages.decode_as(messages.Disconnect, p).reason for p in payloads if p[:1] == b"\x01"]


def assert_still_serving(keyset: KeySet, port: int) -> None:
    result = run_client(conduit_argv(keyset, port, f"{USER}@127.0.0.1", "true"))
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def assert_logged(daemon: Daemon, local_port: int, *expected: str) -> None:
    """A line about this connection (its source port) that mentions one of ``expected``; and no tracebacks."""
    log = daemon.output()
    lines = [line for line in log.splitlines() if f"127.0.0.1 port {local_port}" in line]
    assert any(any(text in line for text in expected) for line in lines), log
    assert not any(noise in log for noise in LOG_NOISE), log


def plain_packet(payload: bytes) -> bytes:
    return ciphers.null_sealer().seal(0, [payload])


# --- before any keys: the daemon answers with a plaintext DISCONNECT --------------------------------------

PLAINTEXT_CASES: dict[str, tuple[bytes, str]] = {
    "garbage-before-version": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "Invalid SSH identification string"),
    "ssh-1.5": (b"SSH-1.5-OldClient\r\n", "Protocol major versions differ"),
    "overlong-version": (b"SSH-2.0-" + b"x" * 1000, "version line too long"),
    "length-2^31": (
        b"SSH-2.0-evil\r\n" + (1 << 31).to_bytes(4, "big") + bytes(32),
        "bad packet length 2147483648",
    ),
    "strict-kex-ignore": (b"", "unexpected message 2 during key exchange"),  # built below: needs a KEXINIT
}


@pytest.mark.parametrize("case", list(PLAINTEXT_CASES))
def test_plaintext_bad_input(conduitd_server: Callable[..., contextlib.AbstractContextManager[Daemon]],
                             keyset: KeySet, case: str) -> None:  # fmt: skip
    payload, logged = PLAINTEXT_CASES[case]
    if case == "strict-kex-ignore":  # a real KEXINIT offering strict kex, then an IGNORE before NEWKEYS
        client = Transport(Role.CLIENT)
        client.start()
        payload = b"".join(client.data_to_send()) + plain_packet(messages.Ignore(b"x").encode())
    with conduitd_server() as daemon:
        with raw_connection(daemon.port) as sock:
            local_port = sock.getsockname()[1]
            sock.sendall(payload)
            version, payloads = plaintext_payloads(read_until_closed(sock))
        assert version.startswith(b"SSH-2.0-sshconduit")
        assert payloads[0][0] == messages.KexInit.ID  # sent up front, before our bytes were read
        expected_reason = (
            DisconnectReason.PROTOCOL_VERSION_NOT_SUPPORTED
            if case in ("ssh-1.5", "overlong-version")
            else DisconnectReason.PROTOCOL_ERROR
        )
        assert disconnect_reasons(payloads) == [expected_reason]
        assert_still_serving(keyset, daemon.port)
        assert_logged(daemon, local_port, logged)


def test_truncated_packet_then_close(
    conduitd_server: Callable[..., contextlib.AbstractContextManager[Daemon]], keyset: KeySet
) -> None:
    with conduitd_server() as daemon:
        with raw_connection(daemon.port) as sock:
            local_port = sock.getsockname()[1]
            # A valid header announcing 252 bytes, and only 20 of them.
            sock.sendall(b"SSH-2.0-cut\r\n" + (252).to_bytes(4, "big") + bytes(20))
            sock.shutdown(socket.SHUT_WR)
            version, payloads = plaintext_payloads(read_until_closed(sock))
        assert version.startswith(b"SSH-2.0-")
        assert [p[0] for p in payloads] == [messages.KexInit.ID]  # nothing to say to a peer that left
        assert_still_serving(keyset, daemon.port)
        assert_logged(daemon, local_port, "Connection closed")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_bytes_after_version(
    conduitd_server: Callable[..., contextlib.AbstractContextManager[Daemon]], keyset: KeySet, seed: int
) -> None:
    noise = random.Random(seed).randbytes(4096)
    assert int.from_bytes(noise[:4], "big") > limits.MAX_PACKET_LENGTH  # what makes these seeds decisive
    with conduitd_server() as daemon:
        with raw_connection(daemon.port) as sock:
            local_port = sock.getsockname()[1]
            sock.sendall(b"SSH-2.0-noise\r\n" + noise)
            _version, payloads = plaintext_payloads(read_until_closed(sock))
        assert disconnect_reasons(payloads) == [DisconnectReason.PROTOCOL_ERROR]
        assert_still_serving(keyset, daemon.port)
        assert_logged(daemon, local_port, "bad packet length")


# --- after a real key exchange: the DISCONNECT is encrypted, and our client Transport reads it ------------


class WireClient:
    """Our sans-IO client Transport driven over a real socket, to get past the key exchange."""

    def __init__(self, sock: socket.socket, config: TransportConfig | None = None) -> None:
        self.sock = sock
        self.transport = Transport(Role.CLIENT, config)
        self.events: list[object] = []

    def flush(self) -> None:
        out = self.transport.data_to_send()
        if out:
            self.sock.sendall(b"".join(out))

    def feed(self, data: bytes) -> None:
        self.events += feed_client_transport(self.transport, data)
        self.flush()

    def wait_for(self, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + IO_TIMEOUT
        while not done():
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError("conduitd did not answer in time") from None
            assert chunk, "conduitd closed the connection"
            self.feed(chunk)

    def handshake(self) -> None:
        self.transport.start()
        self.flush()
        self.wait_for(lambda: any(isinstance(e, KexComplete) for e in self.events))

    def read_disconnect(self) -> PeerDisconnected:
        self.feed(read_until_closed(self.sock))
        (disconnect,) = [e for e in self.events if isinstance(e, PeerDisconnected)]
        return disconnect


def test_bad_mac_after_real_kex(
    conduitd_server: Callable[..., contextlib.AbstractContextManager[Daemon]], keyset: KeySet
) -> None:
    host_public = keys.load_public_key_file(f"{keyset.host_keys['ed25519']}.pub")
    with conduitd_server() as daemon:
        with raw_connection(daemon.port) as sock:
            local_port = sock.getsockname()[1]
            client = WireClient(sock)
            client.handshake()
            assert client.transport.host_key == host_public
            assert client.transport.strict_kex
            # The control: an intact packet is answered.
            client.transport.send(messages.ServiceRequest("ssh-userauth").encode())
            client.flush()
            client.wait_for(lambda: any(isinstance(e, messages.ServiceAccept) for e in client.events))
            # The same kind of packet with one byte flipped is not.
            client.transport.send(messages.Ignore(b"x" * 64).encode())
            (packet,) = client.transport.data_to_send()
            damaged = bytearray(packet)
            damaged[len(packet) // 2] ^= 0x01
            sock.sendall(damaged)
            assert client.read_disconnect().reason == DisconnectReason.MAC_ERROR
        assert_still_serving(keyset, daemon.port)
        assert_logged(daemon, local_port, "message authentication code incorrect")


def test_length_2_pow_31_after_real_kex(
    conduitd_server: Callable[..., contextlib.AbstractContextManager[Daemon]], keyset: KeySet
) -> None:
    """With an -etm MAC the length is in clear, so anyone on the path can write 2**31 into it."""
    etm = TransportConfig(ciphers=("aes128-ctr",), macs=("hmac-sha2-256-etm@openssh.com",))
    with conduitd_server() as daemon:
        with raw_connection(daemon.port) as sock:
            local_port = sock.getsockname()[1]
            client = WireClient(sock, etm)
            client.handshake()
            sock.sendall((1 << 31).to_bytes(4, "big") + bytes(64))
            assert client.read_disconnect().reason == DisconnectReason.PROTOCOL_ERROR
        assert_still_serving(keyset, daemon.port)
        assert_logged(daemon, local_port, "bad packet length 2147483648")
