"""ChrootDirectory (sshd_config(5), sshd(8)): a root server jails an authenticated user's sessions and forwarded
sockets in a root-owned directory. The same config and the same jail go to conduitd (in one process, and with
UsePrivilegeSeparation) and to OpenSSH's sshd, with OpenSSH's ssh as the client, for the same outcome."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    SSHD,
    KeySet,
    echo_through,
    ensure_system_user,
    env_with_src,
    free_port,
    run_client,
    ssh_argv,
    start_daemon,
    tunnel,
)
from test_privsep import TEST_USER, echo_once, unix_echo

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")

WAIT = 15.0  # seconds any one connection in these tests may take
JAIL_PROGRAMS = ("/bin/sh", "/bin/ls", pwd.getpwnam("root").pw_shell)  # the shells run inside the jail
SERVERS = ["conduitd", "conduitd-privsep", "openssh"]


@pytest.fixture(scope="module")
def test_user(keyset: KeySet) -> pwd.struct_passwd:
    return ensure_system_user(TEST_USER, keyset.authorized_keys.read_text().strip())


def _libraries(program: str) -> list[str]:
    out = subprocess.run(["ldd", program], capture_output=True, text=True, timeout=10, check=True).stdout
    return [word for line in out.splitlines() for word in line.split() if word.startswith("/")]


@pytest.fixture
def jail(test_user: pwd.struct_passwd) -> Iterator[Path]:
    """<base>/<user>: the shells, /bin/ls and their libraries, the user's home. sshd checks every component up to /,
    and /tmp is 1777: the base goes under /run (root, 0755)."""
    base = Path(tempfile.mkdtemp(prefix="conduit-chroot-test-", dir="/run"))
    try:
        base.chmod(0o755)
        root = base / TEST_USER
        for source in {p for program in JAIL_PROGRAMS for p in (program, *_libraries(program))}:
            target = root / source.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
        home = root / test_user.pw_dir.lstrip("/")
        home.mkdir(parents=True)
        for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            directory.chmod(0o755)
        os.chown(home, test_user.pw_uid, test_user.pw_gid)
        yield root
    finally:
        shutil.rmtree(base)


@pytest.fixture(params=SERVERS)
def server(request, keyset: KeySet, tmp_path: Path, jail: Path):
    """Factory: ``with server() as d`` runs the server with ``ChrootDirectory <base>/%u`` for the test user."""

    def start(users: str = TEST_USER, directory: str = "%u"):
        port = free_port()
        config = tmp_path / f"config.{port}"
        common = (
            f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {keyset.host_keys['ed25519']}\n"
            f"AuthorizedKeysFile .ssh/authorized_keys {keyset.authorized_keys}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "StrictModes no\nPidFile none\n"
        )
        match = f"Match User {users}\n  ChrootDirectory {jail.parent}/{directory}\n"
        if request.param == "openssh":
            Path("/run/sshd").mkdir(exist_ok=True)
            config.write_text(f"{common}UsePAM yes\n{match}")  # PAM: the test user's password is locked
            return start_daemon([SSHD, "-D", "-e", "-f", str(config)], port, config)
        privsep = "yes" if request.param == "conduitd-privsep" else "no"
        config.write_text(f"{common}UsePAM no\nUsePrivilegeSeparation {privsep}\n{match}")
        argv = [shutil.which("python3") or "python3", "-m", "sshconduit.cli.conduitd", "-D", "-e", "-f", str(config)]
        return start_daemon(argv, port, config, env_with_src())

    return start


def run_as_user(keyset: KeySet, port: int, *args: str) -> subprocess.CompletedProcess:
    return run_client(ssh_argv(keyset, port, *args[:-1], f"{TEST_USER}@127.0.0.1", args[-1]), timeout=WAIT)


def test_session_runs_inside_the_chroot(keyset, server, jail, test_user):
    with server() as daemon:
        out = run_as_user(keyset, daemon.port, "echo $PWD; ls /")
        assert out.returncode == 0, (out.stderr, daemon.output())
        assert out.stdout.decode().split() == [test_user.pw_dir, *sorted(os.listdir(jail))]
        tty = run_as_user(keyset, daemon.port, "-tt", "echo $PWD; test -t 0 && echo tty")
        assert tty.returncode == 0, (tty.stderr, daemon.output())
        assert tty.stdout.decode().split() == [test_user.pw_dir, "tty"]
        (jail / test_user.pw_dir.lstrip("/")).rmdir()  # no home inside the jail: the session starts at /
        out = run_as_user(keyset, daemon.port, "echo $PWD")
        assert out.returncode == 0, (out.stderr, daemon.output())
        assert out.stdout.decode().split() == ["/"]


def test_root_is_jailed_too(keyset, server, jail):
    with server(users="root", directory=TEST_USER) as daemon:
        out = run_client(ssh_argv(keyset, daemon.port, "root@127.0.0.1", "echo $PWD; ls /"), timeout=WAIT)
        assert out.returncode == 0, (out.stderr, daemon.output())
        assert out.stdout.decode().split() == ["/", *sorted(os.listdir(jail))]  # no /root inside


@pytest.mark.parametrize("unsafe", ["group-writable", "user-owned", "component"])
def test_unsafe_chroot_is_refused(keyset, server, jail, test_user, unsafe):
    if unsafe == "group-writable":
        jail.chmod(0o775)
        expected = f'bad ownership or modes for chroot directory "{jail}"'
    elif unsafe == "user-owned":
        os.chown(jail, test_user.pw_uid, test_user.pw_gid)
        expected = f'bad ownership or modes for chroot directory "{jail}"'
    else:
        jail.parent.chmod(0o757)
        expected = f'bad ownership or modes for chroot directory component "{jail.parent}/"'
    with server() as daemon:
        out = run_as_user(keyset, daemon.port, "echo ran")
        log = daemon.output()
    assert out.returncode == 255 and out.stdout == b"", out
    assert expected in log, log


def test_tcp_forward_from_a_chrooted_user(keyset, server, jail, echo_server):
    with server() as daemon:
        lport = free_port()
        argv = ssh_argv(keyset, daemon.port, "-N", "-o", "ExitOnForwardFailure=yes",
                        "-L", f"{lport}:127.0.0.1:{echo_server.port}", f"{TEST_USER}@127.0.0.1")  # fmt: skip
        with tunnel(argv, lport):
            assert echo_through(lport, b"through the jail" * 1000) == b"through the jail" * 1000


def test_unix_forward_is_resolved_inside_the_chroot(keyset, server, jail, test_user):
    sockets = jail / "sock"
    sockets.mkdir(mode=0o755)
    path = sockets / "echo.sock"
    with unix_echo(path, test_user.pw_uid, test_user.pw_gid), server() as daemon:
        inside, outside = free_port(), free_port()
        argv = ssh_argv(keyset, daemon.port, "-N", "-o", "ExitOnForwardFailure=yes",
                        "-L", f"{inside}:/sock/echo.sock", "-L", f"{outside}:{path}",
                        f"{TEST_USER}@127.0.0.1")  # fmt: skip
        with tunnel(argv, outside):  # the forwards listen in order: the last one up means both are
            assert echo_once(inside, b"jailed unix socket") == b"jailed unix socket"
            assert echo_once(outside, b"host path") == b""  # the host's path means nothing inside the jail
