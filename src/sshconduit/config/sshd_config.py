"""sshd_config(5) for conduitd: the same files OpenSSH's sshd reads, with the same precedence.

The first value given for a keyword wins (a few keywords accumulate, as in sshd). ``Match`` blocks are kept
aside and applied per connection by :meth:`ServerConfig.for_connection`; values from matching blocks override
the main section. Keywords sshd knows but conduitd does not implement load with a warning.

``AuditLog <path>`` is conduitd's own keyword (sshd rejects it): a file that receives one JSON line per
connection, authentication and channel event.
"""

from __future__ import annotations

import dataclasses
import glob
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .algorithms import ALGORITHM_KEYWORDS, apply_algorithm_spec
from .lexer import ConfigLine, LineError, parse_flag, parse_rekey_limit, parse_time, read_config_lines
from .patterns import match_address, match_hostname, match_pattern_list

SSHD_CONFIG_DIR = "/etc/ssh"  # where relative Include paths point, as in sshd
DEFAULT_HOST_KEYS = [f"/etc/ssh/ssh_host_{kind}_key" for kind in ("rsa", "ecdsa", "ed25519")]
MAX_INCLUDE_DEPTH = 16

_LOG_LEVELS = ("QUIET", "FATAL", "ERROR", "INFO", "VERBOSE", "DEBUG", "DEBUG1", "DEBUG2", "DEBUG3")
_FACILITIES = ("DAEMON", "USER", "AUTH", "AUTHPRIV", *(f"LOCAL{i}" for i in range(8)))


@dataclass
class _MatchBlock:
    criteria: list[tuple[str, str]]  # (lowercase criterion, argument); ("all", "") for Match All
    lines: list[ConfigLine] = field(default_factory=list)


@dataclass
class ServerConfig:
    """Effective sshd settings; attribute names are the keywords in snake_case."""

    port: list[int] = field(default_factory=lambda: [22])
    listen_addresses: list[tuple[str, int | None]] = field(default_factory=list)  # empty: every address
    address_family: str = "any"
    host_keys: list[str] = field(default_factory=lambda: list(DEFAULT_HOST_KEYS))
    authorized_keys_files: list[str] = field(
        default_factory=lambda: [".ssh/authorized_keys", ".ssh/authorized_keys2"]
    )  # %h %u %% kept as text: the session layer expands them per user
    pubkey_authentication: bool = True
    password_authentication: bool = True
    kbd_interactive_authentication: bool = True
    permit_root_login: str = "prohibit-password"
    permit_empty_passwords: bool = False
    allow_users: list[str] = field(default_factory=list)
    deny_users: list[str] = field(default_factory=list)
    allow_groups: list[str] = field(default_factory=list)
    deny_groups: list[str] = field(default_factory=list)
    allow_tcp_forwarding: str = "yes"  # yes | no | local | remote ("all" is read as yes)
    allow_stream_local_forwarding: str = "yes"
    disable_forwarding: bool = False
    gateway_ports: str = "no"  # no | yes | clientspecified
    permit_open: list[str] = field(default_factory=lambda: ["any"])  # "any", "none" or host:port entries
    permit_listen: list[str] = field(default_factory=lambda: ["any"])  # "any", "none", port or host:port
    stream_local_bind_mask: int = 0o177
    stream_local_bind_unlink: bool = False
    max_auth_tries: int = 6
    max_sessions: int = 10
    max_startups: tuple[int, int, int] = (10, 30, 100)  # start:rate:full
    per_source_max_startups: int | None = None  # None: no per-source limit ("none")
    per_source_net_block_size: tuple[int, int] = (32, 128)  # IPv4:IPv6 prefix bits grouped as one source
    login_grace_time: int = 120  # seconds; 0 = no limit
    client_alive_interval: int = 0
    client_alive_count_max: int = 3
    banner: str | None = None
    log_level: str = "INFO"
    syslog_facility: str = "AUTH"
    pid_file: str | None = "/run/sshd.pid"
    ciphers: tuple[str, ...] = ALGORITHM_KEYWORDS["ciphers"][0]
    macs: tuple[str, ...] = ALGORITHM_KEYWORDS["macs"][0]
    kex_algorithms: tuple[str, ...] = ALGORITHM_KEYWORDS["kexalgorithms"][0]
    rekey_limit: tuple[int | None, int | None] = (None, None)  # bytes, seconds; None: the default
    host_key_algorithms: tuple[str, ...] = ALGORITHM_KEYWORDS["hostkeyalgorithms"][0]
    pubkey_accepted_algorithms: tuple[str, ...] = ALGORITHM_KEYWORDS["pubkeyacceptedalgorithms"][0]
    strict_modes: bool = True
    use_pam: bool = False
    use_privilege_separation: bool = True  # conduitd as root: a process per connection, unprivileged until auth
    permit_tty: bool = True
    permit_user_environment: str = "no"  # yes | no | pattern list
    x11_forwarding: bool = False
    print_motd: bool = True
    print_last_log: bool = True
    tcp_keep_alive: bool = True
    use_dns: bool = False
    subsystems: dict[str, str] = field(default_factory=dict)  # name -> command line
    accept_env: list[str] = field(default_factory=list)
    authentication_methods: list[str] = field(default_factory=lambda: ["any"])
    force_command: str | None = None
    chroot_directory: str | None = None
    audit_log: str | None = None  # conduitd only
    warnings: list[str] = field(default_factory=list)
    _main_lines: list[ConfigLine] = field(default_factory=list, repr=False, compare=False)
    _match_blocks: list[_MatchBlock] = field(default_factory=list, repr=False, compare=False)
    _from_file: set[str] = field(default_factory=set, repr=False, compare=False)  # attrs the lines set

    def listen_endpoints(self) -> list[tuple[str, int]]:
        """(address, port) pairs to bind: ListenAddress without a port takes every Port."""
        if not self.listen_addresses:
            hosts = {"any": ["::", "0.0.0.0"], "inet": ["0.0.0.0"], "inet6": ["::"]}[self.address_family]
            return [(host, port) for host in hosts for port in self.port]
        endpoints: list[tuple[str, int]] = []
        for host, port in self.listen_addresses:
            endpoints.extend([(host, port)] if port is not None else [(host, p) for p in self.port])
        return endpoints

    def for_connection(
        self,
        user: str,
        host: str,
        address: str,
        local_address: str,
        local_port: int,
        groups: Sequence[str] = (),
    ) -> ServerConfig:
        """Apply the Match blocks that fit this connection; returns a new object."""
        context = _MatchContext(user, host, address, local_address, local_port, tuple(groups))
        values: dict[str, Any] = {}
        for block in self._match_blocks:
            if _block_matches(block, context):
                for line in block.lines:
                    _apply_line(line, values, in_match=True)
        if "rekey_limit" in values and values["rekey_limit"][1] is None:  # sshd: a time not given keeps the main one
            values["rekey_limit"] = (values["rekey_limit"][0], self.rekey_limit[1])
        return dataclasses.replace(self, **values)

    def match_values(self, attr: str) -> list[Any]:
        """The values Match blocks give ``attr``, whichever connections they fit."""
        found = []
        for block in self._match_blocks:
            values: dict[str, Any] = {}
            for line in block.lines:
                _apply_line(line, values, in_match=True)
            if attr in values:
                found.append(values[attr])
        return found

    def dump(self) -> str:
        """The effective settings one per line, lowercase keyword first, like ``sshd -T``."""
        out: list[str] = []
        for name, option in _OPTIONS.items():
            if option.alias_of is not None:
                continue
            value = getattr(self, option.attr)
            for text in option.dump(value, self):
                out.append(f"{name.lower()} {text}")
        return "\n".join(out) + "\n"


def default_server_config() -> ServerConfig:
    """sshd's built-in defaults: Port 22 on every address, the three standard host keys."""
    return ServerConfig()


def load_server_config(path: str | Path, options: Sequence[str] = ()) -> ServerConfig:
    """Read an sshd_config file (it must exist); ``options`` are -o strings that take precedence."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    return parse_server_options(options, parse_server_config(text, str(path)))


def parse_server_config(text: str, source: str) -> ServerConfig:
    main_lines: list[ConfigLine] = []
    blocks: list[_MatchBlock] = []
    _flatten(text, source, main_lines, blocks, None, depth=0)
    return _build(main_lines, blocks)


def parse_server_options(options: Sequence[str], cfg: ServerConfig) -> ServerConfig:
    """Apply sshd -o "Keyword=value" options: they come before the file, so they win."""
    if not options:
        return cfg
    option_lines: list[ConfigLine] = []
    for option in options:
        lines = read_config_lines(option, "command-line", first_line=0)
        if len(lines) != 1:
            raise ConfigError(f"command-line: line 0: bad option: {option!r}")
        line = lines[0]
        if line.keyword.lower() in ("match", "include"):
            raise ConfigError(f"command-line: line 0: Directive '{line.keyword}' is not allowed here")
        option_lines.append(line)
    option_values: dict[str, Any] = {}
    warnings = list(cfg.warnings)
    for line in option_lines:
        _apply_line(line, option_values, in_match=False, warnings=warnings)
    # Work on the object as given (a caller may have set attributes by hand): an option replaces the
    # value, except that lists sshd accumulates (Port, HostKey, ...) keep what the file itself gave.
    merged: dict[str, Any] = {}
    for attr, value in option_values.items():
        current = getattr(cfg, attr)
        if attr in cfg._from_file and isinstance(value, list):
            merged[attr] = value + [v for v in current if v not in value]
        elif attr in cfg._from_file and isinstance(value, dict):
            merged[attr] = {**current, **value}
        else:
            merged[attr] = value
    result = dataclasses.replace(cfg, **merged, warnings=warnings)
    result._main_lines = option_lines + cfg._main_lines
    result._match_blocks = cfg._match_blocks
    result._from_file = cfg._from_file | set(option_values)
    return result


def _build(main_lines: list[ConfigLine], blocks: list[_MatchBlock]) -> ServerConfig:
    values: dict[str, Any] = {}
    warnings: list[str] = []
    for line in main_lines:
        _apply_line(line, values, in_match=False, warnings=warnings)
    for block in blocks:  # check every value now, as sshd does at startup, though the block applies later
        scratch: dict[str, Any] = {}
        for line in block.lines:
            _apply_line(line, scratch, in_match=True, warnings=warnings)
    cfg = ServerConfig(**values, warnings=warnings)
    cfg._main_lines = main_lines
    cfg._match_blocks = blocks
    cfg._from_file = set(values)
    return cfg


# ---------------------------------------------------------------- reading files, Include and Match


def _flatten(
    text: str,
    source: str,
    main_lines: list[ConfigLine],
    blocks: list[_MatchBlock],
    block: _MatchBlock | None,
    depth: int,
) -> None:
    """Sort lines into the main section and Match blocks, following Includes in place."""
    for line in read_config_lines(text, source):
        keyword = line.keyword.lower()
        if keyword == "match":
            block = _MatchBlock(_parse_match_criteria(line))
            blocks.append(block)
        elif keyword == "include":
            if not line.args:
                raise line.error("Include missing filename argument")
            for pattern in line.args:
                for included in _expand_include(pattern):
                    if depth + 1 > MAX_INCLUDE_DEPTH:
                        raise line.error("Include nested too deeply")
                    try:
                        content = Path(included).read_text(encoding="utf-8", errors="surrogateescape")
                    except OSError as exc:
                        raise line.error(f"Include {included}: {exc.strerror or exc}") from None
                    # a Match inside the included file ends with that file: the block we are in resumes
                    _flatten(content, included, main_lines, blocks, block, depth + 1)
        elif block is None:
            main_lines.append(line)
        else:
            block.lines.append(line)


def _expand_include(pattern: str) -> list[str]:
    path = os.path.expanduser(pattern)
    if not os.path.isabs(path):
        path = os.path.join(SSHD_CONFIG_DIR, path)
    if glob.has_magic(path):
        return sorted(glob.glob(path))  # no match is fine, as in sshd
    return [path]


_MATCH_CRITERIA = ("user", "group", "host", "address", "localaddress", "localport", "rdomain", "all")


def _parse_match_criteria(line: ConfigLine) -> list[tuple[str, str]]:
    args = line.args
    if not args:
        raise line.error("One or more attributes required for Match")
    if args[0].lower() == "all":
        if len(args) > 1:
            raise line.error("'all' cannot be combined with other Match attributes")
        return [("all", "")]
    criteria: list[tuple[str, str]] = []
    for i in range(0, len(args), 2):
        name = args[i].lower()
        if name not in _MATCH_CRITERIA or name == "all":
            raise line.error(f"Unsupported Match attribute {args[i]}")
        if i + 1 >= len(args) or not args[i + 1]:
            raise line.error(f"Missing Match criteria for {args[i]}")
        value = args[i + 1]
        if name in ("address", "localaddress"):
            _check_address_list(value, line)
        elif name == "localport" and not (value.isdigit() and 0 < int(value) < 65536):
            raise line.error(f"Invalid LocalPort '{value}' on Match line")
        criteria.append((name, value))
    return criteria


@dataclass(frozen=True)
class _MatchContext:
    user: str
    host: str
    address: str
    local_address: str
    local_port: int
    groups: tuple[str, ...]


def _block_matches(block: _MatchBlock, ctx: _MatchContext) -> bool:
    for name, value in block.criteria:
        if name == "all":
            continue
        if name == "user":
            ok = bool(match_pattern_list(ctx.user, value))
        elif name == "group":
            ok = _groups_match(ctx.groups, value)
        elif name == "host":
            ok = bool(match_hostname(ctx.host, value))
        elif name == "address":
            ok = bool(match_address(ctx.address, value))
        elif name == "localaddress":
            ok = bool(match_address(ctx.local_address, value))
        elif name == "localport":
            ok = int(value) == ctx.local_port
        else:  # rdomain: conduitd never runs in a routing domain
            ok = False
        if not ok:
            return False
    return True


def _groups_match(groups: Sequence[str], patterns: str) -> bool:
    # a group hitting a negated pattern vetoes the match, whatever the other groups do (as sshd)
    answers = [match_pattern_list(group, patterns) for group in groups]
    return False not in answers and True in answers


def _check_address_list(value: str, line: ConfigLine) -> None:
    for entry in value.split(","):
        entry = entry.removeprefix("!")
        if "/" in entry:
            try:
                ipaddress.ip_network(entry, strict=True)
            except ValueError:
                raise line.error(f"Invalid Match address argument '{value}'") from None


# ---------------------------------------------------------------- one line -> one value


@dataclass(frozen=True)
class _Option:
    attr: str
    parse: Callable[[ConfigLine], Any]
    mode: str = "first"  # first | append | last | subsystem
    in_match: bool = False
    alias_of: str | None = None
    dump: Callable[[Any, ServerConfig], list[str]] = lambda value, cfg: [_dump_scalar(value)]


def _apply_line(line: ConfigLine, values: dict[str, Any], *, in_match: bool, warnings: list[str] | None = None) -> None:
    name = _CANONICAL.get(line.keyword.lower())
    if name is None:
        raise ConfigError(f"{line.source}: line {line.lineno}: Bad configuration option: {line.keyword}")
    option = _OPTIONS.get(name)
    allowed_in_match = option.in_match if option is not None else name in _UNSUPPORTED_IN_MATCH
    if in_match and not allowed_in_match:
        raise line.error(f"Directive '{name}' is not allowed within a Match block")
    if option is None:
        if warnings is not None:
            warnings.append(f"conduitd: {line.source}:{line.lineno}: keyword '{name}' is not supported and is ignored")
        return
    try:
        value = option.parse(line)
    except LineError as exc:
        raise line.error(str(exc)) from None
    if option.mode == "append":
        values[option.attr] = [*values.get(option.attr, []), *value]
    elif option.mode == "last":
        values[option.attr] = value
    elif option.mode == "subsystem":
        subsystems = values.setdefault(option.attr, {})
        if value[0] in subsystems:
            raise line.error(f"Subsystem '{value[0]}' already defined.")
        subsystems[value[0]] = value[1]
    elif option.attr not in values:
        values[option.attr] = value


def _single(line: ConfigLine) -> str:
    if not line.args:
        raise LineError(f'no argument after keyword "{line.keyword}"')
    if len(line.args) > 1:
        raise LineError(f"keyword {line.keyword} extra arguments at end of line")
    return line.args[0]


def _bad(line: ConfigLine, value: str) -> LineError:
    return LineError(f'invalid value for {_CANONICAL[line.keyword.lower()]}: "{value}"')


def _flag(line: ConfigLine) -> bool:
    value = _single(line)
    result = parse_flag(value)
    if result is None:
        raise _bad(line, value)
    return result


def _privsep_flag(line: ConfigLine) -> bool:
    """yes/no, and "sandbox" (older sshd's seccomp mode, still in old Debian configs) as yes."""
    return True if _single(line).lower() == "sandbox" else _flag(line)


def _choice(*choices: str, aliases: dict[str, str] | None = None) -> Callable[[ConfigLine], str]:
    def parse(line: ConfigLine) -> str:
        value = _single(line).lower()
        value = (aliases or {}).get(value, value)
        if value not in choices:
            raise _bad(line, line.args[0])
        return value

    return parse


def _uppercase_choice(*choices: str) -> Callable[[ConfigLine], str]:
    def parse(line: ConfigLine) -> str:
        value = _single(line).upper()
        if value not in choices:
            raise _bad(line, line.args[0])
        return value

    return parse


def _int(minimum: int = 0) -> Callable[[ConfigLine], int]:
    def parse(line: ConfigLine) -> int:
        value = _single(line)
        if not value.isdigit() or int(value) < minimum or int(value) > 0x7FFFFFFF:
            raise _bad(line, value)
        return int(value)

    return parse


def _time(line: ConfigLine) -> int:
    value = _single(line)
    seconds = parse_time(value)
    if seconds is None:
        raise _bad(line, value)
    return seconds


def _path_or_none(line: ConfigLine) -> str | None:
    value = _single(line)
    return None if value.lower() == "none" else value


def _rest_or_none(line: ConfigLine) -> str | None:
    if not line.rest:
        raise LineError(f'no argument after keyword "{line.keyword}"')
    return None if line.rest.lower() == "none" else line.rest


def _words(line: ConfigLine) -> list[str]:
    return list(line.args)  # may be empty: "AcceptEnv" alone adds nothing, as in sshd


def _nonempty_words(line: ConfigLine) -> list[str]:
    if not line.args:
        raise LineError(f'no argument after keyword "{line.keyword}"')
    return list(line.args)


def _algorithms(keyword: str) -> Callable[[ConfigLine], tuple[str, ...]]:
    default, known, what = ALGORITHM_KEYWORDS[keyword]

    def parse(line: ConfigLine) -> tuple[str, ...]:
        try:
            return apply_algorithm_spec(default, known, _single(line), what)
        except ConfigError as exc:
            raise LineError(str(exc)) from None

    return parse


def _port(line: ConfigLine) -> list[int]:
    value = _single(line)
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise LineError(f"Badly formatted port number: {value}")
    return [int(value)]


def split_host_port(text: str) -> tuple[str, str | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address -> (host, port text)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(text)
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(text)
        return text[1:end], (rest[1:] if rest else None)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    return text, None  # a bare IPv6 address holds many colons


def _listen_address(line: ConfigLine) -> list[tuple[str, int | None]]:
    args = line.args
    if not args:
        raise LineError(f'no argument after keyword "{line.keyword}"')
    # "ListenAddress addr rdomain name": routing domains are accepted and ignored
    if len(args) not in (1, 3) or (len(args) == 3 and args[1].lower() != "rdomain"):
        raise LineError(f"keyword {line.keyword} extra arguments at end of line")
    try:
        host, port_text = split_host_port(args[0])
    except ValueError:
        raise LineError(f"bad address: {args[0]}") from None
    if not host:
        raise LineError(f"bad address: {args[0]}")
    if port_text is None:
        return [(host, None)]
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise LineError("bad port number")
    return [(host, int(port_text))]


def _max_startups(line: ConfigLine) -> tuple[int, int, int]:
    value = _single(line)
    parts = value.split(":")
    if not all(p.isdigit() for p in parts) or len(parts) not in (1, 3):
        raise LineError("Invalid MaxStartups spec.")
    if len(parts) == 1:
        return (int(parts[0]), 30, int(parts[0]))
    start, rate, full = (int(p) for p in parts)
    if start > full or not 1 <= rate <= 100:
        raise LineError("Invalid MaxStartups spec.")
    return (start, rate, full)


def _per_source_max_startups(line: ConfigLine) -> int | None:
    value = _single(line)
    if value == "none":
        return None
    number = value.removeprefix("-")
    if not number.isdigit():
        raise LineError("PerSourceMaxStartups integer value invalid.")
    if value.startswith("-"):
        raise LineError("PerSourceMaxStartups integer value too small.")
    return int(number)


def _net_block_size(line: ConfigLine) -> tuple[int, int]:
    parts = _single(line).split(":")
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise LineError("Invalid PerSourceNetBlockSize spec.")
    # one value: sshd 9.2 takes the IPv6 size as 0 (sshd -T prints "24:0"), so do we
    ipv4, ipv6 = int(parts[0]), int(parts[1]) if len(parts) == 2 else 0
    if ipv4 > 32 or ipv6 > 128:
        raise LineError("Invalid PerSourceNetBlockSize spec.")
    return (ipv4, ipv6)


def _bind_mask(line: ConfigLine) -> int:
    value = _single(line)
    if not value or any(c not in "01234567" for c in value) or int(value, 8) > 0o777:
        raise LineError("Invalid StreamLocalBindMask.")
    return int(value, 8)


def _permit_list(listen: bool) -> Callable[[ConfigLine], list[str]]:
    def parse(line: ConfigLine) -> list[str]:
        args = line.args
        if not args:
            raise LineError(f"missing {line.keyword} specification")
        if len(args) == 1 and args[0].lower() in ("any", "none"):
            return [args[0].lower()]
        for entry in args:
            try:
                split_permit_entry(entry, listen=listen)
            except ValueError:
                raise LineError(f'invalid value for {_CANONICAL[line.keyword.lower()]}: "{entry}"') from None
        return list(args)

    return parse


def split_permit_entry(entry: str, *, listen: bool = False) -> tuple[str | None, int | None]:
    """A PermitOpen/PermitListen entry -> (host or None for "*", port or None for "*").

    PermitListen allows a bare port (the host is then any); PermitOpen requires host:port.
    """
    if listen and (entry.isdigit() or entry == "*"):
        host_text, port_text = "*", entry
    else:
        host_text, port_text_or_none = split_host_port(entry)
        if port_text_or_none is None or not host_text:
            raise ValueError(entry)
        port_text = port_text_or_none
    if port_text == "*":
        port = None
    elif port_text.isdigit() and int(port_text) < 65536:
        port = int(port_text)
    else:
        raise ValueError(entry)
    return (None if host_text == "*" else host_text), port


def _subsystem(line: ConfigLine) -> tuple[str, str]:
    if not line.args:
        raise LineError(f'no argument after keyword "{line.keyword}"')
    if len(line.args) < 2:
        raise LineError("Missing subsystem command.")
    return line.args[0], " ".join(line.args[1:])


def _authentication_methods(line: ConfigLine) -> list[str]:
    args = line.args
    if not args:
        raise LineError(f'no argument after keyword "{line.keyword}"')
    if args == ["any"]:
        return ["any"]
    known = {"publickey", "password", "keyboard-interactive", "hostbased", "gssapi-with-mic", "none"}
    for method_list in args:
        for method in method_list.split(","):
            if method.split(":", 1)[0] not in known:
                raise LineError(f'invalid value for AuthenticationMethods: "{method_list}"')
    return list(args)


def _dump_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "none"
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        return ",".join(value)
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def _dump_each(value: list[Any], cfg: ServerConfig) -> list[str]:
    return [str(v) for v in value]


def _dump_listen(value: list[Any], cfg: ServerConfig) -> list[str]:
    return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in cfg.listen_endpoints()]


_OPTIONS: dict[str, _Option] = {
    "Port": _Option("port", _port, "append", dump=_dump_each),
    "AddressFamily": _Option("address_family", _choice("any", "inet", "inet6")),
    "ListenAddress": _Option("listen_addresses", _listen_address, "append", dump=_dump_listen),
    "HostKey": _Option("host_keys", lambda line: [_single(line)], "append", dump=_dump_each),
    "AuthorizedKeysFile": _Option("authorized_keys_files", _nonempty_words, in_match=True),
    "PubkeyAuthentication": _Option("pubkey_authentication", _flag, in_match=True),
    "PasswordAuthentication": _Option("password_authentication", _flag, in_match=True),
    "KbdInteractiveAuthentication": _Option("kbd_interactive_authentication", _flag, in_match=True),
    "ChallengeResponseAuthentication": _Option(
        "kbd_interactive_authentication", _flag, in_match=True, alias_of="KbdInteractiveAuthentication"
    ),
    "PermitRootLogin": _Option(
        "permit_root_login",
        _choice(
            "yes",
            "prohibit-password",
            "forced-commands-only",
            "no",
            aliases={"without-password": "prohibit-password"},
        ),
        in_match=True,
    ),
    "PermitEmptyPasswords": _Option("permit_empty_passwords", _flag, in_match=True),
    "AllowUsers": _Option("allow_users", _words, "append", in_match=True, dump=_dump_each),
    "DenyUsers": _Option("deny_users", _words, "append", in_match=True, dump=_dump_each),
    "AllowGroups": _Option("allow_groups", _words, "append", in_match=True, dump=_dump_each),
    "DenyGroups": _Option("deny_groups", _words, "append", in_match=True, dump=_dump_each),
    "AllowTcpForwarding": _Option(
        "allow_tcp_forwarding", _choice("yes", "no", "local", "remote", aliases={"all": "yes"}), in_match=True
    ),
    "AllowStreamLocalForwarding": _Option(
        "allow_stream_local_forwarding",
        _choice("yes", "no", "local", "remote", aliases={"all": "yes"}),
        in_match=True,
    ),
    "DisableForwarding": _Option("disable_forwarding", _flag, in_match=True),
    "GatewayPorts": _Option("gateway_ports", _choice("no", "yes", "clientspecified"), in_match=True),
    "PermitOpen": _Option("permit_open", _permit_list(listen=False), in_match=True),
    "PermitListen": _Option("permit_listen", _permit_list(listen=True), in_match=True),
    "StreamLocalBindMask": _Option(
        "stream_local_bind_mask", _bind_mask, in_match=True, dump=lambda v, cfg: [f"{v:04o}"]
    ),
    "StreamLocalBindUnlink": _Option("stream_local_bind_unlink", _flag, in_match=True),
    "MaxAuthTries": _Option("max_auth_tries", _int(), in_match=True),
    "MaxSessions": _Option("max_sessions", _int(), in_match=True),
    "MaxStartups": _Option("max_startups", _max_startups, "last", dump=lambda v, cfg: [":".join(str(n) for n in v)]),
    "PerSourceMaxStartups": _Option("per_source_max_startups", _per_source_max_startups, "last"),
    "PerSourceNetBlockSize": _Option(
        "per_source_net_block_size", _net_block_size, "last", dump=lambda v, cfg: [f"{v[0]}:{v[1]}"]
    ),
    "LoginGraceTime": _Option("login_grace_time", _time),
    "ClientAliveInterval": _Option("client_alive_interval", _time, in_match=True),
    "ClientAliveCountMax": _Option("client_alive_count_max", _int(), in_match=True),
    "Banner": _Option("banner", _path_or_none, in_match=True),
    "LogLevel": _Option("log_level", _uppercase_choice(*_LOG_LEVELS), in_match=True),
    "SyslogFacility": _Option("syslog_facility", _uppercase_choice(*_FACILITIES)),
    "PidFile": _Option("pid_file", _path_or_none),
    "Ciphers": _Option("ciphers", _algorithms("ciphers")),
    "MACs": _Option("macs", _algorithms("macs")),
    "KexAlgorithms": _Option("kex_algorithms", _algorithms("kexalgorithms")),
    "HostKeyAlgorithms": _Option("host_key_algorithms", _algorithms("hostkeyalgorithms")),
    "RekeyLimit": _Option(
        "rekey_limit",
        lambda line: parse_rekey_limit(line.args, "Bad RekeyLimit number"),
        in_match=True,
        dump=lambda v, cfg: [f"{v[0] or 0} {v[1] or 0}"],
    ),
    "PubkeyAcceptedAlgorithms": _Option(
        "pubkey_accepted_algorithms", _algorithms("pubkeyacceptedalgorithms"), in_match=True
    ),
    "PubkeyAcceptedKeyTypes": _Option(
        "pubkey_accepted_algorithms",
        _algorithms("pubkeyacceptedalgorithms"),
        in_match=True,
        alias_of="PubkeyAcceptedAlgorithms",
    ),
    "StrictModes": _Option("strict_modes", _flag),
    "UsePAM": _Option("use_pam", _flag),
    # sshd 9 always separates and calls the keyword deprecated; conduitd as root separates unless it says no
    "UsePrivilegeSeparation": _Option("use_privilege_separation", _privsep_flag, dump=lambda value, cfg: []),
    "PermitTTY": _Option("permit_tty", _flag, in_match=True),
    "PermitUserEnvironment": _Option(
        "permit_user_environment",
        lambda line: {"yes": "yes", "no": "no"}.get(_single(line).lower(), line.args[0]),
    ),
    "X11Forwarding": _Option("x11_forwarding", _flag, in_match=True),
    "PrintMotd": _Option("print_motd", _flag),
    "PrintLastLog": _Option("print_last_log", _flag),
    "TCPKeepAlive": _Option("tcp_keep_alive", _flag),
    "KeepAlive": _Option("tcp_keep_alive", _flag, alias_of="TCPKeepAlive"),
    "UseDNS": _Option("use_dns", _flag),
    "Subsystem": _Option("subsystems", _subsystem, "subsystem", dump=lambda v, cfg: [f"{k} {c}" for k, c in v.items()]),
    "AcceptEnv": _Option("accept_env", _words, "append", in_match=True, dump=_dump_each),
    "AuthenticationMethods": _Option("authentication_methods", _authentication_methods, in_match=True),
    "ForceCommand": _Option("force_command", _rest_or_none, in_match=True),
    "ChrootDirectory": _Option("chroot_directory", _path_or_none, in_match=True),
    "AuditLog": _Option("audit_log", _path_or_none),
}

# Keywords OpenSSH 9.x sshd (Debian patches included) knows and conduitd ignores with a warning.
_UNSUPPORTED_IN_MATCH_NAMES = """
AllowAgentForwarding AuthorizedKeysCommand AuthorizedKeysCommandUser AuthorizedPrincipalsCommand
AuthorizedPrincipalsCommandUser AuthorizedPrincipalsFile CASignatureAlgorithms ChannelTimeout
ExposeAuthInfo GSSAPIAuthentication HostbasedAcceptedAlgorithms HostbasedAcceptedKeyTypes
HostbasedAuthentication HostbasedUsesNameFromPacketOnly IgnoreRhosts IPQoS KerberosAuthentication
PermitTunnel PermitUserRC PubkeyAuthOptions RDomain RevokedKeys SetEnv TrustedUserCAKeys
UnusedConnectionTimeout X11DisplayOffset X11UseLocalhost
"""
_UNSUPPORTED_NAMES = """
AFSTokenPassing AuthorizedKeysFile2 CheckMail Compression DebianBanner DSAAuthentication
FingerprintHash GSSAPICleanupCredentials GSSAPICleanupCreds GSSAPIKexAlgorithms GSSAPIKeyExchange
GSSAPIStoreCredentialsOnRekey GSSAPIStrictAcceptorCheck GSSAPIUseSessionCredCache
GSSUseSessionCCache HostCertificate HostDSAKey HostKeyAgent IgnoreUserKnownHosts KerberosGetAFSToken
KerberosOrLocalPasswd KerberosTgtPassing KerberosTicketCleanup KeyRegenerationInterval LogVerbose
ModuliFile PAMAuthenticationViaKbdInt PermitBlacklistedKeys Protocol RequiredRSASize ReverseMappingCheck
RhostsAuthentication RhostsRSAAuthentication RSAAuthentication SecurityKeyProvider ServerKeyBits ShowPatchLevel
SkeyAuthentication UseLogin VerifyReverseMapping VersionAddendum
XAuthLocation
"""
_UNSUPPORTED_IN_MATCH = frozenset(_UNSUPPORTED_IN_MATCH_NAMES.split())
_UNSUPPORTED = _UNSUPPORTED_IN_MATCH | frozenset(_UNSUPPORTED_NAMES.split())
_CANONICAL: dict[str, str] = {name.lower(): name for name in (*_OPTIONS, *_UNSUPPORTED)}
