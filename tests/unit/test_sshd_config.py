"""sshd_config: Debian's file, precedence, Match, Include, errors; OpenSSH's ``sshd -T`` as the oracle."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import as_local_openssh_kex

from sshconduit.config.sshd_config import (
    ServerConfig,
    default_server_config,
    load_server_config,
    parse_server_config,
    parse_server_options,
    split_permit_entry,
)
from sshconduit.errors import ConfigError

# Debian 12's /etc/ssh/sshd_config, comments trimmed.
DEBIAN_SSHD_CONFIG = """\
# This is the sshd server system-wide configuration file.  See
# sshd_config(5) for more information.

Include /etc/ssh/sshd_config.d/*.conf

#Port 22
#AddressFamily any
#ListenAddress 0.0.0.0
#HostKey /etc/ssh/ssh_host_rsa_key
#LoginGraceTime 2m
#PermitRootLogin prohibit-password
#AuthorizedKeysFile	.ssh/authorized_keys .ssh/authorized_keys2
KbdInteractiveAuthentication no
UsePAM yes
#AllowTcpForwarding yes
X11Forwarding yes
PrintMotd no
#MaxStartups 10:30:100

# Allow client to pass locale environment variables
AcceptEnv LANG LC_*

# override default of no subsystems
Subsystem	sftp	/usr/lib/openssh/sftp-server

# Example of overriding settings on a per-user basis
#Match User anoncvs
#	X11Forwarding no
"""

SSHD = "/usr/sbin/sshd"
needs_sshd = pytest.mark.skipif(
    not (os.path.exists(SSHD) and os.geteuid() == 0), reason="sshd -T needs OpenSSH's sshd and root"
)


def parse(text: str, source: str = "/etc/ssh/sshd_config") -> ServerConfig:
    return parse_server_config(text, source)


def test_debian_default_config() -> None:
    cfg = parse(DEBIAN_SSHD_CONFIG)
    assert cfg.warnings == []
    assert cfg.kbd_interactive_authentication is False
    assert cfg.use_pam is True
    assert cfg.x11_forwarding is True
    assert cfg.print_motd is False
    assert cfg.accept_env == ["LANG", "LC_*"]
    assert cfg.subsystems == {"sftp": "/usr/lib/openssh/sftp-server"}
    # untouched defaults
    assert cfg.port == [22]
    assert cfg.listen_endpoints() == [("::", 22), ("0.0.0.0", 22)]
    assert cfg.permit_root_login == "prohibit-password"
    assert cfg.authorized_keys_files == [".ssh/authorized_keys", ".ssh/authorized_keys2"]
    assert cfg.host_keys == [f"/etc/ssh/ssh_host_{k}_key" for k in ("rsa", "ecdsa", "ed25519")]
    assert cfg.max_startups == (10, 30, 100)
    assert cfg.login_grace_time == 120


@pytest.mark.skipif(not os.path.exists("/etc/ssh/sshd_config"), reason="no system sshd_config")
def test_the_system_file_loads() -> None:
    cfg = load_server_config("/etc/ssh/sshd_config")
    assert cfg.port


def test_defaults() -> None:
    cfg = default_server_config()
    assert (cfg.max_auth_tries, cfg.max_sessions, cfg.client_alive_interval, cfg.client_alive_count_max) == (
        6,
        10,
        0,
        3,
    )
    assert cfg.permit_open == ["any"] and cfg.allow_tcp_forwarding == "yes" and cfg.gateway_ports == "no"
    assert cfg.audit_log is None


def test_first_value_wins_and_lists_accumulate() -> None:
    cfg = parse(
        "MaxAuthTries 3\nMaxAuthTries 9\n"
        "Port 2222\nport=2223\n"
        "AllowUsers alice bob\nAllowUsers carol\n"
        "AcceptEnv LANG\nAcceptEnv LC_*\n"
        "HostKey /k1\nHostKey /k2\n"
        "PermitOpen a:1 [::1]:22\nPermitOpen b:2\n"
        'Banner "/etc/my banner"\nBanner /other\n'
        "ChallengeResponseAuthentication no\nKbdInteractiveAuthentication yes\n"
        "MaxStartups 5\nMaxStartups 7:20:40\n"  # sshd: the last MaxStartups wins
    )
    assert cfg.max_auth_tries == 3
    assert cfg.port == [2222, 2223]
    assert cfg.allow_users == ["alice", "bob", "carol"]
    assert cfg.accept_env == ["LANG", "LC_*"]
    assert cfg.host_keys == ["/k1", "/k2"]
    assert cfg.permit_open == ["a:1", "[::1]:22"]
    assert cfg.banner == "/etc/my banner"
    assert cfg.kbd_interactive_authentication is False
    assert cfg.max_startups == (7, 20, 40)


def test_typed_values() -> None:
    cfg = parse(
        "LoginGraceTime 1h30m\nClientAliveInterval 2m\nAllowTcpForwarding all\nGatewayPorts clientspecified\n"
        "PermitRootLogin without-password\nStreamLocalBindMask 0117\nMaxStartups 4\n"
        "AuthorizedKeysFile %h/.ssh/keys /etc/keys/%u %%\nForceCommand internal-sftp -d /x\n"
        "ChrootDirectory none\nLogLevel verbose\nSyslogFacility local3\nPidFile none\n"
        "ListenAddress 127.0.0.1\nListenAddress [::1]:2200\nListenAddress ::2\nListenAddress h:5 rdomain x\n"
        "AuditLog /var/log/conduitd.jsonl\nPermitListen 8080 localhost:9000 *:*\n"
        "AuthenticationMethods publickey,password publickey,keyboard-interactive:pam\n"
    )
    assert cfg.login_grace_time == 5400
    assert cfg.client_alive_interval == 120
    assert cfg.allow_tcp_forwarding == "yes"
    assert cfg.gateway_ports == "clientspecified"
    assert cfg.permit_root_login == "prohibit-password"
    assert cfg.stream_local_bind_mask == 0o117
    assert cfg.max_startups == (4, 30, 4)
    assert cfg.authorized_keys_files == ["%h/.ssh/keys", "/etc/keys/%u", "%%"]
    assert cfg.force_command == "internal-sftp -d /x"
    assert cfg.chroot_directory is None
    assert (cfg.log_level, cfg.syslog_facility, cfg.pid_file) == ("VERBOSE", "LOCAL3", None)
    assert cfg.listen_addresses == [("127.0.0.1", None), ("::1", 2200), ("::2", None), ("h", 5)]
    assert cfg.listen_endpoints() == [("127.0.0.1", 22), ("::1", 2200), ("::2", 22), ("h", 5)]
    assert cfg.audit_log == "/var/log/conduitd.jsonl"
    assert cfg.permit_listen == ["8080", "localhost:9000", "*:*"]
    assert cfg.authentication_methods == ["publickey,password", "publickey,keyboard-interactive:pam"]


def test_algorithm_lists() -> None:
    cfg = parse("Ciphers -*-ctr\nMACs hmac-sha2-256\nKexAlgorithms +diffie-hellman-group14-sha1\n")
    assert all(not c.endswith("-ctr") for c in cfg.ciphers) and "aes128-gcm@openssh.com" in cfg.ciphers
    assert cfg.macs == ("hmac-sha2-256",)
    assert cfg.kex_algorithms[-1] == "diffie-hellman-group14-sha1"


def test_permit_entries() -> None:
    assert split_permit_entry("host:80") == ("host", 80)
    assert split_permit_entry("[::1]:22") == ("::1", 22)
    assert split_permit_entry("*:443") == (None, 443)
    assert split_permit_entry("db:*") == ("db", None)
    assert split_permit_entry("8080", listen=True) == (None, 8080)
    for bad in ("host", "host:x", "host:70000", ":80", "[::1]22"):
        with pytest.raises(ValueError):
            split_permit_entry(bad)


def test_unsupported_keywords_warn_with_file_and_line() -> None:
    cfg = parse("X11DisplayOffset 10\nPort 22\nprotocol 2\n", "/tmp/x.conf")
    assert cfg.warnings == [
        "conduitd: /tmp/x.conf:1: keyword 'X11DisplayOffset' is not supported and is ignored",
        "conduitd: /tmp/x.conf:3: keyword 'Protocol' is not supported and is ignored",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Port 22\nFooo bar\n", "/etc/ssh/sshd_config: line 2: Bad configuration option: Fooo"),
        (
            "AllowTcpForwarding maybe\n",
            '/etc/ssh/sshd_config: line 1: invalid value for AllowTcpForwarding: "maybe"',
        ),
        ("PasswordAuthentication true\n", 'invalid value for PasswordAuthentication: "true"'),
        ("PermitRootLogin sometimes\n", 'invalid value for PermitRootLogin: "sometimes"'),
        ("GatewayPorts maybe\n", 'invalid value for GatewayPorts: "maybe"'),
        ("MaxAuthTries x\n", 'invalid value for MaxAuthTries: "x"'),
        ("LoginGraceTime 2x\n", 'invalid value for LoginGraceTime: "2x"'),
        ("Port 0\n", "line 1: Badly formatted port number: 0"),
        ("Port 22 23\n", "line 1: keyword Port extra arguments at end of line"),
        ("MaxAuthTries\n", 'line 1: no argument after keyword "MaxAuthTries"'),
        ("MaxStartups 10:30:5\n", "line 1: Invalid MaxStartups spec."),
        ("MaxStartups 5:30\n", "line 1: Invalid MaxStartups spec."),
        ("PerSourceMaxStartups -1\n", "line 1: PerSourceMaxStartups integer value too small."),
        ("PerSourceMaxStartups x\n", "line 1: PerSourceMaxStartups integer value invalid."),
        ("PerSourceNetBlockSize 33\n", "line 1: Invalid PerSourceNetBlockSize spec."),
        ("PerSourceNetBlockSize 24:129\n", "line 1: Invalid PerSourceNetBlockSize spec."),
        ("ListenAddress 1.2.3.4:99999\n", "line 1: bad port number"),
        ("Ciphers aes128-ctr,nope\n", "line 1: Bad SSH2 cipher spec 'aes128-ctr,nope'."),
        ("MACs +nope\n", "line 1: Bad SSH2 MAC spec '+nope'."),
        ("RekeyLimit none\n", "line 1: Bad RekeyLimit number 'none': Invalid argument"),  # sshd's words
        ("RekeyLimit default default\n", "line 1: invalid time value."),
        ("RekeyLimit 12\n", "line 1: RekeyLimit too small"),
        ("PermitOpen host\n", 'line 1: invalid value for PermitOpen: "host"'),
        ("StreamLocalBindMask 0800\n", "line 1: Invalid StreamLocalBindMask."),
        ("Subsystem sftp /a\nSubsystem sftp /b\n", "line 2: Subsystem 'sftp' already defined."),
        ("Subsystem sftp\n", "line 1: Missing subsystem command."),
        ('Banner "unterminated\n', "line 1: invalid quotes"),
        ("AuthenticationMethods publickey,foo\n", "invalid value for AuthenticationMethods"),
        ("Match User x\nPort 33\n", "line 2: Directive 'Port' is not allowed within a Match block"),
        ("Match User x\nMaxAuthTries x\n", 'line 2: invalid value for MaxAuthTries: "x"'),
        ("Match Fooo x\n", "line 1: Unsupported Match attribute Fooo"),
        ("Match User\n", "line 1: Missing Match criteria for User"),
        ("Match All User x\n", "line 1: 'all' cannot be combined with other Match attributes"),
        ("Match Address 10.0.0.1/8\n", "line 1: Invalid Match address argument '10.0.0.1/8'"),
        ("Match\n", "line 1: One or more attributes required for Match"),
    ],
)
def test_errors_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert message in str(info.value)
    assert str(info.value).startswith("/etc/ssh/sshd_config: line ")


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope"):
        load_server_config(tmp_path / "nope")


MATCH_CONFIG = """\
AllowTcpForwarding no
PermitOpen any
MaxAuthTries 5
Match User alice
  AllowTcpForwarding local
  PermitOpen *:443 db:5432
  AllowUsers zed
Match User alice,bob Address 127.0.0.0/8
  AllowTcpForwarding remote
  GatewayPorts clientspecified
  MaxAuthTries 2
Match Group admins,!banned
  PasswordAuthentication no
Match Host *.EXAMPLE.com LocalPort 2222
  X11Forwarding yes
Match LocalAddress 10.1.0.0/16,!10.1.2.3
  Banner /etc/inner
Match All
  PermitTTY no
"""


def test_match_blocks() -> None:
    base = parse(MATCH_CONFIG)
    assert (base.allow_tcp_forwarding, base.max_auth_tries, base.permit_tty) == ("no", 5, True)

    alice = base.for_connection("alice", "h", "127.0.0.1", "127.0.0.1", 22)
    assert alice.allow_tcp_forwarding == "local"  # first matching block wins
    assert alice.permit_open == ["*:443", "db:5432"]
    assert alice.allow_users == ["zed"]  # a list in a Match block replaces the main one
    assert alice.gateway_ports == "clientspecified"
    assert alice.max_auth_tries == 2
    assert alice.permit_tty is False
    assert base.allow_tcp_forwarding == "no"  # the base object is untouched

    remote_alice = base.for_connection("alice", "h", "192.0.2.1", "192.0.2.2", 22)
    assert remote_alice.max_auth_tries == 5

    bob = base.for_connection("bob", "h", "127.0.0.2", "127.0.0.1", 22)
    assert bob.allow_tcp_forwarding == "remote"

    admin = base.for_connection("carol", "h", "192.0.2.1", "192.0.2.2", 22, groups=["users", "admins"])
    assert admin.password_authentication is False
    banned = base.for_connection("carol", "h", "192.0.2.1", "192.0.2.2", 22, groups=["admins", "banned"])
    assert banned.password_authentication is True

    assert base.for_connection("x", "www.example.com", "1.2.3.4", "5.6.7.8", 2222).x11_forwarding is True
    assert base.for_connection("x", "www.example.com", "1.2.3.4", "5.6.7.8", 22).x11_forwarding is False

    assert base.for_connection("x", "h", "1.2.3.4", "10.1.9.9", 22).banner == "/etc/inner"
    assert base.for_connection("x", "h", "1.2.3.4", "10.1.2.3", 22).banner is None


def test_include_globs_and_match_scope(tmp_path: Path) -> None:
    inc = tmp_path / "conf.d"
    inc.mkdir()
    (inc / "10-first.conf").write_text("MaxAuthTries 4\nMatch User alice\nPasswordAuthentication no\n")
    (inc / "20-second.conf").write_text("MaxAuthTries 9\nMaxSessions 3\n")
    (inc / "ignored.txt").write_text("Fooo\n")
    (tmp_path / "inner.conf").write_text("Port 33\n")
    main = tmp_path / "sshd_config"
    main.write_text(
        f"Include {inc}/*.conf\nPort 2200\nInclude {tmp_path}/nomatch-*.conf\n"
        f"Match User bob\nInclude {inc}/10-first.conf\nMaxSessions 1\n"
    )
    cfg = load_server_config(main)
    assert cfg.max_auth_tries == 4  # files in sorted order, first value wins
    assert cfg.max_sessions == 3
    assert cfg.port == [2200]  # the Match in the included file ended with that file
    assert cfg.for_connection("alice", "h", "1.1.1.1", "2.2.2.2", 22).password_authentication is False
    bob = cfg.for_connection("bob", "h", "1.1.1.1", "2.2.2.2", 22)
    assert bob.max_sessions == 1 and bob.password_authentication is True

    (tmp_path / "bad.conf").write_text(f"Match User x\nInclude {tmp_path}/inner.conf\n")
    with pytest.raises(ConfigError) as info:
        load_server_config(tmp_path / "bad.conf")
    assert str(info.value) == f"{tmp_path}/inner.conf: line 1: Directive 'Port' is not allowed within a Match block"

    loop = tmp_path / "loop.conf"
    loop.write_text(f"Include {loop}\n")
    with pytest.raises(ConfigError, match="Include nested too deeply"):
        load_server_config(loop)


def test_command_line_options_take_precedence(tmp_path: Path) -> None:
    path = tmp_path / "sshd_config"
    path.write_text("MaxAuthTries 5\nPort 2022\n")
    cfg = parse_server_options(["MaxAuthTries=2", "Port 2200", "ListenAddress=::1"], load_server_config(path))
    assert cfg.max_auth_tries == 2
    assert cfg.port == [2200, 2022]
    assert cfg.listen_endpoints() == [("::1", 2200), ("::1", 2022)]
    with pytest.raises(ConfigError, match="command-line: line 0: Bad configuration option: Nope"):
        parse_server_options(["Nope=1"], cfg)


def test_options_on_a_config_built_in_code() -> None:
    cfg = default_server_config()
    cfg.port = [2022]
    cfg.host_keys = ["/state/key"]
    cfg.password_authentication = False
    result = parse_server_options(["Port=2200", "MaxSessions 4"], cfg)
    assert result.port == [2200]  # replaces the value set in code, no merge with a default
    assert result.host_keys == ["/state/key"] and result.password_authentication is False
    assert result.max_sessions == 4
    matched = parse_server_options(["MaxSessions 4"], parse("Match User a\n  MaxSessions 1\n"))
    assert matched.for_connection("a", "h", "1.1.1.1", "2.2.2.2", 22).max_sessions == 1


# ---------------------------------------------------------------- OpenSSH's sshd -T as the oracle

ORACLE_CONFIG = """\
Port 2222
Port 2223
ListenAddress 127.0.0.1
ListenAddress [::1]:2200
AcceptEnv LANG LC_*
AcceptEnv FOO
AllowUsers alice bob
AllowUsers carol
PermitOpen host1:80 [::1]:22
PermitOpen ignored:1
AllowTcpForwarding no
Subsystem sftp /usr/lib/openssh/sftp-server
LoginGraceTime 1h30m
ClientAliveInterval 1m
MaxStartups 7:20:40
PerSourceMaxStartups 4
PerSourceNetBlockSize 24
KbdInteractiveAuthentication no
UsePAM yes
X11Forwarding yes
PrintMotd no
Ciphers -*-ctr
MACs ^hmac-sha2-512
KexAlgorithms +diffie-hellman-group14-sha1
StreamLocalBindMask 0111
Match User alice
  AllowTcpForwarding local
  PermitOpen *:443
  AllowUsers zed
Match User alice,bob Address 127.0.0.0/8
  AllowTcpForwarding remote
  GatewayPorts clientspecified
  MaxAuthTries 2
  PermitRootLogin no
Match Address 10.0.0.0/8,!10.9.9.9 LocalPort 2222
  PasswordAuthentication no
  Banner /etc/issue
"""


@pytest.fixture
def host_key(tmp_path: Path) -> Path:
    key = tmp_path / "hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    os.makedirs("/run/sshd", exist_ok=True)  # sshd -T insists on its privilege separation directory
    return key


def sshd_dump(config: Path, connection: str | None = None) -> dict[str, list[str]]:
    args = [SSHD, "-T", "-f", str(config)]
    if connection:
        args += ["-C", connection]
    out = subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout
    return _dump_to_dict(out)


def _dump_to_dict(text: str) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        result.setdefault(key, []).append(value)
    result.pop("hostkey", None)
    if result.get("permitrootlogin") == ["without-password"]:
        result["permitrootlogin"] = ["prohibit-password"]  # the same setting under its old name
    return result


def _compare(ours: ServerConfig, theirs: dict[str, list[str]]) -> None:
    mine = _dump_to_dict(ours.dump())
    mine["kexalgorithms"] = [as_local_openssh_kex(v) for v in mine.get("kexalgorithms", [])]
    common = set(mine) & set(theirs)
    assert len(common) > 40
    assert {key: mine[key] for key in common} == {key: theirs[key] for key in common}


@needs_sshd
@pytest.mark.parametrize(
    "text",
    # Match blocks cut off: without -C, sshd -T refuses a config whose Match needs the local port
    [ORACLE_CONFIG.split("Match")[0], DEBIAN_SSHD_CONFIG.replace("Include", "#"), ""],
)
def test_effective_values_match_sshd(tmp_path: Path, host_key: Path, text: str) -> None:
    path = tmp_path / "sshd_config"
    path.write_text(f"HostKey {host_key}\n{text}")
    cfg = load_server_config(path)
    theirs = sshd_dump(path)
    _compare(cfg, theirs)


@needs_sshd
@pytest.mark.parametrize(
    ("user", "address", "local_port"),
    [
        ("alice", "127.0.0.1", 22),
        ("bob", "127.0.0.5", 22),
        ("carol", "10.1.1.1", 2222),
        ("carol", "10.9.9.9", 2222),
    ],
)
def test_match_results_match_sshd(tmp_path: Path, host_key: Path, user: str, address: str, local_port: int) -> None:
    path = tmp_path / "sshd_config"
    path.write_text(f"HostKey {host_key}\n{ORACLE_CONFIG}")
    ours = load_server_config(path).for_connection(user, "client.example", address, "127.0.0.1", local_port)
    connection = f"user={user},host=client.example,addr={address},laddr=127.0.0.1,lport={local_port}"
    _compare(ours, sshd_dump(path, connection))


@needs_sshd
@pytest.mark.parametrize(
    "line",
    [
        "Fooo bar",
        "AllowTcpForwarding maybe",
        "Port 22 23",
        "MaxStartups 10:30:5",
        "PerSourceMaxStartups x",
        "PerSourceNetBlockSize 24:129",
        "Ciphers nope",
        "Match User x\nPort 3",
    ],
)
def test_rejected_like_sshd(tmp_path: Path, host_key: Path, line: str) -> None:
    path = tmp_path / "sshd_config"
    path.write_text(f"HostKey {host_key}\n{line}\n")
    proc = subprocess.run([SSHD, "-t", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    with pytest.raises(ConfigError):
        load_server_config(path)


@needs_sshd
def test_debian_unsupported_keywords_are_known_to_sshd(tmp_path: Path, host_key: Path) -> None:
    # every keyword we accept-with-warning must really be one sshd knows (no silent typos)
    from sshconduit.config.sshd_config import _UNSUPPORTED

    lines = "\n".join(f"{name} x" for name in sorted(_UNSUPPORTED))
    path = tmp_path / "sshd_config"
    path.write_text(f"HostKey {host_key}\n{lines}\n")
    proc = subprocess.run([SSHD, "-t", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert "Bad configuration option" not in proc.stderr


def test_use_privilege_separation_defaults_to_yes():
    """On by default (conduitd separates only as root); ``no`` turns it off; older sshd's ``sandbox`` is yes,
    and -T, as sshd's, does not print the keyword."""
    assert default_server_config().use_privilege_separation is True
    assert parse("UsePrivilegeSeparation no\n").use_privilege_separation is False
    assert parse("UsePrivilegeSeparation sandbox\n").use_privilege_separation is True
    assert "useprivilegeseparation" not in parse("UsePrivilegeSeparation no\n").dump().lower()
    with pytest.raises(ConfigError, match='invalid value for UsePrivilegeSeparation: "maybe"'):
        parse("UsePrivilegeSeparation maybe\n")
