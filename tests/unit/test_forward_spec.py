"""-L / -R / -D specifications: every form ssh(1) takes, its error wording, and ``ssh -G`` as an oracle."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from sshconduit.config.forward_spec import ForwardSpec, format_forward, parse_forward


@pytest.mark.parametrize(
    ("spec", "kind", "expected"),
    [
        ("8080:example.com:80", "local", ForwardSpec(None, 8080, None, "example.com", 80, None)),
        ("127.0.0.1:8080:db:5432", "local", ForwardSpec("127.0.0.1", 8080, None, "db", 5432, None)),
        ("[::1]:8080:[fe80::1]:22", "local", ForwardSpec("::1", 8080, None, "fe80::1", 22, None)),
        ("*:8080:h:80", "local", ForwardSpec("*", 8080, None, "h", 80, None)),
        ("localhost:8080:h:80", "local", ForwardSpec("localhost", 8080, None, "h", 80, None)),
        ("8080:/run/app.sock", "local", ForwardSpec(None, 8080, None, None, None, "/run/app.sock")),
        ("/tmp/l.sock:h:80", "local", ForwardSpec(None, None, "/tmp/l.sock", "h", 80, None)),
        (
            "/tmp/l.sock:/tmp/r.sock",
            "local",
            ForwardSpec(None, None, "/tmp/l.sock", None, None, "/tmp/r.sock"),
        ),
        ("h:8080:/tmp/r.sock", "local", ForwardSpec("h", 8080, None, None, None, "/tmp/r.sock")),
        ("1100 mail.example.com:110", "local", ForwardSpec(None, 1100, None, "mail.example.com", 110, None)),
        ("[::1]:1101 [::2]:110", "local", ForwardSpec("::1", 1101, None, "::2", 110, None)),
        ("a\\:b:8080:h:80", "local", ForwardSpec("a:b", 8080, None, "h", 80, None)),
        ("0:h:80", "local", ForwardSpec(None, 0, None, "h", 80, None)),  # ephemeral port: allowed here
        ("8080:h:http", "local", ForwardSpec(None, 8080, None, "h", 80, None)),
        ("0:h:80", "remote", ForwardSpec(None, 0, None, "h", 80, None)),
        ("2222:localhost:22", "remote", ForwardSpec(None, 2222, None, "localhost", 22, None)),
        ("/r/s:h:80", "remote", ForwardSpec(None, None, "/r/s", "h", 80, None)),
        ("8080", "remote", ForwardSpec(None, 8080, None, None, None, None)),
        ("h:8080", "remote", ForwardSpec("h", 8080, None, None, None, None)),
        ("1080", "dynamic", ForwardSpec(None, 1080, None, None, None, None)),
        ("127.0.0.1:1080", "dynamic", ForwardSpec("127.0.0.1", 1080, None, None, None, None)),
        ("[::1]:1080", "dynamic", ForwardSpec("::1", 1080, None, None, None, None)),
        ("/tmp/socks.sock", "dynamic", ForwardSpec(None, None, "/tmp/socks.sock", None, None, None)),
    ],
)
def test_forms(spec: str, kind: str, expected: ForwardSpec) -> None:
    assert parse_forward(spec, kind) == expected


def test_dynamic_flag() -> None:
    assert parse_forward("1080", "dynamic").is_dynamic
    assert parse_forward("8080", "remote").is_dynamic
    assert not parse_forward("8080:h:80", "remote").is_dynamic


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("8080", "local"),
        ("h:8080", "local"),
        ("8080:h", "local"),
        ("", "local"),
        ("a:b:c:d:e", "local"),
        ("bind:8080:h:80x", "local"),
        ("70000:h:80", "local"),
        ("8080:h:0", "local"),
        ("8080:h:65536", "local"),
        ("[::1:8080:h:80", "local"),
        ("[::1]x:8080:h:80", "local"),
        ("-1:h:80", "local"),
        ("1:2:3", "dynamic"),
        ("0", "dynamic"),
        ("x:0", "dynamic"),
        ("1 2", "dynamic"),
        ("a b c", "remote"),
    ],
)
def test_bad_specs_use_ssh_wording(spec: str, kind: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_forward(spec, kind)
    assert str(info.value) == f"Bad {kind} forwarding specification '{spec}'"


_OPENSSH_SPECS = [
    ("-L", "local", "8080:h:80"),
    ("-L", "local", "127.0.0.1:8080:h:80"),
    ("-L", "local", "[::1]:8080:[fe80::1]:80"),
    ("-L", "local", "*:8080:h:80"),
    ("-L", "local", "8080:/tmp/s"),
    ("-L", "local", "/l/s:h:80"),
    ("-L", "local", "/l/s:/r/s"),
    ("-L", "local", "a\\:b:8080:h:80"),
    ("-R", "remote", "8080:h:80"),
    ("-R", "remote", "0:h:80"),
    ("-R", "remote", "/r/s:h:80"),
    ("-D", "dynamic", "1080"),
    ("-D", "dynamic", "h:8080"),
    ("-D", "dynamic", "[::1]:1080"),
    ("-D", "dynamic", "/tmp/s"),
]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH ssh not installed")
@pytest.mark.parametrize(("flag", "kind", "spec"), _OPENSSH_SPECS)
def test_same_reading_as_openssh(flag: str, kind: str, spec: str) -> None:
    out = subprocess.run(
        ["ssh", "-G", "-F", "none", flag, spec, "example.invalid"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    ours = format_forward(parse_forward(spec, kind))
    assert f"{kind}forward {ours}" in out.splitlines()


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH ssh not installed")
@pytest.mark.parametrize("spec", ["8080", "h:8080", "8080:h:0", "70000:h:80", "[::1]x:8080:h:80", "8080:h"])
def test_rejected_like_openssh(spec: str) -> None:
    proc = subprocess.run(
        ["ssh", "-G", "-F", "none", "-L", spec, "example.invalid"], capture_output=True, text=True, timeout=10
    )
    assert proc.returncode != 0
    with pytest.raises(ValueError) as info:
        parse_forward(spec, "local")
    assert str(info.value) in proc.stderr
