"""Packet protection: round trips, tamper detection, length/padding checks, and asyncssh as a wire oracle."""

from __future__ import annotations

import itertools
import random
import struct
import sys
import time
from pathlib import Path

import pytest
from asyncssh.encryption import get_encryption, get_encryption_params
from asyncssh.mac import get_mac_params
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.poly1305 import Poly1305

from sshconduit.crypto.ciphers import (
    CIPHERS,
    MACS,
    PacketOpener,
    PacketSealer,
    aes_in_hardware,
    client_preference,
    new_opener,
    new_sealer,
    null_opener,
    null_sealer,
)
from sshconduit.errors import MACError, ProtocolError
from sshconduit.limits import MAX_PACKET_LENGTH

CHACHA = "chacha20-poly1305@openssh.com"
GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
CTR = ("aes128-ctr", "aes192-ctr", "aes256-ctr")
COMBOS = [(CHACHA, None), *((name, None) for name in GCM), *((c, m) for c in CTR for m in MACS)]
COMBO_IDS = [f"{c}+{m}" if m else c for c, m in COMBOS]
PAYLOAD_SIZES = (0, 1, 2, 3, 11, 12, 15, 16, 17, 31, 255, 4096, 32768, 70000)


class Keys:
    def __init__(self, cipher: str, mac: str | None, seed: int) -> None:
        rng = random.Random(seed)
        info = CIPHERS[cipher]
        self.cipher, self.mac = cipher, mac
        self.key = rng.randbytes(info.key_size)
        self.iv = rng.randbytes(info.iv_size)
        self.mac_key = rng.randbytes(MACS[mac].key_size) if mac and not info.aead else b""

    def sealer(self) -> PacketSealer:
        return new_sealer(self.cipher, self.mac, self.key, self.iv, self.mac_key)

    def opener(self) -> PacketOpener:
        return new_opener(self.cipher, self.mac, self.key, self.iv, self.mac_key)

    def asyncssh(self):  # type: ignore[no-untyped-def]
        etm = bool(self.mac and MACS[self.mac].etm)
        mac = (self.mac or "").encode()
        return get_encryption(self.cipher.encode(), self.key, self.iv, mac, self.mac_key, etm)


def alignment(cipher: str, mac: str | None) -> tuple[int, bool]:
    """(block alignment, whether the 4-byte length counts toward it)."""
    info = CIPHERS[cipher]
    return max(8, info.block_size), not (info.aead or (mac is not None and MACS[mac].etm))


def split(payload: bytes, rng: random.Random) -> list[bytes | memoryview]:
    """The payload as a few parts, some bytes and some memoryviews, some empty."""
    cuts = sorted(rng.randrange(len(payload) + 1) for _ in range(3))
    bounds = [0, *cuts, len(payload)]
    view = memoryview(payload)
    return [view[a:b] if i % 2 else payload[a:b] for i, (a, b) in enumerate(itertools.pairwise(bounds))]


def receive(opener: PacketOpener, seq: int, wire: bytes) -> bytes:
    """What the transport does: read the length from the header, then open exactly one packet."""
    length = opener.packet_length(seq, memoryview(wire)[: opener.header_size])
    assert len(wire) == 4 + length + opener.mac_size
    return opener.open(seq, memoryview(wire))


def seqs(count: int, start: int = 2**32 - 3) -> list[int]:
    return [(start + i) % 2**32 for i in range(count)]  # crosses the 32-bit wrap


# --- tables -----------------------------------------------------------------------------------------------


def test_algorithm_order_is_openssh_default() -> None:
    assert list(CIPHERS) == [CHACHA, "aes128-ctr", "aes192-ctr", "aes256-ctr", *GCM]
    assert list(MACS) == [
        "hmac-sha2-256-etm@openssh.com",
        "hmac-sha2-512-etm@openssh.com",
        "hmac-sha1-etm@openssh.com",
        "hmac-sha2-256",
        "hmac-sha2-512",
        "hmac-sha1",
    ]


X86_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 {aes}avx2\nbugs\t\t: sysret_ss_attrs\n\n"
ARM_CPUINFO = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd {aes}pmull sha1\n\n"


@pytest.mark.skipif(sys.platform == "darwin", reason="every Mac counts as having AES instructions")
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (X86_CPUINFO.format(aes="aes "), True),
        (X86_CPUINFO.format(aes="vaes "), False),  # a flag that only contains the word does not count
        (ARM_CPUINFO.format(aes="aes "), True),
        (ARM_CPUINFO.format(aes=""), False),
        ("processor\t: 0\n", False),
    ],
)
def test_aes_in_hardware_reads_the_first_cpu_flags(tmp_path: Path, text: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text + text.replace("aes", "none"))  # a second CPU entry is not read
    assert aes_in_hardware(str(cpuinfo)) is expected


@pytest.mark.skipif(sys.platform == "darwin", reason="every Mac counts as having AES instructions")
def test_aes_in_hardware_is_no_without_cpuinfo(tmp_path: Path) -> None:
    assert aes_in_hardware(str(tmp_path / "missing")) is False


def test_client_preference_puts_aes_gcm_first_only_with_aes_in_hardware() -> None:
    openssh = tuple(CIPHERS)
    assert client_preference(openssh, True) == (*GCM, CHACHA, "aes128-ctr", "aes192-ctr", "aes256-ctr")
    assert client_preference(openssh, False) == openssh
    assert client_preference(("aes256-ctr", CHACHA), True) == ("aes256-ctr", CHACHA)


@pytest.mark.parametrize("cipher", list(CIPHERS))
def test_cipher_sizes_match_asyncssh(cipher: str) -> None:
    key_size, iv_size, block_size, *_ = get_encryption_params(cipher.encode())
    info = CIPHERS[cipher]
    assert (info.key_size, info.iv_size, info.block_size) == (key_size, iv_size, max(8, block_size))
    assert info.aead == (cipher == CHACHA or cipher in GCM)


@pytest.mark.parametrize("mac", list(MACS))
def test_mac_sizes_match_asyncssh(mac: str) -> None:
    info = MACS[mac]
    assert (info.key_size, info.digest_size, info.etm) == get_mac_params(mac.encode())


# --- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cipher", "mac"), COMBOS, ids=COMBO_IDS)
def test_round_trip(cipher: str, mac: str | None) -> None:
    rng = random.Random(1)
    keys = Keys(cipher, mac, 2)
    sealer, opener = keys.sealer(), keys.opener()
    align, length_counts = alignment(cipher, mac)
    for seq, size in zip(seqs(len(PAYLOAD_SIZES)), PAYLOAD_SIZES, strict=True):
        payload = rng.randbytes(size)
        wire = sealer.seal(seq, split(payload, rng))
        length = struct.unpack(">I", wire[:4])[0] if opener.header_size == 4 and cipher != CHACHA else None
        if length is not None:
            assert (length + 4 * length_counts) % align == 0
        assert receive(opener, seq, wire) == payload


def test_null_round_trip_and_layout() -> None:
    rng = random.Random(3)
    sealer, opener = null_sealer(), null_opener()
    assert (opener.header_size, opener.mac_size) == (4, 0)
    for seq, size in zip(seqs(len(PAYLOAD_SIZES)), PAYLOAD_SIZES, strict=True):
        payload = rng.randbytes(size)
        wire = sealer.seal(seq, split(payload, rng))
        length, padding = struct.unpack(">IB", wire[:5])
        assert len(wire) == 4 + length and len(wire) % 8 == 0
        assert 4 <= padding < 12 and wire[5 : 5 + size] == payload
        assert receive(opener, seq, wire) == payload


@pytest.mark.parametrize(("cipher", "mac"), COMBOS, ids=COMBO_IDS)
def test_header_and_mac_sizes(cipher: str, mac: str | None) -> None:
    opener = Keys(cipher, mac, 4).opener()
    info = CIPHERS[cipher]
    etm = mac is not None and MACS[mac].etm
    assert opener.header_size == (4 if info.aead or etm else 16)
    assert opener.mac_size == (16 if info.aead else MACS[mac].digest_size)  # type: ignore[index]


# --- asyncssh as the independent implementation -----------------------------------------------------------


def asyncssh_seal(enc, seq: int, payload: bytes, align: int, length_counts: bool, body: bytes | None = None):  # type: ignore[no-untyped-def]
    """A wire packet made by asyncssh (``body`` overrides padding_length || payload || padding)."""
    if body is None:
        padding = -(len(payload) + 1 + 4 * length_counts) % align
        padding += align if padding < 4 else 0
        body = bytes((padding,)) + payload + random.randbytes(padding)
    packet, mac = enc.encrypt_packet(seq, struct.pack(">I", len(body)), body)
    return packet + mac


def asyncssh_open(enc, seq: int, wire: bytes, align: int, mac_size: int) -> bytes:  # type: ignore[no-untyped-def]
    """padding_length || payload || padding, as asyncssh decrypts and verifies it."""
    first, length_field = enc.decrypt_header(seq, wire[:align], 4)
    length = int.from_bytes(length_field, "big")
    assert len(wire) == 4 + length + mac_size
    body = enc.decrypt_packet(seq, first, wire[align : 4 + length], 4, wire[4 + length :])
    assert body is not None, "asyncssh rejected our MAC/tag"
    return body


@pytest.mark.parametrize(("cipher", "mac"), COMBOS, ids=COMBO_IDS)
def test_ours_to_asyncssh(cipher: str, mac: str | None) -> None:
    rng = random.Random(5)
    keys = Keys(cipher, mac, 6)
    sealer, theirs = keys.sealer(), keys.asyncssh()
    mac_size = keys.opener().mac_size
    align, length_counts = alignment(cipher, mac)
    for seq, size in zip(seqs(len(PAYLOAD_SIZES)), PAYLOAD_SIZES, strict=True):
        payload = rng.randbytes(size)
        body = asyncssh_open(theirs, seq, sealer.seal(seq, split(payload, rng)), align, mac_size)
        padding = body[0]
        assert body[1 : len(body) - padding] == payload
        assert 4 <= padding < 4 + align  # minimal padding, as OpenSSH sends
        assert (len(body) + 4 * length_counts) % align == 0


@pytest.mark.parametrize(("cipher", "mac"), COMBOS, ids=COMBO_IDS)
def test_asyncssh_to_ours(cipher: str, mac: str | None) -> None:
    rng = random.Random(7)
    keys = Keys(cipher, mac, 8)
    theirs, opener = keys.asyncssh(), keys.opener()
    align, length_counts = alignment(cipher, mac)
    for seq, size in zip(seqs(len(PAYLOAD_SIZES)), PAYLOAD_SIZES, strict=True):
        payload = rng.randbytes(size)
        assert receive(opener, seq, asyncssh_seal(theirs, seq, payload, align, length_counts)) == payload


@pytest.mark.parametrize("cipher", GCM)
def test_gcm_invocation_counter_wraps_like_asyncssh(cipher: str) -> None:
    keys = Keys(cipher, None, 9)
    keys.iv = keys.iv[:4] + (2**64 - 2).to_bytes(8, "big")
    sealer, theirs_in = keys.sealer(), keys.asyncssh()
    theirs_out, opener = keys.asyncssh(), keys.opener()
    for seq in range(4):
        payload = bytes([seq]) * 50
        assert asyncssh_open(theirs_in, seq, sealer.seal(seq, [payload]), 16, 16)[1:51] == payload
        assert receive(opener, seq, asyncssh_seal(theirs_out, seq, payload, 16, False)) == payload


# --- chacha20-poly1305 known answers (independent of any SSH library) -------------------------------------

# ChaCha20 keystream for an all-zero key: RFC 8439 A.1 (nonce 0, blocks 0 and 1) and the 64-bit-nonce vector
# of draft-agl-tls-chacha20poly1305 (nonce bytes 00..01, block 0). OpenSSH's nonce is seq as big-endian u64.
ZERO_KEY_SEQ0_BLOCK0 = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
)
ZERO_KEY_SEQ0_BLOCK1 = bytes.fromhex(
    "9f07e7be5551387a98ba977c732d080dcb0f29a048e3656912c6533e32ee7aed"
    "29b721769ce64e43d57133b074d839d531ed1f28510afb45ace10a1f4b794d6f"
)
ZERO_KEY_SEQ1_BLOCK0 = bytes.fromhex(
    "de9cba7bf3d69ef5e786dc63973f653a0b49e015adbff7134fcb7df137821031"
    "e85a050278a7084527214f73efc7fa5b5277062eb7a0433e445f41e3"
)


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=False))


@pytest.mark.parametrize(("seq", "block0"), [(0, ZERO_KEY_SEQ0_BLOCK0), (1, ZERO_KEY_SEQ1_BLOCK0)])
def test_chacha_length_uses_second_key_half_and_big_endian_seq(seq: int, block0: bytes) -> None:
    key = random.Random(10).randbytes(32) + bytes(32)  # K_2 random, K_1 (length key) zero
    wire = new_sealer(CHACHA, None, key, b"", b"").seal(seq, [b"x" * 20])
    assert wire[:4] == xor(struct.pack(">I", len(wire) - 4 - 16), block0[:4])


@pytest.mark.parametrize(("seq", "block0"), [(0, ZERO_KEY_SEQ0_BLOCK0), (1, ZERO_KEY_SEQ1_BLOCK0)])
def test_chacha_poly_key_is_block0_of_first_key_half(seq: int, block0: bytes) -> None:
    key = bytes(32) + random.Random(11).randbytes(32)  # K_2 (body + Poly1305 key) zero, K_1 random
    wire = new_sealer(CHACHA, None, key, b"", b"").seal(seq, [b"y" * 20])
    assert wire[-16:] == Poly1305.generate_tag(block0[:32], wire[:-16])


def test_chacha_body_starts_at_block1() -> None:
    payload = bytes(range(40))
    wire = new_sealer(CHACHA, None, bytes(64), b"", b"").seal(0, [payload])
    padding = wire[4] ^ ZERO_KEY_SEQ0_BLOCK1[0]
    assert 4 <= padding < 12
    assert wire[5:45] == xor(payload, ZERO_KEY_SEQ0_BLOCK1[1:41])


# --- tampering ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cipher", "mac"), COMBOS, ids=COMBO_IDS)
def test_every_flipped_bit_is_rejected(cipher: str, mac: str | None) -> None:
    keys = Keys(cipher, mac, 12)
    seq = 77
    wire = keys.sealer().seal(seq, [b"\x5e", random.Random(13).randbytes(40)])
    assert receive(keys.opener(), seq, wire) is not None  # the untouched packet opens
    for bit in range(len(wire) * 8):
        tampered = bytearray(wire)
        tampered[bit // 8] ^= 1 << (bit % 8)
        opener = keys.opener()
        try:
            length = opener.packet_length(seq, bytes(tampered[: opener.header_size]))
        except ProtocolError:
            assert bit < 32, f"bit {bit} outside the length field broke the length check"
            continue
        total = 4 + length + opener.mac_size
        packet = (bytes(tampered) + bytes(total))[:total]  # as many bytes as the transport would wait for
        with pytest.raises(MACError):
            opener.open(seq, packet)


@pytest.mark.parametrize(("cipher", "mac"), [c for c in COMBOS if c[0] not in GCM], ids=str)
def test_wrong_sequence_number_is_rejected(cipher: str, mac: str | None) -> None:
    keys = Keys(cipher, mac, 14)
    wire = keys.sealer().seal(1000, [b"payload" * 9])
    opener = keys.opener()
    try:
        length = opener.packet_length(1001, wire[: opener.header_size])
    except ProtocolError:
        assert cipher == CHACHA  # only chacha's length depends on seq
        return
    total = 4 + length + opener.mac_size
    with pytest.raises(MACError):
        opener.open(1001, (wire + bytes(total))[:total])


@pytest.mark.parametrize("cipher", GCM)
def test_gcm_skipped_packet_is_rejected(cipher: str) -> None:
    # RFC 5647: the nonce is the invocation counter, not seq; a lost packet desynchronises it.
    keys = Keys(cipher, None, 15)
    sealer, opener = keys.sealer(), keys.opener()
    sealer.seal(0, [b"lost"])
    wire = sealer.seal(1, [b"arrives"])
    opener.packet_length(1, wire[:4])
    with pytest.raises(MACError):
        opener.open(1, wire)


@pytest.mark.parametrize(("cipher", "mac"), COMBOS, ids=COMBO_IDS)
def test_wrong_wire_size_is_rejected(cipher: str, mac: str | None) -> None:
    keys = Keys(cipher, mac, 16)
    wire = keys.sealer().seal(3, [b"abc"])
    opener = keys.opener()
    opener.packet_length(3, wire[: opener.header_size])
    with pytest.raises(ProtocolError):
        opener.open(3, wire[:-1])


# --- length and padding checks ------------------------------------------------------------------------------


def wire_header(keys: Keys | None, seq: int, length: int) -> bytes:
    """The first header_size wire bytes announcing ``length``, encrypted as the cipher would."""
    field = struct.pack(">I", length)
    if keys is None:
        return field
    info = CIPHERS[keys.cipher]
    if keys.cipher == CHACHA:
        nonce = bytes(8) + struct.pack(">Q", seq)
        return Cipher(algorithms.ChaCha20(keys.key[32:], nonce), None).encryptor().update(field)
    if info.aead or MACS[keys.mac].etm:  # type: ignore[index]
        return field
    block = field + bytes(12)
    return Cipher(algorithms.AES(keys.key), modes.CTR(keys.iv)).encryptor().update(block)


@pytest.mark.parametrize(("cipher", "mac"), [*COMBOS, ("none", None)], ids=[*COMBO_IDS, "none"])
def test_packet_length_bounds_and_alignment(cipher: str, mac: str | None) -> None:
    keys = Keys(cipher, mac, 17) if cipher != "none" else None
    align, length_counts = alignment(cipher, mac) if keys else (8, True)
    smallest = next(n for n in range(5, 64) if (n + 4 * length_counts) % align == 0)
    largest = MAX_PACKET_LENGTH - (MAX_PACKET_LENGTH + 4 * length_counts) % align
    for good in (smallest, largest):
        opener = keys.opener() if keys else null_opener()
        assert opener.packet_length(9, wire_header(keys, 9, good)) == good
    bad = (0, 4, smallest - 1, smallest + 1, smallest + 4, largest + align, 2**31, 2**32 - 1)
    for length in bad:
        opener = keys.opener() if keys else null_opener()
        with pytest.raises(ProtocolError, match="length"):
            opener.packet_length(9, wire_header(keys, 9, length))


@pytest.mark.parametrize(("cipher", "mac"), COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("padding_field", [0, 3, "length", "length+3", 255])
def test_bad_padding_length_with_valid_mac(cipher: str, mac: str | None, padding_field: int | str) -> None:
    keys = Keys(cipher, mac, 18)
    align, length_counts = alignment(cipher, mac)
    size = 48 - 4 * length_counts  # packet_length, aligned either way
    if isinstance(padding_field, str):  # just past the largest legal value, size - 1
        padding_field = size + (3 if padding_field.endswith("+3") else 0)
    body = bytes((padding_field,)) + bytes(size - 1)
    wire = asyncssh_seal(keys.asyncssh(), 5, b"", align, length_counts, body=body)
    opener = keys.opener()
    assert opener.packet_length(5, wire[: opener.header_size]) == size
    with pytest.raises(ProtocolError, match="padding") as raised:
        opener.open(5, wire)
    assert not isinstance(raised.value, MACError)


def test_null_bad_padding_length() -> None:
    for padding_field in (3, 12, 15):
        opener = null_opener()
        wire = struct.pack(">IB", 12, padding_field) + bytes(11)
        assert opener.packet_length(0, wire[:4]) == 12
        with pytest.raises(ProtocolError, match="padding"):
            opener.open(0, wire)


def test_factory_rejects_bad_names_and_sizes() -> None:
    with pytest.raises(ValueError):
        new_sealer("aes128-cbc", "hmac-sha1", bytes(16), bytes(16), bytes(20))
    with pytest.raises(ValueError):
        new_opener("aes128-ctr", None, bytes(16), bytes(16), b"")
    with pytest.raises(ValueError):
        new_sealer("aes256-gcm@openssh.com", None, bytes(16), bytes(12), b"")
    with pytest.raises(ValueError):
        new_opener("aes128-ctr", "hmac-sha2-256", bytes(16), bytes(16), bytes(20))
    # The negotiated MAC is ignored with an AEAD cipher.
    assert new_sealer(CHACHA, "hmac-sha1", bytes(64), b"", b"") is not None


# --- throughput (reported, not asserted) --------------------------------------------------------------------


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", CHACHA])
def test_throughput_report(cipher: str, capsys: pytest.CaptureFixture[str]) -> None:
    keys = Keys(cipher, None, 19)
    sealer, opener = keys.sealer(), keys.opener()
    payload = random.Random(20).randbytes(32 * 1024)
    parts = [b"\x5e\x00\x00\x00\x01" + struct.pack(">I", len(payload)), payload]
    count = 2000
    start = time.perf_counter()
    for seq in range(count):
        opened = receive(opener, seq, sealer.seal(seq, parts))
    elapsed = time.perf_counter() - start
    assert opened[9:] == payload
    with capsys.disabled():
        print(f"\n{cipher}: seal+open {count * len(payload) / elapsed / 1e6:.0f} MB/s (32 KiB payloads)")
