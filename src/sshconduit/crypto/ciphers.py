"""Binary packet protection: one payload in, one wire packet out, and back.

RFC 4253 section 6 (packet layout, aes-ctr + hmac), RFC 5647 as amended by OpenSSH's PROTOCOL (aes-gcm with
the length in clear as AAD, fixed-field + 64-bit invocation counter nonce), OpenSSH's PROTOCOL (the
``-etm@openssh.com`` MACs over the ciphertext) and PROTOCOL.chacha20poly1305.

The transport owns sequence numbers and buffering. Every object here is made once per key and direction;
per packet we only build nonces and do the one or two cryptography calls each mode needs.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from hmac import compare_digest
from typing import Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305

from ..errors import MACError, ProtocolError
from ..limits import MAX_PACKET_LENGTH

Buffer = bytes | bytearray | memoryview

_U32 = struct.Struct(">I")
_pack_u32 = _U32.pack
_unpack_u32 = _U32.unpack_from
_pack_u64 = struct.Struct(">Q").pack

_MIN_PADDING = 4
_MIN_PACKET_LENGTH = 1 + _MIN_PADDING  # padding_length byte + minimum padding, as OpenSSH checks
_ZEROS = bytes(64)  # padding source for modes whose padding is encrypted; also ChaCha20 block 0 input
_PAD_BYTE = [bytes((n,)) for n in range(256)]  # the padding_length byte, without a per-packet allocation


@dataclass(frozen=True)
class CipherInfo:
    name: str
    key_size: int
    iv_size: int
    block_size: int
    aead: bool  # chacha20-poly1305 and aes-gcm carry their own tag; the negotiated MAC is ignored


@dataclass(frozen=True)
class MacInfo:
    name: str
    key_size: int
    digest_size: int
    etm: bool


# Insertion order is OpenSSH 9's default preference.
CIPHERS: dict[str, CipherInfo] = {
    info.name: info
    for info in (
        CipherInfo("chacha20-poly1305@openssh.com", 64, 0, 8, True),
        CipherInfo("aes128-ctr", 16, 16, 16, False),
        CipherInfo("aes192-ctr", 24, 16, 16, False),
        CipherInfo("aes256-ctr", 32, 16, 16, False),
        CipherInfo("aes128-gcm@openssh.com", 16, 12, 16, True),
        CipherInfo("aes256-gcm@openssh.com", 32, 12, 16, True),
    )
}
NONE_CIPHER = CipherInfo("none", 0, 0, 8, False)  # never negotiable: only the state before the first NEWKEYS


def aes_in_hardware(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU has AES instructions: the ``aes`` flag in Linux's /proc/cpuinfo (x86 "flags", Arm
    "Features"). Every Mac that current macOS runs on has them. Anywhere else, or unreadable: no."""
    if sys.platform == "darwin":
        return True
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as info:
            for line in info:  # the first CPU's flags say it: no need to read the other CPUs' entries
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return False


def client_preference(names: Sequence[str], hardware_aes: bool) -> tuple[str, ...]:
    """A client's cipher order: OpenSSH's (``names``), but AES-GCM first where the CPU has AES instructions, as
    Red Hat's crypto policies order OpenSSH's. There a small chacha20-poly1305 packet costs about six times an
    AES-GCM one (two ChaCha20 contexts and a Poly1305 each, against one AES-GCM call), and a forwarded stream
    moves 1.5 to 1.6 times the bytes. The client's order is the one negotiation follows (RFC 4253 7.1)."""
    if not hardware_aes:
        return tuple(names)
    gcm = [name for name in names if name.endswith("-gcm@openssh.com")]
    return (*gcm, *(name for name in names if name not in gcm))


CLIENT_CIPHERS = client_preference(tuple(CIPHERS), aes_in_hardware())  # what a client offers by default

MACS: dict[str, MacInfo] = {
    info.name: info
    for info in (
        MacInfo("hmac-sha2-256-etm@openssh.com", 32, 32, True),
        MacInfo("hmac-sha2-512-etm@openssh.com", 64, 64, True),
        MacInfo("hmac-sha1-etm@openssh.com", 20, 20, True),
        MacInfo("hmac-sha2-256", 32, 32, False),
        MacInfo("hmac-sha2-512", 64, 64, False),
        MacInfo("hmac-sha1", 20, 20, False),
    )
}
_MAC_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "hmac-sha2-256-etm@openssh.com": hashes.SHA256,
    "hmac-sha2-512-etm@openssh.com": hashes.SHA512,
    "hmac-sha1-etm@openssh.com": hashes.SHA1,
    "hmac-sha2-256": hashes.SHA256,
    "hmac-sha2-512": hashes.SHA512,
    "hmac-sha1": hashes.SHA1,
}


class PacketSealer(Protocol):
    def seal(self, seq: int, payload_parts: Sequence[Buffer]) -> bytes:
        """The whole wire packet for sequence number ``seq`` (already reduced mod 2**32)."""
        ...


class PacketOpener(Protocol):
    header_size: int  # wire bytes needed before packet_length() can be called
    mac_size: int  # bytes after the 4 + packet_length bytes

    def packet_length(self, seq: int, header: Buffer) -> int:
        """The packet_length field, from the first header_size wire bytes; once per packet, before open().
        Raises ProtocolError for a length out of bounds or not a multiple of the block size."""
        ...

    def open(self, seq: int, packet: Buffer) -> bytes:
        """The payload of the whole wire packet (4 + packet_length + mac_size bytes)."""
        ...


# --- shared helpers --------------------------------------------------------------------------------------


def _padding_length(covered: int, align: int) -> int:
    """Padding that makes ``covered`` + padding a multiple of ``align``, at least 4 bytes (RFC 4253 6)."""
    padding = -covered % align
    return padding + align if padding < _MIN_PADDING else padding


def _payload_size(parts: Sequence[Buffer]) -> int:
    return sum(map(len, parts))


def _check_length(length: int, length_in_alignment: bool, align: int) -> None:
    """Bounds and alignment of a peer's packet_length field, before we wait for that many bytes."""
    if length < _MIN_PACKET_LENGTH or length > MAX_PACKET_LENGTH:
        raise ProtocolError(f"bad packet length {length}")
    if (length + 4 if length_in_alignment else length) % align:
        raise ProtocolError(f"packet length {length} not a multiple of the block size {align}")


def _check_wire_size(packet: Buffer, expected: int) -> None:
    if len(packet) != expected:
        raise ProtocolError(f"packet is {len(packet)} bytes, expected {expected}")


def _payload_end(padding_length: int, packet_length: int, offset: int) -> int:
    """End of the payload, as an index into a buffer whose padding_length byte sits at ``offset`` - 1."""
    if padding_length < _MIN_PADDING or padding_length > packet_length - 1:  # the padding_length byte itself
        raise ProtocolError(f"bad padding length {padding_length}")
    return offset - 1 + packet_length - padding_length


class _RandomPadding:
    """Unpredictable padding bytes, drawn from os.urandom in bulk so a packet costs one slice."""

    __slots__ = ("_pool", "_pos")
    _POOL_SIZE = 4096

    def __init__(self) -> None:
        self._pool = os.urandom(self._POOL_SIZE)
        self._pos = 0

    def take(self, n: int) -> bytes:
        pos = self._pos
        if pos + n > self._POOL_SIZE:
            self._pool = os.urandom(self._POOL_SIZE)
            pos = 0
        self._pos = pos + n
        return self._pool[pos : pos + n]


def _check_sizes(info: CipherInfo, key: bytes, iv: bytes) -> None:
    # Sizes are ours to get right (kex derives exactly key_size/iv_size bytes): a mismatch is a bug.
    if len(key) != info.key_size or len(iv) != info.iv_size:
        raise ValueError(f"{info.name}: expected a {info.key_size}-byte key and a {info.iv_size}-byte IV")


# --- none ------------------------------------------------------------------------------------------------


class _NullSealer:
    __slots__ = ()

    def seal(self, seq: int, payload_parts: Sequence[Buffer]) -> bytes:
        size = _payload_size(payload_parts)
        padding = _padding_length(5 + size, NONE_CIPHER.block_size)
        header = _pack_u32(1 + size + padding) + _PAD_BYTE[padding]
        return b"".join((header, *payload_parts, _ZEROS[:padding]))


class _NullOpener:
    __slots__ = ("_length",)
    header_size = 4
    mac_size = 0

    def __init__(self) -> None:
        self._length = 0

    def packet_length(self, seq: int, header: Buffer) -> int:
        length = _unpack_u32(header)[0]
        _check_length(length, True, NONE_CIPHER.block_size)
        self._length = length
        return length

    def open(self, seq: int, packet: Buffer) -> bytes:
        end = 4 + self._length
        _check_wire_size(packet, end)
        return bytes(packet[5 : _payload_end(packet[4], self._length, 5)])


def null_sealer() -> PacketSealer:
    return _NullSealer()


def null_opener() -> PacketOpener:
    return _NullOpener()


# --- aes-gcm@openssh.com ---------------------------------------------------------------------------------

_GCM_TAG_SIZE = 16
_GCM_SMALL_PACKET = 4096  # below: encrypt() and a join beat a preallocated packet and encrypt_into
_U64_MASK = (1 << 64) - 1


class _GcmBase:
    """RFC 5647 nonce: 4-byte fixed field + 64-bit invocation counter, incremented once per packet."""

    __slots__ = ("_aead", "_counter", "_fixed")

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._aead = AESGCM(key)
        self._fixed = iv[:4]
        self._counter = int.from_bytes(iv[4:], "big")

    def _next_nonce(self) -> bytes:
        counter = self._counter
        self._counter = (counter + 1) & _U64_MASK
        return self._fixed + _pack_u64(counter)


class _GcmSealer(_GcmBase):
    __slots__ = ()

    def seal(self, seq: int, payload_parts: Sequence[Buffer]) -> bytes:
        size = _payload_size(payload_parts)
        padding = _padding_length(1 + size, 16)
        length_field = _pack_u32(1 + size + padding)
        plaintext = b"".join((_PAD_BYTE[padding], *payload_parts, _ZEROS[:padding]))
        nonce = self._next_nonce()
        if size < _GCM_SMALL_PACKET:  # a forward's opens, EOFs and CLOSEs
            return length_field + self._aead.encrypt(nonce, plaintext, length_field)
        # Encrypted straight behind the length field: no second copy of a big packet to prepend it.
        packet = bytearray(4 + len(plaintext) + _GCM_TAG_SIZE)
        packet[:4] = length_field
        with memoryview(packet) as out:
            self._aead.encrypt_into(nonce, plaintext, length_field, out[4:])
        return packet  # type: ignore[return-value]  # a bytearray: what the socket takes, one copy fewer


class _GcmOpener(_GcmBase):
    __slots__ = ("_length",)
    header_size = 4
    mac_size = _GCM_TAG_SIZE

    def __init__(self, key: bytes, iv: bytes) -> None:
        super().__init__(key, iv)
        self._length = 0

    def packet_length(self, seq: int, header: Buffer) -> int:
        length = _unpack_u32(header)[0]
        _check_length(length, False, 16)
        self._length = length
        return length

    def open(self, seq: int, packet: Buffer) -> bytes:
        return bytes(self.open_view(seq, packet))

    def open_view(self, seq: int, packet: Buffer) -> memoryview:
        """As open(), without copying the payload out of the decrypted body (the transport's data path)."""
        length = self._length
        _check_wire_size(packet, 4 + length + _GCM_TAG_SIZE)
        view = memoryview(packet)
        try:
            body = self._aead.decrypt(self._next_nonce(), view[4:], view[:4])
        except InvalidTag:
            raise MACError() from None
        return memoryview(body)[1 : _payload_end(body[0], length, 1)]


# --- chacha20-poly1305@openssh.com -----------------------------------------------------------------------

# cryptography's ChaCha20 takes 16 bytes: the block counter (little-endian) then the nonce. OpenSSH's variant
# uses a 64-bit counter and the sequence number as a 64-bit big-endian nonce; counters here stay far below
# 2**32 (a packet is at most MAX_PACKET_LENGTH bytes), so the two layouts agree.
_CHACHA_BLOCK0 = (0).to_bytes(8, "little")
_POLY1305_TAG_SIZE = 16


class _ChachaBase:
    """K_2 (first 32 key bytes) encrypts the body and keys Poly1305; K_1 (last 32) encrypts the length."""

    __slots__ = ("_length_key", "_main_key")

    def __init__(self, key: bytes) -> None:
        self._main_key = key[:32]
        self._length_key = key[32:]

    def _length_cipher(self, nonce: bytes) -> CipherContext:
        return Cipher(algorithms.ChaCha20(self._length_key, _CHACHA_BLOCK0 + nonce), None).encryptor()

    def _main_cipher(self, nonce: bytes) -> tuple[CipherContext, bytes]:
        """The body cipher positioned at block 1, and the Poly1305 key from block 0 of the same stream."""
        context = Cipher(algorithms.ChaCha20(self._main_key, _CHACHA_BLOCK0 + nonce), None).encryptor()
        poly_key = context.update(_ZEROS)[:32]  # consumes all of block 0, so the body starts at block 1
        return context, poly_key


class _ChachaSealer(_ChachaBase):
    __slots__ = ()

    def seal(self, seq: int, payload_parts: Sequence[Buffer]) -> bytes:
        size = _payload_size(payload_parts)
        padding = _padding_length(1 + size, 8)
        nonce = _pack_u64(seq)
        encrypted_length = self._length_cipher(nonce).update(_pack_u32(1 + size + padding))
        body_cipher, poly_key = self._main_cipher(nonce)
        plaintext = b"".join((_PAD_BYTE[padding], *payload_parts, _ZEROS[:padding]))
        encrypted = encrypted_length + body_cipher.update(plaintext)
        # One-shot Poly1305: a fraction of the per-packet cost of an object with two updates.
        return encrypted + Poly1305.generate_tag(poly_key, encrypted)


class _ChachaOpener(_ChachaBase):
    __slots__ = ("_length",)
    header_size = 4
    mac_size = _POLY1305_TAG_SIZE

    def __init__(self, key: bytes) -> None:
        super().__init__(key)
        self._length = 0

    def packet_length(self, seq: int, header: Buffer) -> int:
        length = _unpack_u32(self._length_cipher(_pack_u64(seq)).update(header[:4]))[0]
        _check_length(length, False, 8)
        self._length = length
        return length

    def open(self, seq: int, packet: Buffer) -> bytes:
        return bytes(self.open_view(seq, packet))

    def open_view(self, seq: int, packet: Buffer) -> memoryview:
        """As open(), without copying the payload out of the decrypted body (the transport's data path)."""
        length = self._length
        end = 4 + length
        _check_wire_size(packet, end + _POLY1305_TAG_SIZE)
        view = memoryview(packet)
        body_cipher, poly_key = self._main_cipher(_pack_u64(seq))
        try:
            Poly1305.verify_tag(poly_key, view[:end], bytes(view[end:]))  # constant-time compare inside
        except InvalidSignature:
            raise MACError() from None
        body = body_cipher.update(view[4:end])
        return memoryview(body)[1 : _payload_end(body[0], length, 1)]


# --- aes-ctr + hmac (RFC 4253 6.4 mac-then-encrypt, or OpenSSH's encrypt-then-mac) -----------------------


class _CtrBase:
    """One AES-CTR context per direction: the counter runs on across packets (RFC 4344)."""

    __slots__ = ("_cipher", "_hmac", "mac_size")

    def __init__(self, key: bytes, iv: bytes, mac: MacInfo, mac_key: bytes, decrypt: bool) -> None:
        cipher = Cipher(algorithms.AES(key), modes.CTR(iv))
        self._cipher = cipher.decryptor() if decrypt else cipher.encryptor()
        # Keyed once; each packet works on a copy, which skips re-deriving the HMAC pads.
        self._hmac = hmac.HMAC(mac_key, _MAC_HASHES[mac.name]())
        self.mac_size = mac.digest_size

    def _mac(self, seq: int, *data: Buffer) -> bytes:
        context = self._hmac.copy()
        context.update(_pack_u32(seq))
        for chunk in data:
            context.update(chunk)
        return context.finalize()


class _CtrEtmSealer(_CtrBase):
    """Length in clear; MAC over seq || length || ciphertext; alignment excludes the length."""

    __slots__ = ()

    def seal(self, seq: int, payload_parts: Sequence[Buffer]) -> bytes:
        size = _payload_size(payload_parts)
        padding = _padding_length(1 + size, 16)
        length_field = _pack_u32(1 + size + padding)
        encrypted = self._cipher.update(b"".join((_PAD_BYTE[padding], *payload_parts, _ZEROS[:padding])))
        return b"".join((length_field, encrypted, self._mac(seq, length_field, encrypted)))


class _CtrEtmOpener(_CtrBase):
    __slots__ = ("_length",)
    header_size = 4

    def __init__(self, key: bytes, iv: bytes, mac: MacInfo, mac_key: bytes, decrypt: bool) -> None:
        super().__init__(key, iv, mac, mac_key, decrypt)
        self._length = 0

    def packet_length(self, seq: int, header: Buffer) -> int:
        length = _unpack_u32(header)[0]
        _check_length(length, False, 16)
        self._length = length
        return length

    def open(self, seq: int, packet: Buffer) -> bytes:
        length = self._length
        end = 4 + length
        _check_wire_size(packet, end + self.mac_size)
        view = memoryview(packet)
        if not compare_digest(self._mac(seq, view[:end]), view[end:]):
            raise MACError()
        body = self._cipher.update(view[4:end])
        return body[1 : _payload_end(body[0], length, 1)]


class _CtrSealer(_CtrBase):
    """MAC over seq || plaintext packet, then the whole packet (length included) is encrypted."""

    __slots__ = ("_random_padding",)

    def __init__(self, key: bytes, iv: bytes, mac: MacInfo, mac_key: bytes, decrypt: bool) -> None:
        super().__init__(key, iv, mac, mac_key, decrypt)
        self._random_padding = _RandomPadding()  # the padding is MACed plaintext: keep it unpredictable

    def seal(self, seq: int, payload_parts: Sequence[Buffer]) -> bytes:
        size = _payload_size(payload_parts)
        padding = _padding_length(5 + size, 16)
        header = _pack_u32(1 + size + padding) + _PAD_BYTE[padding]
        plaintext = b"".join((header, *payload_parts, self._random_padding.take(padding)))
        return b"".join((self._cipher.update(plaintext), self._mac(seq, plaintext)))


class _CtrOpener(_CtrBase):
    __slots__ = ("_first_block", "_length")
    header_size = 16

    def __init__(self, key: bytes, iv: bytes, mac: MacInfo, mac_key: bytes, decrypt: bool) -> None:
        super().__init__(key, iv, mac, mac_key, decrypt)
        self._length = 0
        self._first_block = b""

    def packet_length(self, seq: int, header: Buffer) -> int:
        first_block = self._cipher.update(header[:16])
        length = _unpack_u32(first_block)[0]
        _check_length(length, True, 16)  # also guarantees the packet covers the whole first block
        self._first_block = first_block
        self._length = length
        return length

    def open(self, seq: int, packet: Buffer) -> bytes:
        end = 4 + self._length
        _check_wire_size(packet, end + self.mac_size)
        view = memoryview(packet)
        first_block = self._first_block
        rest = self._cipher.update(view[16:end])
        if not compare_digest(self._mac(seq, first_block, rest), view[end:]):
            raise MACError()
        payload_end = _payload_end(first_block[4], self._length, 5)
        if payload_end <= 16:
            return first_block[5:payload_end]
        return first_block[5:] + rest[: payload_end - 16]


# --- factories -------------------------------------------------------------------------------------------


def _cipher_info(cipher: str) -> CipherInfo:
    info = CIPHERS.get(cipher)
    if info is None:
        raise ValueError(f"unsupported cipher {cipher!r}")
    return info


def _mac_info(cipher: str, mac: str | None, mac_key: bytes) -> MacInfo:
    info = MACS.get(mac) if mac is not None else None
    if info is None:
        raise ValueError(f"{cipher} needs one of the supported MACs, not {mac!r}")
    if len(mac_key) != info.key_size:
        raise ValueError(f"{info.name}: expected a {info.key_size}-byte key")
    return info


def new_sealer(cipher: str, mac: str | None, key: bytes, iv: bytes, mac_key: bytes) -> PacketSealer:
    """Sealer for one direction's new keys. ``mac``/``mac_key`` are ignored for the AEAD ciphers."""
    if cipher == "none":
        return _NullSealer()
    info = _cipher_info(cipher)
    _check_sizes(info, key, iv)
    if info.name == "chacha20-poly1305@openssh.com":
        return _ChachaSealer(key)
    if info.aead:
        return _GcmSealer(key, iv)
    mac_info = _mac_info(cipher, mac, mac_key)
    sealer_type = _CtrEtmSealer if mac_info.etm else _CtrSealer
    return sealer_type(key, iv, mac_info, mac_key, False)


def new_opener(cipher: str, mac: str | None, key: bytes, iv: bytes, mac_key: bytes) -> PacketOpener:
    """Opener for one direction's new keys. ``mac``/``mac_key`` are ignored for the AEAD ciphers."""
    if cipher == "none":
        return _NullOpener()
    info = _cipher_info(cipher)
    _check_sizes(info, key, iv)
    if info.name == "chacha20-poly1305@openssh.com":
        return _ChachaOpener(key)
    if info.aead:
        return _GcmOpener(key, iv)
    mac_info = _mac_info(cipher, mac, mac_key)
    opener_type = _CtrEtmOpener if mac_info.etm else _CtrOpener
    return opener_type(key, iv, mac_info, mac_key, True)
