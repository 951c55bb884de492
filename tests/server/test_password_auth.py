"""conduitd as root checks system users' passwords (PAM with UsePAM yes, /etc/shadow and crypt(3) without) and
enforces AuthenticationMethods, with OpenSSH's ssh answering password prompts through SSH_ASKPASS."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    KeySet,
    ensure_system_user,
    env_with_src,
    free_port,
    keygen,
    remove_system_user,
    run_client,
    ssh_argv,
    start_daemon,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="system users and their passwords need root")

PASSWORD = "Corr3ct horse: battery staple"
WAIT = 30.0  # seconds one login may take (a refused password costs 2 s per attempt)


@pytest.fixture(scope="module")
def password_user(keyset: KeySet) -> Iterator[pwd.struct_passwd]:
    """A throwaway system user with a password and the test key, removed afterwards."""
    name = f"conduit-pw-{os.getpid()}"
    entry = ensure_system_user(name, keyset.authorized_keys.read_text().strip())
    try:
        subprocess.run(["chpasswd"], input=f"{name}:{PASSWORD}\n".encode(), check=True, capture_output=True)
        yield entry
    finally:
        remove_system_user(name)


@pytest.fixture
def conduitd_root(keyset: KeySet, tmp_path: Path):
    """Factory: conduitd as root with password auth on, and ``extra`` lines (UsePAM, privsep, ...)."""

    def start(extra: str, env: dict[str, str] | None = None):
        port = free_port()
        config = tmp_path / f"conduitd_config.{port}"
        config.write_text(  # extra first: the first value of a keyword wins
            extra + f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {keyset.host_keys['ed25519']}\n"
            "PasswordAuthentication yes\nKbdInteractiveAuthentication no\nStrictModes no\nPidFile none\n"
            "MaxAuthTries 3\n"
        )
        python = shutil.which("python3") or sys.executable
        argv = [python, "-m", "sshconduit.cli.conduitd", "-D", "-e", "-f", str(config)]
        return start_daemon(argv, port, config, {**env_with_src(), **(env or {})})

    return start


def ssh_with_password(
    keyset: KeySet, tmp_path: Path, port: int, user: str, password: str, *options: str
) -> subprocess.CompletedProcess:
    """OpenSSH's ssh, answering its one password prompt from an askpass script; runs ``id -un``."""
    answer = tmp_path / "password"
    answer.write_text(password)
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\ncat '{answer}'\n")
    askpass.chmod(0o700)
    argv = ["ssh", "-o", "BatchMode=no", "-o", "NumberOfPasswordPrompts=1", *options]
    argv += ssh_argv(keyset, port, f"{user}@127.0.0.1", "id -un")[1:]
    env = {"SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
    return run_client(argv, timeout=WAIT, env=env)


@pytest.mark.parametrize("pam", ["yes", "no"])
@pytest.mark.parametrize("privsep", ["no", "yes"])
def test_system_password_login(keyset, tmp_path, conduitd_root, password_user, pam, privsep):
    only_password = ("-o", "PreferredAuthentications=password", "-o", "PubkeyAuthentication=no")
    with conduitd_root(f"UsePAM {pam}\nUsePrivilegeSeparation {privsep}\n") as daemon:
        good = ssh_with_password(keyset, tmp_path, daemon.port, password_user.pw_name, PASSWORD, *only_password)
        assert good.returncode == 0, good.stderr
        assert good.stdout.decode().split() == [password_user.pw_name]
        bad = ssh_with_password(keyset, tmp_path, daemon.port, password_user.pw_name, "wrong", *only_password)
        assert bad.returncode == 255
        assert b"Permission denied" in bad.stderr
        output = daemon.output()
    assert f"Accepted password for {password_user.pw_name}" in output
    assert f"Failed password for {password_user.pw_name}" in output
    assert PASSWORD not in output and "wrong" not in output


@pytest.mark.parametrize("privsep", ["no", "yes"])
def test_keyboard_interactive_through_pam(keyset, tmp_path, conduitd_root, password_user, privsep):
    kbd_only = ("-o", "PreferredAuthentications=keyboard-interactive", "-o", "PubkeyAuthentication=no")
    config = f"UsePAM yes\nUsePrivilegeSeparation {privsep}\nKbdInteractiveAuthentication yes\n"
    with conduitd_root(config) as daemon:
        good = ssh_with_password(keyset, tmp_path, daemon.port, password_user.pw_name, PASSWORD, *kbd_only)
        assert good.returncode == 0, good.stderr
        assert good.stdout.decode().split() == [password_user.pw_name]
        bad = ssh_with_password(keyset, tmp_path, daemon.port, password_user.pw_name, "wrong", *kbd_only)
        assert bad.returncode == 255


@pytest.mark.parametrize("privsep", ["no", "yes"])
def test_publickey_then_password(keyset, tmp_path, conduitd_root, password_user, privsep):
    user = password_user.pw_name
    config = f"UsePAM yes\nUsePrivilegeSeparation {privsep}\nAuthenticationMethods publickey,password\n"
    with conduitd_root(config) as daemon:
        both = ssh_with_password(keyset, tmp_path, daemon.port, user, PASSWORD)
        assert both.returncode == 0, both.stderr
        assert both.stdout.decode().split() == [user]
        key_only = ssh_with_password(keyset, tmp_path, daemon.port, user, "wrong")
        assert key_only.returncode == 255 and b"Permission denied" in key_only.stderr
        no_key = ssh_with_password(keyset, tmp_path, daemon.port, user, PASSWORD, "-o", "PubkeyAuthentication=no")
        assert no_key.returncode == 255
        assert b"Permission denied (publickey)" in no_key.stderr  # password is not offered before the key
        output = daemon.output()
    assert f"Partial publickey for {user}" in output
    assert f"Accepted password for {user}" in output


def test_publickey_twice_needs_two_keys(keyset, tmp_path, conduitd_root, password_user):
    second = keygen(tmp_path / "id_second")
    entry = ensure_system_user(password_user.pw_name, (tmp_path / "id_second.pub").read_text().strip())
    assert entry.pw_uid == password_user.pw_uid
    with conduitd_root("AuthenticationMethods publickey,publickey\n") as daemon:
        one = run_client(ssh_argv(keyset, daemon.port, f"{entry.pw_name}@127.0.0.1", "id -un"), timeout=WAIT)
        assert one.returncode == 255 and b"Permission denied" in one.stderr
        two = run_client(
            ssh_argv(keyset, daemon.port, "-i", str(second), f"{entry.pw_name}@127.0.0.1", "id -un"), timeout=WAIT
        )
        assert two.returncode == 0, two.stderr
        assert two.stdout.decode().split() == [entry.pw_name]


def test_unsatisfiable_authentication_methods_fail_the_config_test(keyset, tmp_path):
    config = tmp_path / "conduitd_config"
    base = f"HostKey {keyset.host_keys['ed25519']}\nPasswordAuthentication no\nPidFile none\n"
    argv = [sys.executable, "-m", "sshconduit.cli.conduitd", "-t", "-f", str(config)]
    config.write_text(base + "AuthenticationMethods publickey,password\n")
    bad = subprocess.run(argv, capture_output=True, env=env_with_src(), timeout=WAIT)
    assert bad.returncode == 255
    assert b"AuthenticationMethods cannot be satisfied by enabled authentication methods" in bad.stderr
    config.write_text(base + "AuthenticationMethods publickey,password publickey\n")
    good = subprocess.run(argv, capture_output=True, env=env_with_src(), timeout=WAIT)
    assert good.returncode == 0, good.stderr


SECOND_FACTOR = "second factor 42"


@pytest.fixture
def pam_service(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A throwaway /etc/pam.d service conduitd uses instead of sshd (SSHCONDUIT_PAM_SERVICE): a text message,
    the password (pam_unix), a second question (pam_stress) a script checks, pam_env and a session recorder."""
    name = f"conduit-test-{os.getpid()}"
    check = tmp_path / "second_factor"
    check.write_text(f"#!/bin/sh\n[ \"$(tr -d '\\000')\" = '{SECOND_FACTOR}' ]\n")
    record = tmp_path / "record"
    record.write_text(f"#!/bin/sh\necho \"$PAM_TYPE $PAM_USER\" >> '{tmp_path / 'sessions'}'\n")
    for script in (check, record):
        script.chmod(0o700)
    (tmp_path / "environment").write_text("CONDUIT_PAM_TEST=set by pam_env\n")
    stack = Path("/etc/pam.d") / name
    stack.write_text(
        "auth required pam_echo.so Welcome to the conduit test\n"
        "auth requisite pam_unix.so\n"
        "auth required pam_stress.so\n"
        f"auth required pam_exec.so expose_authtok quiet {check}\n"
        "account required pam_unix.so\n"
        f"session required pam_env.so readenv=1 envfile={tmp_path / 'environment'}\n"
        f"session optional pam_exec.so quiet {record}\n"
    )
    try:
        yield name, tmp_path / "sessions"
    finally:
        stack.unlink()


def ssh_kbd_interactive(keyset, tmp_path, port, user, answers: dict[str, str], command: str):
    """OpenSSH's ssh with keyboard-interactive only; its askpass answers each prompt from ``answers`` (by the
    prompt's text) and records the prompts it was shown."""
    askpass = tmp_path / "askpass_kbd"
    lines = [f"  *'{prompt}'*) echo '{answer}' ;;" for prompt, answer in answers.items()]
    askpass.write_text(
        f'#!/bin/sh\necho "$1" >> \'{tmp_path / "prompts"}\'\ncase "$1" in\n' + "\n".join(lines) + "\nesac\n"
    )
    askpass.chmod(0o700)
    argv = ["ssh", "-o", "BatchMode=no", "-o", "NumberOfPasswordPrompts=1", "-o", "LogLevel=INFO"]
    argv += ["-o", "PreferredAuthentications=keyboard-interactive", "-o", "PubkeyAuthentication=no"]
    argv += ssh_argv(keyset, port, f"{user}@127.0.0.1", command)[1:]
    env = {"SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
    return run_client(argv, timeout=WAIT, env=env)


@pytest.mark.parametrize("privsep", ["no", "yes"])
def test_pam_conversation_and_session(keyset, tmp_path, conduitd_root, password_user, pam_service, privsep):
    """keyboard-interactive shows PAM's own questions (two rounds) and its text; the PAM session's environment
    reaches the session, and the session closes with the connection."""
    service, sessions = pam_service
    user = password_user.pw_name
    config = f"UsePAM yes\nUsePrivilegeSeparation {privsep}\nKbdInteractiveAuthentication yes\n"
    answers = {"STRESS Password": SECOND_FACTOR, "Password": PASSWORD}
    with conduitd_root(config, {"SSHCONDUIT_PAM_SERVICE": service}) as daemon:
        good = ssh_kbd_interactive(keyset, tmp_path, daemon.port, user, answers, "printenv CONDUIT_PAM_TEST")
        assert good.returncode == 0, good.stderr
        assert good.stdout.decode().strip() == "set by pam_env"
        assert b"Welcome to the conduit test" in good.stderr  # PAM_TEXT_INFO, as the instruction
        shown = [line.split(") ", 1)[-1] for line in (tmp_path / "prompts").read_text().splitlines()]
        assert shown == ["Password: ", "STRESS Password: "]  # ssh puts "(user@host) " first
        wrong = {"STRESS Password": "wrong second", "Password": PASSWORD}
        bad = ssh_kbd_interactive(keyset, tmp_path, daemon.port, user, wrong, "true")
        assert bad.returncode == 255 and b"Permission denied" in bad.stderr
        for _ in range(50):  # the session closes once the connection is gone (in the background)
            if sessions.exists() and len(sessions.read_text().splitlines()) >= 2:
                break
            time.sleep(0.1)
        output = daemon.output()
    assert sessions.read_text().splitlines() == [f"open_session {user}", f"close_session {user}"]
    assert f"Accepted keyboard-interactive/pam for {user}" in output  # sshd's words
    assert f"Failed keyboard-interactive/pam for {user}" in output
    assert PASSWORD not in output and SECOND_FACTOR not in output and "wrong second" not in output


@pytest.mark.parametrize(("pam", "privsep"), [("yes", "no"), ("yes", "yes"), ("no", "yes")])
def test_expired_account_refuses_key_login(keyset, tmp_path, conduitd_root, pam, privsep):
    """An expired account is refused a key login too: by PAM's account stack with UsePAM yes (after the key, and
    the connection drops), by the shadow expiry date without (the user is refused, as sshd's allowed_user)."""
    name = f"conduit-exp-{os.getpid()}"
    entry = ensure_system_user(name, keyset.authorized_keys.read_text().strip())
    try:
        with conduitd_root(f"UsePAM {pam}\nUsePrivilegeSeparation {privsep}\n") as daemon:
            argv = ssh_argv(keyset, daemon.port, f"{entry.pw_name}@127.0.0.1", "id -un")
            before = run_client(argv, timeout=WAIT)
            assert before.returncode == 0, before.stderr
            subprocess.run(["chage", "-E", "0", name], check=True, capture_output=True)
            after = run_client(argv, timeout=WAIT)
            assert after.returncode == 255
            assert after.stdout == b""
            output = daemon.output()
    finally:
        remove_system_user(name)
    if pam == "yes":
        assert f"Access denied for user {name} by PAM account configuration" in output
    else:
        assert b"Permission denied (publickey" in after.stderr
        assert f"User {name} account has expired" in output
