"""conduitd's per-connection policy from sshd_config and authorized_keys, checked with OpenSSH's ssh as the
client, and where cheap against OpenSSH's sshd on the same config with the same outcome."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess

import pytest
from conftest import USER, EchoServer, KeySet, env_with_src, free_port, keys_file, run_client, wait_for_port

SERVERS = ["conduitd", "openssh"]
PROHIBITED = "administratively prohibited"


@pytest.fixture
def servers(conduitd_server, openssh_server):
    return {"conduitd": conduitd_server, "openssh": openssh_server}


def client_argv(keyset: KeySet, port: int, *args: str, command: tuple[str, ...] = ()) -> list[str]:
    """ssh at its default LogLevel (INFO), so a refused channel's "open failed" line reaches stderr."""
    return [
        "ssh", "-F", "none", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-i", str(keyset.client_key), "-p", str(port), *args, f"{USER}@127.0.0.1", *command,
    ]  # fmt: skip


def forward_once(keyset: KeySet, port: int, dest_port: int, payload: bytes = b"hello") -> tuple[bytes, str]:
    """``ssh -N -L`` to 127.0.0.1:dest_port; one connection through it. Returns (echoed bytes, ssh's stderr)."""
    lport = free_port()
    argv = client_argv(keyset, port, "-N", "-L", f"{lport}:127.0.0.1:{dest_port}")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(lport, proc)
        with socket.create_connection(("127.0.0.1", lport), timeout=10) as s:
            chunks = []
            with contextlib.suppress(OSError):  # a refused channel closes the socket at once
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                while chunk := s.recv(65536):
                    chunks.append(chunk)
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=5)
    return b"".join(chunks), err.decode(errors="replace")


def assert_forwards(keyset: KeySet, port: int, dest_port: int) -> None:
    echoed, err = forward_once(keyset, port, dest_port)
    assert echoed == b"hello", err


def assert_prohibited(keyset: KeySet, port: int, dest_port: int) -> None:
    echoed, err = forward_once(keyset, port, dest_port)
    assert echoed == b""
    assert PROHIBITED in err, err


def login(keyset: KeySet, port: int, *args: str) -> subprocess.CompletedProcess:
    return run_client(client_argv(keyset, port, *args, command=("true",)))


# --- sshd_config forwarding keywords ---


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize(
    ("extra", "allowed"),
    [
        ("AllowTcpForwarding no\n", False),
        ("AllowTcpForwarding local\n", True),
        ("AllowTcpForwarding remote\n", False),
        ("AllowTcpForwarding yes\nDisableForwarding yes\n", False),
        (f"Match User {USER}\n  AllowTcpForwarding no\n", False),
        ("Match User nobody-else\n  AllowTcpForwarding no\n", True),
        ("AllowTcpForwarding no\nMatch Address 127.0.0.0/8\n  AllowTcpForwarding yes\n", True),
    ],
    ids=["no", "local", "remote", "disable", "match-user", "match-other-user", "match-address"],
)
def test_allow_tcp_forwarding(server, servers, keyset, echo_server, extra, allowed):
    with servers[server](extra) as daemon:
        if allowed:
            assert_forwards(keyset, daemon.port, echo_server.port)
        else:
            assert_prohibited(keyset, daemon.port, echo_server.port)


@pytest.mark.parametrize("server", SERVERS)
def test_permit_open_exact_destination(server, servers, keyset, echo_server):
    other = EchoServer()
    try:
        with servers[server](f"PermitOpen 127.0.0.1:{echo_server.port}\n") as daemon:
            assert_forwards(keyset, daemon.port, echo_server.port)
            assert_prohibited(keyset, daemon.port, other.port)
        assert other.connections == 0
    finally:
        other.close()


# --- authorized_keys options ---


@pytest.mark.parametrize("server", SERVERS)
def test_authorized_keys_permitopen(server, servers, keyset, echo_server, tmp_path):
    other = EchoServer()
    try:
        with servers[server](keys_file(tmp_path, keyset, f'permitopen="127.0.0.1:{echo_server.port}"')) as daemon:
            assert_forwards(keyset, daemon.port, echo_server.port)
            assert_prohibited(keyset, daemon.port, other.port)
    finally:
        other.close()


@pytest.mark.parametrize("server", SERVERS)
def test_authorized_keys_restrict(server, servers, keyset, echo_server, tmp_path):
    with servers[server](keys_file(tmp_path, keyset, "restrict")) as daemon:
        assert_prohibited(keyset, daemon.port, echo_server.port)
        result = login(keyset, daemon.port, "-tt")
        assert "PTY allocation request failed" in result.stderr.decode(errors="replace")
        assert login(keyset, daemon.port).returncode == 0  # the login itself is allowed


@pytest.mark.parametrize("server", SERVERS)
def test_authorized_keys_from(server, servers, keyset, tmp_path):
    with servers[server](keys_file(tmp_path, keyset, 'from="10.0.0.0/8"')) as daemon:
        result = login(keyset, daemon.port)
        assert result.returncode == 255
        assert "Permission denied" in result.stderr.decode(errors="replace")
    with servers[server](keys_file(tmp_path, keyset, 'from="127.0.0.0/8"')) as daemon:
        assert login(keyset, daemon.port).returncode == 0


# --- who may log in ---


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize(
    ("extra", "allowed"),
    [
        ("AllowUsers nobody-else\n", False),
        (f"AllowUsers nobody-else {USER}\n", True),
        (f"AllowUsers {USER}@127.0.0.1\n", True),
        (f"AllowUsers {USER}@10.0.0.0/8\n", False),
        (f"DenyUsers {USER}\n", False),
        (f"DenyUsers {USER}@10.0.0.0/8\n", True),
        (f"AllowUsers {USER}\nDenyUsers {USER}\n", False),
    ],
    ids=["allow-other", "allow-listed", "allow-at-host", "allow-at-other-net", "deny", "deny-other-net", "both"],
)
def test_allow_deny_users(server, servers, keyset, extra, allowed):
    with servers[server](extra) as daemon:
        result = login(keyset, daemon.port)
        assert (result.returncode == 0) == allowed, result.stderr.decode(errors="replace")
        log = daemon.output()
    if not allowed and server == "conduitd":
        assert f"User {USER} from 127.0.0.1 not allowed because" in log, log


# --- the audit trail ---


def test_audit_log_json(conduitd_server, keyset, echo_server, tmp_path):
    audit_path = tmp_path / "audit.jsonl"
    extra = f"PermitOpen 127.0.0.1:{echo_server.port}\nAuditLog {audit_path}\n"
    other = EchoServer()
    try:
        with conduitd_server(extra) as daemon:
            assert_forwards(keyset, daemon.port, echo_server.port)
            assert_prohibited(keyset, daemon.port, other.port)
            log = daemon.output()
    finally:
        other.close()
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    forwards = [r for r in records if r["event"] == "forward" and r["bytes_from_client"]]  # not the port probe
    refusals = [r for r in records if r["event"] == "refused"]
    assert len(forwards) == 1 and len(refusals) == 2, records  # refused twice: the port probe, then ours
    fwd, ref = forwards[0], refusals[-1]
    assert fwd["user"] == USER and fwd["address"] == "127.0.0.1" and fwd["kind"] == "direct-tcpip"
    assert fwd["destination"] == f"127.0.0.1:{echo_server.port}"
    assert fwd["bytes_from_client"] == 5 and fwd["bytes_to_client"] == 5 and fwd["duration"] >= 0
    assert ref["destination"] == f"127.0.0.1:{other.port}" and ref["reason"] == "PermitOpen"
    assert f"audit: refused direct-tcpip to 127.0.0.1:{other.port} for {USER} from 127.0.0.1: PermitOpen" in log
    assert "audit: direct-tcpip for" in log


def test_match_applies_only_to_matching_user_in_dump(tmp_path, keyset):
    """``conduitd -T -C`` prints the Match-applied config, and agrees with ``sshd -T -C``."""
    config = tmp_path / "cfg"
    config.write_text(
        f"HostKey {keyset.host_keys['ed25519']}\nPidFile none\nAllowTcpForwarding yes\n"
        "Match User alice Address 127.0.0.0/8\n  AllowTcpForwarding no\n  MaxSessions 2\n"
    )
    for spec, forwarding, sessions in (
        ("user=alice,host=h,addr=127.0.0.1", "no", "2"),
        ("user=alice,host=h,addr=10.1.2.3", "yes", "10"),
        ("user=bob,host=h,addr=127.0.0.1", "yes", "10"),
    ):
        outs = []
        for argv in (
            ["python3", "-m", "sshconduit.cli.conduitd", "-T", "-C", spec, "-f", str(config)],
            ["/usr/sbin/sshd", "-T", "-C", spec, "-f", str(config)],
        ):
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env_with_src())
            assert result.returncode == 0, result.stderr
            lines = set(result.stdout.splitlines())
            outs.append(lines)
            assert f"allowtcpforwarding {forwarding}" in lines, (argv, spec)
            assert f"maxsessions {sessions}" in lines, (argv, spec)


def test_rekey_limit_in_the_dump_agrees_with_sshd(tmp_path, keyset):
    """RekeyLimit, main section and Match, as ``sshd -T -C`` prints it (bytes and seconds, 0 for the default)."""
    config = tmp_path / "cfg"
    config.write_text(
        f"HostKey {keyset.host_keys['ed25519']}\nPidFile none\nRekeyLimit 1G 1h\n"
        "Match User alice\n  RekeyLimit 64K none\nMatch User bob\n  RekeyLimit default 30m\n"
    )
    for spec, expected in (
        ("user=alice,host=h,addr=127.0.0.1", "rekeylimit 65536 3600"),  # "none": the main section's time
        ("user=bob,host=h,addr=127.0.0.1", "rekeylimit 0 1800"),
        ("user=carol,host=h,addr=127.0.0.1", "rekeylimit 1073741824 3600"),
    ):
        for argv in (
            ["python3", "-m", "sshconduit.cli.conduitd", "-T", "-C", spec, "-f", str(config)],
            ["/usr/sbin/sshd", "-T", "-C", spec, "-f", str(config)],
        ):
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env_with_src())
            assert result.returncode == 0, result.stderr
            assert expected in result.stdout.splitlines(), (argv[0], spec)


# --- the pieces, without a daemon ---


def test_access_denial_order_and_patterns():
    from sshconduit.access import access_denial

    assert access_denial("alice", "127.0.0.1") is None
    assert access_denial("alice", "127.0.0.1", deny_users=["a*"]) == "listed in DenyUsers"
    assert access_denial("alice", "127.0.0.1", allow_users=["bob"]) == "not listed in AllowUsers"
    assert access_denial("alice", "127.0.0.1", allow_users=["alice@127.0.0.0/8"]) is None
    assert access_denial("alice", "10.1.1.1", allow_users=["alice@127.0.0.0/8"]) == "not listed in AllowUsers"
    assert access_denial("alice", "127.0.0.1", allow_users=["alice"], deny_users=["alice"]) == "listed in DenyUsers"
    assert access_denial("root", "127.0.0.1", deny_groups=["root"]) == "a group is listed in DenyGroups"
    assert access_denial("root", "127.0.0.1", allow_groups=["nogroup-x"]) is not None
    assert access_denial("root", "127.0.0.1", allow_groups=["r*"]) is None


def test_startup_gate_is_random_early_drop():
    import random

    from sshconduit.server_config import StartupGate

    random.seed(7)
    gate = StartupGate()
    gate.unauthenticated = 9
    assert all(gate.admit((10, 30, 60)) for _ in range(100))  # below start: always
    gate.unauthenticated = 60
    assert not any(gate.admit((10, 30, 60)) for _ in range(100))  # at full: never
    gate.unauthenticated = 10
    admitted = sum(gate.admit((10, 30, 60)) for _ in range(2000))
    assert 1200 < admitted < 1600  # at start: refused with probability 30%
    gate.unauthenticated = 35
    admitted = sum(gate.admit((10, 30, 60)) for _ in range(2000))
    assert 550 < admitted < 850  # halfway: 65% refused


def test_connection_spec():
    from sshconduit.errors import ConfigError
    from sshconduit.server_config import parse_connection_spec

    assert parse_connection_spec("user=a,host=h,addr=1.2.3.4,lport=22") == {
        "user": "a",
        "host": "h",
        "addr": "1.2.3.4",
        "lport": "22",
    }
    with pytest.raises(ConfigError):
        parse_connection_spec("usr=a")
