"""The exec round trip against real OpenSSH in both roles, for every kex method x cipher/MAC and host-key type.

Each client offers exactly one kex method, one cipher and one MAC, so a passing run proves that very
combination was negotiated and worked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import (
    SSHD,
    USER,
    conduit_argv,
    env_with_src,
    free_port,
    run_client,
    server_config_text,
    ssh_argv,
    start_daemon,
)

from sshconduit.crypto.ciphers import CLIENT_CIPHERS

COMMAND = "echo ok-$((6*7)); exit 3"

KEX_WITH_OPENSSH = [
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group14-sha256",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
]
CIPHER_MACS = [
    ("chacha20-poly1305@openssh.com", None),
    ("aes128-gcm@openssh.com", None),
    ("aes256-gcm@openssh.com", None),
    ("aes128-ctr", "hmac-sha2-256-etm@openssh.com"),
    ("aes128-ctr", "hmac-sha2-256"),
    ("aes256-ctr", "hmac-sha2-512-etm@openssh.com"),
    ("aes256-ctr", "hmac-sha2-512"),
]


def algorithm_args(kex: str, cipher: str, mac: str | None) -> list[str]:
    args = ["-o", f"KexAlgorithms={kex}", "-c", cipher]
    if mac:
        args += ["-m", mac]
    return args


def assert_round_trip(result) -> None:
    assert result.stdout == b"ok-42\n", result.stderr.decode(errors="replace")
    assert result.returncode == 3, result.stderr.decode(errors="replace")


@pytest.fixture(scope="module")
def servers(keyset, tmp_path_factory):
    """One OpenSSH sshd and one conduitd per host-key type, for the whole module."""
    Path("/run/sshd").mkdir(exist_ok=True)
    root = tmp_path_factory.mktemp("matrix")
    started = {}
    contexts = []
    for kind in ("ed25519", "ecdsa", "rsa"):
        for daemon in ("sshd", "conduitd"):
            port = free_port()
            config = root / f"{daemon}_{kind}"
            config.write_text(server_config_text(keyset, port, kind))
            if daemon == "sshd":
                argv, env = [SSHD, "-D", "-e", "-f", str(config)], None
            else:
                argv, env = (
                    [sys.executable, "-m", "sshconduit.cli.conduitd", "-D", "-e", "-f", str(config)],
                    env_with_src(),
                )
            ctx = start_daemon(argv, port, config, env)
            started[(daemon, kind)] = ctx.__enter__()
            contexts.append(ctx)
    yield started
    for ctx in contexts:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("kex", KEX_WITH_OPENSSH)
def test_conduit_to_openssh_sshd(kex, keyset, servers):
    port = servers[("sshd", "ed25519")].port
    for cipher, mac in CIPHER_MACS:
        argv = conduit_argv(keyset, port, *algorithm_args(kex, cipher, mac), f"{USER}@127.0.0.1", COMMAND)
        assert_round_trip(run_client(argv))


@pytest.mark.parametrize("kex", KEX_WITH_OPENSSH)
def test_openssh_ssh_to_conduitd(kex, keyset, servers):
    port = servers[("conduitd", "ed25519")].port
    for cipher, mac in CIPHER_MACS:
        argv = ssh_argv(keyset, port, *algorithm_args(kex, cipher, mac), f"{USER}@127.0.0.1", COMMAND)
        assert_round_trip(run_client(argv))


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_host_key_types_with_defaults(kind, keyset, servers):
    expected = {"ed25519": "ssh-ed25519", "ecdsa": "ecdsa-sha2-nistp256", "rsa": "rsa-sha2-512"}[kind]
    result = run_client(conduit_argv(keyset, servers[("sshd", kind)].port, "-v", f"{USER}@127.0.0.1", COMMAND))
    assert_round_trip(result)
    assert f"host key algorithm: {expected}" in result.stderr.decode()
    result = run_client(ssh_argv(keyset, servers[("conduitd", kind)].port, "-v", f"{USER}@127.0.0.1", COMMAND))
    assert_round_trip(result)
    assert f"kex: host key algorithm: {expected}" in result.stderr.decode()


@pytest.mark.parametrize("kex", ["mlkem768x25519-sha256", "curve25519-sha256", "diffie-hellman-group14-sha256"])
def test_conduit_to_conduitd(kex, keyset, servers):
    port = servers[("conduitd", "ed25519")].port
    for cipher, mac in CIPHER_MACS:
        argv = conduit_argv(keyset, port, "-v", *algorithm_args(kex, cipher, mac), f"{USER}@127.0.0.1", COMMAND)
        result = run_client(argv)
        assert_round_trip(result)
        assert f"kex: algorithm: {kex};" in result.stderr.decode()


def test_default_negotiation_prefers_mlkem_between_us(keyset, servers):
    result = run_client(conduit_argv(keyset, servers[("conduitd", "ed25519")].port, "-v", f"{USER}@127.0.0.1", COMMAND))
    assert_round_trip(result)
    assert "kex: algorithm: mlkem768x25519-sha256;" in result.stderr.decode()


def test_default_cipher_to_sshd(keyset, servers):
    """With no Ciphers given, conduit offers AES-GCM first where the CPU has AES instructions (CLIENT_CIPHERS);
    a given one, even relative, means what it means to ssh: OpenSSH's default without aes128-gcm starts with
    chacha20-poly1305 (CLIENT_CIPHERS without it would start with aes256-gcm on such a CPU)."""
    port = servers[("sshd", "ed25519")].port
    for options, expected in (
        ((), CLIENT_CIPHERS[0]),
        (("-o", "Ciphers=-aes128-gcm@openssh.com"), "chacha20-poly1305@openssh.com"),
    ):
        result = run_client(conduit_argv(keyset, port, "-v", *options, f"{USER}@127.0.0.1", COMMAND))
        assert_round_trip(result)
        assert f"cipher out: {expected} " in result.stderr.decode()
