"""conduitd as a daemon: config checks, SIGHUP reload, SIGTERM, MaxStartups under a connection flood,
LoginGraceTime, MaxAuthTries, MaxSessions and ClientAlive, each with sshd's log line."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    SSHD,
    USER,
    KeySet,
    env_with_src,
    free_port,
    run_client,
    server_config_text,
    ssh_argv,
    wait_for_port,
)
from test_bad_input import WireClient, raw_connection

from sshconduit import auth, messages
from sshconduit.crypto import keys

CONDUITD = [sys.executable, "-m", "sshconduit.cli.conduitd"]
DEBIAN_CONFIG = Path("/etc/ssh/sshd_config")
FLOOD = 300
WAIT = 15.0  # seconds any one condition in these tests may take


def check(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env_with_src())


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def ssh_login(keyset: KeySet, port: int, *args: str) -> subprocess.CompletedProcess:
    return run_client(ssh_argv(keyset, port, *args, f"{USER}@127.0.0.1", "true"))


# --- -t / -T ---


@pytest.mark.skipif(not DEBIAN_CONFIG.exists(), reason="no /etc/ssh/sshd_config here")
def test_debian_sshd_config_loads(tmp_path):
    copy = tmp_path / "sshd_config"
    shutil.copy(DEBIAN_CONFIG, copy)
    result = check([*CONDUITD, "-t", "-f", str(copy)])
    assert result.returncode == 0, result.stderr
    assert all("error" not in line.lower() for line in result.stderr.splitlines()), result.stderr


def test_typo_names_file_and_line_and_agrees_with_sshd(tmp_path, keyset):
    good = tmp_path / "good"
    good.write_text(server_config_text(keyset, 2222, extra="AllowTcpForwarding local\nMaxStartups 10:30:60\n"))
    bad = tmp_path / "bad"
    text = server_config_text(keyset, 2222, extra="AllowTcpForwardingg no\n")
    bad.write_text(text)
    lineno = text.splitlines().index("AllowTcpForwardingg no") + 1
    for config, ok in ((good, True), (bad, False)):
        ours = check([*CONDUITD, "-t", "-f", str(config)])
        theirs = check([SSHD, "-t", "-f", str(config)])
        assert (ours.returncode == 0) == ok == (theirs.returncode == 0), (ours.stderr, theirs.stderr)
    ours = check([*CONDUITD, "-t", "-f", str(bad)])
    assert f"{bad}: line {lineno}: Bad configuration option: AllowTcpForwardingg" in ours.stderr


# --- SIGHUP / SIGTERM ---


def open_tunnel(keyset: KeySet, port: int, dest: int) -> tuple[subprocess.Popen, int]:
    lport = free_port()
    argv = ssh_argv(keyset, port, "-N", "-L", f"{lport}:127.0.0.1:{dest}", f"{USER}@127.0.0.1")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(lport, proc)
    return proc, lport


def echo_round(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def forwarding_works(lport: int) -> bool:
    with socket.create_connection(("127.0.0.1", lport), timeout=10) as s:
        try:
            return echo_round(s, b"probe") == b"probe"
        except OSError:
            return False


def test_sighup_reload_keeps_established_connections(conduitd_server, keyset, echo_server):
    with conduitd_server("AllowTcpForwarding yes\n") as daemon:
        config_text = daemon.config.read_text()
        tunnels = []
        try:
            proc_a, lport_a = open_tunnel(keyset, daemon.port, echo_server.port)
            tunnels.append(proc_a)
            with socket.create_connection(("127.0.0.1", lport_a), timeout=10) as held:
                assert echo_round(held, b"before HUP") == b"before HUP"
                # a bad file first: logged, the old config stays
                daemon.config.write_text(config_text + "NoSuchKeyword yes\n")
                daemon.proc.send_signal(signal.SIGHUP)
                time.sleep(0.5)
                proc_b, lport_b = open_tunnel(keyset, daemon.port, echo_server.port)
                tunnels.append(proc_b)
                assert forwarding_works(lport_b)
                # now a good one that turns forwarding off
                daemon.config.write_text(config_text.replace("AllowTcpForwarding yes", "AllowTcpForwarding no"))
                daemon.proc.send_signal(signal.SIGHUP)
                refused = False
                for _ in range(40):  # until the reload has landed: bounded, 40 x 0.25 s
                    proc_c, lport_c = open_tunnel(keyset, daemon.port, echo_server.port)
                    tunnels.append(proc_c)
                    if not forwarding_works(lport_c):
                        refused = True
                        break
                    time.sleep(0.25)
                assert refused, "a connection made after SIGHUP could still forward"
                assert forwarding_works(lport_b)  # established before the HUP: keeps its policy
                assert echo_round(held, b"after HUP") == b"after HUP"  # the same socket keeps flowing
        finally:
            for proc in tunnels:
                proc.terminate()
                proc.wait(5)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0
        log = daemon.output()
    assert "Bad configuration option: NoSuchKeyword; keeping the previous configuration" in log, log
    assert "Configuration reloaded." in log
    assert "refused local port forward" in log


# --- MaxStartups, LoginGraceTime ---


def test_connection_flood_does_not_stop_a_login(conduitd_server, keyset):
    with conduitd_server("MaxStartups 10:30:60\nLoginGraceTime 5\n") as daemon:
        pid = daemon.proc.pid
        rss_before = vm_rss_kib(pid)
        held: list[socket.socket] = []
        try:
            for i in range(FLOOD):
                with contextlib.suppress(OSError):
                    s = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
                    held.append(s)
                    if i % 2:
                        s.sendall(b"SSH-2.0-flood\r\n")  # a version line, then nothing
            started = time.monotonic()
            result = None
            attempts = 0
            for _ in range(10):  # dropped while the flood fills MaxStartups: retry, bounded in count
                attempts += 1
                result = ssh_login(keyset, daemon.port)
                if result.returncode == 0:
                    break
                time.sleep(1)
            elapsed = time.monotonic() - started
            assert result is not None and result.returncode == 0, result.stderr if result else None
            print(f"login during a {FLOOD}-connection flood took {elapsed:.2f}s ({attempts} attempts)")
            rss_after = vm_rss_kib(pid)
            print(f"conduitd VmRSS {rss_before} KiB -> {rss_after} KiB")
            assert rss_after - rss_before < 100 * 1024
            # LoginGraceTime ends the first flood connection (admitted: below MaxStartups' start), not our close
            first = held[0]
            first.settimeout(5 + WAIT)
            for _ in range(100):  # the server's version line, then EOF
                if not first.recv(4096):
                    break
        finally:
            for s in held:
                s.close()
        log = daemon.output()
    assert "past MaxStartups" in log
    assert "Timeout before authentication for 127.0.0.1 port" in log


@pytest.mark.parametrize(
    "extra", ["MaxAuthTries 2\n", "MaxAuthTries 6\nMatch User root\n  MaxAuthTries 2\n"], ids=["main", "match"]
)
def test_max_auth_tries_log_line(conduitd_server, keyset, extra):
    wrong = [keys.generate_private_key("ssh-ed25519") for _ in range(3)]
    with conduitd_server(extra) as daemon:
        with raw_connection(daemon.port) as sock:
            local_port = sock.getsockname()[1]
            client = WireClient(sock)
            client.handshake()
            client.transport.send(messages.ServiceRequest("ssh-userauth").encode())
            client.flush()
            client.wait_for(lambda: any(isinstance(e, messages.ServiceAccept) for e in client.events))
            session_id = client.transport.session_id
            assert session_id is not None
            for key in wrong:
                alg = key.public.key_type
                signed = auth.publickey_signed_data(session_id, "root", alg, key.public.blob)
                client.transport.send(auth.publickey_request("root", alg, key.public.blob, key.sign(signed)).encode())
            client.flush()
            with contextlib.suppress(OSError, AssertionError):
                client.read_disconnect()
        log = daemon.output()
    want = f"Disconnecting authenticating user root 127.0.0.1 port {local_port}: Too many authentication failures"
    assert want in log and "[preauth]" in log, log


# --- after auth: MaxSessions, ClientAlive ---


def authenticated_client(sock: socket.socket, keyset: KeySet) -> WireClient:
    client = WireClient(sock)
    client.handshake()
    client.transport.send(messages.ServiceRequest("ssh-userauth").encode())
    client.flush()
    client.wait_for(lambda: any(isinstance(e, messages.ServiceAccept) for e in client.events))
    key = keys.load_private_key(keyset.client_key)
    alg = key.public.key_type
    session_id = client.transport.session_id
    assert session_id is not None
    signed = auth.publickey_signed_data(session_id, USER, alg, key.public.blob)
    client.transport.send(auth.publickey_request(USER, alg, key.public.blob, key.sign(signed)).encode())
    client.flush()
    client.wait_for(lambda: any(isinstance(e, messages.UserauthSuccess) for e in client.events))
    return client


def test_client_alive_drops_a_silent_client(conduitd_server, keyset):
    with conduitd_server("ClientAliveInterval 1\nClientAliveCountMax 2\n") as daemon:
        with raw_connection(daemon.port) as sock:
            local_port = sock.getsockname()[1]
            client = authenticated_client(sock, keyset)
            started = time.monotonic()
            # silent from here: read (and decrypt) what the server sends, never answer
            closed = False
            sock.settimeout(1.0)
            while time.monotonic() - started < WAIT:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    closed = True
                    break
                client.transport.receive_data(chunk)  # no flush: nothing goes back
            elapsed = time.monotonic() - started
            assert closed, f"still connected after {WAIT}s of silence"
            print(f"silent client dropped after {elapsed:.1f}s")
        log = daemon.output()
    assert f"Timeout, client not responding from user {USER} 127.0.0.1 port {local_port}" in log, log


def test_client_alive_keeps_an_answering_client(conduitd_server, keyset):
    with conduitd_server("ClientAliveInterval 1\nClientAliveCountMax 1\n") as daemon:
        result = run_client(ssh_argv(keyset, daemon.port, f"{USER}@127.0.0.1", "sleep 4"))
        assert result.returncode == 0, result.stderr
        assert "Timeout, client not responding" not in daemon.output()


def test_max_sessions(conduitd_server, keyset):
    with conduitd_server("MaxSessions 1\n") as daemon:
        control = Path(f"/tmp/conduit-test-mux-{daemon.port}")
        master = subprocess.Popen(
            ssh_argv(keyset, daemon.port, "-M", "-S", str(control), "-N", f"{USER}@127.0.0.1"),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(100):  # bounded wait for the control socket
                if control.exists():
                    break
                time.sleep(0.1)
            first = subprocess.Popen(ssh_argv(keyset, daemon.port, "-S", str(control), "x", "sleep 3"))
            time.sleep(1)
            second = run_client(ssh_argv(keyset, daemon.port, "-S", str(control), "x", "true"))
            assert second.returncode != 0
            assert first.wait(10) == 0
            third = run_client(ssh_argv(keyset, daemon.port, "-S", str(control), "x", "true"))
            assert third.returncode == 0, third.stderr
        finally:
            master.terminate()
            master.wait(5)
        log = daemon.output()
    assert "MaxSessions 1 reached" in log
