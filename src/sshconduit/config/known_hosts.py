"""known_hosts files (sshd(8) "SSH_KNOWN_HOSTS FILE FORMAT").

Each line: ``[@marker] hosts keytype base64 [comment]``. The hosts field is either a comma list of patterns
(``*``, ``?``, ``!negation``, ``[host]:port`` for ports other than 22) or one hashed entry
``|1|base64(salt)|base64(HMAC-SHA1(salt, host))``. Bad lines are skipped, never fatal.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from ..crypto.keys import PublicKey, parse_public_line
from ..errors import KeyError_
from .patterns import match_hostname

_HASH_MAGIC = "|1|"
_SHA1_LEN = 20


class HostKeyStatus(Enum):
    KNOWN = "known"
    UNKNOWN = "unknown"
    CHANGED = "changed"
    REVOKED = "revoked"


@dataclass(frozen=True)
class KnownHostEntry:
    hosts: str  # the raw hosts field
    key: PublicKey
    marker: str | None  # None, "@revoked" or "@cert-authority"
    source: str  # "path:line"

    def matches(self, name: str) -> bool:
        """`name` is already in lookup form: ``host`` or ``[host]:port``, lower case."""
        if self.hosts.startswith(_HASH_MAGIC):
            return _hashed_field_matches(self.hosts, name)
        return match_hostname(name, self.hosts) is True


def host_lookup_name(host: str, port: int) -> str:
    """The name known_hosts stores: ``host`` for port 22, else ``[host]:port``."""
    host = host.lower()
    return host if port == 22 else f"[{host}]:{port}"


def _hmac_sha1(salt: bytes, name: str) -> bytes:
    mac = crypto_hmac.HMAC(salt, hashes.SHA1())
    mac.update(name.encode("utf-8"))
    return mac.finalize()


def hash_host_name(name: str, salt: bytes | None = None) -> str:
    """``|1|salt|hash`` for a lookup name, as ``ssh-keygen -H`` writes it."""
    salt = salt if salt is not None else secrets.token_bytes(_SHA1_LEN)
    encoded = base64.b64encode
    return f"{_HASH_MAGIC}{encoded(salt).decode()}|{encoded(_hmac_sha1(salt, name)).decode()}"


def _hashed_field_matches(field: str, name: str) -> bool:
    parts = field[len(_HASH_MAGIC) :].split("|")
    if len(parts) != 2:
        return False
    try:
        salt = base64.b64decode(parts[0], validate=True)
        expected = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return False
    if len(salt) != _SHA1_LEN or len(expected) != _SHA1_LEN:
        return False
    return hmac.compare_digest(_hmac_sha1(salt, name), expected)


def parse_known_hosts_line(line: str, source: str) -> KnownHostEntry | None:
    """One line to an entry; None for blank lines, comments and anything malformed."""
    fields = line.strip().split(None, 1)
    if not fields or fields[0].startswith("#"):
        return None
    marker = None
    if fields[0].startswith("@"):
        marker = fields[0].lower()
        if marker not in ("@revoked", "@cert-authority") or len(fields) < 2:
            return None
        fields = fields[1].split(None, 1)
    if len(fields) < 2:
        return None
    try:
        key, _comment = parse_public_line(fields[1])
    except KeyError_:
        return None  # unsupported key type, certificate, garbage
    return KnownHostEntry(fields[0], key, marker, source)


def read_known_hosts(path: str | Path) -> Iterator[KnownHostEntry]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return  # a missing or unreadable file holds no keys
    for number, line in enumerate(text.splitlines(), 1):
        entry = parse_known_hosts_line(line, f"{path}:{number}")
        if entry is not None:
            yield entry


class KnownHosts:
    """The known_hosts files ssh consults (UserKnownHostsFile, GlobalKnownHostsFile), reread on each check."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [Path(p).expanduser() for p in paths]

    def entries_for(self, host: str, port: int, aliases: Sequence[str] = ()) -> list[KnownHostEntry]:
        names = [host_lookup_name(name, port) for name in (host, *aliases)]
        return [
            entry
            for path in self.paths
            for entry in read_known_hosts(path)
            if any(entry.matches(name) for name in names)
        ]

    def check(
        self, host: str, port: int, key: PublicKey, aliases: Sequence[str] = ()
    ) -> tuple[HostKeyStatus, str | None]:
        """KNOWN / REVOKED with the matching entry, CHANGED with the first conflicting one, or UNKNOWN.

        `aliases` are other names for the same host (its IP address, HostKeyAlias); any may match.
        A revocation wins over everything; cert-authority lines do not vouch for plain keys.
        """
        entries = self.entries_for(host, port, aliases)
        for entry in entries:
            if entry.marker == "@revoked" and entry.key == key:
                return HostKeyStatus.REVOKED, entry.source
        conflict: str | None = None
        for entry in entries:
            if entry.marker is not None:
                continue
            if entry.key == key:
                return HostKeyStatus.KNOWN, entry.source
            if conflict is None and entry.key.key_type == key.key_type:
                conflict = entry.source
        if conflict is not None:
            return HostKeyStatus.CHANGED, conflict
        return HostKeyStatus.UNKNOWN, None

    def add(self, path: str | Path, host: str, port: int, key: PublicKey, hashed: bool = False) -> None:
        """Append one entry, creating the file (0600) and its directory (0700) when missing."""
        path = Path(path).expanduser()
        name = host_lookup_name(host, port)
        hosts_field = hash_host_name(name) if hashed else name
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            prefix = b""
            size = os.fstat(fd).st_size
            if size:  # keep the previous last line whole if it lacks its newline
                os.lseek(fd, size - 1, os.SEEK_SET)
                if os.read(fd, 1) != b"\n":
                    prefix = b"\n"
            os.write(fd, prefix + f"{hosts_field} {key.openssh_line()}\n".encode())
        finally:
            os.close(fd)
