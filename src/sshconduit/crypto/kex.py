"""Key-exchange methods and key derivation (RFC 4253 7-8, RFC 5656, RFC 8731, RFC 8268, mlkem768x25519).

Each method is a small key-agreement object; ``KexClient``/``KexServer`` wrap one exchange of messages 30/31
and compute the exchange hash H. Negotiation, NEWKEYS and signature checks belong to the transport layer.

Exchange hash (RFC 4253 8, RFC 5656 4): HASH(string V_C || string V_S || string I_C || string I_S ||
string K_S || client public || server public || K), where the public values are strings for the ECDH family
(curve25519, nistp*, the ML-KEM hybrid) and mpints for the finite-field groups, and K is an mpint except for
the ML-KEM hybrid, where it is a string.
"""

from __future__ import annotations

import functools
import hmac
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519

from .. import messages, wire
from ..errors import KexError, ProtocolError

# --- hashing ---

_HASH_ALGORITHMS: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def _digest(hash_name: str, *parts: bytes) -> bytes:
    try:
        hasher = hashes.Hash(_HASH_ALGORITHMS[hash_name]())
    except KeyError:
        raise ValueError(f"unknown kex hash {hash_name!r}") from None
    for part in parts:
        hasher.update(part)
    return hasher.finalize()


def derive_key(
    hash_name: str, shared_secret: bytes, exchange_hash: bytes, session_id: bytes, letter: bytes, size: int
) -> bytes:
    """RFC 4253 7.2: K1 = HASH(K || H || letter || session_id), Kn = HASH(K || H || K1 || ... || Kn-1).

    ``shared_secret`` is K already encoded (mpint or string), as in KexOutcome.
    """
    key = _digest(hash_name, shared_secret, exchange_hash, letter, session_id)
    while len(key) < size:
        key += _digest(hash_name, shared_secret, exchange_hash, key)
    return key[:size]


# --- the public interface's data ---


@dataclass(frozen=True)
class ExchangeContext:
    """The strings every exchange hash starts with."""

    client_version: bytes  # V_C, without CR LF
    server_version: bytes  # V_S
    client_kexinit: bytes  # I_C: whole KEXINIT payload as sent (message number included)
    server_kexinit: bytes  # I_S

    def hash_prefix(self) -> bytes:
        return b"".join(
            wire.string(field)
            for field in (self.client_version, self.server_version, self.client_kexinit, self.server_kexinit)
        )


@dataclass(frozen=True, repr=False)
class KexOutcome:
    hash_name: str  # "sha1" (group14-sha1 only) | "sha256" | "sha384" | "sha512"
    shared_secret: bytes  # K, encoded as it enters the hash and key derivation
    exchange_hash: bytes  # H
    host_key_blob: bytes  # K_S
    signature: bytes  # from the reply (client) / made by us (server)

    def __repr__(self) -> str:  # keep K out of logs and tracebacks
        return f"KexOutcome(hash_name={self.hash_name!r}, exchange_hash={self.exchange_hash.hex()})"


# --- key agreements: one object per method, one private value per exchange ---


class _ClientSecret(ABC):
    """The client's ephemeral secret for one exchange."""

    public: bytes  # the client's public value as carried in message 30 (raw, before string/mpint framing)

    @abstractmethod
    def shared_secret(self, server_public: bytes) -> bytes:
        """K, encoded, from the server's public value; KexError if that value is unacceptable."""


class _Agreement(ABC):
    """A key-agreement primitive; public values are bytes (for mpint methods: unsigned big-endian)."""

    def __init__(self, hash_name: str, mpint_publics: bool = False) -> None:
        self.hash_name = hash_name
        self.mpint_publics = mpint_publics  # DH groups: messages 30/31 carry e/f as mpints

    @abstractmethod
    def client_start(self) -> _ClientSecret: ...

    @abstractmethod
    def server_respond(self, client_public: bytes) -> tuple[bytes, bytes]:
        """(server public value, encoded K) for the client's public value."""


def _mpint_from_unsigned(value: bytes) -> bytes:
    return wire.mpint(int.from_bytes(value, "big"))


def _x25519_shared(private_key: x25519.X25519PrivateKey, peer_public: bytes) -> bytes:
    """The raw 32-byte X25519 output; RFC 8731 3 requires aborting on the all-zero value."""
    if len(peer_public) != 32:
        raise KexError("curve25519 public key must be 32 bytes")
    try:
        shared = private_key.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # OpenSSL refuses low-order points (all-zero result)
        raise KexError("curve25519 shared secret is zero") from None
    if hmac.compare_digest(shared, bytes(32)):
        raise KexError("curve25519 shared secret is zero")
    return shared


class _X25519Secret(_ClientSecret):
    def __init__(self) -> None:
        self._private_key = x25519.X25519PrivateKey.generate()
        self.public = self._private_key.public_key().public_bytes_raw()

    def shared_secret(self, server_public: bytes) -> bytes:
        # RFC 8731 3.1: the 32 bytes read as an unsigned big-endian integer, then mpint
        return _mpint_from_unsigned(_x25519_shared(self._private_key, server_public))


class _X25519(_Agreement):
    def client_start(self) -> _ClientSecret:
        return _X25519Secret()

    def server_respond(self, client_public: bytes) -> tuple[bytes, bytes]:
        server = _X25519Secret()
        return server.public, server.shared_secret(client_public)


class _NistSecret(_ClientSecret):
    def __init__(self, curve: ec.EllipticCurve) -> None:
        self._curve = curve
        self._private_key = ec.generate_private_key(curve)
        # RFC 5656 3.1: SEC1 uncompressed point
        self.public = self._private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def shared_secret(self, server_public: bytes) -> bytes:
        # Only the uncompressed form is allowed (RFC 5656 3.1); the loader checks the point is on the curve.
        if not server_public or server_public[0] != 4:
            raise KexError("ECDH public key is not an uncompressed point")
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(self._curve, server_public)
            shared_x = self._private_key.exchange(ec.ECDH(), peer)
        except ValueError:
            raise KexError("invalid ECDH public key") from None
        return _mpint_from_unsigned(shared_x)  # RFC 5656 4: K is the x coordinate as an mpint


class _Nist(_Agreement):
    def __init__(self, hash_name: str, curve: ec.EllipticCurve) -> None:
        super().__init__(hash_name)
        self._curve = curve

    def client_start(self) -> _ClientSecret:
        return _NistSecret(self._curve)

    def server_respond(self, client_public: bytes) -> tuple[bytes, bytes]:
        server = _NistSecret(self._curve)
        return server.public, server.shared_secret(client_public)


MLKEM768_PUBLIC_SIZE = 1184
MLKEM768_CIPHERTEXT_SIZE = 1088
X25519_SIZE = 32


def _hybrid_secret(hash_name: str, mlkem_secret: bytes, x25519_secret: bytes) -> bytes:
    # K = HASH(K_PQ || K_CL), carried as a string (not an mpint) in H and in key derivation
    return wire.string(_digest(hash_name, mlkem_secret, x25519_secret))


class _MlkemX25519Secret(_ClientSecret):
    def __init__(self, hash_name: str) -> None:
        self._hash_name = hash_name
        self._mlkem_key = mlkem.MLKEM768PrivateKey.generate()
        self._x25519_key = x25519.X25519PrivateKey.generate()
        # C_INIT = ML-KEM-768 encapsulation key || X25519 public key
        self.public = self._mlkem_key.public_key().public_bytes_raw() + self._x25519_key.public_key().public_bytes_raw()

    def shared_secret(self, server_public: bytes) -> bytes:
        # S_REPLY = ML-KEM-768 ciphertext || X25519 public key
        if len(server_public) != MLKEM768_CIPHERTEXT_SIZE + X25519_SIZE:
            raise KexError("mlkem768x25519 server reply has the wrong length")
        try:
            mlkem_secret = self._mlkem_key.decapsulate(server_public[:MLKEM768_CIPHERTEXT_SIZE])
        except ValueError:
            raise KexError("invalid ML-KEM ciphertext") from None
        x25519_secret = _x25519_shared(self._x25519_key, server_public[MLKEM768_CIPHERTEXT_SIZE:])
        return _hybrid_secret(self._hash_name, mlkem_secret, x25519_secret)


class _MlkemX25519(_Agreement):
    def client_start(self) -> _ClientSecret:
        return _MlkemX25519Secret(self.hash_name)

    def server_respond(self, client_public: bytes) -> tuple[bytes, bytes]:
        if len(client_public) != MLKEM768_PUBLIC_SIZE + X25519_SIZE:
            raise KexError("mlkem768x25519 client public key has the wrong length")
        try:
            # the loader runs FIPS 203's encapsulation-key check (coefficients reduced mod q)
            peer_mlkem = mlkem.MLKEM768PublicKey.from_public_bytes(client_public[:MLKEM768_PUBLIC_SIZE])
        except ValueError:
            raise KexError("invalid ML-KEM public key") from None
        mlkem_secret, ciphertext = peer_mlkem.encapsulate()
        x25519_key = x25519.X25519PrivateKey.generate()
        x25519_secret = _x25519_shared(x25519_key, client_public[MLKEM768_PUBLIC_SIZE:])
        server_public = ciphertext + x25519_key.public_key().public_bytes_raw()
        return server_public, _hybrid_secret(self.hash_name, mlkem_secret, x25519_secret)


# RFC 3526 MODP groups, generator 2: p = 2^N - 2^(N-64) - 1 + 2^64 * (floor(2^(N-130) * pi) + offset).
# Built from the RFC's own definition rather than pasted hex; tests check them against an independent copy.
_MODP_OFFSETS = {2048: 124476, 4096: 240904, 8192: 4743158}


def _pi_scaled(bits: int) -> int:
    """floor(pi * 2^bits), by Machin's formula in integer arithmetic (64 guard bits absorb rounding)."""
    guard = 64
    one = 1 << (bits + guard)

    def arctan_inverse(x: int) -> int:
        total, term, n, sign, x_squared = 0, one // x, 1, 1, x * x
        while term:
            total += sign * (term // n)
            term //= x_squared
            n += 2
            sign = -sign
        return total

    return (16 * arctan_inverse(5) - 4 * arctan_inverse(239)) >> guard


@functools.cache
def modp_prime(bits: int) -> int:
    """The RFC 3526 MODP prime of ``bits`` bits (2048, 4096 or 8192)."""
    offset = _MODP_OFFSETS[bits]
    return (1 << bits) - (1 << (bits - 64)) - 1 + (1 << 64) * (_pi_scaled(bits - 130) + offset)


_DH_GENERATOR = 2


class _DhSecret(_ClientSecret):
    # Builtin pow: pyca's FFDH is deprecated and slated for removal; the brief allows modular exponentiation.
    def __init__(self, prime: int, exponent_bits: int) -> None:
        self._prime = prime
        # x in [2^(n-1), 2^n): twice the hash size in bits, as OpenSSH sizes its exponents
        self._exponent = secrets.randbits(exponent_bits) | (1 << (exponent_bits - 1))
        public = pow(_DH_GENERATOR, self._exponent, prime)
        self.public = public.to_bytes((public.bit_length() + 7) // 8, "big")

    def shared_secret(self, server_public: bytes) -> bytes:
        peer = int.from_bytes(server_public, "big")
        # RFC 4253 8: values outside [1, p-1] must not be accepted; 1 and p-1 give a trivial secret
        if not 1 < peer < self._prime - 1:
            raise KexError("DH public value out of range")
        return wire.mpint(pow(peer, self._exponent, self._prime))


class _Dh(_Agreement):
    def __init__(self, hash_name: str, prime_bits: int) -> None:
        super().__init__(hash_name, mpint_publics=True)
        self._prime_bits = prime_bits
        self._exponent_bits = max(512, 2 * _HASH_ALGORITHMS[hash_name].digest_size * 8)

    def client_start(self) -> _ClientSecret:
        return _DhSecret(modp_prime(self._prime_bits), self._exponent_bits)

    def server_respond(self, client_public: bytes) -> tuple[bytes, bytes]:
        server = _DhSecret(modp_prime(self._prime_bits), self._exponent_bits)
        return server.public, server.shared_secret(client_public)


_METHODS: dict[str, _Agreement] = {
    "mlkem768x25519-sha256": _MlkemX25519("sha256"),
    "curve25519-sha256": _X25519("sha256"),
    "curve25519-sha256@libssh.org": _X25519("sha256"),
    "ecdh-sha2-nistp256": _Nist("sha256", ec.SECP256R1()),
    "ecdh-sha2-nistp384": _Nist("sha384", ec.SECP384R1()),
    "ecdh-sha2-nistp521": _Nist("sha512", ec.SECP521R1()),
    "diffie-hellman-group16-sha512": _Dh("sha512", 4096),
    "diffie-hellman-group18-sha512": _Dh("sha512", 8192),
    "diffie-hellman-group14-sha256": _Dh("sha256", 2048),
    "diffie-hellman-group14-sha1": _Dh("sha1", 2048),
}


def mlkem_available() -> bool:
    """Whether pyca's OpenSSL does ML-KEM (3.5 and later: pyca's own wheels from 48 on). A cryptography built on
    an older OpenSSL has the module but refuses the key, so the hybrid is then not offered, as by an OpenSSH
    built without it; offering it would end the first exchange with a peer that chose it."""
    try:
        mlkem.MLKEM768PrivateKey.generate()
    except UnsupportedAlgorithm:
        return False
    return True


def offered_methods(with_mlkem: bool) -> tuple[str, ...]:
    """The methods this build can run, in OpenSSH 9.9's preference order."""
    return tuple(name for name in _METHODS if with_mlkem or not name.startswith("mlkem"))


KEX_ALGORITHMS: tuple[str, ...] = offered_methods(mlkem_available())  # supported
DEFAULT_KEX_ALGORITHMS: tuple[str, ...] = tuple(
    name for name in KEX_ALGORITHMS if name != "diffie-hellman-group14-sha1"
)


# --- messages 30/31: strings for the ECDH family, mpints for DH groups ---


def _public_field(agreement: _Agreement, public: bytes) -> bytes:
    """The public value framed as it appears in messages 30/31 and in H."""
    return _mpint_from_unsigned(public) if agreement.mpint_publics else wire.string(public)


def _unsigned_from_mpint(value: int) -> bytes:
    if value <= 0:
        raise KexError("DH public value out of range")
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _encode_init(agreement: _Agreement, public: bytes) -> bytes:
    if agreement.mpint_publics:
        return messages.KexdhInit(int.from_bytes(public, "big")).encode()
    return messages.KexEcdhInit(public).encode()


def _decode_init(agreement: _Agreement, payload: bytes) -> bytes:
    if agreement.mpint_publics:
        return _unsigned_from_mpint(messages.decode_as(messages.KexdhInit, payload).e)
    return messages.decode_as(messages.KexEcdhInit, payload).client_public


def _encode_reply(agreement: _Agreement, host_key_blob: bytes, public: bytes, signature: bytes) -> bytes:
    if agreement.mpint_publics:
        return messages.KexdhReply(host_key_blob, int.from_bytes(public, "big"), signature).encode()
    return messages.KexEcdhReply(host_key_blob, public, signature).encode()


def _decode_reply(agreement: _Agreement, payload: bytes) -> tuple[bytes, bytes, bytes]:
    """(K_S, server public value, signature)."""
    if agreement.mpint_publics:
        dh_reply = messages.decode_as(messages.KexdhReply, payload)
        return dh_reply.host_key, _unsigned_from_mpint(dh_reply.f), dh_reply.signature
    ecdh_reply = messages.decode_as(messages.KexEcdhReply, payload)
    return ecdh_reply.host_key, ecdh_reply.server_public, ecdh_reply.signature


def _exchange_hash(
    agreement: _Agreement,
    ctx: ExchangeContext,
    host_key_blob: bytes,
    client_public: bytes,
    server_public: bytes,
    shared_secret: bytes,
) -> bytes:
    return _digest(
        agreement.hash_name,
        ctx.hash_prefix(),
        wire.string(host_key_blob),
        _public_field(agreement, client_public),
        _public_field(agreement, server_public),
        shared_secret,
    )


def _agreement(name: str) -> _Agreement:
    try:
        return _METHODS[name]
    except KeyError:
        raise KexError(f"unsupported key exchange method {name!r}") from None


# --- one exchange, each side ---


class KexClient:
    """The client side of one key exchange: send ``init_message()``, then feed the reply (message 31)."""

    def __init__(self, name: str, ctx: ExchangeContext) -> None:
        self.name = name
        self._agreement = _agreement(name)
        self._ctx = ctx
        self._secret: _ClientSecret | None = self._agreement.client_start()

    def init_message(self) -> bytes:
        """Payload of message 30."""
        if self._secret is None:
            raise ProtocolError("key exchange already finished")
        return _encode_init(self._agreement, self._secret.public)

    def handle_reply(self, payload: bytes) -> KexOutcome:
        """Payload of message 31 -> K and H. The signature over H is NOT checked here."""
        secret = self._secret
        if secret is None:
            raise ProtocolError("unexpected key exchange reply")
        self._secret = None  # one reply per exchange; drop the private value either way
        host_key_blob, server_public, signature = _decode_reply(self._agreement, payload)
        shared_secret = secret.shared_secret(server_public)
        exchange_hash = _exchange_hash(
            self._agreement, self._ctx, host_key_blob, secret.public, server_public, shared_secret
        )
        return KexOutcome(self._agreement.hash_name, shared_secret, exchange_hash, host_key_blob, signature)


class KexServer:
    """The server side of one key exchange: feed message 30, send the returned message 31."""

    def __init__(self, name: str, ctx: ExchangeContext, host_key_blob: bytes, sign: Callable[[bytes], bytes]) -> None:
        self.name = name
        self._agreement = _agreement(name)
        self._ctx = ctx
        self._host_key_blob = host_key_blob
        self._sign = sign
        self._done = False

    def handle_init(self, payload: bytes) -> tuple[bytes, KexOutcome]:
        """Payload of message 30 -> (payload of message 31, outcome)."""
        if self._done:
            raise ProtocolError("unexpected key exchange init")
        self._done = True
        client_public = _decode_init(self._agreement, payload)
        server_public, shared_secret = self._agreement.server_respond(client_public)
        exchange_hash = _exchange_hash(
            self._agreement, self._ctx, self._host_key_blob, client_public, server_public, shared_secret
        )
        signature = self._sign(exchange_hash)
        reply = _encode_reply(self._agreement, self._host_key_blob, server_public, signature)
        outcome = KexOutcome(self._agreement.hash_name, shared_secret, exchange_hash, self._host_key_blob, signature)
        return reply, outcome


def start_client_kex(name: str, ctx: ExchangeContext) -> KexClient:
    return KexClient(name, ctx)


def start_server_kex(
    name: str, ctx: ExchangeContext, host_key_blob: bytes, sign: Callable[[bytes], bytes]
) -> KexServer:
    return KexServer(name, ctx, host_key_blob, sign)
