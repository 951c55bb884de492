"""authorized_keys files (sshd(8) "AUTHORIZED_KEYS FILE FORMAT").

Each line: ``[options] keytype base64 [comment]``. Options are comma separated, names case-insensitive,
values double-quoted with ``\\"`` for a quote. As in sshd, a line with an unknown or malformed option is
invalid as a whole: it grants nothing, and we report it as a warning naming ``file:line``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ..crypto.keys import KEY_TYPES, PublicKey, parse_public_line
from ..errors import KeyError_
from .patterns import match_host_and_address

# Key types OpenSSH knows and we do not use: such lines have no options; they are skipped with a warning.
_OTHER_KEY_TYPES = ("ssh-dss", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
_ENV_NAME = re.compile(r"[A-Za-z0-9_]+\Z")
_OPTION_NAME = re.compile(r"[A-Za-z0-9-]+")
_EXPIRY = re.compile(r"(\d{8})(\d{4})?(\d{2})?(Z?)\Z", re.IGNORECASE)


class _BadOption(Exception):
    pass


def _expiry_timestamp(value: str) -> float:
    """sshd's parse_absolute_time: YYYYMMDD[HHMM[SS]], local time unless it ends in Z (UTC)."""
    m = _EXPIRY.match(value)
    if m is None:
        raise _BadOption("invalid expiry-time")
    try:
        parsed = datetime.strptime(m.group(1) + (m.group(2) or "0000") + (m.group(3) or "00"), "%Y%m%d%H%M%S")
    except ValueError:
        raise _BadOption("invalid expiry-time") from None
    if m.group(4):
        return parsed.replace(tzinfo=UTC).timestamp()
    return parsed.timestamp()  # a naive datetime is local time


@dataclass
class KeyOptions:
    """Options of one authorized_keys line; the allows_* methods give the effective permissions."""

    restrict: bool = False
    no_port_forwarding: bool = False
    port_forwarding: bool = False
    no_pty: bool = False
    pty: bool = False
    no_agent_forwarding: bool = False
    agent_forwarding: bool = False
    no_x11_forwarding: bool = False
    x11_forwarding: bool = False
    no_user_rc: bool = False
    user_rc: bool = False
    cert_authority: bool = False
    permitopen: list[str] = field(default_factory=list)
    permitlisten: list[str] = field(default_factory=list)
    from_patterns: str | None = None
    command: str | None = None
    environment: list[str] = field(default_factory=list)
    expiry_time: str | None = None
    principals: str | None = None
    tunnel: str | None = None

    def _allows(self, granted: bool, denied: bool) -> bool:
        # "restrict" clears every permission; a later positive option grants it back (the parser keeps order)
        return granted or not (denied or self.restrict)

    def allows_port_forwarding(self) -> bool:
        return self._allows(self.port_forwarding, self.no_port_forwarding)

    def allows_pty(self) -> bool:
        return self._allows(self.pty, self.no_pty)

    def allows_agent_forwarding(self) -> bool:
        return self._allows(self.agent_forwarding, self.no_agent_forwarding)

    def allows_x11_forwarding(self) -> bool:
        return self._allows(self.x11_forwarding, self.no_x11_forwarding)

    def allows_user_rc(self) -> bool:
        return self._allows(self.user_rc, self.no_user_rc)

    def expires_at(self) -> float | None:
        """Expiry as a POSIX timestamp (local time, or UTC with a trailing Z)."""
        if self.expiry_time is None:
            return None
        try:
            return _expiry_timestamp(self.expiry_time)
        except _BadOption:
            return 0.0  # set by hand to something unreadable: fail closed, treat as long expired

    def is_expired(self, now: float | None = None) -> bool:
        expiry = self.expires_at()
        return expiry is not None and (time.time() if now is None else now) >= expiry


@dataclass
class AuthorizedKey:
    key: PublicKey
    options: KeyOptions
    comment: str
    source: str  # "path:line"


# flag name -> (attribute set True, attribute set False); every flag also takes a "no-" prefix
_FLAGS = {
    "port-forwarding": ("port_forwarding", "no_port_forwarding"),
    "pty": ("pty", "no_pty"),
    "agent-forwarding": ("agent_forwarding", "no_agent_forwarding"),
    "x11-forwarding": ("x11_forwarding", "no_x11_forwarding"),
    "user-rc": ("user_rc", "no_user_rc"),
}
_IGNORED_FLAGS = ("no-touch-required", "touch-required", "verify-required")  # FIDO keys only
_SINGLE_VALUED = {"command": "command", "from": "from_patterns", "principals": "principals"}


def _read_quoted(text: str, pos: int) -> tuple[str, int]:
    """Read ``"value"`` at text[pos]; only ``\\"`` is an escape, other backslashes stay."""
    if pos >= len(text) or text[pos] != '"':
        raise _BadOption("missing start quote")
    out: list[str] = []
    pos += 1
    while pos < len(text):
        char = text[pos]
        if char == "\\" and text[pos + 1 : pos + 2] == '"':
            out.append('"')
            pos += 2
        elif char == '"':
            return "".join(out), pos + 1
        else:
            out.append(char)
            pos += 1
    raise _BadOption("missing end quote")


def _check_permit(value: str, listen: bool) -> None:
    """permitopen="host:port" (port may be *); permitlisten="[host:]port"."""
    host, sep, port = value.rpartition(":")
    if not sep:
        if not listen:
            raise _BadOption("missing ':' in permitopen")
        port = value
    elif not host:
        raise _BadOption("missing host in permit")
    if host.startswith("[") != host.endswith("]"):
        raise _BadOption("unbalanced brackets in permit host")
    if port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
        raise _BadOption("invalid permit port")


def _apply_option(options: KeyOptions, name: str, value: str | None) -> None:
    if name == "restrict":
        options.restrict = True
        options.port_forwarding = options.pty = options.agent_forwarding = False
        options.x11_forwarding = options.user_rc = False
        return
    if name == "cert-authority":
        options.cert_authority = True
        return
    if name in _IGNORED_FLAGS:
        return
    bare = name[3:] if name.startswith("no-") else name
    if bare in _FLAGS and value is None:
        granted, denied = _FLAGS[bare]
        positive = bare == name
        setattr(options, granted, positive)
        setattr(options, denied, not positive)
        return
    if value is None:
        raise _BadOption(f"unknown or incomplete option {name!r}")
    if name in _SINGLE_VALUED:
        attr = _SINGLE_VALUED[name]
        if getattr(options, attr) is not None:
            raise _BadOption(f'multiple "{name}" clauses')
        setattr(options, attr, value)
    elif name == "expiry-time":
        # the earliest of several expiry times counts, as in sshd
        expires = _expiry_timestamp(value)
        if options.expiry_time is None or expires < _expiry_timestamp(options.expiry_time):
            options.expiry_time = value
    elif name == "environment":
        env_name, sep, _ = value.partition("=")
        if not sep or not _ENV_NAME.match(env_name):
            raise _BadOption("invalid environment string")
        options.environment.append(value)
    elif name in ("permitopen", "permitlisten"):
        _check_permit(value, listen=name == "permitlisten")
        getattr(options, name).append(value)
    elif name == "tunnel":
        if not (value.isdigit() or value.lower() == "any"):
            raise _BadOption("invalid tun device")
        options.tunnel = value
    else:
        raise _BadOption(f"unknown option {name!r}")


def parse_options(text: str) -> tuple[KeyOptions, int]:
    """Parse the options at the start of `text`; returns them and the index where the key begins."""
    options = KeyOptions()
    pos = 0
    while True:
        m = _OPTION_NAME.match(text, pos)
        if m is None:
            raise _BadOption("bad option name")
        name = m.group().lower()
        pos = m.end()
        value = None
        if text.startswith("=", pos):
            value, pos = _read_quoted(text, pos + 1)
        _apply_option(options, name, value)
        if pos >= len(text) or text[pos] in " \t":
            return options, pos
        if text[pos] != ",":
            raise _BadOption("unknown key option")
        pos += 1
        if pos >= len(text):
            raise _BadOption("unexpected end-of-options")


def _parse_line(line: str) -> tuple[PublicKey, KeyOptions, str]:
    first = line.split(None, 1)[0]
    if first in KEY_TYPES or first in _OTHER_KEY_TYPES or first.endswith("-cert-v01@openssh.com"):
        options = KeyOptions()
        key_text = line
    else:
        options, end = parse_options(line)
        key_text = line[end:]
    key, comment = parse_public_line(key_text)
    return key, options, comment


def parse_authorized_keys(text: str, source: str = "authorized_keys") -> tuple[list[AuthorizedKey], list[str]]:
    """(valid entries, one warning per skipped line naming ``source:line``)."""
    keys: list[AuthorizedKey] = []
    warnings: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        try:
            key, options, comment = _parse_line(line)
        except _BadOption as exc:
            warnings.append(f"{where}: bad key options: {exc}")
            continue
        except KeyError_ as exc:
            warnings.append(f"{where}: {exc}")
            continue
        keys.append(AuthorizedKey(key, options, comment, where))
    return keys, warnings


def load_authorized_keys(path: str | Path) -> tuple[list[AuthorizedKey], list[str]]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        return [], [f"{path}: {exc.strerror}"]
    return parse_authorized_keys(text, str(path))


def find_authorized_key(
    keys: Sequence[AuthorizedKey], key: PublicKey, client_addr: str | None, client_host: str | None = None
) -> AuthorizedKey | None:
    """The first entry for `key` whose from= admits the client, that is not expired and not a CA line."""
    for entry in keys:
        if entry.key != key or entry.options.cert_authority or entry.options.is_expired():
            continue
        patterns = entry.options.from_patterns
        if patterns is not None and not match_host_and_address(client_host, client_addr, patterns):
            continue
        return entry
    return None
