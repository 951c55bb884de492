"""config/patterns.py, with ssh -G (Match host) and sshd -T (Match Address) as oracles."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshconduit.config.patterns import (
    match_address,
    match_host_and_address,
    match_hostname,
    match_pattern,
    match_pattern_list,
)

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def test_match_pattern_basics() -> None:
    assert match_pattern("host.example.com", "*.example.com")
    assert not match_pattern("example.com", "*.example.com")
    assert match_pattern("abc", "a?c") and not match_pattern("ac", "a?c")
    assert match_pattern("", "*") and match_pattern("", "") and not match_pattern("a", "")
    assert match_pattern("aaab", "*a*b") and not match_pattern("aaaa", "*a*b")
    assert not match_pattern("Host", "host")  # case-sensitive on its own
    assert match_pattern("a" * 5000, "*a*a*a*a*a*a*a*a*a*a*") and not match_pattern("a" * 5000, "*a*a*a*a*b")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab.", max_size=12), st.text(alphabet="ab.*?", max_size=8))
def test_match_pattern_agrees_with_fnmatch_semantics(name: str, pattern: str) -> None:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    assert match_pattern(name, pattern) == bool(re.fullmatch(regex, name, re.DOTALL))


def test_match_pattern_list_tristate() -> None:
    assert match_pattern_list("a", "a,!b,*.c") is True
    assert match_pattern_list("x.c", "a,!b,*.c") is True
    assert match_pattern_list("b", "a,!b,*.c") is False
    assert match_pattern_list("zzz", "a,!b,*.c") is None
    assert match_pattern_list("bad.c", "*.c,!bad.c") is False  # negation wins wherever it stands
    assert match_pattern_list("bad.c", "!bad.c,*.c") is False
    assert match_pattern_list("A", "a") is None and match_pattern_list("A", "a", ignore_case=True) is True


HOST_CASES = [
    ("ok.example.com", "*.example.com,!bad.example.com"),
    ("bad.example.com", "*.example.com,!bad.example.com"),
    ("OK.Example.COM", "*.example.com"),
    ("x.org", "*.example.com,x.org"),
    ("x.orgg", "*.example.com,x.org"),
    ("h1", "h?"),
    ("h12", "h?"),
    ("anything", "*,!anything"),
    ("other", "*,!anything"),
]


@pytest.mark.parametrize(("host", "patterns"), HOST_CASES)
def test_match_hostname_agrees_with_ssh_match_host(tmp_path: Path, host: str, patterns: str) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(f"Match host {patterns}\n  User matched-user\n")
    out = subprocess.run(
        ["ssh", "-G", "-F", str(config), host],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    assert out.returncode == 0
    ssh_says = "user matched-user" in out.stdout.splitlines()
    assert (match_hostname(host, patterns) is True) == ssh_says


ADDRESS_CASES = [
    ("10.2.3.4", "10.0.0.0/8,!10.1.*"),
    ("10.1.3.4", "10.0.0.0/8,!10.1.*"),
    ("11.0.0.1", "10.0.0.0/8,!10.1.*"),
    ("192.168.1.7", "192.168.1.0/24"),
    ("192.168.2.7", "192.168.1.0/24"),
    ("192.168.1.7", "192.168.1.?"),
    ("2001:db8::1", "2001:db8::/32"),
    ("2001:db9::1", "2001:db8::/32"),
    ("10.9.9.9", "!10.9.0.0/16,10.0.0.0/8"),
    ("127.0.0.1", "127.0.0.1"),
]


def sshd_match_address(tmp_path: Path, addr: str, patterns: str) -> bool:
    hostkey = tmp_path / "hostkey"
    if not hostkey.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)],
            check=True,
            capture_output=True,
        )
    config = tmp_path / "sshd_config"
    config.write_text(f"HostKey {hostkey}\nMatch Address {patterns}\n  PermitTTY no\n")
    out = subprocess.run(
        [SSHD, "-T", "-f", str(config), "-C", f"user=u,host=h.example,addr={addr}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode != 0:
        pytest.skip(f"sshd -T unusable here: {out.stderr.strip()[:200]}")
    return "permittty no" in out.stdout.splitlines()


@pytest.mark.parametrize(("addr", "patterns"), ADDRESS_CASES)
def test_match_address_agrees_with_sshd_match_address(tmp_path: Path, addr: str, patterns: str) -> None:
    assert (match_address(addr, patterns) is True) == sshd_match_address(tmp_path, addr, patterns)


def test_match_address_tristate_and_bad_cidr() -> None:
    assert match_address("10.1.3.4", "10.0.0.0/8,!10.1.*") is False
    assert match_address("11.0.0.1", "10.0.0.0/8") is None
    assert match_address("10.1.2.3", "10.1.2.3/8") is False  # host bits set: an error, so deny
    assert match_address("10.1.2.3", "10.0.0.0/33") is False
    assert match_address("::1", "127.0.0.0/8") is None


def test_match_host_and_address() -> None:
    assert match_host_and_address("box.example.com", "10.0.0.5", "*.example.com")
    assert match_host_and_address(None, "10.0.0.5", "10.0.0.0/24")
    assert match_host_and_address(None, "10.0.0.5", "10.0.0.*")
    assert not match_host_and_address("box.example.com", "10.0.0.5", "*.example.com,!10.0.0.5")
    assert not match_host_and_address("bad.example.com", "10.0.0.5", "10.0.0.0/24,!bad.example.com")
    assert not match_host_and_address(None, "10.0.1.5", "10.0.0.0/24")
    assert not match_host_and_address(None, None, "*")
