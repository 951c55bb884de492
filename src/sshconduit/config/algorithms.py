"""Algorithm lists in config files: ``a,b``, ``+a`` (append), ``-a*`` (remove), ``^a`` (put first).

The name tables hold what OpenSSH 9.2 knows, so that any list an OpenSSH config names is accepted here; the
transport intersects the result with what it implements when it builds its KEXINIT.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError
from .patterns import match_pattern_list

KNOWN_CIPHERS: tuple[str, ...] = (
    "3des-cbc",
    "aes128-cbc",
    "aes192-cbc",
    "aes256-cbc",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
)
DEFAULT_CIPHERS: tuple[str, ...] = (
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
)

KNOWN_MACS: tuple[str, ...] = (
    "hmac-sha1",
    "hmac-sha1-96",
    "hmac-sha2-256",
    "hmac-sha2-512",
    "hmac-md5",
    "hmac-md5-96",
    "umac-64@openssh.com",
    "umac-128@openssh.com",
    "hmac-sha1-etm@openssh.com",
    "hmac-sha1-96-etm@openssh.com",
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "hmac-md5-etm@openssh.com",
    "hmac-md5-96-etm@openssh.com",
    "umac-64-etm@openssh.com",
    "umac-128-etm@openssh.com",
)
DEFAULT_MACS: tuple[str, ...] = (
    "umac-64-etm@openssh.com",
    "umac-128-etm@openssh.com",
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha1-etm@openssh.com",
    "umac-64@openssh.com",
    "umac-128@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
    "hmac-sha1",
)

KNOWN_KEX: tuple[str, ...] = (
    "diffie-hellman-group1-sha1",
    "diffie-hellman-group14-sha1",
    "diffie-hellman-group14-sha256",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group-exchange-sha1",
    "diffie-hellman-group-exchange-sha256",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "sntrup761x25519-sha512",
    "sntrup761x25519-sha512@openssh.com",
    "mlkem768x25519-sha256",
)
# OpenSSH 9.9's default: the post-quantum hybrid first (9.2 on Debian 12 lacks mlkem; the transport
# offers only what it implements, so a 9.2 peer simply negotiates the next one).
DEFAULT_KEX: tuple[str, ...] = (
    "mlkem768x25519-sha256",
    "sntrup761x25519-sha512",
    "sntrup761x25519-sha512@openssh.com",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group-exchange-sha256",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group14-sha256",
)

KNOWN_KEY_ALGORITHMS: tuple[str, ...] = (
    "ssh-ed25519",
    "ssh-ed25519-cert-v01@openssh.com",
    "sk-ssh-ed25519@openssh.com",
    "sk-ssh-ed25519-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp384-cert-v01@openssh.com",
    "ecdsa-sha2-nistp521",
    "ecdsa-sha2-nistp521-cert-v01@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "webauthn-sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
    "ssh-dss-cert-v01@openssh.com",
    "ssh-rsa",
    "ssh-rsa-cert-v01@openssh.com",
    "rsa-sha2-256",
    "rsa-sha2-256-cert-v01@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-512-cert-v01@openssh.com",
)
DEFAULT_KEY_ALGORITHMS: tuple[str, ...] = (
    "ssh-ed25519-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "ecdsa-sha2-nistp384-cert-v01@openssh.com",
    "ecdsa-sha2-nistp521-cert-v01@openssh.com",
    "sk-ssh-ed25519-cert-v01@openssh.com",
    "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "rsa-sha2-512-cert-v01@openssh.com",
    "rsa-sha2-256-cert-v01@openssh.com",
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-256",
)

# keyword (lowercase) -> (default, known names, the word OpenSSH's error message uses)
ALGORITHM_KEYWORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "ciphers": (DEFAULT_CIPHERS, KNOWN_CIPHERS, "cipher"),
    "macs": (DEFAULT_MACS, KNOWN_MACS, "MAC"),
    "kexalgorithms": (DEFAULT_KEX, KNOWN_KEX, "KexAlgorithms"),
    "hostkeyalgorithms": (DEFAULT_KEY_ALGORITHMS, KNOWN_KEY_ALGORITHMS, "key types"),
    "pubkeyacceptedalgorithms": (DEFAULT_KEY_ALGORITHMS, KNOWN_KEY_ALGORITHMS, "key types"),
}


def apply_algorithm_spec(default: Sequence[str], supported: Sequence[str], spec: str, what: str) -> tuple[str, ...]:
    """Resolve one algorithm-list value against ``default``; ``what`` names the list in errors.

    Names given to add, prepend or replace must be in ``supported``; removal patterns (``-``) are not
    checked, as in OpenSSH, so ``-*cbc`` works whatever is compiled in.
    """
    if not spec or spec in "+-^":
        raise ConfigError(f"Bad SSH2 {what} spec '{spec}'.")
    modifier = spec[0] if spec[0] in "+-^" else ""
    body = spec[1:] if modifier else spec
    names = body.split(",")
    if modifier == "-":
        return tuple(name for name in default if not match_pattern_list(name, body))
    unknown = [name for name in names if name not in supported]
    if unknown or "" in names:
        raise ConfigError(f"Bad SSH2 {what} spec '{spec}'.")
    if modifier == "+":
        combined = [*default, *names]
    elif modifier == "^":
        combined = [*names, *default]
    else:
        combined = names
    return tuple(dict.fromkeys(combined))  # drop duplicates, keep first position
