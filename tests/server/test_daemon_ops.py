"""conduitd's operations against real ssh: SIGHUP rebinding ListenAddress/Port, SIGTERM with a forwarded
connection open and a pid file, and PerSourceMaxStartups over PerSourceNetBlockSize netblocks."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import sys
import time

import pytest
from conftest import USER, env_with_src, free_port, run_client, server_config_text, ssh_argv, start_daemon
from test_daemon import FLOOD, echo_round, forwarding_works, open_tunnel, ssh_login, vm_rss_kib
from test_remote_forward import read_line_matching, refused

from sshconduit.server_config import source_block

CONDUITD = [sys.executable, "-m", "sshconduit.cli.conduitd", "-D", "-e"]
WAIT = 15.0  # seconds any one condition in these tests may take


def login(keyset, port: int, host: str = "127.0.0.1") -> bool:
    return run_client(ssh_argv(keyset, port, f"{USER}@{host}", "true")).returncode == 0


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT}s: {what}"
        time.sleep(0.1)


# --- SIGHUP: the listeners follow ListenAddress / Port ---


def test_sighup_rebinds_listen_addresses_and_keeps_connections(conduitd_server, keyset, echo_server):
    with conduitd_server("AllowTcpForwarding yes\n") as daemon:
        old_port, new_port = daemon.port, free_port()
        text = daemon.config.read_text()
        tunnel, lport = open_tunnel(keyset, old_port, echo_server.port)
        taken = socket.socket()
        try:
            with socket.create_connection(("127.0.0.1", lport), timeout=10) as held:
                assert echo_round(held, b"before HUP") == b"before HUP"
                # Port changes, and a second address appears: one listener closes, two open
                daemon.config.write_text(
                    text.replace(f"Port {old_port}\n", f"Port {new_port}\nListenAddress 127.0.0.2\n")
                )
                daemon.proc.send_signal(signal.SIGHUP)
                read_line_matching(daemon.proc, "Configuration reloaded")
                assert refused("127.0.0.1", old_port)
                assert login(keyset, new_port) and login(keyset, new_port, "127.0.0.2")
                assert echo_round(held, b"after HUP") == b"after HUP"  # established: untouched
                assert forwarding_works(lport)  # its SSH connection came in on the closed listener

                # a port that cannot be bound: the reload is refused, old listeners and config stay
                taken.bind(("127.0.0.1", 0))
                taken.listen(1)
                busy = taken.getsockname()[1]
                daemon.config.write_text(
                    text.replace(f"Port {old_port}\n", f"Port {busy}\n").replace(
                        "AllowTcpForwarding yes", "AllowTcpForwarding no"
                    )
                )
                daemon.proc.send_signal(signal.SIGHUP)
                found = read_line_matching(daemon.proc, r"Bind to port \d+ on 127\.0\.0\.1 failed: .*")
                assert f"Bind to port {busy} on 127.0.0.1 failed: Address already in use" in found.group(0)
                assert "keeping the previous configuration" in found.group(0)
                assert login(keyset, new_port) and login(keyset, new_port, "127.0.0.2")
                late, late_port = open_tunnel(keyset, new_port, echo_server.port)
                try:
                    assert forwarding_works(late_port)  # AllowTcpForwarding no was not applied
                finally:
                    late.terminate()
                    late.wait(5)
                assert echo_round(held, b"still") == b"still"
        finally:
            taken.close()
            tunnel.terminate()
            tunnel.wait(5)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0


# --- SIGTERM ---


def test_sigterm_closes_forwarded_connections_and_removes_pid_file(keyset, tmp_path, echo_server):
    port = free_port()
    pid_file = tmp_path / "conduitd.pid"
    config = tmp_path / "conduitd_config"
    config.write_text(server_config_text(keyset, port).replace("PidFile none", f"PidFile {pid_file}"))
    with start_daemon([*CONDUITD, "-f", str(config)], port, config, env_with_src()) as daemon:
        wait_until(pid_file.exists, "pid file written")
        assert pid_file.read_text() == f"{daemon.proc.pid}\n"
        tunnel, lport = open_tunnel(keyset, port, echo_server.port)
        try:
            with socket.create_connection(("127.0.0.1", lport), timeout=WAIT) as held:
                assert echo_round(held, b"open") == b"open"
                daemon.proc.send_signal(signal.SIGTERM)
                assert daemon.proc.wait(WAIT) == 0
                with contextlib.suppress(ConnectionResetError):
                    assert held.recv(100) == b""  # the forwarded connection ends, it does not hang
                assert tunnel.wait(WAIT) == 255  # ssh saw its connection go
        finally:
            if tunnel.poll() is None:
                tunnel.kill()
                tunnel.wait(5)
        assert not pid_file.exists()
        log = daemon.output()
    assert "Received signal 15; terminating." in log, log


# --- PerSourceMaxStartups / PerSourceNetBlockSize ---


def startup(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(source, 0))


def admitted(sock: socket.socket) -> bool:
    """An admitted connection gets the server's version line; a dropped one is closed before it."""
    try:
        return sock.recv(8).startswith(b"SSH-2.0-")
    except ConnectionResetError:
        return False


def test_per_source_max_startups_counts_netblocks(conduitd_server):
    extra = "MaxStartups 100\nPerSourceMaxStartups 2\nPerSourceNetBlockSize 24\nLoginGraceTime 60\n"
    with conduitd_server(extra) as daemon:
        held: list[socket.socket] = []
        try:
            # the start-up probe (from 127.0.0.1, the same /24) counts until its connection process has gone
            # (privilege separation): retry, bounded, until both are in
            for _ in range(50):
                held = [startup(daemon.port, "127.0.0.2"), startup(daemon.port, "127.0.0.3")]
                if all([admitted(s) for s in held]):
                    break
                for s in held:
                    s.close()
                time.sleep(0.2)
            else:
                pytest.fail("two startups from one /24 were never admitted")
            # a third address in the same /24: past the limit
            with startup(daemon.port, "127.0.0.4") as third:
                assert not admitted(third)
            # another /24 has its own count
            other = startup(daemon.port, "127.0.1.2")
            held.append(other)
            assert admitted(other)
            # a startup that goes makes room again (bounded: the server notices the close)
            held.pop(0).close()
            for _ in range(50):
                with startup(daemon.port, "127.0.0.5") as retry:
                    if admitted(retry):
                        break
                time.sleep(0.1)
            else:
                pytest.fail("the freed per-source slot was never given out")
        finally:
            for s in held:
                s.close()
        log = daemon.output()
    assert re.search(r"drop connection #\d+ from \[127\.0\.0\.4\]:\d+ on \[127\.0\.0\.1\]:\d+ past MaxStartups", log), (
        log
    )


def test_a_flood_from_one_source_does_not_stop_a_login_from_another(conduitd_server, keyset):
    """Point 7 of the issue: 300 connections that never finish kex, all from 127.0.0.2; PerSourceMaxStartups keeps
    them to 10 of MaxStartups' 20 unthrottled slots, so a user from 127.0.0.1 gets in at the first attempt."""
    extra = "MaxStartups 20:30:100\nPerSourceMaxStartups 10\nPerSourceNetBlockSize 32\nLoginGraceTime 30\n"
    with conduitd_server(extra) as daemon:
        rss_before = vm_rss_kib(daemon.proc.pid)
        held: list[socket.socket] = []
        try:
            for i in range(FLOOD):
                with contextlib.suppress(OSError):
                    held.append(startup(daemon.port, "127.0.0.2"))
                    if i % 2:
                        held[-1].sendall(b"SSH-2.0-flood\r\n")  # a version line, then nothing
            started = time.monotonic()
            result = ssh_login(keyset, daemon.port)
            print(f"login beside a {FLOOD}-connection flood from another source: {time.monotonic() - started:.2f}s")
            assert result.returncode == 0, result.stderr
            assert sum(admitted(s) for s in held[:20]) == 10  # the first ten of the flood, no more
            assert vm_rss_kib(daemon.proc.pid) - rss_before < 100 * 1024
        finally:
            for s in held:
                s.close()
        log = daemon.output()
    assert re.search(r"drop connection #\d+ from \[127\.0\.0\.2\]:\d+ on \[127\.0\.0\.1\]:\d+ past MaxStartups", log)


def test_source_block():
    assert source_block("10.1.2.3", (32, 128)) == "10.1.2.3/32"
    assert source_block("10.1.2.3", (24, 128)) == "10.1.2.0/24"
    assert source_block("::ffff:10.1.2.3", (16, 128)) == "10.1.0.0/16"
    assert source_block("2001:db8::1", (32, 64)) == "2001:db8::/64"
    assert source_block("2001:db8::1", (32, 0)) == "::/0"
    assert source_block("fe80::1%eth0", (32, 128)) == "fe80::1/128"
