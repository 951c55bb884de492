"""The client's side of trust: host keys against known_hosts, keys from files and ssh-agent, passwords, errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
from conftest import USER, conduit_argv, env_with_src, free_port, keygen, run_client, start_daemon

import sshconduit
from sshconduit.crypto import keys
from sshconduit.errors import AuthenticationError
from sshconduit.policy import ServerPolicy
from sshconduit.server import ServerOptions, listen

COMMAND = "echo ok-$((6*7)); exit 3"


def conduit_with_known_hosts(keyset, port: int, known_hosts, strict: str, *args: str) -> list[str]:
    argv = conduit_argv(keyset, port, *args)
    argv[argv.index("StrictHostKeyChecking=no")] = f"StrictHostKeyChecking={strict}"
    argv[argv.index("UserKnownHostsFile=/dev/null")] = f"UserKnownHostsFile={known_hosts}"
    return argv


def test_known_hosts_policies(keyset, conduitd_server, tmp_path):
    known = tmp_path / "known_hosts"
    with conduitd_server() as daemon:
        target = (f"{USER}@127.0.0.1", "true")
        # yes: an unknown host is refused
        result = run_client(conduit_with_known_hosts(keyset, daemon.port, known, "yes", *target))
        assert result.returncode == 255
        assert b"Host key verification failed." in result.stderr
        assert not known.exists()
        # accept-new: an unknown host is added, as [127.0.0.1]:port
        result = run_client(conduit_with_known_hosts(keyset, daemon.port, known, "accept-new", *target))
        assert result.returncode == 0, result.stderr
        assert known.read_text().startswith(f"[127.0.0.1]:{daemon.port} ssh-ed25519 ")
        # yes: now known, so it goes through
        assert run_client(conduit_with_known_hosts(keyset, daemon.port, known, "yes", *target)).returncode == 0
        port = daemon.port
    # The same address now answers with another key: refused loudly, even with accept-new.
    other = keygen(tmp_path / "other_host_key")
    config = tmp_path / "other_config"
    config.write_text(daemon.config.read_text().replace(str(keyset.host_keys["ed25519"]), str(other)))
    argv = [sys.executable, "-m", "sshconduit.cli.conduitd", "-D", "-e", "-f", str(config)]
    with start_daemon(argv, port, config, env_with_src()):
        result = run_client(conduit_with_known_hosts(keyset, port, known, "accept-new", *target))
    stderr = result.stderr.decode()
    assert result.returncode == 255
    assert "WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!" in stderr
    assert f"Offending ED25519 key in {known}:1" in stderr
    assert "Host key verification failed." in stderr


def test_ssh_agent_key_is_used(keyset, conduitd_server, tmp_path):
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(keyset.client_key)], env=env, check=True, timeout=10)
        with conduitd_server() as daemon:
            argv = conduit_argv(keyset, daemon.port, "-v", f"{USER}@127.0.0.1", COMMAND)
            i = argv.index("-i")
            del argv[i : i + 2]  # no key file: only the agent holds the key
            result = subprocess.run(argv, capture_output=True, timeout=30, env={**env_with_src(), **env},
                                    stdin=subprocess.DEVNULL)  # fmt: skip
        assert result.stdout == b"ok-42\n", result.stderr
        assert result.returncode == 3
        assert b"Authenticated with public key ED25519" in result.stderr
    finally:
        agent.terminate()
        agent.wait(5)


def test_wrong_key_is_permission_denied(keyset, conduitd_server, tmp_path):
    stranger = keygen(tmp_path / "stranger")
    with conduitd_server() as daemon:
        argv = conduit_argv(keyset, daemon.port, f"{USER}@127.0.0.1", "true")
        argv[argv.index(str(keyset.client_key))] = str(stranger)
        argv[argv.index("-F") : argv.index("-F")] = ["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"]
        result = run_client(argv)
    assert result.returncode == 255
    assert result.stderr.decode().strip().endswith("Permission denied (publickey).")


def test_connection_refused_exits_255():
    port = free_port()
    result = run_client([*conduit_argv_minimal(port), "true"])
    assert result.returncode == 255
    assert f"ssh: connect to host 127.0.0.1 port {port}: Connection refused" in result.stderr.decode()


def conduit_argv_minimal(port: int) -> list[str]:
    return [sys.executable, "-m", "sshconduit.cli.conduit", "-F", "none", "-p", str(port), "127.0.0.1"]


@pytest.mark.parametrize("method", ["password", "keyboard-interactive"])
def test_password_methods_through_a_checker(method):
    """The server's password check is pluggable; the client answers from the API."""
    seen: list[tuple[str, str]] = []

    def checker(user: str, password: str) -> bool:
        seen.append((user, password))
        return password == "correct horse"

    async def main() -> tuple[str, str]:
        policy = ServerPolicy(
            pubkey_authentication=False,
            password_authentication=method == "password",
            kbd_interactive_authentication=method == "keyboard-interactive",
            password_checker=checker,
            permit_root_login="yes",  # the suite may run as root
        )
        servers = await listen(ServerOptions(listen=[("127.0.0.1", 0)], host_keys=[keys.generate_private_key()],
                                             policy=policy))  # fmt: skip
        port = servers[0].sockets[0].getsockname()[1]
        try:
            with pytest.raises(AuthenticationError) as refused:
                await sshconduit.connect("127.0.0.1", port, username=USER, password="wrong", client_keys=[],
                                         known_hosts=(), strict_host_key_checking="no")  # fmt: skip
            client = await sshconduit.connect(
                "127.0.0.1", port, username=USER, password="correct horse", client_keys=[], known_hosts=(),
                strict_host_key_checking="no",
            )  # fmt: skip
            await client.close()
            return str(refused.value), "ok"
        finally:
            for server in servers:
                server.close()

    refused, ok = asyncio.run(asyncio.wait_for(main(), 30))
    assert refused == f"Permission denied ({method})."
    assert ok == "ok"
    assert seen == [(USER, "wrong"), (USER, "correct horse")]


def test_shell_with_pty_when_stdin_is_a_tty(keyset, conduitd_server):
    """conduit host (no command) on a terminal: a pty shell, our keystrokes in, its exit status out."""
    with conduitd_server() as daemon:
        argv = conduit_argv(keyset, daemon.port, f"{USER}@127.0.0.1")
        pid, fd = pty.fork()
        if pid == 0:  # the child: conduit with the pty as its terminal
            os.environ.update(env_with_src())
            os.execvp(argv[0], argv)
        output = b""
        try:
            os.write(fd, b"tty; echo shell-$((40+2)); exit 7\n")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                ready, _, _ = select.select([fd], [], [], 1)
                if ready:
                    try:
                        chunk = os.read(fd, 4096)
                    except OSError:
                        break
                    if not chunk:
                        break
                    output += chunk
            _, status = os.waitpid(pid, 0)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.close(fd)
    assert b"shell-42" in output
    assert b"/dev/pts/" in output
    assert os.waitstatus_to_exitcode(status) == 7
