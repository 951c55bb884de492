"""ssh_config: Host/Match precedence, Include, tokens, -o, errors; OpenSSH's ``ssh -G`` as the oracle."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from sshconduit.config import ssh_config
from sshconduit.config.algorithms import ALGORITHM_KEYWORDS
from sshconduit.config.forward_spec import ForwardSpec, format_forward
from sshconduit.config.ssh_config import ClientConfig, expand_tokens, resolve_client_config
from sshconduit.crypto.ciphers import CLIENT_CIPHERS
from sshconduit.errors import ConfigError

HOME = pwd.getpwuid(os.getuid()).pw_dir
LOCAL_USER = pwd.getpwuid(os.getuid()).pw_name

# Debian 12's /etc/ssh/ssh_config, comments trimmed.
DEBIAN_SSH_CONFIG = """\
# This is the ssh client system-wide configuration file.

Include /etc/ssh/ssh_config.d/*.conf

Host *
#   ForwardAgent no
#   StrictHostKeyChecking ask
#   IdentityFile ~/.ssh/id_rsa
#   Port 22
    SendEnv LANG LC_*
    HashKnownHosts yes
    GSSAPIAuthentication yes
"""

USER_CONFIG = """\
# a typical ~/.ssh/config
Host !bad.example.com *.example.com alias
  Hostname %h.internal
  User alice
  IdentityFile ~/.ssh/id_%h_%r_%p
  IdentityFile /keys/%u-%n-%%
  UserKnownHostsFile ~/.ssh/kh_%h /tmp/kh2
  Port 2200
  LocalForward 1100 mail.example.com:110
  LocalForward [::1]:1101 [::2]:110
  RemoteForward 2000
  DynamicForward 127.0.0.1:1080

Match host *.internal user alice
  Port 9999
  Compression yes

Host jump
  ProxyCommand nc %h %p

Host *
  User bob
  ConnectTimeout 10
  SendEnv A B
  SendEnv -A
  ProxyJump j1
  ProxyCommand nc %h %p
  StrictHostKeyChecking accept-new
  ServerAliveInterval 1m
  Ciphers ^aes256-ctr

Match final
  ServerAliveCountMax 7
"""


def write(tmp_path: Path, text: str, name: str = "config") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_host_blocks_first_value_wins(tmp_path: Path) -> None:
    cfg = resolve_client_config("www.example.com", config_file=write(tmp_path, USER_CONFIG))
    assert cfg.hostname == "www.example.com.internal"
    assert cfg.user == "alice"
    assert cfg.port == 2200  # Match host ... Port 9999 comes too late
    assert cfg.compression is True  # ...but it sets what nothing set before
    assert cfg.identity_files == [
        f"{HOME}/.ssh/id_www.example.com.internal_alice_2200",
        f"/keys/{LOCAL_USER}-www.example.com-%",
    ]
    assert cfg.user_known_hosts_files == [f"{HOME}/.ssh/kh_www.example.com.internal", "/tmp/kh2"]
    assert cfg.local_forwards == [
        ForwardSpec(None, 1100, None, "mail.example.com", 110, None),
        ForwardSpec("::1", 1101, None, "::2", 110, None),
    ]
    assert cfg.remote_forwards == [ForwardSpec(None, 2000, None, None, None, None)]
    assert cfg.dynamic_forwards == [ForwardSpec("127.0.0.1", 1080, None, None, None, None)]
    assert cfg.connect_timeout == 10
    assert cfg.send_env == ["B", "B"]  # the "Match final" pass reads SendEnv again, as ssh does
    assert (cfg.proxy_jump, cfg.proxy_command) == ("j1", None)
    assert cfg.strict_host_key_checking == "accept-new"
    assert cfg.server_alive_interval == 60
    assert cfg.server_alive_count_max == 7
    assert cfg.ciphers[0] == "aes256-ctr"


def test_negated_host_and_other_hosts(tmp_path: Path) -> None:
    path = write(tmp_path, USER_CONFIG)
    bad = resolve_client_config("bad.example.com", config_file=path)
    assert (bad.hostname, bad.user, bad.port) == ("bad.example.com", "bob", 22)
    jump = resolve_client_config("jump", config_file=path)
    assert (jump.proxy_command, jump.proxy_jump) == ("nc jump 22", None)
    assert resolve_client_config("ALIAS", config_file=path).user == "alice"  # host patterns ignore case


def test_command_line_wins(tmp_path: Path) -> None:
    path = write(tmp_path, USER_CONFIG)
    cfg = resolve_client_config(
        "www.example.com",
        user="carol",
        port=2022,
        config_file=path,
        options=["Hostname=direct", "IdentityFile /cli/key", "LocalForward=9000 h:90", "Compression no"],
    )
    assert (cfg.hostname, cfg.user, cfg.port, cfg.compression) == ("direct", "carol", 2022, False)
    assert cfg.identity_files[0] == "/cli/key"
    assert cfg.local_forwards[0] == ForwardSpec(None, 9000, None, "h", 90, None)
    assert len(cfg.local_forwards) == 3


def test_defaults_without_files() -> None:
    cfg = resolve_client_config("example.org", config_file="none")
    assert (cfg.hostname, cfg.port, cfg.user) == ("example.org", 22, LOCAL_USER)
    assert cfg.identity_files[0] == f"{HOME}/.ssh/id_rsa" and len(cfg.identity_files) == 7
    assert cfg.user_known_hosts_files == [f"{HOME}/.ssh/known_hosts", f"{HOME}/.ssh/known_hosts2"]
    assert cfg.strict_host_key_checking == "ask"
    assert cfg.warnings == []


def test_cipher_preference_is_ours_only_when_no_ciphers_are_given(tmp_path: Path) -> None:
    openssh = ALGORITHM_KEYWORDS["ciphers"][0]
    cfg = resolve_client_config("example.org", config_file="none")
    assert cfg.ciphers == openssh and cfg.cipher_preference == CLIENT_CIPHERS
    # OpenSSH's default spelled out, a relative spec and a list of one each mean what they mean to ssh
    given = [("Ciphers=" + ",".join(openssh), openssh), ("Ciphers=+aes128-cbc", (*openssh, "aes128-cbc"))]
    for option, expected in [*given, ("Ciphers=aes256-ctr", ("aes256-ctr",))]:
        cfg = resolve_client_config("example.org", config_file="none", options=[option])
        assert cfg.cipher_preference == expected
    cfg = resolve_client_config("example.org", config_file=write(tmp_path, "Ciphers -chacha*\n"))
    assert cfg.cipher_preference == tuple(c for c in openssh if not c.startswith("chacha"))


def test_debian_system_config(tmp_path: Path) -> None:
    cfg = resolve_client_config("example.org", config_file=write(tmp_path, DEBIAN_SSH_CONFIG))
    assert cfg.send_env == ["LANG", "LC_*"]
    assert cfg.hash_known_hosts is True
    assert cfg.warnings == [
        f"conduit: {tmp_path}/config:12: keyword 'GSSAPIAuthentication' is not supported and is ignored"
    ]


def test_default_files_user_then_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host *\n  Port 2022\n  Include extra.conf\n")
    (home / ".ssh" / "extra.conf").write_text("User fromextra\n")
    system = tmp_path / "ssh_config"
    system.write_text("Host *\n  Port 22\n  User root2\n  Compression yes\n")
    identity = ssh_config._LocalIdentity("me", str(home), 1000, "box.lan")
    monkeypatch.setattr(ssh_config, "_local_identity", lambda: identity)
    monkeypatch.setattr(ssh_config, "SYSTEM_CONFIG", str(system))
    cfg = resolve_client_config("h")
    assert (cfg.port, cfg.user, cfg.compression) == (2022, "fromextra", True)

    (home / ".ssh" / "config").chmod(0o666)
    with pytest.raises(ConfigError, match="Bad owner or permissions on"):
        resolve_client_config("h")


def test_tokens(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    identity = ssh_config._LocalIdentity("me", "/home/me", 1234, "box.lan")
    monkeypatch.setattr(ssh_config, "_local_identity", lambda: identity)
    monkeypatch.setenv("KEYDIR", "/env/keys")
    path = write(
        tmp_path,
        "Host h\n  Hostname real.host\n  User u\n  Port 2\n"
        "  IdentityFile %d/%u/%h/%p/%r/%n/%l/%L/%i/%k/%%\n  IdentityFile ${KEYDIR}/k\n"
        "  IdentityFile ~/plain\n  ControlPath /tmp/cm-%C\n",
    )
    cfg = resolve_client_config("h", config_file=path)
    assert cfg.identity_files == [
        "/home/me/me/real.host/2/u/h/box.lan/box/1234/h/%",
        "/env/keys/k",
        "/home/me/plain",
    ]
    from cryptography.hazmat.primitives import hashes

    digest = hashes.Hash(hashes.SHA1())
    digest.update(b"box.lanreal.host2u")
    assert cfg.control_path == f"/tmp/cm-{digest.finalize().hex()}"

    assert expand_tokens("a%hb%%", {"h": "H"}) == "aHb%"
    with pytest.raises(ConfigError, match="percent_expand: unknown key %z"):
        expand_tokens("%z", {})
    with pytest.raises(ConfigError):
        resolve_client_config("h", config_file=write(tmp_path, "IdentityFile /k/%z\n", "bad"))


def test_match_criteria(tmp_path: Path) -> None:
    text = (
        "Match originalhost web* !user root\n  Port 1\n"
        f"Match localuser {LOCAL_USER} host *.lan\n  Port 2\n"
        "Match exec true\n  Port 3\n"
        "Match all\n  Port 4\n"
    )
    path = write(tmp_path, text)
    assert resolve_client_config("web1", user="alice", config_file=path).port == 1
    assert resolve_client_config("web1", user="root", config_file=path).port == 4
    assert resolve_client_config("x.lan", config_file=path).port == 2
    cfg = resolve_client_config("other", config_file=path)
    assert cfg.port == 4  # exec is not supported: it never matches, with a warning
    assert any("Match exec" in w for w in cfg.warnings)


def test_include_in_inactive_block_applies_nothing(tmp_path: Path) -> None:
    inc = tmp_path / "inc.conf"
    inc.write_text("Host *\n  User included\n")
    path = write(tmp_path, f"Host other\n  Include {inc}\nHost *\n  User last\n")
    assert resolve_client_config("h", config_file=path).user == "last"
    assert resolve_client_config("other", config_file=path).user == "included"


def test_ignore_unknown_and_clear_forwardings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "IgnoreUnknown UseKeychain,Add*\nUseKeychain yes\nLocalForward 1 h:2\nClearAllForwardings yes\n",
    )
    cfg = resolve_client_config("h", config_file=path)
    assert cfg.local_forwards == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Fooo bar\n", "line 1: Bad configuration option: Fooo"),
        ("Host x\n  Port x\n", "line 2: Bad port 'x'."),  # checked even in a block that does not apply
        ("StrictHostKeyChecking maybe\n", 'line 1: invalid value for StrictHostKeyChecking: "maybe"'),
        ("BatchMode maybe\n", 'line 1: invalid value for BatchMode: "maybe"'),
        ("ConnectTimeout 5x\n", "line 1: invalid time value."),
        ("Ciphers nope\n", "line 1: Bad SSH2 cipher spec 'nope'."),
        ("LocalForward 1100\n", "line 1: Bad local forwarding specification '1100'"),
        ("LocalForward 0:h:0\n", "line 1: Bad local forwarding specification '0:h:0'"),
        ("DynamicForward 1:2:3\n", "line 1: Bad dynamic forwarding specification '1:2:3'"),
        ("Match foo x\n", "line 1: Unsupported Match attribute foo"),
        ("Match host\n", "line 1: Missing Match criteria for host"),
        ("Match all host x\n", "line 1: Match all must appear alone"),
        ("Host\n", "line 1: Missing argument."),
        ("User\n", "line 1: Missing argument."),
        ("EscapeChar ab\n", "line 1: Bad escape character."),
        ("RekeyLimit 1x\n", "line 1: Bad number '1x': Invalid argument"),  # ssh's words, and below
        ("RekeyLimit none\n", "line 1: Bad number 'none': Invalid argument"),
        ("RekeyLimit default default\n", "line 1: invalid time value."),
        ("ControlPersist 3q\n", "line 1: Bad ControlPersist argument."),
        ("Port 1 2\n", "line 1: keyword Port extra arguments at end of line"),
        ('User "unterminated\n', "line 1: invalid quotes"),
    ],
)
def test_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        resolve_client_config("h", config_file=path)
    assert str(info.value) == f"{path}: {message}" or str(info.value).startswith(f"{path}: {message}")


def test_option_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="command-line: line 0: Bad configuration option: Fooo"):
        resolve_client_config("h", config_file="none", options=["Fooo=1"])
    with pytest.raises(ConfigError, match="Host directive not supported as a command-line option"):
        resolve_client_config("h", config_file="none", options=["Host=x"])
    with pytest.raises(ConfigError, match="Can't open user config file /nonexistent"):
        resolve_client_config("h", config_file="/nonexistent")


# ---------------------------------------------------------------- OpenSSH's ssh -G as the oracle


def _ssh_dump(config: str, host: str, *extra: str) -> dict[str, list[str]]:
    out = subprocess.run(
        ["ssh", "-G", "-F", config, *extra, host], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    result: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        result.setdefault(key, []).append(value)
    return result


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _ours(cfg: ClientConfig) -> dict[str, list[str]]:
    return {
        "hostname": [cfg.hostname],
        "user": [cfg.user],
        "port": [str(cfg.port)],
        "userknownhostsfile": [" ".join(cfg.user_known_hosts_files)],
        "compression": [_yes(cfg.compression)],
        "connecttimeout": [str(cfg.connect_timeout) if cfg.connect_timeout is not None else "none"],
        "serveraliveinterval": [str(cfg.server_alive_interval)],
        "serveralivecountmax": [str(cfg.server_alive_count_max)],
        "sendenv": cfg.send_env,
        "stricthostkeychecking": [
            {"yes": "true", "no": "false"}.get(cfg.strict_host_key_checking, cfg.strict_host_key_checking)
        ],
        "ciphers": [",".join(cfg.ciphers)],
        "macs": [",".join(cfg.macs)],
        "localforward": [format_forward(f) for f in cfg.local_forwards],
        "remoteforward": [format_forward(f) + (" [socks]:0" if f.is_dynamic else "") for f in cfg.remote_forwards],
        "dynamicforward": [format_forward(f) for f in cfg.dynamic_forwards],
        "hashknownhosts": [_yes(cfg.hash_known_hosts)],
        "batchmode": [_yes(cfg.batch_mode)],
        "exitonforwardfailure": [_yes(cfg.exit_on_forward_failure)],
        "gatewayports": [_yes(cfg.gateway_ports)],
    }


def _compare(cfg: ClientConfig, theirs: dict[str, list[str]]) -> None:
    ours = _ours(cfg)
    # ssh -G also lists a local forward to a unix socket under "dynamicforward": a quirk of its dump only
    unix_targets = {format_forward(f).split(" ")[0] for f in cfg.local_forwards if f.connect_path}
    theirs["dynamicforward"] = [d for d in theirs.get("dynamicforward", []) if d not in unix_targets]
    assert {k: ours[k] for k in ours} == {k: theirs.get(k, []) for k in ours}
    if cfg.proxy_jump:
        assert theirs["proxyjump"] == [cfg.proxy_jump]


ORACLE_CONFIGS = [
    (USER_CONFIG, "www.example.com"),
    (USER_CONFIG, "bad.example.com"),
    (USER_CONFIG, "alias"),
    (DEBIAN_SSH_CONFIG.replace("Include", "#"), "example.org"),
    (
        "Host a*\n  Port 1\n  Batchmode yes\nHost *\n  Port 2\n  GatewayPorts yes\n"
        "  ExitOnForwardFailure yes\n"
        "  MACs -umac*\n  LocalForward 8080 /tmp/s\n  RemoteForward 0 h:80\n  LocalForward /l/s /r/s\n"
        "  RemoteForward 7000\n  DynamicForward [::1]:1080\n",
        "abc",
    ),
    ("Match user nobody\n  Port 3\nHost *\n  User nobody\nMatch user nobody\n  Port 4\n", "x"),
]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH ssh not installed")
@pytest.mark.parametrize(("text", "host"), ORACLE_CONFIGS)
def test_effective_values_match_ssh(tmp_path: Path, text: str, host: str) -> None:
    path = write(tmp_path, text)
    _compare(resolve_client_config(host, config_file=path), _ssh_dump(path, host))


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH ssh not installed")
def test_options_match_ssh(tmp_path: Path) -> None:
    path = write(tmp_path, USER_CONFIG)
    options = ["Port=7", "Compression=no", "SendEnv=Z"]
    ours = resolve_client_config("www.example.com", user="zed", config_file=path, options=options)
    args = [arg for option in options for arg in ("-o", option)]
    _compare(ours, _ssh_dump(path, "www.example.com", "-l", "zed", *args))


def test_local_hostname_is_used_for_l() -> None:
    assert ssh_config._local_identity().hostname == socket.gethostname()
