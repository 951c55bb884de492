"""Algorithm-list specs (+ - ^), checked against OpenSSH's own resolution via ``ssh -G``."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import as_local_openssh_kex

from sshconduit.config.algorithms import (
    ALGORITHM_KEYWORDS,
    DEFAULT_CIPHERS,
    DEFAULT_KEX,
    DEFAULT_MACS,
    KNOWN_CIPHERS,
    KNOWN_MACS,
    apply_algorithm_spec,
)
from sshconduit.errors import ConfigError


def test_plain_list_replaces_default_in_given_order() -> None:
    assert apply_algorithm_spec(DEFAULT_CIPHERS, KNOWN_CIPHERS, "aes256-ctr,aes128-ctr", "cipher") == (
        "aes256-ctr",
        "aes128-ctr",
    )


def test_plus_appends_and_skips_duplicates() -> None:
    result = apply_algorithm_spec(DEFAULT_CIPHERS, KNOWN_CIPHERS, "+aes128-cbc,aes128-ctr", "cipher")
    assert result == (*DEFAULT_CIPHERS, "aes128-cbc")


def test_caret_puts_first_without_duplicating() -> None:
    result = apply_algorithm_spec(DEFAULT_CIPHERS, KNOWN_CIPHERS, "^aes256-gcm@openssh.com", "cipher")
    assert result[0] == "aes256-gcm@openssh.com"
    assert sorted(result) == sorted(DEFAULT_CIPHERS)


def test_minus_removes_wildcards() -> None:
    result = apply_algorithm_spec(DEFAULT_MACS, KNOWN_MACS, "-umac*,hmac-sha1*", "MAC")
    assert result == (
        "hmac-sha2-256-etm@openssh.com",
        "hmac-sha2-512-etm@openssh.com",
        "hmac-sha2-256",
        "hmac-sha2-512",
    )


def test_minus_of_unknown_name_is_not_an_error() -> None:
    assert apply_algorithm_spec(DEFAULT_KEX, DEFAULT_KEX, "-nonexistent", "KexAlgorithms") == DEFAULT_KEX


@pytest.mark.parametrize("spec", ["foo", "+foo", "^aes128-ctr,foo", "aes128-ctr,", "", "+", "aes*"])
def test_unknown_names_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_algorithm_spec(DEFAULT_CIPHERS, KNOWN_CIPHERS, spec, "cipher")
    assert str(info.value) == f"Bad SSH2 cipher spec '{spec}'."


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH ssh not installed")
@pytest.mark.parametrize(
    ("keyword", "spec"),
    [
        ("ciphers", "aes256-ctr,aes128-ctr"),
        ("ciphers", "+aes128-cbc"),
        ("ciphers", "-*-ctr"),
        ("ciphers", "^aes256-gcm@openssh.com,aes128-ctr"),
        ("macs", "-umac*,hmac-sha1*"),
        ("kexalgorithms", "+diffie-hellman-group14-sha1"),
        ("kexalgorithms", "-sntrup*,ecdh-*"),
        ("hostkeyalgorithms", "^ssh-ed25519"),
        ("pubkeyacceptedalgorithms", "+ssh-rsa"),
        ("pubkeyacceptedalgorithms", "-*cert*"),
    ],
)
def test_matches_openssh(keyword: str, spec: str) -> None:
    out = subprocess.run(
        ["ssh", "-G", "-F", "none", "-o", f"{keyword}={spec}", "example.invalid"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    openssh = next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith(keyword + " "))
    default, known, what = ALGORITHM_KEYWORDS[keyword]
    ours = ",".join(apply_algorithm_spec(default, known, spec, what))
    assert (as_local_openssh_kex(ours) if keyword == "kexalgorithms" else ours) == openssh
