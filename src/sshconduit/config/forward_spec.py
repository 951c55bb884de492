"""Forwarding specifications as ssh(1) takes them for -L, -R and -D (and LocalForward & co. in ssh_config).

Fields are separated by ``:``; an IPv6 address goes in brackets; ``\\:`` escapes a colon; a field holding a
``/`` is a unix-socket path. The forms:

    local/remote:  [bind:]port:host:hostport   [bind:]port:/socket   /socket:host:hostport   /socket:/socket
    remote only:   [bind:]port                 (dynamic SOCKS forwarding done on the client side)
    dynamic:       [bind:]port                 /socket
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

_KINDS = ("local", "remote", "dynamic")


@dataclass(frozen=True)
class ForwardSpec:
    listen_host: str | None
    listen_port: int | None
    listen_path: str | None  # unix-socket listener
    connect_host: str | None
    connect_port: int | None
    connect_path: str | None

    @property
    def is_dynamic(self) -> bool:
        """SOCKS forwarding: the target is chosen per connection (-D, or -R with a port only)."""
        return self.connect_host is None and self.connect_path is None


@dataclass(frozen=True)
class _Field:
    text: str
    is_path: bool


def parse_forward(spec: str, kind: str = "local") -> ForwardSpec:
    """Parse one -L/-R/-D argument; ssh_config's "listen target" (two words) form is accepted too.

    Raises ValueError("Bad local forwarding specification '...'") as ssh does.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown forwarding kind {kind!r}")
    error = ValueError(f"Bad {kind} forwarding specification '{spec}'")
    words = spec.split()
    if len(words) == 2 and kind != "dynamic":
        text = f"{words[0]}:{words[1]}"  # "LocalForward 1100 mail.example.com:110"
    elif len(words) == 1:
        text = words[0]
    else:
        raise error
    fields = _split_fields(text)
    if fields is None:
        raise error
    try:
        result = _assign(fields, kind)
    except ValueError:
        raise error from None
    if result is None:
        raise error
    return result


def _split_fields(text: str) -> list[_Field] | None:
    """At most 4 fields; None when the text does not split cleanly."""
    fields: list[_Field] = []
    pos = 0
    while pos < len(text) and len(fields) < 4:
        if text[pos] == "[":
            end = text.find("]", pos + 1)
            if end < 0 or (end + 1 < len(text) and text[end + 1] != ":"):
                return None
            fields.append(_Field(text[pos + 1 : end], False))
            pos = end + 2
            continue
        chars: list[str] = []
        is_path = False
        while pos < len(text) and text[pos] != ":":
            if text[pos] == "\\":
                pos += 1
                if pos == len(text):
                    return None
            elif text[pos] == "/":
                is_path = True
            chars.append(text[pos])
            pos += 1
        pos += 1  # past the ':'
        fields.append(_Field("".join(chars), is_path))
    if pos < len(text) or not fields:
        return None  # a fifth field, or nothing at all
    return fields


def _port(text: str, *, listen: bool) -> int:
    if text.isdigit():
        port = int(text)
    else:
        try:
            port = socket.getservbyname(text, "tcp")
        except OSError:
            raise ValueError(text) from None
    if port > 65535 or (port == 0 and not listen):
        raise ValueError(text)
    return port


def _assign(fields: list[_Field], kind: str) -> ForwardSpec | None:
    n = len(fields)
    first = fields[0]
    if kind == "dynamic" or (kind == "remote" and n <= 2 and not fields[-1].is_path):
        if n == 1 and first.is_path:
            return ForwardSpec(None, None, first.text, None, None, None)
        if n == 1:
            return ForwardSpec(None, _port(first.text, listen=kind == "remote"), None, None, None, None)
        if n == 2:
            port = _port(fields[1].text, listen=kind == "remote")
            return ForwardSpec(first.text, port, None, None, None, None)
        return None
    last = fields[-1]
    if n == 2:
        if not last.is_path:
            return None
        if first.is_path:
            return ForwardSpec(None, None, first.text, None, None, last.text)
        return ForwardSpec(None, _port(first.text, listen=True), None, None, None, last.text)
    if n == 3:
        if first.is_path:
            return ForwardSpec(None, None, first.text, fields[1].text, _port(last.text, listen=False), None)
        if last.is_path:
            return ForwardSpec(first.text, _port(fields[1].text, listen=True), None, None, None, last.text)
        return ForwardSpec(
            None, _port(first.text, listen=True), None, fields[1].text, _port(last.text, listen=False), None
        )
    if n == 4:
        return ForwardSpec(
            first.text,
            _port(fields[1].text, listen=True),
            None,
            fields[2].text,
            _port(last.text, listen=False),
            None,
        )
    return None


def format_forward(spec: ForwardSpec) -> str:
    """The form `ssh -G` prints: ``[bind]:port [host]:port``, paths bare."""
    if spec.listen_path is not None:
        listen = spec.listen_path
    elif spec.listen_host is not None:
        listen = f"[{spec.listen_host}]:{spec.listen_port}"
    else:
        listen = str(spec.listen_port)
    if spec.connect_path is not None:
        return f"{listen} {spec.connect_path}"
    if spec.connect_host is not None:
        return f"{listen} [{spec.connect_host}]:{spec.connect_port}"
    return listen
