"""config/authorized_keys.py: sshd(8) AUTHORIZED_KEYS FILE FORMAT with keys made by ssh-keygen."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from sshconduit.config.authorized_keys import (
    KeyOptions,
    find_authorized_key,
    load_authorized_keys,
    parse_authorized_keys,
)
from sshconduit.crypto.keys import PublicKey, generate_private_key, load_public_key_file


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[PublicKey, str]]:
    """name -> (key, its .pub line as ssh-keygen wrote it)"""
    directory = tmp_path_factory.mktemp("userkeys")
    specs = {
        "ed": ["-t", "ed25519"],
        "ecdsa": ["-t", "ecdsa", "-b", "384"],
        "rsa": ["-t", "rsa", "-b", "2048"],
    }
    result = {}
    for name, args in specs.items():
        path = directory / name
        subprocess.run(
            ["ssh-keygen", "-q", *args, "-N", "", "-C", f"{name}@laptop", "-f", str(path)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        pub = Path(f"{path}.pub")
        result[name] = (load_public_key_file(pub), pub.read_text().strip())
    return result


def test_plain_lines_all_types(keys: dict[str, tuple[PublicKey, str]]) -> None:
    text = "# header\n\n" + "\n".join(line for _key, line in keys.values()) + "\n"
    entries, warnings = parse_authorized_keys(text, "ak")
    assert warnings == []
    assert [e.key for e in entries] == [k for k, _ in keys.values()]
    assert [e.comment for e in entries] == ["ed@laptop", "ecdsa@laptop", "rsa@laptop"]
    assert [e.source for e in entries] == ["ak:3", "ak:4", "ak:5"]
    assert entries[0].options == KeyOptions()
    assert entries[0].options.allows_pty() and entries[0].options.allows_port_forwarding()


def test_options_parsed(keys: dict[str, tuple[PublicKey, str]]) -> None:
    _, line = keys["ed"]
    opts = (
        'Command="echo \\"hi there\\" \\\\n",No-Pty,permitopen="localhost:80",PERMITOPEN="[::1]:*",'
        'permitlisten="8080",permitlisten="127.0.0.1:9000",from="10.0.0.0/8,!10.1.*",'
        'environment="FOO=bar baz",expiry-time="20990101",principals="alice,bob",no-agent-forwarding,'
        "no-X11-forwarding,no-user-rc,no-port-forwarding"
    )
    entries, warnings = parse_authorized_keys(f"{opts} {line}\n")
    assert warnings == []
    (entry,) = entries
    o = entry.options
    assert o.command == 'echo "hi there" \\\\n'
    assert o.no_pty and not o.allows_pty()
    assert o.permitopen == ["localhost:80", "[::1]:*"]
    assert o.permitlisten == ["8080", "127.0.0.1:9000"]
    assert o.from_patterns == "10.0.0.0/8,!10.1.*"
    assert o.environment == ["FOO=bar baz"]
    assert o.expiry_time == "20990101" and not o.is_expired()
    assert o.principals == "alice,bob"
    assert o.no_agent_forwarding and not o.allows_agent_forwarding()
    assert not o.allows_x11_forwarding() and not o.allows_user_rc() and not o.allows_port_forwarding()
    assert entry.comment == "ed@laptop"


def test_restrict_and_order(keys: dict[str, tuple[PublicKey, str]]) -> None:
    _, line = keys["ed"]
    text = f"restrict {line}\nrestrict,port-forwarding,pty {line}\npty,restrict {line}\nno-pty,pty {line}\n"
    entries, warnings = parse_authorized_keys(text)
    assert warnings == []
    plain, reopened, restricted_last, last_wins = (e.options for e in entries)
    assert plain.restrict and not plain.allows_port_forwarding() and not plain.allows_pty()
    assert not plain.allows_agent_forwarding() and not plain.allows_x11_forwarding()
    assert reopened.allows_port_forwarding() and reopened.allows_pty() and not reopened.allows_agent_forwarding()
    assert not restricted_last.allows_pty()  # sshd: restrict clears what came before it
    assert last_wins.allows_pty()


@pytest.mark.parametrize(
    "bad_options",
    [
        "bogus-option",
        'command="unterminated',
        "command=unquoted",
        'command="a",command="b"',
        'from="a",from="b"',
        'environment="NOEQUALS"',
        'environment="BAD-NAME=x"',
        'permitopen="nocolon"',
        'permitopen="host:99999"',
        'expiry-time="2099"',
        'expiry-time="20991301"',
        "no-pty,",
        "no-pty;pty",
        'tunnel="abc"',
    ],
)
def test_bad_options_invalidate_line(keys: dict[str, tuple[PublicKey, str]], bad_options: str) -> None:
    _, line = keys["ecdsa"]
    text = f"# c\n{bad_options} {line}\n{line}\n"
    entries, warnings = parse_authorized_keys(text, "/home/u/.ssh/authorized_keys")
    assert [e.source for e in entries] == ["/home/u/.ssh/authorized_keys:3"]
    assert entries[0].options == KeyOptions()
    assert len(warnings) == 1 and warnings[0].startswith("/home/u/.ssh/authorized_keys:2: ")


def test_bad_key_lines_skipped_with_warnings(keys: dict[str, tuple[PublicKey, str]]) -> None:
    key, line = keys["rsa"]
    type_, b64, _comment = line.split(" ", 2)
    text = "\n".join(
        [
            "ssh-ed25519 notbase64!!",
            f"ssh-ed25519 {b64}",  # type does not match the blob
            "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
            "just words here",
            f"{type_} {b64} with a long comment",
        ]
    )
    entries, warnings = parse_authorized_keys(text, "f")
    assert [(e.key, e.comment, e.source) for e in entries] == [(key, "with a long comment", "f:5")]
    assert [w.split(":")[0:2] for w in warnings] == [["f", "1"], ["f", "2"], ["f", "3"], ["f", "4"]]


def test_find_authorized_key_applies_from_expiry_and_ca(keys: dict[str, tuple[PublicKey, str]]) -> None:
    ed, ed_line = keys["ed"]
    rsa, rsa_line = keys["rsa"]
    past = time.strftime("%Y%m%d", time.gmtime(time.time() - 3 * 86400))
    text = "\n".join(
        [
            f'from="10.0.0.0/8,!10.1.*" {ed_line}',
            f'from="*.trusted.example",command="only this" {ed_line}',
            f'expiry-time="{past}" {rsa_line}',
            f"cert-authority {rsa_line}",
        ]
    )
    entries, warnings = parse_authorized_keys(text, "ak")
    assert warnings == []
    assert find_authorized_key(entries, ed, "10.2.0.1").source == "ak:1"
    # 10.1.* is negated on line 1; line 2 admits it only by host name
    assert find_authorized_key(entries, ed, "10.1.0.1") is None
    found = find_authorized_key(entries, ed, "10.1.0.1", "box.trusted.example")
    assert found is not None and found.source == "ak:2" and found.options.command == "only this"
    assert find_authorized_key(entries, ed, "192.168.0.1") is None
    assert find_authorized_key(entries, ed, None) is None
    assert find_authorized_key(entries, rsa, "10.2.0.1") is None  # expired, and a CA line is not a user key
    assert find_authorized_key(entries, keys["ecdsa"][0], "10.2.0.1") is None


def test_find_without_restrictions_and_expiry_utc(keys: dict[str, tuple[PublicKey, str]]) -> None:
    ed, ed_line = keys["ed"]
    entries, _ = parse_authorized_keys(f'expiry-time="20990101Z",expiry-time="209801011200" {ed_line}')
    assert entries[0].options.expiry_time == "209801011200"  # the earliest counts
    assert find_authorized_key(entries, ed, None) is entries[0]
    assert entries[0].options.is_expired(now=time.mktime((2098, 1, 1, 12, 0, 1, 0, 0, -1)))
    utc = KeyOptions(expiry_time="20300101Z")
    assert utc.expires_at() == 1893456000.0


def test_load_authorized_keys(tmp_path: Path, keys: dict[str, tuple[PublicKey, str]]) -> None:
    assert load_authorized_keys(tmp_path / "missing") == ([], [])
    path = tmp_path / "authorized_keys"
    path.write_text(f"{keys['ed'][1]}\nbroken\n")
    entries, warnings = load_authorized_keys(path)
    assert [e.source for e in entries] == [f"{path}:1"]
    assert len(warnings) == 1 and warnings[0].startswith(f"{path}:2:")


def test_generated_key_round_trip() -> None:
    key = generate_private_key("ecdsa-sha2-nistp256").public
    entries, warnings = parse_authorized_keys(f'no-pty,permitopen="db:5432" {key.openssh_line("me")}')
    assert warnings == [] and entries[0].key == key and entries[0].options.permitopen == ["db:5432"]
