"""ssh_config(5) for conduit: ~/.ssh/config and /etc/ssh/ssh_config, read as OpenSSH's ssh reads them.

Precedence is OpenSSH's: command-line options first, then the user's file, then the system file, and for each
keyword the first value obtained wins (IdentityFile, the forwards and SendEnv accumulate). ``Host`` patterns
match the host name as given on the command line; ``Match host`` matches the name after ``Hostname``.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes

from ..crypto.ciphers import CLIENT_CIPHERS
from ..errors import ConfigError
from .algorithms import ALGORITHM_KEYWORDS, apply_algorithm_spec
from .forward_spec import ForwardSpec, parse_forward
from .lexer import ConfigLine, LineError, parse_flag, parse_rekey_limit, parse_time, read_config_lines
from .patterns import match_hostname, match_pattern_list

SYSTEM_CONFIG = "/etc/ssh/ssh_config"
MAX_INCLUDE_DEPTH = 16
DEFAULT_IDENTITY_NAMES = (
    "id_rsa",
    "id_ecdsa",
    "id_ecdsa_sk",
    "id_ed25519",
    "id_ed25519_sk",
    "id_xmss",
    "id_dsa",
)


@dataclass
class ClientConfig:
    """Effective ssh settings for one destination; attribute names are the keywords in snake_case."""

    host: str  # as given on the command line
    hostname: str
    port: int = 22
    user: str = ""
    identity_files: list[str] = field(default_factory=list)  # tokens and ~ expanded
    identities_only: bool = False
    identity_agent: str | None = None  # None: $SSH_AUTH_SOCK; "none" disables
    local_forwards: list[ForwardSpec] = field(default_factory=list)
    remote_forwards: list[ForwardSpec] = field(default_factory=list)
    dynamic_forwards: list[ForwardSpec] = field(default_factory=list)
    gateway_ports: bool = False
    exit_on_forward_failure: bool = False
    clear_all_forwardings: bool = False
    strict_host_key_checking: str = "ask"  # yes | no | ask | accept-new
    user_known_hosts_files: list[str] = field(default_factory=list)
    global_known_hosts_files: list[str] = field(
        default_factory=lambda: ["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"]
    )
    host_key_alias: str | None = None
    hash_known_hosts: bool = False
    check_host_ip: bool = False
    update_host_keys: str = "yes"  # yes | no | ask
    visual_host_key: bool = False
    ciphers: tuple[str, ...] = ALGORITHM_KEYWORDS["ciphers"][0]
    macs: tuple[str, ...] = ALGORITHM_KEYWORDS["macs"][0]
    kex_algorithms: tuple[str, ...] = ALGORITHM_KEYWORDS["kexalgorithms"][0]
    host_key_algorithms: tuple[str, ...] = ALGORITHM_KEYWORDS["hostkeyalgorithms"][0]
    pubkey_accepted_algorithms: tuple[str, ...] = ALGORITHM_KEYWORDS["pubkeyacceptedalgorithms"][0]
    password_authentication: bool = True
    pubkey_authentication: bool = True
    kbd_interactive_authentication: bool = True
    preferred_authentications: list[str] = field(
        default_factory=lambda: ["publickey", "keyboard-interactive", "password"]
    )
    number_of_password_prompts: int = 3
    batch_mode: bool = False
    connect_timeout: int | None = None  # seconds
    connection_attempts: int = 1
    server_alive_interval: int = 0
    server_alive_count_max: int = 3
    tcp_keep_alive: bool = True
    log_level: str = "INFO"
    address_family: str = "any"
    bind_address: str | None = None
    proxy_jump: str | None = None
    proxy_command: str | None = None
    request_tty: str = "auto"  # yes | no | force | auto
    session_type: str = "default"  # default | none | subsystem
    remote_command: str | None = None
    stdin_null: bool = False
    fork_after_authentication: bool = False
    rekey_limit: tuple[int | None, int | None] = (None, None)  # (bytes, seconds); None: the default
    send_env: list[str] = field(default_factory=list)
    set_env: list[str] = field(default_factory=list)  # NAME=VALUE
    compression: bool = False
    forward_agent: str = "no"  # yes | no | a socket path
    forward_x11: bool = False
    control_master: str = "no"  # yes | no | ask | auto | autoask
    control_path: str | None = None
    control_persist: str = "no"  # yes | no | seconds
    escape_char: str | None = "~"
    permit_local_command: bool = False
    local_command: str | None = None
    add_keys_to_agent: str = "no"
    stream_local_bind_mask: int = 0o177
    stream_local_bind_unlink: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def cipher_preference(self) -> tuple[str, ...]:
        """The ciphers to offer: ``Ciphers`` as given (-c, -o, a file), else crypto.ciphers.CLIENT_CIPHERS, OpenSSH's
        default with AES-GCM first where the CPU has AES instructions. ``ciphers`` itself keeps OpenSSH's default,
        so what a file's ``+``, ``-`` or ``^`` makes of it is what ssh makes of it. Every given value is a new
        tuple (apply_algorithm_spec), so the default object itself means "none given"."""
        return CLIENT_CIPHERS if self.ciphers is ALGORITHM_KEYWORDS["ciphers"][0] else self.ciphers


def resolve_client_config(
    host: str,
    user: str | None = None,
    port: int | None = None,
    config_file: str | None = None,
    options: Sequence[str] = (),
) -> ClientConfig:
    """Settings for ``host`` as ``ssh [-l user] [-p port] [-F config_file] [-o option]... host`` sees them.

    ``config_file`` None reads ~/.ssh/config then /etc/ssh/ssh_config; "none" reads no file.
    """
    local = _local_identity()
    state = _ResolveState(original_host=host, local_user=local.user)
    if user is not None:
        state.values["user"] = user
    if port is not None:
        state.values["port"] = port
    for option in options:
        lines = read_config_lines(option, "command-line", first_line=0)
        if len(lines) != 1:
            raise ConfigError(f"command-line: line 0: Bad configuration option: {option}")
        keyword = lines[0].keyword.lower()
        if keyword in ("host", "match", "include"):
            raise ConfigError(f"{lines[0].keyword} directive not supported as a command-line option")
        _process_line(state, lines[0], active=True)

    files: list[tuple[str, bool]] = []  # (path, is the user's own file)
    if config_file is None:
        user_file = os.path.join(local.home, ".ssh", "config")
        files = [(f, f == user_file) for f in (user_file, SYSTEM_CONFIG) if os.path.exists(f)]
    elif config_file != "none":
        if not os.path.exists(config_file):
            raise ConfigError(f"Can't open user config file {config_file}: No such file or directory")
        files = [(config_file, True)]

    for final_pass in (False, True):
        state.final_pass = final_pass
        for path, is_user_file in files:
            _read_file(state, path, is_user_file, check_permissions=config_file is None and is_user_file)
        if not state.wants_final_pass:
            break
    return _finalize(state, local)


# ---------------------------------------------------------------- reading files


@dataclass(frozen=True)
class _LocalIdentity:
    user: str
    home: str
    uid: int
    hostname: str


def _local_identity() -> _LocalIdentity:
    entry = pwd.getpwuid(os.getuid())
    return _LocalIdentity(entry.pw_name, entry.pw_dir, entry.pw_uid, socket.gethostname())


@dataclass
class _ResolveState:
    original_host: str
    local_user: str
    values: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    warned: set[str] = field(default_factory=set)
    final_pass: bool = False
    wants_final_pass: bool = False


def _read_file(
    state: _ResolveState,
    path: str,
    is_user_file: bool,
    *,
    check_permissions: bool,
    never_match: bool = False,
    depth: int = 0,
) -> None:
    if check_permissions:
        st = os.stat(path)
        if (st.st_uid not in (0, os.getuid())) or st.st_mode & 0o022:
            raise ConfigError(f"Bad owner or permissions on {path}")
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise ConfigError(f"Can't open user config file {path}: {exc.strerror or exc}") from None
    active = not never_match
    for line in read_config_lines(text, path):
        keyword = line.keyword.lower()
        if keyword == "host":
            if not line.args:
                raise line.error("Missing argument.")
            active = not never_match and bool(match_hostname(state.original_host, ",".join(line.args)))
        elif keyword == "match":
            matched = _match_line(state, line)
            active = not never_match and matched
        elif keyword == "include":
            if not line.args:
                raise line.error("Include missing filename argument")
            if depth + 1 > MAX_INCLUDE_DEPTH:
                raise line.error("Include nested too deeply")
            base = os.path.join(_local_identity().home, ".ssh") if is_user_file else os.path.dirname(SYSTEM_CONFIG)
            for pattern in line.args:
                path_pattern = os.path.expanduser(pattern)
                if not os.path.isabs(path_pattern):
                    path_pattern = os.path.join(base, path_pattern)
                # an Include in an inactive block reads the files but nothing in them applies, as in ssh
                for included in sorted(glob.glob(path_pattern)):
                    _read_file(
                        state,
                        included,
                        is_user_file,
                        check_permissions=True,
                        never_match=not active,
                        depth=depth + 1,
                    )
        else:
            _process_line(state, line, active)


_MATCH_NO_ARG = ("all", "canonical", "final")
_MATCH_WITH_ARG = ("exec", "host", "originalhost", "user", "localuser", "localnetwork", "tagged")


def _match_line(state: _ResolveState, line: ConfigLine) -> bool:
    args = line.args
    if not args:
        raise line.error("Missing Match criteria")
    result = True
    i = 0
    while i < len(args):
        word = args[i]
        negate = word.startswith("!")
        name = word[1:].lower() if negate else word.lower()
        i += 1
        if name in _MATCH_NO_ARG:
            if name == "all":
                if any(a.lower() not in ("all", "canonical", "final") for a in args) or negate:
                    raise line.error("Match all must appear alone or after canonical/final")
                hit = True
            else:
                state.wants_final_pass = True  # no canonicalization here: both mean "the second pass"
                hit = state.final_pass
        elif name in _MATCH_WITH_ARG:
            if i >= len(args):
                raise line.error(f"Missing Match criteria for {name}")
            value = args[i]
            i += 1
            hit = _match_criterion(state, line, name, value)
        else:
            raise line.error(f"Unsupported Match attribute {word}")
        if hit == negate:
            result = False  # keep going: later criteria still need checking for errors
    return result


def _match_criterion(state: _ResolveState, line: ConfigLine, name: str, value: str) -> bool:
    if name == "host":
        return bool(match_hostname(state.values.get("hostname", state.original_host), value))
    if name == "originalhost":
        return bool(match_hostname(state.original_host, value))
    if name == "user":
        return bool(match_pattern_list(state.values.get("user", state.local_user), value))
    if name == "localuser":
        return bool(match_pattern_list(state.local_user, value))
    _warn_once(state, line, f"Match {name}")
    return False  # exec, localnetwork, tagged: not supported, never match


def _warn_once(state: _ResolveState, line: ConfigLine, what: str) -> None:
    if what.lower() not in state.warned:
        state.warned.add(what.lower())
        state.warnings.append(f"conduit: {line.source}:{line.lineno}: keyword '{what}' is not supported and is ignored")


# ---------------------------------------------------------------- one line -> one value


def _process_line(state: _ResolveState, line: ConfigLine, active: bool) -> None:
    name = _CANONICAL.get(line.keyword.lower())
    if name is None:
        ignored = state.values.get("ignore_unknown")
        if ignored and match_pattern_list(line.keyword.lower(), ignored.lower()):
            return
        raise ConfigError(f"{line.source}: line {line.lineno}: Bad configuration option: {line.keyword}")
    option = _OPTIONS.get(name)
    if option is None:
        if active:
            _warn_once(state, line, name)
        return
    try:
        value = option.parse(line, state)
    except LineError as exc:
        raise line.error(str(exc)) from None
    if not active:
        return  # values in inactive blocks are still checked, as ssh does
    if option.mode == "append":
        state.values[option.attr] = [*state.values.get(option.attr, []), *value]
    elif option.attr not in state.values:
        state.values[option.attr] = value


@dataclass(frozen=True)
class _Option:
    attr: str
    parse: Callable[[ConfigLine, _ResolveState], Any]
    mode: str = "first"  # first | append


def _single(line: ConfigLine) -> str:
    if not line.args:
        raise LineError("Missing argument.")
    if len(line.args) > 1:
        raise LineError(f"keyword {line.keyword} extra arguments at end of line")
    return line.args[0]


def _bad(line: ConfigLine, value: str) -> LineError:
    return LineError(f'invalid value for {_CANONICAL[line.keyword.lower()]}: "{value}"')


def _flag(line: ConfigLine, state: _ResolveState) -> bool:
    value = _single(line)
    result = parse_flag(value, true_false=True)
    if result is None:
        raise _bad(line, value)
    return result


def _choice(*choices: str, aliases: dict[str, str] | None = None) -> Callable[[ConfigLine, _ResolveState], str]:
    table = {"true": "yes", "false": "no", **(aliases or {})}

    def parse(line: ConfigLine, state: _ResolveState) -> str:
        value = _single(line).lower()
        value = table.get(value, value)
        if value not in choices:
            raise _bad(line, line.args[0])
        return value

    return parse


def _int(minimum: int) -> Callable[[ConfigLine, _ResolveState], int]:
    def parse(line: ConfigLine, state: _ResolveState) -> int:
        value = _single(line)
        if not value.isdigit() or not minimum <= int(value) <= 0x7FFFFFFF:
            raise _bad(line, value)
        return int(value)

    return parse


def _time(none_ok: bool) -> Callable[[ConfigLine, _ResolveState], int | None]:
    def parse(line: ConfigLine, state: _ResolveState) -> int | None:
        value = _single(line)
        if none_ok and value.lower() == "none":
            return None
        seconds = parse_time(value)
        if seconds is None:
            raise LineError("invalid time value.")
        return seconds

    return parse


def _word(line: ConfigLine, state: _ResolveState) -> str:
    return _single(line)


def _word_or_none(line: ConfigLine, state: _ResolveState) -> str | None:
    value = _single(line)
    return None if value.lower() == "none" else value


def _rest(line: ConfigLine, state: _ResolveState) -> str | None:
    if not line.rest:
        raise LineError("Missing argument.")
    return None if line.rest.lower() == "none" else line.rest


def _words(line: ConfigLine, state: _ResolveState) -> list[str]:
    if not line.args:
        raise LineError("Missing argument.")
    return list(line.args)


def _port(line: ConfigLine, state: _ResolveState) -> int:
    value = _single(line)
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise LineError(f"Bad port '{value}'.")
    return int(value)


def _hostname(line: ConfigLine, state: _ResolveState) -> str:
    return expand_tokens(_single(line), {"h": state.original_host})


def _algorithms(keyword: str) -> Callable[[ConfigLine, _ResolveState], tuple[str, ...]]:
    default, known, what = ALGORITHM_KEYWORDS[keyword]

    def parse(line: ConfigLine, state: _ResolveState) -> tuple[str, ...]:
        try:
            return apply_algorithm_spec(default, known, _single(line), what)
        except ConfigError as exc:
            raise LineError(str(exc)) from None

    return parse


def _forward(kind: str) -> Callable[[ConfigLine, _ResolveState], list[ForwardSpec]]:
    def parse(line: ConfigLine, state: _ResolveState) -> list[ForwardSpec]:
        if not line.args or len(line.args) > (1 if kind == "dynamic" else 2):
            raise LineError(f"Bad {kind} forwarding specification '{line.rest}'")
        try:
            return [parse_forward(" ".join(line.args), kind)]
        except ValueError as exc:
            raise LineError(str(exc)) from None

    return parse


def _proxy(kind: str) -> Callable[[ConfigLine, _ResolveState], tuple[str, str | None]]:
    # ProxyJump and ProxyCommand share one slot: whichever comes first wins, as in ssh
    def parse(line: ConfigLine, state: _ResolveState) -> tuple[str, str | None]:
        value = _rest(line, state) if kind == "command" else _word_or_none(line, state)
        return kind, value

    return parse


def _escape_char(line: ConfigLine, state: _ResolveState) -> str | None:
    value = _single(line)
    if value.lower() == "none":
        return None
    if len(value) == 1:
        return value
    if len(value) == 2 and value[0] == "^" and value[1].isalpha():
        return chr(ord(value[1].upper()) & 0x1F)
    raise LineError("Bad escape character.")


def _rekey_limit(line: ConfigLine, state: _ResolveState) -> tuple[int | None, int | None]:
    return parse_rekey_limit(line.args)


def _control_persist(line: ConfigLine, state: _ResolveState) -> str:
    value = _single(line)
    flag = parse_flag(value, true_false=True)
    if flag is not None:
        return "yes" if flag else "no"
    seconds = parse_time(value)
    if seconds is None:
        raise LineError("Bad ControlPersist argument.")
    return "no" if seconds == 0 else str(seconds)


def _add_keys_to_agent(line: ConfigLine, state: _ResolveState) -> str:
    args = line.args
    if not args or len(args) > 2:
        raise _bad(line, line.rest)
    value = args[0].lower()
    value = {"true": "yes", "false": "no"}.get(value, value)
    if value in ("yes", "no", "ask", "confirm") and len(args) == 1:
        return value
    if value == "confirm" and parse_time(args[1]) is not None:
        return f"confirm {parse_time(args[1])}"
    if len(args) == 1 and parse_time(value) is not None:
        return value
    raise _bad(line, line.rest)


def _bind_mask(line: ConfigLine, state: _ResolveState) -> int:
    value = _single(line)
    if not value or any(c not in "01234567" for c in value) or int(value, 8) > 0o777:
        raise LineError("Bad mask.")
    return int(value, 8)


def _preferred(line: ConfigLine, state: _ResolveState) -> list[str]:
    return _single(line).split(",")


def _set_env(line: ConfigLine, state: _ResolveState) -> list[str]:
    for item in line.args:
        if "=" not in item or item.startswith("="):
            raise LineError("Invalid environment.")
    return list(line.args)


_LOG_LEVELS = ("QUIET", "FATAL", "ERROR", "INFO", "VERBOSE", "DEBUG", "DEBUG1", "DEBUG2", "DEBUG3")


def _log_level(line: ConfigLine, state: _ResolveState) -> str:
    value = _single(line).upper()
    if value not in _LOG_LEVELS:
        raise LineError(f"unsupported log level '{line.args[0]}'")
    return value


_OPTIONS: dict[str, _Option] = {
    "Hostname": _Option("hostname", _hostname),
    "Port": _Option("port", _port),
    "User": _Option("user", _word),
    "IdentityFile": _Option("identity_files", lambda line, state: [_single(line)], "append"),
    "IdentitiesOnly": _Option("identities_only", _flag),
    "IdentityAgent": _Option("identity_agent", _word),
    "LocalForward": _Option("local_forwards", _forward("local"), "append"),
    "RemoteForward": _Option("remote_forwards", _forward("remote"), "append"),
    "DynamicForward": _Option("dynamic_forwards", _forward("dynamic"), "append"),
    "GatewayPorts": _Option("gateway_ports", _flag),
    "ExitOnForwardFailure": _Option("exit_on_forward_failure", _flag),
    "ClearAllForwardings": _Option("clear_all_forwardings", _flag),
    "StrictHostKeyChecking": _Option(
        "strict_host_key_checking", _choice("yes", "no", "ask", "accept-new", aliases={"off": "no"})
    ),
    "UserKnownHostsFile": _Option("user_known_hosts_files", _words),
    "GlobalKnownHostsFile": _Option("global_known_hosts_files", _words),
    "HostKeyAlias": _Option("host_key_alias", _word),
    "HashKnownHosts": _Option("hash_known_hosts", _flag),
    "CheckHostIP": _Option("check_host_ip", _flag),
    "UpdateHostKeys": _Option("update_host_keys", _choice("yes", "no", "ask")),
    "VisualHostKey": _Option("visual_host_key", _flag),
    "Ciphers": _Option("ciphers", _algorithms("ciphers")),
    "MACs": _Option("macs", _algorithms("macs")),
    "KexAlgorithms": _Option("kex_algorithms", _algorithms("kexalgorithms")),
    "HostKeyAlgorithms": _Option("host_key_algorithms", _algorithms("hostkeyalgorithms")),
    "PubkeyAcceptedAlgorithms": _Option("pubkey_accepted_algorithms", _algorithms("pubkeyacceptedalgorithms")),
    "PubkeyAcceptedKeyTypes": _Option("pubkey_accepted_algorithms", _algorithms("pubkeyacceptedalgorithms")),
    "PasswordAuthentication": _Option("password_authentication", _flag),
    "PubkeyAuthentication": _Option(
        "pubkey_authentication",
        lambda line, state: _choice("yes", "no", aliases={"unbound": "yes", "host-bound": "yes"})(line, state) == "yes",
    ),
    "KbdInteractiveAuthentication": _Option("kbd_interactive_authentication", _flag),
    "ChallengeResponseAuthentication": _Option("kbd_interactive_authentication", _flag),
    "PreferredAuthentications": _Option("preferred_authentications", _preferred),
    "NumberOfPasswordPrompts": _Option("number_of_password_prompts", _int(0)),
    "BatchMode": _Option("batch_mode", _flag),
    "ConnectTimeout": _Option("connect_timeout", _time(none_ok=True)),
    "ConnectionAttempts": _Option("connection_attempts", _int(1)),
    "ServerAliveInterval": _Option("server_alive_interval", _time(none_ok=False)),
    "ServerAliveCountMax": _Option("server_alive_count_max", _int(0)),
    "TCPKeepAlive": _Option("tcp_keep_alive", _flag),
    "KeepAlive": _Option("tcp_keep_alive", _flag),
    "LogLevel": _Option("log_level", _log_level),
    "AddressFamily": _Option("address_family", _choice("any", "inet", "inet6")),
    "BindAddress": _Option("bind_address", _word),
    "ProxyJump": _Option("proxy", _proxy("jump")),
    "ProxyCommand": _Option("proxy", _proxy("command")),
    "RequestTTY": _Option("request_tty", _choice("yes", "no", "force", "auto")),
    "SessionType": _Option("session_type", _choice("none", "subsystem", "default")),
    "RemoteCommand": _Option("remote_command", _rest),
    "StdinNull": _Option("stdin_null", _flag),
    "ForkAfterAuthentication": _Option("fork_after_authentication", _flag),
    "RekeyLimit": _Option("rekey_limit", _rekey_limit),
    "SendEnv": _Option("send_env", lambda line, state: list(line.args), "append"),
    "SetEnv": _Option("set_env", _set_env),
    "Compression": _Option("compression", _flag),
    "ForwardAgent": _Option(
        "forward_agent",
        lambda line, state: {"yes": "yes", "true": "yes", "no": "no", "false": "no"}.get(
            _single(line).lower(), line.args[0]
        ),
    ),
    "ForwardX11": _Option("forward_x11", _flag),
    "ControlMaster": _Option("control_master", _choice("yes", "no", "ask", "auto", "autoask")),
    "ControlPath": _Option("control_path", _word_or_none),
    "ControlPersist": _Option("control_persist", _control_persist),
    "EscapeChar": _Option("escape_char", _escape_char),
    "PermitLocalCommand": _Option("permit_local_command", _flag),
    "LocalCommand": _Option("local_command", _rest),
    "AddKeysToAgent": _Option("add_keys_to_agent", _add_keys_to_agent),
    "StreamLocalBindMask": _Option("stream_local_bind_mask", _bind_mask),
    "StreamLocalBindUnlink": _Option("stream_local_bind_unlink", _flag),
    "IgnoreUnknown": _Option("ignore_unknown", _word),
}

# Keywords OpenSSH 9.x ssh (Debian patches included) knows and conduit ignores with a warning.
_UNSUPPORTED_NAMES = """
AFSTokenPassing BindInterface CanonicalDomains CanonicalizeFallbackLocal CanonicalizeHostname
CanonicalizeMaxDots CanonicalizePermittedCNAMEs CASignatureAlgorithms CertificateFile Cipher
CompressionLevel DSAAuthentication EnableEscapeCommandline EnableSSHKeysign FallBackToRsh FingerprintHash
ForwardX11Timeout ForwardX11Trusted GlobalKnownHostsFile2 GSSAPIAuthentication GSSAPIClientIdentity
GSSAPIDelegateCredentials GSSAPIKexAlgorithms GSSAPIKeyExchange GSSAPIRenewalForcesRekey
GSSAPIServerIdentity GSSAPITrustDns HostbasedAcceptedAlgorithms HostbasedAcceptedKeyTypes
HostbasedAuthentication HostbasedKeyTypes IdentityFile2 IPQoS KbdInteractiveDevices KerberosAuthentication
KerberosTgtPassing KnownHostsCommand LogVerbose NoHostAuthenticationForLocalhost PermitRemoteOpen
PKCS11Provider Protocol ProtocolKeepAlives ProxyUseFdpass RequiredRSASize RevokedHostKeys
RhostsAuthentication RhostsRSAAuthentication RSAAuthentication SecurityKeyProvider SetupTimeout
SkeyAuthentication SmartcardDevice SyslogFacility TISAuthentication Tunnel TunnelDevice UseBlacklistedKeys
UsePrivilegedPort UserKnownHostsFile2 UseRoaming UseRsh VerifyHostKeyDNS XAuthLocation
"""
_CANONICAL: dict[str, str] = {name.lower(): name for name in (*_OPTIONS, *_UNSUPPORTED_NAMES.split())}


# ---------------------------------------------------------------- defaults and token expansion


def expand_tokens(text: str, tokens: dict[str, str]) -> str:
    """Replace ``%x`` from ``tokens`` and ``%%``; an unknown token is a ConfigError, as in ssh."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(text):
            raise ConfigError(f'percent_expand: invalid format "{text}"')
        key = text[i + 1]
        if key == "%":
            out.append("%")
        elif key in tokens:
            out.append(tokens[key])
        else:
            raise ConfigError(f"percent_expand: unknown key %{key}")
        i += 2
    return "".join(out)


def _expand_env(text: str) -> str:
    def replace(found: re.Match[str]) -> str:
        value = os.environ.get(found.group(1))
        if value is None:
            raise ConfigError(f"env var ${{{found.group(1)}}} has no value")
        return value

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", replace, text)


def _expand_path(text: str, tokens: dict[str, str], home: str) -> str:
    """~ first, then %-tokens, then ${ENV}: ssh's order for IdentityFile & co."""
    if text == "~" or text.startswith("~/"):
        text = home + text[1:]
    elif text.startswith("~"):
        text = os.path.expanduser(text)
    return _expand_env(expand_tokens(text, tokens))


def _finalize(state: _ResolveState, local: _LocalIdentity) -> ClientConfig:
    values = dict(state.values)
    values.pop("ignore_unknown", None)
    proxy_kind, proxy_value = values.pop("proxy", ("jump", None))
    values["proxy_jump" if proxy_kind == "jump" else "proxy_command"] = proxy_value
    hostname = values.pop("hostname", state.original_host)
    cfg = ClientConfig(host=state.original_host, hostname=hostname, **values)
    if not cfg.user:
        cfg.user = local.user
    if cfg.batch_mode and "server_alive_interval" not in values:
        cfg.server_alive_interval = 300  # ssh's default when nobody may answer a prompt
    jump = cfg.proxy_jump or ""
    connection_hash = hashes.Hash(hashes.SHA1())
    connection_hash.update(f"{local.hostname}{hostname}{cfg.port}{cfg.user}{jump}".encode())
    tokens = {
        "C": connection_hash.finalize().hex(),
        "d": local.home,
        "h": hostname,
        "i": str(local.uid),
        "j": jump,
        "k": cfg.host_key_alias or state.original_host,
        "L": local.hostname.split(".", 1)[0],
        "l": local.hostname,
        "n": state.original_host,
        "p": str(cfg.port),
        "r": cfg.user,
        "u": local.user,
    }

    def expand(path: str) -> str:
        return _expand_path(path, tokens, local.home)

    if "identity_files" not in values:
        cfg.identity_files = [os.path.join(local.home, ".ssh", name) for name in DEFAULT_IDENTITY_NAMES]
    else:
        cfg.identity_files = list(dict.fromkeys(expand(p) for p in cfg.identity_files))
    known_hosts = values.get("user_known_hosts_files", ["~/.ssh/known_hosts", "~/.ssh/known_hosts2"])
    cfg.user_known_hosts_files = [] if known_hosts == ["none"] else [expand(p) for p in known_hosts]
    if cfg.global_known_hosts_files == ["none"]:
        cfg.global_known_hosts_files = []
    else:
        cfg.global_known_hosts_files = [expand(p) for p in cfg.global_known_hosts_files]
    if cfg.identity_agent is not None and cfg.identity_agent not in ("none", "SSH_AUTH_SOCK"):
        cfg.identity_agent = expand(cfg.identity_agent)
    if cfg.control_path is not None:
        cfg.control_path = expand(cfg.control_path)
    if cfg.proxy_command is not None:
        cfg.proxy_command = expand_tokens(cfg.proxy_command, {k: tokens[k] for k in "hnpr"})
    if cfg.clear_all_forwardings:
        cfg.local_forwards, cfg.remote_forwards, cfg.dynamic_forwards = [], [], []
    # a second ("Match final") pass reads the same lines again; ssh drops repeated identities and forwards
    cfg.local_forwards = list(dict.fromkeys(cfg.local_forwards))
    cfg.remote_forwards = list(dict.fromkeys(cfg.remote_forwards))
    cfg.dynamic_forwards = list(dict.fromkeys(cfg.dynamic_forwards))
    cfg.send_env = _send_env(cfg.send_env)
    cfg.warnings = list(state.warnings)
    return cfg


def _send_env(patterns: list[str]) -> list[str]:
    """``SendEnv -PATTERN`` removes what earlier lines added."""
    result: list[str] = []
    for pattern in patterns:
        if pattern.startswith("-"):
            result = [p for p in result if not match_pattern_list(p, pattern[1:])]
        else:
            result.append(pattern)
    return result
