"""Host and user keys: SSH key blobs, signatures, fingerprints, key files.

RFC 4253 section 6.6 (ssh-rsa), RFC 8332 (rsa-sha2-256/512), RFC 5656 (ecdsa-sha2-nistp*), RFC 8709
(ssh-ed25519). Every primitive comes from pyca cryptography; this module only speaks the SSH encodings.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from .. import limits, wire
from ..errors import KeyError_, ProtocolError

ED25519 = "ssh-ed25519"
RSA = "ssh-rsa"
RSA_SHA256 = "rsa-sha2-256"
RSA_SHA512 = "rsa-sha2-512"

# key type -> (cryptography curve, SSH curve identifier, hash for signatures)
_ECDSA_CURVES: dict[str, tuple[ec.EllipticCurve, bytes, hashes.HashAlgorithm]] = {
    "ecdsa-sha2-nistp256": (ec.SECP256R1(), b"nistp256", hashes.SHA256()),
    "ecdsa-sha2-nistp384": (ec.SECP384R1(), b"nistp384", hashes.SHA384()),
    "ecdsa-sha2-nistp521": (ec.SECP521R1(), b"nistp521", hashes.SHA512()),
}
_RSA_HASHES: dict[str, hashes.HashAlgorithm] = {
    RSA_SHA512: hashes.SHA512(),
    RSA_SHA256: hashes.SHA256(),
    RSA: hashes.SHA1(),  # verification only, for old peers
}
_RSA_SIGNING_ALGORITHMS = (RSA_SHA512, RSA_SHA256)

KEY_TYPES: tuple[str, ...] = (ED25519, *_ECDSA_CURVES, RSA)
_LABELS = {ED25519: "ED25519", RSA: "RSA"} | dict.fromkeys(_ECDSA_CURVES, "ECDSA")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class PublicKey:
    """One public key, identified by its SSH blob."""

    __slots__ = ("_crypto_key", "blob", "key_type", "label")

    def __init__(self, key_type: str, blob: bytes, crypto_key: Any) -> None:
        self.key_type = key_type
        self.blob = blob
        self.label = _LABELS[key_type]
        self._crypto_key = crypto_key

    @property
    def crypto_key(self) -> Any:
        """The cryptography public key object."""
        return self._crypto_key

    @property
    def bits(self) -> int:
        key = self._crypto_key
        if isinstance(key, rsa.RSAPublicKey):
            return key.key_size
        if isinstance(key, ec.EllipticCurvePublicKey):
            return key.curve.key_size
        return 256

    def signature_algorithms(self) -> tuple[str, ...]:
        if self.key_type == RSA:
            return (RSA_SHA512, RSA_SHA256, RSA)
        return (self.key_type,)

    def verify(self, data: bytes, signature_blob: bytes, algorithm: str | None = None) -> bool:
        """True only for a well-formed, valid signature by this key (of `algorithm`, when given)."""
        try:
            reader = wire.Reader(signature_blob)
            sig_alg = reader.text()
            sig = reader.string()
            reader.expect_end()
        except ProtocolError:
            return False
        if sig_alg not in self.signature_algorithms() or (algorithm is not None and sig_alg != algorithm):
            return False
        try:
            self._verify_raw(sig_alg, sig, data)
        except (InvalidSignature, ProtocolError, ValueError):
            return False
        return True

    def _verify_raw(self, sig_alg: str, sig: bytes, data: bytes) -> None:
        key = self._crypto_key
        if isinstance(key, ed25519.Ed25519PublicKey):
            if len(sig) != 64:
                raise InvalidSignature
            key.verify(sig, data)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            reader = wire.Reader(sig)
            r, s = reader.mpint(), reader.mpint()
            reader.expect_end()
            if r <= 0 or s <= 0:
                raise InvalidSignature
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(_ECDSA_CURVES[self.key_type][2]))
        else:
            modulus_len = (key.key_size + 7) // 8
            if len(sig) > modulus_len:
                raise InvalidSignature
            # Some implementations strip leading zero bytes of the signature; OpenSSH accepts them padded.
            sig = sig.rjust(modulus_len, b"\x00")
            key.verify(sig, data, padding.PKCS1v15(), _RSA_HASHES[sig_alg])

    def fingerprint(self) -> str:
        """SHA256 fingerprint exactly as ``ssh-keygen -l`` prints it."""
        digest = hashes.Hash(hashes.SHA256())
        digest.update(self.blob)
        return "SHA256:" + _b64(digest.finalize()).rstrip("=")

    def openssh_line(self, comment: str = "") -> str:
        line = f"{self.key_type} {_b64(self.blob)}"
        return f"{line} {comment}" if comment else line

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and self.blob == other.blob

    def __hash__(self) -> int:
        return hash(self.blob)

    def __repr__(self) -> str:
        return f"<PublicKey {self.key_type} {self.fingerprint()}>"


def parse_public_blob(blob: bytes) -> PublicKey:
    """Decode an SSH public key blob; KeyError_ for anything we do not understand."""
    try:
        reader = wire.Reader(blob)
        key_type = reader.string().decode("ascii", "replace")
        crypto_key: Any
        if key_type == ED25519:
            raw = reader.string()
            if len(raw) != 32:
                raise KeyError_("bad ssh-ed25519 key length")
            crypto_key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
        elif key_type in _ECDSA_CURVES:
            curve, curve_id, _hash = _ECDSA_CURVES[key_type]
            if reader.string() != curve_id:
                raise KeyError_(f"curve does not match key type {key_type}")
            point = reader.string()
            if not point.startswith(b"\x04"):  # RFC 5656 3.1: uncompressed points only
                raise KeyError_("ECDSA point is not in uncompressed form")
            crypto_key = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        elif key_type == RSA:
            e, n = reader.mpint(), reader.mpint()
            if not limits.RSA_MIN_BITS <= n.bit_length() <= limits.RSA_MAX_BITS:
                raise KeyError_(f"RSA key of {n.bit_length()} bits is outside the allowed sizes")
            if e < 3 or e % 2 == 0:
                raise KeyError_("bad RSA public exponent")
            crypto_key = rsa.RSAPublicNumbers(e, n).public_key()
        else:
            raise KeyError_(f"unsupported key type {key_type[:64]!r}")
        reader.expect_end()
    except ProtocolError as exc:
        raise KeyError_(f"malformed public key blob: {exc}") from None
    except ValueError as exc:  # cryptography rejects a point not on the curve, a bad modulus, ...
        raise KeyError_(f"invalid {key_type} public key: {exc}") from None
    return PublicKey(key_type, bytes(blob), crypto_key)


def parse_public_line(line: str) -> tuple[PublicKey, str]:
    """Parse ``type base64 [comment]`` (an id_*.pub or known_hosts key field) into (key, comment)."""
    parts = line.strip().split(None, 2)
    if len(parts) < 2:
        raise KeyError_("public key line needs a key type and base64 data")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise KeyError_("public key data is not valid base64") from None
    key = parse_public_blob(blob)
    if key.key_type != parts[0]:
        raise KeyError_(f"key type {parts[0][:64]!r} does not match the key data ({key.key_type})")
    return key, parts[2].strip() if len(parts) > 2 else ""


def load_public_key_file(path: str | Path) -> PublicKey:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise KeyError_(f"{path}: {exc.strerror}") from None
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                return parse_public_line(line)[0]
            except KeyError_ as exc:
                raise KeyError_(f"{path}: {exc}") from None
    raise KeyError_(f"{path}: no public key found")


def public_key_from_crypto(crypto_key: Any) -> PublicKey:
    """Wrap a cryptography public key object (Ed25519, ECDSA P-256/384/521, RSA)."""
    try:
        line = crypto_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    except (AttributeError, ValueError, UnsupportedAlgorithm):
        raise KeyError_(f"unsupported key {type(crypto_key).__name__}") from None
    return parse_public_line(line.decode("ascii"))[0]


class PrivateKey:
    """A private key that makes SSH signature blobs."""

    __slots__ = ("_crypto_key", "public")

    def __init__(self, crypto_key: Any) -> None:
        if not isinstance(crypto_key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise KeyError_(f"unsupported private key type {type(crypto_key).__name__}")
        self._crypto_key = crypto_key
        self.public = public_key_from_crypto(crypto_key.public_key())

    @property
    def crypto_key(self) -> Any:
        return self._crypto_key

    def sign(self, data: bytes, algorithm: str | None = None) -> bytes:
        """SSH signature blob; ssh-rsa (SHA-1) is refused: we only verify those."""
        alg = algorithm or self.public.signature_algorithms()[0]
        key = self._crypto_key
        if isinstance(key, rsa.RSAPrivateKey):
            if alg not in _RSA_SIGNING_ALGORITHMS:
                raise KeyError_(f"cannot sign with {alg} using an RSA key")
            sig = key.sign(data, padding.PKCS1v15(), _RSA_HASHES[alg])
        elif alg != self.public.key_type:
            raise KeyError_(f"cannot sign with {alg} using a {self.public.key_type} key")
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            sig = key.sign(data)
        else:
            r, s = decode_dss_signature(key.sign(data, ec.ECDSA(_ECDSA_CURVES[alg][2])))
            sig = wire.mpint(r) + wire.mpint(s)
        return wire.string(alg) + wire.string(sig)

    def __repr__(self) -> str:
        return f"<PrivateKey {self.public.key_type} {self.public.fingerprint()}>"


class PassphraseRequired(KeyError_):
    """The key file is encrypted and no passphrase was given."""


_OPENSSH_BEGIN = b"-----BEGIN OPENSSH PRIVATE KEY-----"
_OPENSSH_END = b"-----END OPENSSH PRIVATE KEY-----"


def _openssh_key_is_encrypted(data: bytes) -> bool:
    """Read the cipher name from an openssh-key-v1 container (PROTOCOL.key)."""
    try:
        body = data.split(_OPENSSH_BEGIN, 1)[1].split(_OPENSSH_END, 1)[0]
        raw = base64.b64decode(b"".join(body.split()))
    except (IndexError, binascii.Error, ValueError):
        return False
    magic = b"openssh-key-v1\x00"
    if not raw.startswith(magic):
        return False
    try:
        return wire.Reader(raw, len(magic)).string() != b"none"
    except ProtocolError:
        return False


def _is_encrypted(data: bytes) -> bool:
    if _OPENSSH_BEGIN in data:
        return _openssh_key_is_encrypted(data)
    return b"ENCRYPTED" in data  # "Proc-Type: 4,ENCRYPTED" or "BEGIN ENCRYPTED PRIVATE KEY"


def load_private_key(path: str | Path, passphrase: bytes | None = None) -> PrivateKey:
    """Load an OpenSSH-format or PEM (PKCS#1, SEC1, PKCS#8) private key file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyError_(f"{path}: {exc.strerror}") from None
    encrypted = _is_encrypted(data)
    if encrypted and not passphrase:
        raise PassphraseRequired(f"{path}: key is encrypted and no passphrase was given")
    password = passphrase if encrypted else None
    try:
        if _OPENSSH_BEGIN in data:
            crypto_key = serialization.load_ssh_private_key(data, password)
        else:
            crypto_key = serialization.load_pem_private_key(data, password)
    except TypeError:  # cryptography's "password was not given" for an encryption we did not spot
        raise PassphraseRequired(f"{path}: key is encrypted and no passphrase was given") from None
    except (ValueError, UnsupportedAlgorithm):
        why = "wrong passphrase or corrupt key" if encrypted else "invalid format or unsupported key"
        raise KeyError_(f"{path}: cannot load private key: {why}") from None
    try:
        return PrivateKey(crypto_key)
    except KeyError_ as exc:
        raise KeyError_(f"{path}: {exc}") from None


def generate_private_key(key_type: str = ED25519, rsa_bits: int = 3072) -> PrivateKey:
    if key_type == ED25519:
        return PrivateKey(ed25519.Ed25519PrivateKey.generate())
    if key_type in _ECDSA_CURVES:
        return PrivateKey(ec.generate_private_key(_ECDSA_CURVES[key_type][0]))
    if key_type == RSA:
        return PrivateKey(rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits))
    raise KeyError_(f"cannot generate key type {key_type!r}")


def _write_private_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the file may have existed with looser permissions
        os.write(fd, data)
    finally:
        os.close(fd)


def write_private_key(key: PrivateKey, path: str | Path, comment: str = "", passphrase: bytes | None = None) -> None:
    """Write `path` (OpenSSH format, mode 0600, encrypted when a passphrase is given) and `path`.pub."""
    path = Path(path)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    data = key.crypto_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, encryption)
    _write_private_file(path, data)
    Path(f"{path}.pub").write_text(key.public.openssh_line(comment) + "\n", encoding="utf-8")
