"""config/known_hosts.py with `ssh-keygen -F` (lookup) and `ssh-keygen -H` (hashing) as oracles."""

from __future__ import annotations

import base64
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from sshconduit.config.known_hosts import HostKeyStatus, KnownHosts, hash_host_name, host_lookup_name
from sshconduit.crypto.keys import PublicKey, load_public_key_file


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PublicKey]:
    directory = tmp_path_factory.mktemp("hostkeys")
    specs = {
        "ed_a": ["-t", "ed25519"],
        "ed_b": ["-t", "ed25519"],
        "ed_revoked": ["-t", "ed25519"],
        "ecdsa": ["-t", "ecdsa"],
        "rsa": ["-t", "rsa", "-b", "2048"],
    }
    result = {}
    for name, args in specs.items():
        path = directory / name
        subprocess.run(
            ["ssh-keygen", "-q", *args, "-N", "", "-f", str(path)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        result[name] = load_public_key_file(f"{path}.pub")
    return result


def write_known_hosts(path: Path, keys: dict[str, PublicKey], garbage: bool = True) -> None:
    lines = [
        "# a comment",
        f"host1.example.com,10.0.0.1 {keys['ed_a'].openssh_line('first')}",
        f"*.example.com,!bad.example.com {keys['ecdsa'].openssh_line()}",
        f"[host1.example.com]:2222 {keys['ed_b'].openssh_line()}",
        "this line is garbage" if garbage else "# (garbage line left out)",
        "",
        f"host?.test {keys['rsa'].openssh_line()}",
        f"@revoked * {keys['ed_revoked'].openssh_line()}",
        "host4.example.com ssh-ed25519 AAAA!!notbase64",
        f"host5.example.com {keys['ed_b'].openssh_line()}",
        f"@cert-authority *.ca.test {keys['ed_a'].openssh_line()}",
        f"UPPER.example.net {keys['ed_a'].openssh_line()}",
        f"@bogus-marker host6.example.com {keys['ed_a'].openssh_line()}" if garbage else "#",
    ]
    path.write_text("\n".join(lines) + "\n")


QUERIES = [
    ("host1.example.com", 22),
    ("10.0.0.1", 22),
    ("host1.example.com", 2222),
    ("bad.example.com", 22),
    ("other.example.com", 22),
    ("hostx.test", 22),
    ("hostxx.test", 22),
    ("host5.example.com", 22),
    ("upper.example.net", 22),
    ("nowhere.org", 22),
    ("host6.example.com", 22),
]


def keygen_lines(path: Path, host: str, port: int) -> set[int]:
    name = host_lookup_name(host, port)
    out = subprocess.run(["ssh-keygen", "-F", name, "-f", str(path)], capture_output=True, text=True, timeout=30)
    return {int(n) for n in re.findall(r"found: line (\d+)", out.stdout)}


def our_lines(path: Path, host: str, port: int) -> set[int]:
    return {int(e.source.rsplit(":", 1)[1]) for e in KnownHosts([path]).entries_for(host, port)}


@pytest.mark.parametrize("hashed", [False, True])
def test_lookup_agrees_with_ssh_keygen(tmp_path: Path, keys: dict[str, PublicKey], hashed: bool) -> None:
    path = tmp_path / "known_hosts"
    write_known_hosts(path, keys, garbage=not hashed)  # ssh-keygen -H refuses files with invalid lines
    if hashed:
        subprocess.run(["ssh-keygen", "-H", "-f", str(path)], check=True, capture_output=True, timeout=30)
        assert "|1|" in path.read_text()
    found_any = 0
    for host, port in QUERIES:
        expected = keygen_lines(path, host, port)
        found_any += bool(expected)
        # ssh-keygen -F lists @cert-authority lines too; ours are included in entries_for likewise
        assert our_lines(path, host, port) == expected, (host, port)
    assert found_any >= 6  # the oracle really found things


def test_statuses(tmp_path: Path, keys: dict[str, PublicKey]) -> None:
    path = tmp_path / "known_hosts"
    write_known_hosts(path, keys)
    kh = KnownHosts([tmp_path / "missing", path])
    src = str(path)
    assert kh.check("host1.example.com", 22, keys["ed_a"]) == (HostKeyStatus.KNOWN, f"{src}:2")
    assert kh.check("HOST1.example.com", 22, keys["ed_a"]) == (HostKeyStatus.KNOWN, f"{src}:2")
    assert kh.check("host1.example.com", 22, keys["ed_b"]) == (HostKeyStatus.CHANGED, f"{src}:2")
    assert kh.check("host1.example.com", 22, keys["ecdsa"]) == (HostKeyStatus.KNOWN, f"{src}:3")
    assert kh.check("host1.example.com", 22, keys["rsa"]) == (HostKeyStatus.UNKNOWN, None)
    assert kh.check("host1.example.com", 2222, keys["ed_b"]) == (HostKeyStatus.KNOWN, f"{src}:4")
    assert kh.check("host1.example.com", 2222, keys["ed_a"]) == (HostKeyStatus.CHANGED, f"{src}:4")
    assert kh.check("bad.example.com", 22, keys["ecdsa"]) == (HostKeyStatus.UNKNOWN, None)
    assert kh.check("a.example.com", 22, keys["ecdsa"]) == (HostKeyStatus.KNOWN, f"{src}:3")
    assert kh.check("hostq.test", 22, keys["rsa"]) == (HostKeyStatus.KNOWN, f"{src}:7")
    # revocation wins, for any host
    assert kh.check("nowhere.org", 22, keys["ed_revoked"]) == (HostKeyStatus.REVOKED, f"{src}:8")
    # a cert-authority line does not vouch for a plain key
    assert kh.check("x.ca.test", 22, keys["ed_a"]) == (HostKeyStatus.UNKNOWN, None)
    # an alias (the IP address) may vouch for the host
    assert kh.check("renamed.org", 22, keys["ed_a"], aliases=["10.0.0.1"]) == (
        HostKeyStatus.KNOWN,
        f"{src}:2",
    )
    # bad marker line is skipped
    assert kh.check("host6.example.com", 22, keys["ed_a"]) == (HostKeyStatus.UNKNOWN, None)


def test_add_plain_and_hashed_found_by_ssh_keygen(tmp_path: Path, keys: dict[str, PublicKey]) -> None:
    path = tmp_path / "new" / "dir" / "known_hosts"
    kh = KnownHosts([path])
    assert kh.check("srv.example.com", 22, keys["ed_a"]) == (HostKeyStatus.UNKNOWN, None)
    kh.add(path, "srv.example.com", 22, keys["ed_a"])
    kh.add(path, "srv.example.com", 2200, keys["ecdsa"], hashed=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    lines = path.read_text().splitlines()
    assert lines[0] == f"srv.example.com {keys['ed_a'].openssh_line()}"
    assert lines[1].startswith("|1|") and "srv.example.com" not in lines[1]
    assert keygen_lines(path, "srv.example.com", 22) == {1}
    assert keygen_lines(path, "srv.example.com", 2200) == {2}
    assert keygen_lines(path, "srv.example.com", 2201) == set()
    assert kh.check("srv.example.com", 22, keys["ed_a"])[0] is HostKeyStatus.KNOWN
    assert kh.check("srv.example.com", 2200, keys["ecdsa"]) == (HostKeyStatus.KNOWN, f"{path}:2")
    assert kh.check("srv.example.com", 2200, keys["ed_a"])[0] is HostKeyStatus.UNKNOWN


def test_add_after_line_without_newline(tmp_path: Path, keys: dict[str, PublicKey]) -> None:
    path = tmp_path / "kh"
    path.write_text(f"one.example {keys['ed_a'].openssh_line()}")  # no final newline
    KnownHosts([path]).add(path, "two.example", 22, keys["ed_b"])
    assert keygen_lines(path, "one.example", 22) == {1}
    assert keygen_lines(path, "two.example", 22) == {2}


def test_hash_matches_ssh_keygen(tmp_path: Path, keys: dict[str, PublicKey]) -> None:
    path = tmp_path / "kh"
    path.write_text(f"[h.example]:2022 {keys['ed_a'].openssh_line()}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(path)], check=True, capture_output=True, timeout=30)
    hashed_field = path.read_text().split()[0]
    salt_b64 = hashed_field.split("|")[2]
    assert hash_host_name("[h.example]:2022", base64.b64decode(salt_b64)) == hashed_field
    assert hash_host_name("[h.example]:2023", base64.b64decode(salt_b64)) != hashed_field


def test_garbage_files_never_crash(tmp_path: Path, keys: dict[str, PublicKey]) -> None:
    path = tmp_path / "kh"
    path.write_bytes(
        b"\xff\xfe garbage\n|1|bad|hash ssh-ed25519 AAAA\n|1|||\n@revoked\n@revoked host\nhost\n"
        b"host ssh-ed25519\n\x00\x00\n" + f"ok.example {keys['ed_a'].openssh_line()}\n".encode()
    )
    kh = KnownHosts([path, tmp_path])  # a directory as a path is skipped too
    assert kh.check("ok.example", 22, keys["ed_a"]) == (HostKeyStatus.KNOWN, f"{path}:9")
    assert kh.check("host", 22, keys["ed_a"]) == (HostKeyStatus.UNKNOWN, None)


def test_ssh_keygen_is_available() -> None:
    assert shutil.which("ssh-keygen")
