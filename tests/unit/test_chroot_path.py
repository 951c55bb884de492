"""ChrootDirectory's path: sshd's tokens, and sshd's rule and messages for a directory that is not safe."""

from __future__ import annotations

import pwd

import pytest

from sshconduit import chroot, privsep

ENTRY = pwd.struct_passwd(("alice", "x", 1234, 1234, "", "/home/alice", "/bin/sh"))


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("/jails/%u", "/jails/alice"),
        ("%h/jail", "/home/alice/jail"),
        ("/jails/%U", "/jails/1234"),
        ("/a%%u", "/a%u"),
        ("~/jail", "/home/alice/jail"),
        ("none", None),
        ("NONE", None),
        (None, None),
    ],
)
def test_tokens(pattern, expected):
    assert chroot.chroot_path(pattern, ENTRY) == expected


@pytest.mark.parametrize(
    ("pattern", "message"),
    [("/jails/%x", "percent_expand: unknown key %x"), ("/jails/%", "percent_expand: bad format")],
)
def test_unknown_token_is_an_error(pattern, message):
    with pytest.raises(chroot.ChrootError, match=message):
        chroot.chroot_path(pattern, ENTRY)


def test_safe_directories_pass():
    chroot.check("/")
    chroot.check("/usr/bin")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("relative/jail", "chroot path does not begin at root"),
        ("/tmp/jail", 'bad ownership or modes for chroot directory component "/tmp/"'),  # /tmp is 1777
        ("/etc/passwd", 'chroot path "/etc/passwd" is not a directory'),
        ("/nonexistent-conduit-jail", 'safely_chroot: stat("/nonexistent-conduit-jail"): No such file or directory'),
    ],
)
def test_unsafe_paths_say_why(path, message):
    with pytest.raises(chroot.ChrootError) as info:
        chroot.check(path)
    assert str(info.value) == message


def test_group_writable_or_foreign_owned_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(chroot.os, "stat", lambda p: _fake_stat(p, tmp_path))
    with pytest.raises(chroot.ChrootError, match=f'bad ownership or modes for chroot directory "{tmp_path}"'):
        chroot.check(str(tmp_path))


def _fake_stat(path: str, jail) -> object:
    """Every component safe but the jail itself, owned by uid 1000."""

    class Stat:
        st_uid = 1000 if path == str(jail) else 0
        st_mode = 0o40755

    return Stat()


def test_a_server_that_is_not_root_cannot_chroot(monkeypatch):
    monkeypatch.setattr(privsep, "helper_source", None)
    monkeypatch.setattr(privsep.os, "geteuid", lambda: 1000)
    with pytest.raises(chroot.ChrootError, match="server lacks privileges to chroot to ChrootDirectory"):
        privsep.credentials_for("root", "/jails/%u")
    assert privsep.credentials_for("root") is None  # without a ChrootDirectory it serves its own user
