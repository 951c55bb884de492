"""Session keywords of sshd_config (ForceCommand, AcceptEnv, PermitUserEnvironment, Subsystem, Banner) and who
may log in (PermitRootLogin, PubkeyAcceptedAlgorithms, ChrootDirectory), with OpenSSH's ssh as the client
against conduitd, and where the config means the same to sshd, against sshd for the same outcome."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from conftest import USER, KeySet, env_with_src, run_client, ssh_argv
from test_policy_config import client_argv, keys_file

from sshconduit import server_config
from sshconduit.cli.conduitd import embedded_config
from sshconduit.config.sshd_config import _OPTIONS
from sshconduit.policy import ServerPolicy

SERVERS = ["conduitd", "openssh"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="PermitRootLogin needs the tests to log in as root")


@pytest.fixture(params=SERVERS)
def server(request):
    """The daemon factory for each server in turn: ``with server(extra) as d: d.port``."""
    return request.getfixturevalue(f"{request.param}_server")


def run(keyset: KeySet, port: int, *command: str, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return run_client(client_argv(keyset, port, *args, command=command))


def stdout_of(keyset: KeySet, port: int, *command: str, args: tuple[str, ...] = ()) -> str:
    result = run(keyset, port, *command, args=args)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode()


# --- ForceCommand and command= ---

ORIGINAL = 'echo "forced:${SSH_ORIGINAL_COMMAND-unset}"'


@pytest.mark.parametrize(
    ("extra", "command", "expected"),
    [
        (f"ForceCommand {ORIGINAL}\n", ("echo", "hi"), "forced:echo hi\n"),
        (f"ForceCommand {ORIGINAL}\n", (), "forced:unset\n"),  # a shell: no original command
        (f"Match User {USER}\n  ForceCommand {ORIGINAL}\n", ("echo", "hi"), "forced:echo hi\n"),
        ("Match User nobody-else\n  ForceCommand echo no\n", ("echo", "hi"), "hi\n"),
        (f"ForceCommand echo main\nMatch User {USER}\n  ForceCommand none\n", ("echo", "hi"), "hi\n"),
    ],
    ids=["main-exec", "main-shell", "match", "match-other-user", "match-none-cancels"],
)
def test_force_command(server, keyset, extra, command, expected):
    with server(extra) as daemon:
        assert stdout_of(keyset, daemon.port, *command) == expected


def test_force_command_wins_over_key_command(server, keyset, tmp_path):
    extra = "ForceCommand echo config\n" + keys_file(tmp_path, keyset, 'command="echo key"')
    with server(extra) as daemon:
        assert stdout_of(keyset, daemon.port, "echo", "hi") == "config\n"
    with server(keys_file(tmp_path, keyset, 'command="echo key:$SSH_ORIGINAL_COMMAND"')) as daemon:
        assert stdout_of(keyset, daemon.port, "echo", "hi") == "key:echo hi\n"


def test_subsystem_and_force_command(server, keyset):
    with server("Subsystem echosub /bin/echo from-subsystem\n") as daemon:
        assert stdout_of(keyset, daemon.port, "echosub", args=("-s",)) == "from-subsystem\n"
        assert run(keyset, daemon.port, "nosuch", args=("-s",)).returncode != 0
    with server(f"Subsystem echosub /bin/echo from-subsystem\nForceCommand {ORIGINAL}\n") as daemon:
        assert stdout_of(keyset, daemon.port, "echosub", args=("-s",)) == "forced:/bin/echo from-subsystem\n"


# --- AcceptEnv, PermitUserEnvironment ---

SHOW_FOO = 'echo "${FOO-unset} ${LANG-unset}"'


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("", "unset unset\n"),  # sshd's default accepts nothing, LANG included
        ("AcceptEnv FOO\n", "bar unset\n"),
        ("AcceptEnv LANG LC_*\n", "unset xx_YY.UTF-8\n"),
        (f"Match User {USER}\n  AcceptEnv F?O\n", "bar unset\n"),
        ("Match User nobody-else\n  AcceptEnv *\n", "unset unset\n"),
    ],
    ids=["default", "named", "lang", "match-pattern", "match-other-user"],
)
def test_accept_env(server, keyset, extra, expected):
    args = ("-o", "SetEnv=FOO=bar LANG=xx_YY.UTF-8")
    with server(extra) as daemon:
        assert stdout_of(keyset, daemon.port, SHOW_FOO, args=args) == expected


def test_embedded_default_accepts_lang_as_debian_ships():
    assert embedded_config().accept_env == ["LANG", "LC_*"]


@pytest.mark.parametrize(
    ("permit", "expected"),
    [("no", "unset"), ("yes", "from-key"), ("FOO,BAR", "from-key"), ("BAR", "unset"), ("F*,!FOO", "unset")],
)
def test_permit_user_environment(server, keyset, tmp_path, permit, expected):
    extra = f"PermitUserEnvironment {permit}\n" + keys_file(tmp_path, keyset, 'environment="FOO=from-key"')
    with server(extra) as daemon:
        assert stdout_of(keyset, daemon.port, 'echo "${FOO-unset}"') == expected + "\n"
        log = daemon.output()
    if expected == "unset" and daemon.proc.args[0] == sys.executable:
        assert "ignoring authorized_keys environment" in log, log


# --- Banner ---


def test_banner_is_the_one_match_chose(server, keyset, tmp_path):
    general, own = tmp_path / "banner.general", tmp_path / "banner.own"
    general.write_text("general banner\n")
    own.write_text("banner for this user\n")
    extra = f"Banner {general}\nMatch User {USER}\n  Banner {own}\nMatch User nobody-else\n  Banner none\n"
    with server(extra) as daemon:
        result = run_client(ssh_argv(keyset, daemon.port, "-v", f"{USER}@127.0.0.1", "true"))
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 0, err
    assert "banner for this user" in err and "general banner" not in err, err
    with server(f"Banner {general}\nMatch User {USER}\n  Banner none\n") as daemon:
        result = run_client(ssh_argv(keyset, daemon.port, "-v", f"{USER}@127.0.0.1", "true"))
    assert result.returncode == 0 and "general banner" not in result.stderr.decode(errors="replace")


@needs_root
def test_banner_under_privilege_separation_is_read_as_root(conduitd_server, keyset, tmp_path):
    # the connection process serves the client as nobody: a root-only banner is read before it drops root
    own = tmp_path / "banner.own"
    own.write_text("banner for this user\n")
    own.chmod(0o600)
    with conduitd_server(f"UsePrivilegeSeparation yes\nMatch User {USER}\n  Banner {own}\n") as daemon:
        result = run_client(ssh_argv(keyset, daemon.port, "-v", f"{USER}@127.0.0.1", "true"))
    assert result.returncode == 0 and "banner for this user" in result.stderr.decode(errors="replace")


# --- who may log in ---


@needs_root
@pytest.mark.parametrize(
    ("setting", "key_options", "expected"),
    [
        ("no", "", None),
        ("prohibit-password", "", "hi\n"),
        ("without-password", "", "hi\n"),
        ("forced-commands-only", "", None),
        ("forced-commands-only", 'command="echo forced"', "forced\n"),
        ("no", 'command="echo forced"', None),
    ],
)
def test_permit_root_login(server, keyset, tmp_path, setting, key_options, expected):
    # in a Match block: the main section of the shared test config already says prohibit-password
    extra = keys_file(tmp_path, keyset, key_options) + f"  PermitRootLogin {setting}\n"
    with server(extra) as daemon:
        result = run(keyset, daemon.port, "echo", "hi")
    if expected is None:  # sshd 9.2 refuses forced-commands-only without command= by its monitor dying
        assert result.returncode == 255 and result.stdout == b"", result.stderr
        if daemon.proc.args[0] == sys.executable:
            assert b"Permission denied" in result.stderr
    else:
        assert result.stdout.decode() == expected, result.stderr


def test_pubkey_accepted_algorithms_per_user(server, keyset):
    with server(f"Match User {USER}\n  PubkeyAcceptedAlgorithms rsa-sha2-512,rsa-sha2-256\n") as daemon:
        result = run(keyset, daemon.port, "true")  # the client's key is ed25519
        assert result.returncode == 255 and b"Permission denied" in result.stderr
    with server("Match User nobody-else\n  PubkeyAcceptedAlgorithms rsa-sha2-512\n") as daemon:
        assert run(keyset, daemon.port, "true").returncode == 0


# --- ChrootDirectory (the jail itself: test_chroot.py) ---


def test_chroot_directory_none_in_match_cancels_it(conduitd_server, keyset, tmp_path):
    # tmp_path is under /tmp (1777): a jail there is refused, so only "none" lets the login through
    with conduitd_server(f"ChrootDirectory {tmp_path}\n") as daemon:
        assert run(keyset, daemon.port, "true").returncode == 255
        assert "bad ownership or modes for chroot directory component" in daemon.output()
    with conduitd_server(f"ChrootDirectory {tmp_path}\nMatch User {USER}\n  ChrootDirectory none\n") as daemon:
        assert run(keyset, daemon.port, "true").returncode == 0


def test_chroot_directory_is_accepted_in_test_mode(keyset, tmp_path):
    config = tmp_path / "sshd_config"
    config.write_text(f"HostKey {keyset.host_keys['ed25519']}\nMatch User someone\n  ChrootDirectory /srv/jail\n")
    argv = [sys.executable, "-m", "sshconduit.cli.conduitd", "-t", "-f", str(config)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env_with_src())
    assert result.returncode == 0 and result.stderr == "", result.stderr  # as sshd -t: the directory is not checked


# --- every Match-able keyword conduitd implements applies per connection ---


def test_every_match_keyword_reaches_the_connection_policy():
    policy_fields = {f.name for f in dataclasses.fields(ServerPolicy)}
    for name, option in _OPTIONS.items():
        if option.in_match:
            assert option.attr in policy_fields or option.attr in server_config.NOT_PER_CONNECTION, name
    assert set(server_config._POLICY_FIELDS) >= {o.attr for o in _OPTIONS.values() if o.attr in policy_fields}
