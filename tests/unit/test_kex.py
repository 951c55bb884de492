"""Key exchange: client/server agreement, hash layout, peer-value validation, and AsyncSSH as an oracle."""

from __future__ import annotations

import asyncio
import hashlib
import struct
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519

from sshconduit.crypto import kex
from sshconduit.errors import KexError, ProtocolError

# pyca on an OpenSSL before 3.5 has no ML-KEM, and then the hybrid is not offered (see the test of that below)
NEEDS_MLKEM = pytest.mark.skipif(not kex.mlkem_available(), reason="this cryptography's OpenSSL has no ML-KEM")

CTX = kex.ExchangeContext(
    client_version=b"SSH-2.0-conduit_test",
    server_version=b"SSH-2.0-OpenSSH_9.9",
    client_kexinit=b"\x14" + bytes(range(16)) + b"client kexinit body",
    server_kexinit=b"\x14" + bytes(range(16, 32)) + b"server kexinit body",
)
HOST_KEY = b"\x00\x00\x00\x0bssh-ed25519" + b"\x00\x00\x00\x20" + bytes(range(32))
HASHLIB = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
DH_METHODS = {
    "diffie-hellman-group14-sha256": 2048,
    "diffie-hellman-group14-sha1": 2048,
    "diffie-hellman-group16-sha512": 4096,
    "diffie-hellman-group18-sha512": 8192,
}


# Encoders written independently of sshconduit.wire, straight from RFC 4251 5.
def ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def ssh_mpint_unsigned(magnitude: bytes) -> bytes:
    magnitude = magnitude.lstrip(b"\x00")
    if magnitude and magnitude[0] & 0x80:
        magnitude = b"\x00" + magnitude
    return ssh_string(magnitude)


def fake_sign(exchange_hash: bytes) -> bytes:
    return ssh_string(b"test-sig") + ssh_string(exchange_hash)


def run_pair(name: str) -> tuple[kex.KexOutcome, kex.KexOutcome, bytes, bytes]:
    client = kex.start_client_kex(name, CTX)
    server = kex.start_server_kex(name, CTX, HOST_KEY, fake_sign)
    init = client.init_message()
    reply, server_outcome = server.handle_init(init)
    return client.handle_reply(reply), server_outcome, init, reply


# --- the algorithm lists ---


def test_algorithm_lists_follow_openssh_order() -> None:
    assert kex.offered_methods(with_mlkem=True) == (
        "mlkem768x25519-sha256",
        "curve25519-sha256",
        "curve25519-sha256@libssh.org",
        "ecdh-sha2-nistp256",
        "ecdh-sha2-nistp384",
        "ecdh-sha2-nistp521",
        "diffie-hellman-group16-sha512",
        "diffie-hellman-group18-sha512",
        "diffie-hellman-group14-sha256",
        "diffie-hellman-group14-sha1",
    )
    assert kex.offered_methods(kex.mlkem_available()) == kex.KEX_ALGORITHMS
    assert (*kex.DEFAULT_KEX_ALGORITHMS, "diffie-hellman-group14-sha1") == kex.KEX_ALGORITHMS


def test_a_cryptography_without_ml_kem_leaves_the_hybrid_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # pyca built on an OpenSSL before 3.5 (its wheels before 48) has the mlkem module but refuses the key
    def refuse() -> None:
        raise UnsupportedAlgorithm("ML-KEM-768 is not supported by this backend.")

    monkeypatch.setattr(mlkem.MLKEM768PrivateKey, "generate", staticmethod(refuse))
    assert not kex.mlkem_available()
    offered = kex.offered_methods(with_mlkem=False)
    assert offered[0] == "curve25519-sha256"
    assert offered == tuple(name for name in kex.offered_methods(with_mlkem=True) if "mlkem" not in name)


def test_unknown_method_is_refused() -> None:
    with pytest.raises(KexError):
        kex.start_client_kex("diffie-hellman-group1-sha1", CTX)
    with pytest.raises(KexError):
        kex.start_server_kex("sntrup761x25519-sha512", CTX, HOST_KEY, fake_sign)


# --- our client against our server ---


@pytest.mark.parametrize("name", kex.KEX_ALGORITHMS)
def test_pair_agrees(name: str) -> None:
    client_outcome, server_outcome, _, reply = run_pair(name)
    assert client_outcome.shared_secret == server_outcome.shared_secret
    assert client_outcome.exchange_hash == server_outcome.exchange_hash
    assert client_outcome.host_key_blob == server_outcome.host_key_blob == HOST_KEY
    assert client_outcome.signature == server_outcome.signature == fake_sign(server_outcome.exchange_hash)
    assert len(client_outcome.exchange_hash) == HASHLIB[client_outcome.hash_name]().digest_size
    assert reply[0] == 31
    # two runs never give the same K (fresh ephemeral keys)
    assert run_pair(name)[0].shared_secret != client_outcome.shared_secret


@pytest.mark.parametrize(
    ("name", "hash_name"),
    [
        pytest.param("mlkem768x25519-sha256", "sha256", marks=NEEDS_MLKEM),
        ("curve25519-sha256", "sha256"),
        ("ecdh-sha2-nistp384", "sha384"),
        ("ecdh-sha2-nistp521", "sha512"),
        ("diffie-hellman-group16-sha512", "sha512"),
        ("diffie-hellman-group14-sha1", "sha1"),
    ],
)
def test_hash_names(name: str, hash_name: str) -> None:
    assert run_pair(name)[0].hash_name == hash_name


def test_client_accepts_only_one_reply() -> None:
    client = kex.start_client_kex("curve25519-sha256", CTX)
    server = kex.start_server_kex("curve25519-sha256", CTX, HOST_KEY, fake_sign)
    reply, _ = server.handle_init(client.init_message())
    client.handle_reply(reply)
    with pytest.raises(ProtocolError):
        client.handle_reply(reply)
    with pytest.raises(ProtocolError):
        client.init_message()
    fresh_init = kex.start_client_kex("curve25519-sha256", CTX).init_message()
    with pytest.raises(ProtocolError):
        server.handle_init(fresh_init)


def test_wrong_message_number_is_refused() -> None:
    client = kex.start_client_kex("curve25519-sha256", CTX)
    server = kex.start_server_kex("curve25519-sha256", CTX, HOST_KEY, fake_sign)
    init = client.init_message()
    with pytest.raises(ProtocolError):
        server.handle_init(b"\x1f" + init[1:])
    reply, _ = kex.start_server_kex("curve25519-sha256", CTX, HOST_KEY, fake_sign).handle_init(init)
    with pytest.raises(ProtocolError):
        client.handle_reply(reply + b"\x00")  # trailing garbage


# --- key derivation, against a hand-written hashlib expansion ---


@pytest.mark.parametrize(("hash_name", "size"), [("sha256", 16), ("sha256", 100), ("sha512", 64), ("sha1", 40)])
def test_derive_key_matches_rfc4253_expansion(hash_name: str, size: int) -> None:
    shared = ssh_mpint_unsigned(bytes.fromhex("80") + bytes(range(31)))
    exchange_hash = bytes(range(100, 132))
    session_id = bytes(range(200, 232))
    h = HASHLIB[hash_name]
    expected = h(shared + exchange_hash + b"C" + session_id).digest()
    while len(expected) < size:
        expected += h(shared + exchange_hash + expected).digest()
    got = kex.derive_key(hash_name, shared, exchange_hash, session_id, b"C", size)
    assert got == expected[:size]
    assert len(got) == size
    assert kex.derive_key(hash_name, shared, exchange_hash, session_id, b"D", size) != got


def test_derive_key_second_block_is_chained() -> None:
    k, h, sid = b"\x00\x00\x00\x01\x05", b"H" * 32, b"S" * 32
    first = hashlib.sha256(k + h + b"A" + sid).digest()
    second = hashlib.sha256(k + h + first).digest()
    assert kex.derive_key("sha256", k, h, sid, b"A", 64) == first + second


# --- curve25519: play the server by hand and recompute H field by field ---


def expected_exchange_hash(
    digest: Callable[[bytes], Any], client_value: bytes, server_value: bytes, shared: bytes
) -> bytes:
    """H as RFC 4253 8, RFC 5656 4 and RFC 8731 lay it out: both versions and KEXINITs, the host key, each side's
    value (already encoded: a string or an mpint) and K."""
    exchange = (CTX.client_version, CTX.server_version, CTX.client_kexinit, CTX.server_kexinit)
    return digest(
        b"".join(ssh_string(f) for f in exchange) + ssh_string(HOST_KEY) + client_value + server_value + shared
    ).digest()


def hand_server_reply_curve25519(init: bytes) -> tuple[bytes, bytes, bytes]:
    """(reply payload, expected K, expected H) computed from RFC 8731 and RFC 5656 4 alone."""
    assert init[0] == 30
    (length,) = struct.unpack(">I", init[1:5])
    assert length == 32 and len(init) == 37
    client_public = init[5:]
    server_key = x25519.X25519PrivateKey.generate()
    server_public = server_key.public_key().public_bytes_raw()
    raw = server_key.exchange(x25519.X25519PublicKey.from_public_bytes(client_public))
    shared = ssh_mpint_unsigned(raw)  # RFC 8731 3.1: big-endian unsigned, as mpint
    exchange_hash = expected_exchange_hash(hashlib.sha256, ssh_string(client_public), ssh_string(server_public), shared)
    signature = b"sig-blob"
    reply = b"\x1f" + ssh_string(HOST_KEY) + ssh_string(server_public) + ssh_string(signature)
    return reply, shared, exchange_hash


@pytest.mark.parametrize("name", ["curve25519-sha256", "curve25519-sha256@libssh.org"])
def test_curve25519_exchange_hash_layout(name: str) -> None:
    client = kex.start_client_kex(name, CTX)
    reply, shared, exchange_hash = hand_server_reply_curve25519(client.init_message())
    outcome = client.handle_reply(reply)
    assert outcome.shared_secret == shared
    assert outcome.exchange_hash == exchange_hash
    assert outcome.signature == b"sig-blob"
    assert outcome.host_key_blob == HOST_KEY


def test_curve25519_server_hash_layout() -> None:
    client_key = x25519.X25519PrivateKey.generate()
    client_public = client_key.public_key().public_bytes_raw()
    seen: list[bytes] = []

    def sign(h: bytes) -> bytes:
        seen.append(h)
        return b"S"

    server = kex.start_server_kex("curve25519-sha256", CTX, HOST_KEY, sign)
    reply, outcome = server.handle_init(b"\x1e" + ssh_string(client_public))
    assert reply[:5] == b"\x1f" + struct.pack(">I", len(HOST_KEY))
    server_public = reply[5 + len(HOST_KEY) + 4 : 5 + len(HOST_KEY) + 4 + 32]
    assert reply == b"\x1f" + ssh_string(HOST_KEY) + ssh_string(server_public) + ssh_string(b"S")
    shared = ssh_mpint_unsigned(client_key.exchange(x25519.X25519PublicKey.from_public_bytes(server_public)))
    expected_h = expected_exchange_hash(hashlib.sha256, ssh_string(client_public), ssh_string(server_public), shared)
    assert outcome.shared_secret == shared
    assert outcome.exchange_hash == expected_h
    assert seen == [expected_h]


# Low-order points whose X25519 result is all zero (RFC 7748 5 and the "cr.yp.to/ecdh.html" list).
LOW_ORDER_X25519 = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
]


@pytest.mark.parametrize("bad_public", LOW_ORDER_X25519)
def test_curve25519_zero_shared_secret_is_rejected(bad_public: bytes) -> None:
    client = kex.start_client_kex("curve25519-sha256", CTX)
    client.init_message()
    with pytest.raises(KexError):
        client.handle_reply(b"\x1f" + ssh_string(HOST_KEY) + ssh_string(bad_public) + ssh_string(b"s"))
    server = kex.start_server_kex("curve25519-sha256", CTX, HOST_KEY, fake_sign)
    with pytest.raises(KexError):
        server.handle_init(b"\x1e" + ssh_string(bad_public))


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_curve25519_wrong_length_is_rejected(length: int) -> None:
    server = kex.start_server_kex("curve25519-sha256", CTX, HOST_KEY, fake_sign)
    with pytest.raises(KexError):
        server.handle_init(b"\x1e" + ssh_string(b"\x09" * length))


# --- NIST ECDH ---


@pytest.mark.parametrize(
    ("name", "curve", "hash_name"),
    [
        ("ecdh-sha2-nistp256", ec.SECP256R1(), "sha256"),
        ("ecdh-sha2-nistp384", ec.SECP384R1(), "sha384"),
        ("ecdh-sha2-nistp521", ec.SECP521R1(), "sha512"),
    ],
)
def test_nist_ecdh_against_hand_client(name: str, curve: ec.EllipticCurve, hash_name: str) -> None:
    client_key = ec.generate_private_key(curve)
    client_public = client_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    server = kex.start_server_kex(name, CTX, HOST_KEY, fake_sign)
    reply, outcome = server.handle_init(b"\x1e" + ssh_string(client_public))
    offset = 1 + 4 + len(HOST_KEY)
    (length,) = struct.unpack(">I", reply[offset : offset + 4])
    server_public = reply[offset + 4 : offset + 4 + length]
    peer = ec.EllipticCurvePublicKey.from_encoded_point(curve, server_public)
    shared = ssh_mpint_unsigned(client_key.exchange(ec.ECDH(), peer))
    client_q, server_q = ssh_string(client_public), ssh_string(server_public)
    expected_h = expected_exchange_hash(HASHLIB[hash_name], client_q, server_q, shared)
    assert outcome.shared_secret == shared
    assert outcome.exchange_hash == expected_h


def test_nist_rejects_bad_points() -> None:
    good = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    )
    off_curve = b"\x04" + b"\x01" * 64
    for bad in (good, off_curve, b"\x04" + bytes(64), b"", b"\x04" + b"\x01" * 10):
        server = kex.start_server_kex("ecdh-sha2-nistp256", CTX, HOST_KEY, fake_sign)
        with pytest.raises(KexError):
            server.handle_init(b"\x1e" + ssh_string(bad))
        client = kex.start_client_kex("ecdh-sha2-nistp256", CTX)
        with pytest.raises(KexError):
            client.handle_reply(b"\x1f" + ssh_string(HOST_KEY) + ssh_string(bad) + ssh_string(b"s"))


# --- mlkem768x25519-sha256 ---


@NEEDS_MLKEM
def test_mlkem_hybrid_client_against_hand_server() -> None:
    """K = string(SHA-256(ML-KEM secret || X25519 secret)); C_INIT = pk || x25519; S_REPLY = ct || x25519."""
    client = kex.start_client_kex("mlkem768x25519-sha256", CTX)
    init = client.init_message()
    (length,) = struct.unpack(">I", init[1:5])
    assert init[0] == 30 and length == 1184 + 32 and len(init) == 5 + length
    client_blob = init[5:]
    mlkem_secret, ciphertext = mlkem.MLKEM768PublicKey.from_public_bytes(client_blob[:1184]).encapsulate()
    server_key = x25519.X25519PrivateKey.generate()
    x25519_secret = server_key.exchange(x25519.X25519PublicKey.from_public_bytes(client_blob[1184:]))
    server_blob = ciphertext + server_key.public_key().public_bytes_raw()
    reply = b"\x1f" + ssh_string(HOST_KEY) + ssh_string(server_blob) + ssh_string(b"sig")
    outcome = client.handle_reply(reply)
    expected_k = ssh_string(hashlib.sha256(mlkem_secret + x25519_secret).digest())
    assert outcome.shared_secret == expected_k
    expected_h = expected_exchange_hash(hashlib.sha256, ssh_string(client_blob), ssh_string(server_blob), expected_k)
    assert outcome.exchange_hash == expected_h


@NEEDS_MLKEM
def test_mlkem_hybrid_server_against_hand_client() -> None:
    mlkem_key = mlkem.MLKEM768PrivateKey.generate()
    x_key = x25519.X25519PrivateKey.generate()
    client_blob = mlkem_key.public_key().public_bytes_raw() + x_key.public_key().public_bytes_raw()
    server = kex.start_server_kex("mlkem768x25519-sha256", CTX, HOST_KEY, fake_sign)
    reply, outcome = server.handle_init(b"\x1e" + ssh_string(client_blob))
    offset = 1 + 4 + len(HOST_KEY)
    (length,) = struct.unpack(">I", reply[offset : offset + 4])
    assert length == 1088 + 32
    server_blob = reply[offset + 4 : offset + 4 + length]
    mlkem_secret = mlkem_key.decapsulate(server_blob[:1088])
    x_secret = x_key.exchange(x25519.X25519PublicKey.from_public_bytes(server_blob[1088:]))
    assert outcome.shared_secret == ssh_string(hashlib.sha256(mlkem_secret + x_secret).digest())


@NEEDS_MLKEM
@pytest.mark.parametrize("length", [0, 32, 1184, 1184 + 31, 1184 + 33, 1088 + 32])
def test_mlkem_hybrid_client_public_length(length: int) -> None:
    server = kex.start_server_kex("mlkem768x25519-sha256", CTX, HOST_KEY, fake_sign)
    with pytest.raises(KexError):
        server.handle_init(b"\x1e" + ssh_string(b"\x09" * length))


@NEEDS_MLKEM
@pytest.mark.parametrize("length", [0, 32, 1088, 1088 + 31, 1088 + 33, 1184 + 32])
def test_mlkem_hybrid_server_reply_length(length: int) -> None:
    client = kex.start_client_kex("mlkem768x25519-sha256", CTX)
    with pytest.raises(KexError):
        client.handle_reply(b"\x1f" + ssh_string(HOST_KEY) + ssh_string(b"\x09" * length) + ssh_string(b"s"))


@NEEDS_MLKEM
def test_mlkem_hybrid_rejects_invalid_encapsulation_key_and_zero_x25519() -> None:
    good_x = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    good_pk = mlkem.MLKEM768PrivateKey.generate().public_key().public_bytes_raw()
    for blob in (b"\xff" * 1184 + good_x, good_pk + bytes(32)):  # coefficients >= q; zero X25519 point
        server = kex.start_server_kex("mlkem768x25519-sha256", CTX, HOST_KEY, fake_sign)
        with pytest.raises(KexError):
            server.handle_init(b"\x1e" + ssh_string(blob))


# --- finite-field DH ---


def test_modp_primes_match_an_independent_copy() -> None:
    import asyncssh.kex_dh as oracle

    assert kex.modp_prime(2048) == oracle._group14_p
    assert kex.modp_prime(4096) == oracle._group16_p
    assert kex.modp_prime(8192) == oracle._group18_p
    # RFC 3526's published first and last words of the 2048-bit prime
    text = format(kex.modp_prime(2048), "X")
    assert text.startswith("FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD1")
    assert text.endswith("15728E5A8AACAA68FFFFFFFFFFFFFFFF")
    for bits in (2048, 4096, 8192):
        p = kex.modp_prime(bits)
        assert p.bit_length() == bits
        assert pow(3, p - 1, p) == 1  # Fermat check


def dh_reply_with_f(f: int) -> bytes:
    body = f.to_bytes((f.bit_length() + 8) // 8, "big", signed=True) if f else b""
    return b"\x1f" + ssh_string(HOST_KEY) + ssh_string(body) + ssh_string(b"s")


@pytest.mark.parametrize("name", list(DH_METHODS))
def test_dh_peer_value_range(name: str) -> None:
    p = kex.modp_prime(DH_METHODS[name])
    for bad in (0, 1, p - 1, p, p + 1, -2, -(p - 2)):
        client = kex.start_client_kex(name, CTX)
        client.init_message()
        with pytest.raises(KexError):
            client.handle_reply(dh_reply_with_f(bad))
        server = kex.start_server_kex(name, CTX, HOST_KEY, fake_sign)
        body = bad.to_bytes((bad.bit_length() + 8) // 8, "big", signed=True) if bad else b""
        with pytest.raises(KexError):
            server.handle_init(b"\x1e" + ssh_string(body))
    for good in (2, p - 2):  # the edges of the allowed range
        client = kex.start_client_kex(name, CTX)
        assert client.handle_reply(dh_reply_with_f(good)).shared_secret


def test_dh_group14_against_hand_server() -> None:
    p = kex.modp_prime(2048)
    client = kex.start_client_kex("diffie-hellman-group14-sha256", CTX)
    init = client.init_message()
    (length,) = struct.unpack(">I", init[1:5])
    e = int.from_bytes(init[5 : 5 + length], "big", signed=True)
    assert 1 < e < p - 1 and len(init) == 5 + length
    y = 0x1234567890ABCDEF << 300 | 0xF00D
    f = pow(2, y, p)
    shared = ssh_mpint_unsigned(pow(e, y, p).to_bytes(256, "big"))
    outcome = client.handle_reply(dh_reply_with_f(f))
    assert outcome.shared_secret == shared
    client_e, server_f = ssh_mpint_unsigned(e.to_bytes(256, "big")), ssh_mpint_unsigned(f.to_bytes(256, "big"))
    expected_h = expected_exchange_hash(hashlib.sha256, client_e, server_f, shared)
    assert outcome.exchange_hash == expected_h


# --- AsyncSSH as an independent oracle for K and H ---


class _OracleHostKey:
    def __init__(self) -> None:
        self.public_data = HOST_KEY
        self.signed: list[bytes] = []

    def sign(self, data: bytes) -> bytes:
        self.signed.append(data)
        return fake_sign(data)

    def verify(self, data: bytes, sig: bytes) -> bool:
        return sig == fake_sign(data)


class _OracleConn:
    """Just enough of an AsyncSSH connection for its kex handlers."""

    def __init__(self, is_client: bool) -> None:
        import logging

        self.logger = logging.getLogger("kex-oracle")
        self._is_client = is_client
        self.sent: list[bytes] = []
        self.newkeys: tuple[bytes, bytes] | None = None
        self.host_key = _OracleHostKey()

    def is_client(self) -> bool:
        return self._is_client

    def is_server(self) -> bool:
        return not self._is_client

    def get_hash_prefix(self) -> bytes:
        return CTX.hash_prefix()

    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        self.sent.append(bytes((pkttype,)) + b"".join(args))

    def get_server_host_key(self) -> _OracleHostKey:
        return self.host_key

    def validate_server_host_key(self, data: bytes) -> _OracleHostKey:
        assert data == HOST_KEY
        return self.host_key

    def send_newkeys(self, k: bytes, h: bytes) -> None:
        self.newkeys = (k, h)


def _oracle(name: str, is_client: bool) -> tuple[Any, _OracleConn, Any]:
    from asyncssh.kex import get_kex
    from asyncssh.packet import SSHPacket

    conn = _OracleConn(is_client)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyca's FFDH deprecation inside AsyncSSH
        handler = get_kex(conn, name.encode())  # type: ignore[arg-type]  # duck-typed connection
    return handler, conn, SSHPacket


@pytest.mark.parametrize("name", kex.KEX_ALGORITHMS)
def test_our_client_against_asyncssh_server(name: str) -> None:
    handler, conn, packet_cls = _oracle(name, is_client=False)
    client = kex.start_client_kex(name, CTX)
    init = client.init_message()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handler.process_packet(init[0], 0, packet_cls(init[1:]))
    assert conn.newkeys is not None and len(conn.sent) == 1
    outcome = client.handle_reply(conn.sent[0])
    assert (outcome.shared_secret, outcome.exchange_hash) == conn.newkeys
    assert outcome.signature == fake_sign(outcome.exchange_hash)


@pytest.mark.parametrize("name", kex.KEX_ALGORITHMS)
def test_asyncssh_client_against_our_server(name: str) -> None:
    handler, conn, packet_cls = _oracle(name, is_client=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asyncio.run(handler.start())
    assert len(conn.sent) == 1
    server = kex.start_server_kex(name, CTX, HOST_KEY, fake_sign)
    reply, outcome = server.handle_init(conn.sent[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handler.process_packet(reply[0], 0, packet_cls(reply[1:]))
    # AsyncSSH verified fake_sign(H) with its own H, then handed over its K and H
    assert conn.newkeys == (outcome.shared_secret, outcome.exchange_hash)
