"""The sans-IO transport: handshakes between two in-memory Transports, rekeying, framing, version lines,
strict kex, and a man in the middle who tries the Terrapin prefix truncation (CVE-2023-48795)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence

import pytest
from conftest import feed_client_transport

from sshconduit import limits, messages
from sshconduit.crypto import ciphers, kex, keys
from sshconduit.errors import DisconnectReason, KexError, MACError, ProtocolError
from sshconduit.transport import (
    ExtInfoReceived,
    HostKeyReceived,
    KexComplete,
    PeerDisconnected,
    Role,
    Transport,
    TransportConfig,
)

Chunks = list[bytes]
Hook = Callable[[Chunks], Chunks]
MAX_ROUNDS = 64  # a handshake settles in under 10 round trips; more means a loop


@pytest.fixture(scope="module")
def host_keys() -> dict[str, keys.PrivateKey]:
    return {
        "ssh-ed25519": keys.generate_private_key("ssh-ed25519"),
        "ecdsa-sha2-nistp256": keys.generate_private_key("ecdsa-sha2-nistp256"),
        "ssh-rsa": keys.generate_private_key("ssh-rsa", rsa_bits=2048),
    }


def data_msg(index: int, size: int = 0) -> bytes:
    """An upper-layer payload that carries its own sequence index."""
    return messages.ChannelData(0, index.to_bytes(4, "big") + bytes(size)).encode()


def indices(events: Sequence[object]) -> list[int]:
    return [int.from_bytes(e.data[:4], "big") for e in events if isinstance(e, messages.ChannelData)]


def plain_packet(payload: bytes) -> bytes:
    """A packet as sent before the first NEWKEYS (the 'none' cipher ignores the sequence number)."""
    return ciphers.null_sealer().seal(0, [payload])


def plain_payload(chunk: bytes) -> bytes:
    opener = ciphers.null_opener()
    assert opener.packet_length(0, chunk[:4]) + 4 == len(chunk)
    return opener.open(0, chunk)


def plain_msg_id(chunk: bytes) -> int | None:
    """Message number of an unencrypted packet chunk; None for the version line and for an encrypted packet (a
    hook also sees what the peer sends after its NEWKEYS): a MAC or tag follows the packet, or, with
    chacha20-poly1305, the length is encrypted, so the length field does not match the chunk. Else the encrypted
    byte where the number would be is 31 once in 256 handshakes, and a hook rewrites the wrong packet."""
    if chunk.startswith(b"SSH-") or int.from_bytes(chunk[:4], "big") + 4 != len(chunk):
        return None
    return chunk[5]


class Pair:
    """A client and a server Transport wired back to back; hooks may rewrite what crosses the wire.

    Each element of ``data_to_send()`` is one packet (or the version line), so hooks act per packet.
    """

    def __init__(
        self,
        host_key: keys.PrivateKey,
        client_config: TransportConfig | None = None,
        server_config: TransportConfig | None = None,
    ) -> None:
        self.client = Transport(Role.CLIENT, client_config)
        self.server = Transport(Role.SERVER, server_config, [host_key])
        self.client_events: list[object] = []
        self.server_events: list[object] = []
        self.to_client: Hook | None = None
        self.to_server: Hook | None = None
        self.split: Callable[[bytes], list[bytes]] = lambda data: [data]

    def feed_client(self, data: bytes) -> None:
        self.client_events += feed_client_transport(self.client, data)

    def feed_server(self, data: bytes) -> None:
        self.server_events += self.server.receive_data(data)

    def pump(self, max_rounds: int = MAX_ROUNDS) -> None:
        for _ in range(max_rounds):
            to_server = self.client.data_to_send()
            if self.to_server is not None:
                to_server = self.to_server(to_server)
            for piece in self.split(b"".join(to_server)):
                self.feed_server(piece)
            to_client = self.server.data_to_send()
            if self.to_client is not None:
                to_client = self.to_client(to_client)
            for piece in self.split(b"".join(to_client)):
                self.feed_client(piece)
            if not to_server and not to_client:
                return
        raise AssertionError(f"the pair did not settle within {max_rounds} rounds")

    def handshake(self) -> Pair:
        self.client.start()
        self.server.start()
        self.pump()
        return self

    def kex_completions(self, side: str, initial: bool) -> int:
        events = self.client_events if side == "client" else self.server_events
        return sum(1 for e in events if isinstance(e, KexComplete) and e.initial is initial)


def exchange_payloads(pair: Pair, count: int = 3) -> None:
    """Both directions carry payloads after the handshake, in order."""
    before_c, before_s = len(pair.client_events), len(pair.server_events)
    for i in range(count):
        pair.client.send(data_msg(i, 50))
        pair.server.send(data_msg(1000 + i, 50))
    pair.pump()
    assert indices(pair.server_events[before_s:]) == list(range(count))
    assert indices(pair.client_events[before_c:]) == [1000 + i for i in range(count)]


def assert_initial_kex(pair: Pair) -> None:
    assert pair.kex_completions("client", True) == 1
    assert pair.kex_completions("server", True) == 1
    assert pair.client.session_id is not None
    assert pair.client.session_id == pair.server.session_id
    assert pair.client.algorithms == pair.server.algorithms


# --- full handshakes ---------------------------------------------------------------------------------------

HOST_KEY_CASES = [
    ("ssh-ed25519", "ssh-ed25519"),
    ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp256"),
    ("ssh-rsa", "rsa-sha2-512"),  # ssh-rsa (SHA-1) is never offered; the client's first choice wins
]


@pytest.mark.parametrize("kex_name", kex.KEX_ALGORITHMS)
@pytest.mark.parametrize(("key_type", "signature_alg"), HOST_KEY_CASES)
def test_handshake_every_kex_and_host_key(
    host_keys: dict[str, keys.PrivateKey], kex_name: str, key_type: str, signature_alg: str
) -> None:
    host_key = host_keys[key_type]
    only = TransportConfig(kex_algorithms=(kex_name,))  # group14-sha1 is not in the defaults: set both
    pair = Pair(host_key, only, only).handshake()
    assert_initial_kex(pair)
    assert pair.client.algorithms is not None and pair.client.algorithms.kex == kex_name
    (offered,) = [e for e in pair.client_events if isinstance(e, HostKeyReceived)]
    assert offered.key == host_key.public
    assert offered.algorithm == signature_alg
    assert pair.client.host_key == host_key.public
    assert pair.client.strict_kex and pair.server.strict_kex
    (ext,) = [e for e in pair.client_events if isinstance(e, ExtInfoReceived)]
    assert b"ssh-ed25519" in ext.extensions["server-sig-algs"]
    exchange_payloads(pair)


def test_rsa_sha2_256_host_key_signature(host_keys: dict[str, keys.PrivateKey]) -> None:
    config = TransportConfig(host_key_algorithms=("rsa-sha2-256",))
    pair = Pair(host_keys["ssh-rsa"], config).handshake()
    assert pair.client.algorithms is not None and pair.client.algorithms.host_key == "rsa-sha2-256"
    exchange_payloads(pair)


def test_sha1_rsa_host_key_signature_not_offered(host_keys: dict[str, keys.PrivateKey]) -> None:
    pair = Pair(host_keys["ssh-rsa"], TransportConfig(host_key_algorithms=("ssh-rsa",)))
    with pytest.raises(KexError, match="host key type"):
        pair.handshake()


def test_no_common_kex_method(host_keys: dict[str, keys.PrivateKey]) -> None:
    pair = Pair(
        host_keys["ssh-ed25519"],
        TransportConfig(kex_algorithms=("curve25519-sha256",)),
        TransportConfig(kex_algorithms=("ecdh-sha2-nistp256",)),
    )
    with pytest.raises(KexError, match="key exchange method"):
        pair.handshake()


def cipher_mac_cases() -> list[tuple[str, str | None]]:
    cases: list[tuple[str, str | None]] = []
    for name, info in ciphers.CIPHERS.items():
        if info.aead:
            cases.append((name, None))  # the tag is the cipher's own; the negotiated MAC is not used
        else:
            cases += [(name, mac) for mac in ciphers.MACS]
    return cases


CIPHER_MAC_CASES = cipher_mac_cases()


def cipher_config(cipher: str, mac: str | None, **extra: object) -> TransportConfig:
    return TransportConfig(
        kex_algorithms=("curve25519-sha256",),
        ciphers=(cipher,),
        macs=(mac,) if mac else tuple(ciphers.MACS),
        **extra,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("cipher", "mac"), CIPHER_MAC_CASES)
def test_handshake_every_cipher_and_mac(host_keys: dict[str, keys.PrivateKey], cipher: str, mac: str | None) -> None:
    pair = Pair(host_keys["ssh-ed25519"], cipher_config(cipher, mac)).handshake()
    assert_initial_kex(pair)
    algs = pair.client.algorithms
    assert algs is not None
    assert (algs.cipher_c2s, algs.cipher_s2c) == (cipher, cipher)
    assert (algs.mac_c2s, algs.mac_s2c) == (mac, mac)
    exchange_payloads(pair, 20)
    pair.client.rekey()  # the second set of keys works too
    pair.pump()
    assert pair.kex_completions("client", False) == pair.kex_completions("server", False) == 1
    exchange_payloads(pair, 20)


def test_byte_by_byte_delivery(host_keys: dict[str, keys.PrivateKey]) -> None:
    pair = Pair(host_keys["ssh-ed25519"])
    pair.split = lambda data: [data[i : i + 1] for i in range(len(data))]
    pair.handshake()
    assert_initial_kex(pair)
    exchange_payloads(pair)


def test_host_key_signature_checked(host_keys: dict[str, keys.PrivateKey]) -> None:
    """A reply whose signature over H is altered makes the client fail before it trusts anything."""
    pair = Pair(host_keys["ssh-ed25519"], TransportConfig(kex_algorithms=("curve25519-sha256",)))

    def corrupt_signature(chunks: Chunks) -> Chunks:
        out = []
        for chunk in chunks:
            if plain_msg_id(chunk) == 31:
                reply = messages.decode_as(messages.KexEcdhReply, plain_payload(chunk))
                signature = bytearray(reply.signature)
                signature[-1] ^= 1
                chunk = plain_packet(
                    messages.KexEcdhReply(reply.host_key, reply.server_public, bytes(signature)).encode()
                )
            out.append(chunk)
        return out

    pair.to_client = corrupt_signature
    with pytest.raises(KexError, match="incorrect signature"):
        pair.handshake()
    assert not any(isinstance(e, HostKeyReceived) for e in pair.client_events)


# --- rekeying ----------------------------------------------------------------------------------------------


def test_payloads_sent_during_rekey_are_held_then_delivered_in_order(
    host_keys: dict[str, keys.PrivateKey],
) -> None:
    pair = Pair(host_keys["ssh-ed25519"]).handshake()
    pair.client.rekey()
    assert pair.client.in_kex
    for i in range(100):
        pair.client.send(data_msg(i, 10))
    # Only the KEXINIT left: a payload sealed now would reach the server in the middle of its exchange.
    (kexinit,) = pair.client.data_to_send()
    before = len(pair.server_events)
    pair.feed_server(kexinit)
    for i in range(100, 200):  # the server is in the exchange now: it holds its own payloads too
        pair.server.send(data_msg(i, 10))
    pair.pump()
    server_new = pair.server_events[before:]
    assert indices(server_new) == list(range(100))
    first_data = next(i for i, e in enumerate(server_new) if isinstance(e, messages.ChannelData))
    rekeyed = next(i for i, e in enumerate(server_new) if isinstance(e, KexComplete))
    assert rekeyed < first_data
    assert indices(pair.client_events) == list(range(100, 200))
    assert pair.kex_completions("client", False) == pair.kex_completions("server", False) == 1


def test_rekey_from_both_sides_mid_stream_loses_and_reorders_nothing(
    host_keys: dict[str, keys.PrivateKey],
) -> None:
    pair = Pair(host_keys["ssh-ed25519"]).handshake()
    rng = random.Random(4253)

    def ragged(data: bytes) -> list[bytes]:  # cut the stream anywhere, packets straddle the cuts
        pieces, pos = [], 0
        while pos < len(data):
            step = rng.randint(1, 700)
            pieces.append(data[pos : pos + step])
            pos += step
        return pieces

    pair.split = ragged
    total, rekey_every = 5000, 250
    for i in range(total):
        pair.client.send(data_msg(i, i % 97))
        pair.server.send(data_msg(i, i % 89))
        if i % rekey_every == rekey_every - 1:
            pair.client.rekey()
            pair.server.rekey()  # at once: both KEXINITs cross on the wire
        if i % 7 == 0:  # deliver one round only, so data and kex packets are in flight together
            _one_round(pair)
    pair.pump(max_rounds=200)
    assert indices(pair.server_events) == list(range(total))
    assert indices(pair.client_events) == list(range(total))
    rekeys = pair.kex_completions("client", False)
    assert rekeys == pair.kex_completions("server", False)
    assert rekeys == total // rekey_every  # each exchange ends before the next rekey() pair
    assert pair.client.session_id == pair.server.session_id


def _one_round(pair: Pair) -> None:
    to_server = pair.client.data_to_send()
    for piece in pair.split(b"".join(to_server)):
        pair.feed_server(piece)
    to_client = pair.server.data_to_send()
    for piece in pair.split(b"".join(to_client)):
        pair.feed_client(piece)


@pytest.mark.parametrize(("rekey_bytes", "expect_rekeys"), [(32 * 1024, True), (limits.DEFAULT_REKEY_BYTES, False)])
def test_automatic_rekey_after_rekey_bytes(
    host_keys: dict[str, keys.PrivateKey], rekey_bytes: int, expect_rekeys: bool
) -> None:
    pair = Pair(host_keys["ssh-ed25519"], TransportConfig(rekey_bytes=rekey_bytes)).handshake()
    for i in range(200):
        pair.client.send(data_msg(i, 1024))
        pair.pump()
    assert indices(pair.server_events) == list(range(200))
    rekeys = pair.kex_completions("server", False)
    assert rekeys == pair.kex_completions("client", False)
    if expect_rekeys:
        assert 200 * 1024 // rekey_bytes - 1 <= rekeys <= 200 * 1024 // rekey_bytes + 1
    else:
        assert rekeys == 0


@pytest.mark.parametrize(("each_way", "expect_rekeys"), [(48, False), (80, True)])
def test_rekey_limit_counts_each_direction_alone(
    host_keys: dict[str, keys.PrivateKey], each_way: int, expect_rekeys: bool
) -> None:
    """As OpenSSH's RekeyLimit: 48 KiB each way under a 64 KiB limit is no rekey, though 96 KiB passed in all."""
    pair = Pair(host_keys["ssh-ed25519"], TransportConfig(rekey_bytes=64 * 1024)).handshake()
    for i in range(each_way):
        pair.client.send(data_msg(i, 1024))
        pair.server.send(data_msg(i, 1024))
        pair.pump()
    assert indices(pair.server_events) == indices(pair.client_events) == list(range(each_way))
    assert (pair.kex_completions("client", False) > 0) is expect_rekeys


def test_rekey_before_first_kex_is_a_no_op(host_keys: dict[str, keys.PrivateKey]) -> None:
    client = Transport(Role.CLIENT)
    client.start()
    client.data_to_send()
    client.rekey()
    assert client.data_to_send() == []


# --- version exchange --------------------------------------------------------------------------------------


def test_client_accepts_lines_before_the_server_version() -> None:
    client = Transport(Role.CLIENT)
    client.start()
    client.receive_data(b"Welcome to the box\r\nsecond line\n")
    assert client.peer_version is None
    client.receive_data(b"SSH-2.0-OpenSSH_9.9 Debian\r\n")
    assert client.peer_version == "SSH-2.0-OpenSSH_9.9 Debian"


@pytest.mark.parametrize("one_line_per_call", [False, True])
def test_client_bounds_lines_before_the_server_version(one_line_per_call: bool) -> None:
    client = Transport(Role.CLIENT)
    client.start()
    lines = [b"banner %d\r\n" % i for i in range(limits.MAX_PRE_VERSION_LINES + 1)]
    with pytest.raises(ProtocolError, match="too many lines"):
        if one_line_per_call:  # the count must survive across reads, not just within one
            for line in lines:
                client.receive_data(line)
        else:
            client.receive_data(b"".join(lines))
    assert client.peer_version is None


def test_client_accepts_the_maximum_number_of_lines_before_the_version() -> None:
    client = Transport(Role.CLIENT)
    client.start()
    for i in range(limits.MAX_PRE_VERSION_LINES):
        client.receive_data(b"banner %d\r\n" % i)
    client.receive_data(b"SSH-2.0-x\r\n")
    assert client.peer_version == "SSH-2.0-x"


def test_server_refuses_garbage_before_the_client_version() -> None:
    server = Transport(Role.SERVER)
    server.start()
    with pytest.raises(ProtocolError, match="identification") as info:
        server.receive_data(b"GET / HTTP/1.1\r\nSSH-2.0-x\r\n")
    assert info.value.reason == DisconnectReason.PROTOCOL_ERROR


@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
@pytest.mark.parametrize("terminated", [True, False])
def test_overlong_version_line(role: Role, terminated: bool) -> None:
    transport = Transport(role)
    transport.start()
    line = b"SSH-2.0-" + b"x" * 300
    with pytest.raises(ProtocolError, match="too long"):
        transport.receive_data(line + (b"\r\n" if terminated else b""))


def test_overlong_banner_line() -> None:
    client = Transport(Role.CLIENT)
    client.start()
    with pytest.raises(ProtocolError):
        client.receive_data(b"b" * 300 + b"\r\nSSH-2.0-x\r\n")


@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
@pytest.mark.parametrize("version", [b"SSH-1.5-OldSSH", b"SSH-3.0-Future", b"SSH-2.0"])
def test_unsupported_protocol_version(role: Role, version: bytes) -> None:
    transport = Transport(role)
    transport.start()
    with pytest.raises(ProtocolError) as info:
        transport.receive_data(version + b"\r\n")
    assert info.value.reason == DisconnectReason.PROTOCOL_VERSION_NOT_SUPPORTED
    assert transport.peer_version is None


def test_ssh_1_99_is_version_2() -> None:
    server = Transport(Role.SERVER)
    server.start()
    server.receive_data(b"SSH-1.99-compat\r\n")
    assert server.peer_version == "SSH-1.99-compat"


# --- framing and integrity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
@pytest.mark.parametrize("length", [1 << 31, (1 << 32) - 1, limits.MAX_PACKET_LENGTH + 8, 0])
def test_bad_plaintext_packet_length(role: Role, length: int) -> None:
    transport = Transport(role)
    transport.start()
    with pytest.raises(ProtocolError, match="length"):
        transport.receive_data(b"SSH-2.0-x\r\n" + length.to_bytes(4, "big") + bytes(64))


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "aes256-ctr"])
def test_bad_encrypted_packet_length(host_keys: dict[str, keys.PrivateKey], cipher: str) -> None:
    """GCM and -etm MACs leave the length in clear: a MITM can write 2**31 there directly."""
    pair = Pair(host_keys["ssh-ed25519"], cipher_config(cipher, "hmac-sha2-256-etm@openssh.com")).handshake()
    with pytest.raises(ProtocolError, match="length"):
        pair.server.receive_data((1 << 31).to_bytes(4, "big") + bytes(64))


@pytest.mark.parametrize(("cipher", "mac"), CIPHER_MAC_CASES)
@pytest.mark.parametrize("where", ["body", "tag"])
def test_flipped_bit_is_a_mac_error(
    host_keys: dict[str, keys.PrivateKey], cipher: str, mac: str | None, where: str
) -> None:
    pair = Pair(host_keys["ssh-ed25519"], cipher_config(cipher, mac)).handshake()
    pair.client.send(data_msg(7, 200))
    (packet,) = pair.client.data_to_send()
    damaged = bytearray(packet)
    damaged[len(packet) // 2 if where == "body" else -1] ^= 0x10
    with pytest.raises(MACError) as info:
        pair.server.receive_data(damaged)
    assert info.value.reason == DisconnectReason.MAC_ERROR
    assert not any(isinstance(e, messages.ChannelData) for e in pair.server_events)


def test_peer_disconnect_is_an_event(host_keys: dict[str, keys.PrivateKey]) -> None:
    pair = Pair(host_keys["ssh-ed25519"]).handshake()
    pair.server.disconnect(DisconnectReason.BY_APPLICATION, "bye")
    assert pair.server.closed
    pair.pump()
    assert PeerDisconnected(DisconnectReason.BY_APPLICATION, "bye") in pair.client_events
    assert pair.client.closed


# --- strict kex ---------------------------------------------------------------------------------------------

# chacha20-poly1305, whose nonce is the sequence number, so that a shifted count shows in the control below (an
# AES-GCM nonce counts its own packets instead, and a client with AES in hardware offers AES-GCM first).
_SEQ_NONCE = ("chacha20-poly1305@openssh.com",)
STRICT_OFF_CASES = [
    pytest.param(None, TransportConfig(strict_kex=False, ciphers=_SEQ_NONCE), id="server-not-strict"),
    pytest.param(TransportConfig(strict_kex=False, ciphers=_SEQ_NONCE), None, id="client-not-strict"),
]


@pytest.mark.parametrize(("client_config", "server_config"), STRICT_OFF_CASES)
def test_strict_kex_needs_both_sides(
    host_keys: dict[str, keys.PrivateKey],
    client_config: TransportConfig | None,
    server_config: TransportConfig | None,
) -> None:
    pair = Pair(host_keys["ssh-ed25519"], client_config, server_config).handshake()
    assert not pair.client.strict_kex and not pair.server.strict_kex
    exchange_payloads(pair)


def inject_before(target_id: int, payload: bytes) -> Hook:
    """Insert one plaintext packet just before the first packet with message number ``target_id``."""
    done = False

    def hook(chunks: Chunks) -> Chunks:
        nonlocal done
        out: Chunks = []
        for chunk in chunks:
            if not done and plain_msg_id(chunk) == target_id:
                out.append(plain_packet(payload))
                done = True
            out.append(chunk)
        return out

    return hook


UNEXPECTED = {
    "ignore": messages.Ignore(b"x").encode(),
    "service-request": messages.ServiceRequest("ssh-userauth").encode(),
    "debug": messages.Debug(False, "hi").encode(),
}


@pytest.mark.parametrize("toward", ["client", "server"])
@pytest.mark.parametrize("what", list(UNEXPECTED))
def test_strict_kex_refuses_any_other_message_before_newkeys(
    host_keys: dict[str, keys.PrivateKey], toward: str, what: str
) -> None:
    pair = Pair(host_keys["ssh-ed25519"])
    # Client->server: before the client's KEX_ECDH_INIT; server->client: before the server's reply.
    hook = inject_before(30 if toward == "server" else 31, UNEXPECTED[what])
    if toward == "server":
        pair.to_server = hook
    else:
        pair.to_client = hook
    with pytest.raises(ProtocolError, match=f"unexpected message {UNEXPECTED[what][0]} during key exchange"):
        pair.handshake()
    assert pair.kex_completions("client", True) == pair.kex_completions("server", True) == 0


@pytest.mark.parametrize("toward", ["client", "server"])
def test_strict_kex_refuses_a_message_before_kexinit(host_keys: dict[str, keys.PrivateKey], toward: str) -> None:
    pair = Pair(host_keys["ssh-ed25519"])
    hook = inject_before(20, messages.Ignore(b"").encode())
    if toward == "server":
        pair.to_server = hook
    else:
        pair.to_client = hook
    with pytest.raises(ProtocolError, match="KEXINIT was not the first packet"):
        pair.handshake()


@pytest.mark.parametrize(("client_config", "server_config"), STRICT_OFF_CASES)
def test_without_strict_kex_ignore_during_kex_is_accepted_and_shifts_the_count(
    host_keys: dict[str, keys.PrivateKey],
    client_config: TransportConfig | None,
    server_config: TransportConfig | None,
) -> None:
    """The control for the tests above: without strict kex the injected IGNORE passes the exchange, and the
    server's sequence number is one ahead of the client's, so the first encrypted packet fails to open."""
    pair = Pair(host_keys["ssh-ed25519"], client_config, server_config)
    pair.to_server = inject_before(30, messages.Ignore(b"x").encode())
    pair.handshake()  # the client sends nothing after its NEWKEYS yet
    assert_initial_kex(pair)
    pair.client.send(data_msg(1))
    with pytest.raises(ProtocolError) as info:
        pair.pump()
    assert "unexpected message" not in str(info.value)
    assert indices(pair.server_events) == []


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("toward", ["client", "server"])
def test_second_kexinit_or_service_request_during_first_kex_is_refused(
    host_keys: dict[str, keys.PrivateKey], strict: bool, toward: str
) -> None:
    """Forbidden by RFC 4253 7.1 whether or not strict kex is on."""
    for payload in (Transport(Role.CLIENT)._kexinit_message().encode(), UNEXPECTED["service-request"]):
        pair = Pair(host_keys["ssh-ed25519"], TransportConfig(strict_kex=strict))
        hook = inject_before(30 if toward == "server" else 31, payload)
        if toward == "server":
            pair.to_server = hook
        else:
            pair.to_client = hook
        with pytest.raises(ProtocolError, match=r"unexpected message|second KEXINIT"):
            pair.handshake()


class ServerPacketRecorder:
    """Records every server->client packet and the KexOutcomes the server derived its keys from."""

    def __init__(self, pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
        self.packets: Chunks = []
        self.outcomes: list[kex.KexOutcome] = []
        original = Transport._finish_exchange
        server = pair.server

        def spy(transport: Transport, outcome: kex.KexOutcome, events: list[object]) -> None:
            if transport is server:
                self.outcomes.append(outcome)
            original(transport, outcome, events)

        monkeypatch.setattr(Transport, "_finish_exchange", spy)
        pair.to_client = self.record

    def record(self, chunks: Chunks) -> Chunks:
        self.packets += [c for c in chunks if not c.startswith(b"SSH-")]
        return chunks


def server_to_client_opener(server: Transport, outcome: kex.KexOutcome) -> ciphers.PacketOpener:
    """Derive the server->client keys from K and H ourselves (RFC 4253 7.2 letters B, D, F)."""
    algs, session_id = server.algorithms, server.session_id
    assert algs is not None and session_id is not None
    info = ciphers.CIPHERS[algs.cipher_s2c]

    def derive(letter: bytes, size: int) -> bytes:
        return kex.derive_key(outcome.hash_name, outcome.shared_secret, outcome.exchange_hash, session_id, letter, size)

    iv = derive(b"B", info.iv_size) if info.iv_size else b""
    mac_key = derive(b"F", ciphers.MACS[algs.mac_s2c].key_size) if algs.mac_s2c else b""
    return ciphers.new_opener(algs.cipher_s2c, algs.mac_s2c, derive(b"D", info.key_size), iv, mac_key)


def open_as(opener: ciphers.PacketOpener, seq: int, packet: bytes) -> bytes:
    length = opener.packet_length(seq, packet[: opener.header_size])
    if 4 + length + opener.mac_size != len(packet):
        raise ProtocolError("length decrypted with the wrong sequence number")
    return opener.open(seq, packet)


# GCM's nonce counts packets by itself and ignores the sequence number, so only these modes can tell.
SEQ_SENSITIVE = [("chacha20-poly1305@openssh.com", None), ("aes128-ctr", "hmac-sha2-256")]


@pytest.mark.parametrize(("cipher", "mac"), SEQ_SENSITIVE)
@pytest.mark.parametrize("strict", [True, False])
def test_sequence_numbers_reset_after_newkeys_only_with_strict_kex(
    host_keys: dict[str, keys.PrivateKey],
    monkeypatch: pytest.MonkeyPatch,
    cipher: str,
    mac: str | None,
    strict: bool,
) -> None:
    pair = Pair(host_keys["ssh-ed25519"], cipher_config(cipher, mac, strict_kex=strict))
    recorder = ServerPacketRecorder(pair, monkeypatch)
    pair.handshake()
    assert pair.server.strict_kex is strict
    # The server sent KEXINIT, KEX_ECDH_REPLY, NEWKEYS, then EXT_INFO: its first encrypted packet.
    assert len(recorder.packets) == 4 and len(recorder.outcomes) == 1
    ext_info = recorder.packets[3]
    right, wrong = (0, 3) if strict else (3, 0)
    assert open_as(server_to_client_opener(pair.server, recorder.outcomes[0]), right, ext_info)[0] == 7
    with pytest.raises(ProtocolError):  # a MAC error, or a length that decrypts to nonsense
        open_as(server_to_client_opener(pair.server, recorder.outcomes[0]), wrong, ext_info)  # MAC/length

    # A rekey resets them again (strict) or keeps counting (not strict).
    pair.client.rekey()
    pair.pump()
    assert len(recorder.outcomes) == 2
    sent_before = len(recorder.packets)
    pair.server.send(data_msg(5))
    pair.pump()
    first_after_rekey = recorder.packets[sent_before]
    right, wrong = (0, sent_before) if strict else (sent_before, 0)
    opened = open_as(server_to_client_opener(pair.server, recorder.outcomes[1]), right, first_after_rekey)
    assert indices([messages.decode_message(opened)]) == [5]
    with pytest.raises(ProtocolError):  # a MAC error, or a length that decrypts to nonsense
        open_as(server_to_client_opener(pair.server, recorder.outcomes[1]), wrong, first_after_rekey)


# --- Terrapin (CVE-2023-48795) ------------------------------------------------------------------------------


class TerrapinMitm:
    """Server->client: add an IGNORE before the server's NEWKEYS, drop the first packet after it."""

    def __init__(self) -> None:
        self.seen_newkeys = False
        self.dropped: bytes | None = None

    def __call__(self, chunks: Chunks) -> Chunks:
        out: Chunks = []
        for chunk in chunks:
            if self.seen_newkeys:
                if self.dropped is None:
                    self.dropped = chunk
                    continue
            elif plain_msg_id(chunk) == 31:  # the kex reply: the client counts one packet too many
                out.append(plain_packet(messages.Ignore(b"terrapin").encode()))
            elif plain_msg_id(chunk) == 21:
                self.seen_newkeys = True
            out.append(chunk)
        return out


def test_terrapin_prefix_truncation_fails_with_strict_kex(host_keys: dict[str, keys.PrivateKey]) -> None:
    pair = Pair(host_keys["ssh-ed25519"], cipher_config("chacha20-poly1305@openssh.com", None))
    pair.to_client = TerrapinMitm()
    with pytest.raises(ProtocolError, match="unexpected message 2 during key exchange"):
        pair.handshake()
    assert pair.kex_completions("client", True) == 0
    assert not any(isinstance(e, ExtInfoReceived) for e in pair.client_events)


@pytest.mark.parametrize(("client_config", "server_config"), STRICT_OFF_CASES)
def test_terrapin_succeeds_without_strict_kex_ext_info_silently_lost(
    host_keys: dict[str, keys.PrivateKey],
    client_config: TransportConfig | None,
    server_config: TransportConfig | None,
) -> None:
    """With ChaCha20-Poly1305 the nonce is the sequence number, so the shifted count lines up again after the
    drop: the client completes the kex, never sees EXT_INFO, and everything after works. That is the attack,
    and the reason strict kex exists; this test proves the manipulation above is a real one."""

    def chacha(config: TransportConfig | None) -> TransportConfig:
        strict = config.strict_kex if config else True
        return cipher_config("chacha20-poly1305@openssh.com", None, strict_kex=strict)

    pair = Pair(host_keys["ssh-ed25519"], chacha(client_config), chacha(server_config))
    pair.to_client = mitm = TerrapinMitm()
    pair.handshake()
    assert_initial_kex(pair)
    assert mitm.dropped is not None
    assert not any(isinstance(e, ExtInfoReceived) for e in pair.client_events)
    assert pair.client.server_sig_algs is None
    exchange_payloads(pair)


@pytest.mark.parametrize(("client_config", "server_config"), STRICT_OFF_CASES)
def test_terrapin_without_strict_kex_on_gcm_is_a_mac_error(
    host_keys: dict[str, keys.PrivateKey],
    client_config: TransportConfig | None,
    server_config: TransportConfig | None,
) -> None:
    """AES-GCM's nonce counts packets by itself: a dropped packet desynchronises it, seen as a MAC error."""
    strict_c = client_config.strict_kex if client_config else True
    strict_s = server_config.strict_kex if server_config else True
    gcm = "aes256-gcm@openssh.com"
    pair = Pair(
        host_keys["ssh-ed25519"],
        cipher_config(gcm, None, strict_kex=strict_c),
        cipher_config(gcm, None, strict_kex=strict_s),
    )
    pair.to_client = TerrapinMitm()
    pair.handshake()  # the client has nothing after NEWKEYS to read yet
    pair.server.send(data_msg(1))
    with pytest.raises(MACError):
        pair.pump()


@pytest.mark.parametrize("strict", [True, False])
def test_rogue_plaintext_ext_info_is_refused(host_keys: dict[str, keys.PrivateKey], strict: bool) -> None:
    """An EXT_INFO injected in clear before the kex (CVE-2023-46445's shape) must not set server-sig-algs."""
    pair = Pair(host_keys["ssh-ed25519"], cipher_config("chacha20-poly1305@openssh.com", None, strict_kex=strict))
    rogue = messages.ExtInfo.from_pairs({"server-sig-algs": b"ssh-rsa"}).encode()
    inject = inject_before(20, rogue)
    mitm = TerrapinMitm()  # used for its state only: the drop is done below

    def hook(chunks: Chunks) -> Chunks:
        out: Chunks = []
        for chunk in inject(chunks):
            if mitm.seen_newkeys and mitm.dropped is None:
                mitm.dropped = chunk  # the real EXT_INFO, to realign the sequence numbers
                continue
            if plain_msg_id(chunk) == 21:
                mitm.seen_newkeys = True
            out.append(chunk)
        return out

    pair.to_client = hook
    with pytest.raises(ProtocolError):
        pair.handshake()
    assert pair.client.server_sig_algs is None


# --- hostile payloads never raise anything but ProtocolError ------------------------------------------------


@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
def test_random_plaintext_packets_raise_only_protocol_errors(host_keys: dict[str, keys.PrivateKey], role: Role) -> None:
    rng = random.Random(0x55)
    for msg_id in range(256):
        for size in (0, 3, 40, 400):
            transport = Transport(role, host_keys=[host_keys["ssh-ed25519"]] if role is Role.SERVER else ())
            transport.start()
            with contextlib.suppress(ProtocolError):
                transport.receive_data(b"SSH-2.0-x\r\n" + plain_packet(bytes([msg_id]) + rng.randbytes(size)))


@pytest.mark.parametrize("toward", ["client", "server"])
def test_random_encrypted_payloads_raise_only_protocol_errors(
    host_keys: dict[str, keys.PrivateKey], toward: str
) -> None:
    rng = random.Random(0x66)
    pair = Pair(host_keys["ssh-ed25519"]).handshake()
    errors = 0
    for msg_id in range(256):
        for size in (0, 5, 64):
            sender = pair.server if toward == "client" else pair.client
            sender.send(bytes([msg_id]) + rng.randbytes(size))
            try:
                pair.pump()
            except ProtocolError:
                errors += 1
                pair = Pair(host_keys["ssh-ed25519"]).handshake()
    assert errors > 0  # some of these are malformed; each was refused cleanly
