"""An error of our own inside the core (a bug, or input that got past every check) ends that connection the way a
peer's protocol error does: one DISCONNECT the peer can read, one log line naming the error, nothing else lost.
It used to reach asyncio as "Fatal error: protocol.data_received() call failed" and reset the connection.
The bug is injected into one connection-layer handler; the peers are real OpenSSH."""

from __future__ import annotations

import asyncio
import logging
import re
import socket

import pytest
from conftest import USER, recv_until_eof, ssh_argv

import sshconduit
from sshconduit import connection
from sshconduit.crypto import keys
from sshconduit.policy import ServerPolicy
from sshconduit.server import ServerOptions, listen

WAIT = 20.0  # seconds for a connection to end


class InjectedBug(Exception):
    pass


def inject_bug(monkeypatch: pytest.MonkeyPatch, handler: str) -> None:
    """Make ConnectionLayer.<handler> raise. Layers made from now on bind it (their handler table is built in
    __init__), so patch before connecting."""

    def broken(self: connection.ConnectionLayer, msg: object) -> list[connection.Event]:
        raise InjectedBug("injected for the test")

    monkeypatch.setattr(connection.ConnectionLayer, handler, broken)


def internal_error_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "internal error" in r.getMessage()]


def assert_one_line_and_no_fatal_error(caplog: pytest.LogCaptureFixture) -> None:
    lines = internal_error_lines(caplog)
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert lines[0].levelno == logging.ERROR
    assert lines[0].exc_info is not None and lines[0].exc_info[0] is InjectedBug
    assert not [r for r in caplog.records if "Fatal error" in r.getMessage()]


def test_the_client_disconnects_sshd_with_a_reason_and_one_log_line(keyset, openssh_server, monkeypatch, caplog):
    inject_bug(monkeypatch, "_on_open_confirmation")  # the first -L connection's confirmation
    caplog.set_level(logging.INFO)
    target = socket.create_server(("127.0.0.1", 0))

    async def main(port: int) -> tuple[bytes, str]:
        client = await sshconduit.connect("127.0.0.1", port, username=USER, client_keys=[str(keyset.client_key)],
                                          known_hosts=(), strict_host_key_checking="no")  # fmt: skip
        async with client.forward_local(0, "127.0.0.1", target.getsockname()[1]) as forward:

            def use_forward() -> bytes:
                with socket.create_connection(("127.0.0.1", forward.port), timeout=WAIT) as s:
                    s.sendall(b"hello")
                    return recv_until_eof(s, WAIT)  # the forward's connection ends with the SSH connection

            got = await asyncio.to_thread(use_forward)
            await asyncio.wait_for(client.conn.closed, WAIT)
            return got, str(client.conn.close_reason)

    with openssh_server("LogLevel INFO\n") as daemon:
        got, reason = asyncio.run(main(daemon.port))
        log = daemon.output()
    target.close()
    assert got == b""
    assert reason == "internal error"
    assert_one_line_and_no_fatal_error(caplog)
    assert re.search(r"Received disconnect from 127\.0\.0\.1 port \d+:2: internal error", log), log


def test_the_server_disconnects_ssh_with_a_reason_and_serves_the_next_one(keyset, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    policy = ServerPolicy(authorized_keys_files=(str(keyset.authorized_keys),), permit_root_login="yes")

    async def ssh(port: int) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *ssh_argv(keyset, port, "-o", "LogLevel=INFO", f"{USER}@127.0.0.1", "true"),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), WAIT)
        return proc.returncode or 0, err.decode(errors="replace")

    async def main() -> tuple[tuple[int, str], tuple[int, str]]:
        servers = await listen(ServerOptions(listen=[("127.0.0.1", 0)], host_keys=[keys.generate_private_key()],
                                             policy=policy))  # fmt: skip
        port = servers[0].sockets[0].getsockname()[1]
        try:
            with monkeypatch.context() as patch:
                inject_bug(patch, "_on_open")  # ssh's session channel
                broken = await ssh(port)
            return broken, await ssh(port)
        finally:
            for server in servers:
                server.close()

    (broken_rc, broken_err), (next_rc, next_err) = asyncio.run(main())
    assert broken_rc == 255
    assert re.search(r"Received disconnect from 127\.0\.0\.1 port \d+:2: internal error", broken_err), broken_err
    assert_one_line_and_no_fatal_error(caplog)
    assert next_rc == 0, next_err
