"""ssh -L end to end: conduit and OpenSSH's ssh, against conduitd and OpenSSH's sshd, real TCP services behind."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading

import pytest
from conftest import (
    USER,
    EchoServer,
    conduit_argv,
    echo_through,
    free_port,
    run_client,
    ssh_argv,
    tunnel,
    wait_for_port,
)

PAIRS = [
    pytest.param("conduit", "conduitd", id="conduit-conduitd"),
    pytest.param("conduit", "sshd", id="conduit-sshd"),
    pytest.param("ssh", "conduitd", id="ssh-conduitd"),
]


@pytest.fixture
def server_factory(request, openssh_server, conduitd_server):
    return {"sshd": openssh_server, "conduitd": conduitd_server}


def closed_without_reply(port: int) -> bool:
    """The forward closed our connection (FIN or, with unread data in the kernel, RST) and sent nothing."""
    try:
        return echo_through(port, b"x") == b""
    except ConnectionResetError:
        return True


def client_argv(kind: str, keyset, port: int, *args: str) -> list[str]:
    return (conduit_argv if kind == "conduit" else ssh_argv)(keyset, port, *args)


@pytest.fixture
def second_loopback_echo():
    """The seed's "third host": a service on 127.0.0.2 that only the SSH server reaches on our behalf."""
    server = EchoServer("127.0.0.2")
    yield server
    server.close()


@pytest.mark.parametrize(("client", "server"), PAIRS)
def test_seed_scenarios(client, server, keyset, server_factory, echo_server, second_loopback_echo):
    """The seed's three commands: service on the SSH host, on a third host, several forwards with -N."""
    with server_factory[server]() as daemon:
        # ssh -L 1100:mail.example.com:110 mail.example.com  (the service runs on the SSH host itself)
        lport = free_port()
        argv = client_argv(client, keyset, daemon.port, "-N", "-L", f"{lport}:localhost:{echo_server.port}",
                           f"{USER}@127.0.0.1")  # fmt: skip
        with tunnel(argv, lport):
            assert echo_through(lport, b"+OK POP3 ready\r\n" * 1000) == b"+OK POP3 ready\r\n" * 1000
        # ssh -L 1100:mail.example.com:110 other.example.com  (the SSH host connects onward to a third host)
        lport = free_port()
        argv = client_argv(client, keyset, daemon.port, "-N", "-L",
                           f"{lport}:127.0.0.2:{second_loopback_echo.port}", f"{USER}@127.0.0.1")  # fmt: skip
        with tunnel(argv, lport):
            assert echo_through(lport, b"RETR 1\r\n") == b"RETR 1\r\n"
        assert second_loopback_echo.connections >= 1  # the readiness probe may add one
        # ssh -N -L 8080:intranet:80 -L 5432:db:5432 gateway
        p1, p2 = free_port(), free_port()
        argv = client_argv(client, keyset, daemon.port, "-N", "-L", f"{p1}:127.0.0.1:{echo_server.port}",
                           "-L", f"{p2}:127.0.0.2:{second_loopback_echo.port}", f"{USER}@127.0.0.1")  # fmt: skip
        with tunnel(argv, p1):
            wait_for_port(p2)
            assert echo_through(p1, b"GET / HTTP/1.0\r\n\r\n") == b"GET / HTTP/1.0\r\n\r\n"
            assert echo_through(p2, b"\x00\x00\x00\x08\x04\xd2\x16\x2f") == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"


@pytest.mark.parametrize(("client", "server"), PAIRS)
def test_big_stream_and_many_connections(client, server, keyset, server_factory, echo_server):
    """Data both ways at once, half-close honoured, and 200 concurrent forwarded connections."""
    with server_factory[server]() as daemon:
        lport = free_port()
        argv = client_argv(client, keyset, daemon.port, "-N", "-L", f"{lport}:127.0.0.1:{echo_server.port}",
                           f"{USER}@127.0.0.1")  # fmt: skip
        with tunnel(argv, lport):
            payload = os.urandom(32 * 1024 * 1024)
            assert hashlib.sha256(echo_through(lport, payload, timeout=60)).digest() == hashlib.sha256(payload).digest()
            results: dict[int, bool] = {}

            def one(i: int) -> None:
                data = i.to_bytes(4, "big") * 4096
                try:
                    results[i] = echo_through(lport, data, timeout=60) == data
                except OSError:
                    results[i] = False

            threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(90)
            assert sum(results.values()) == 200


def test_half_close_keeps_other_direction(keyset, conduitd_server):
    """The client shuts its write side; the server side keeps sending, and the reply arrives in full."""
    listener = socket.create_server(("127.0.0.1", 0))
    received = bytearray()

    def serve() -> None:
        for _ in range(5):  # the tunnel's readiness probe comes first, with nothing to say
            conn, _ = listener.accept()
            with conn:
                while data := conn.recv(65536):  # until the client's EOF arrives through the tunnel
                    received.extend(data)
                if received:
                    conn.sendall(b"reply after eof" * 10000)
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with conduitd_server() as daemon:
        lport = free_port()
        argv = conduit_argv(keyset, daemon.port, "-N", "-L", f"{lport}:127.0.0.1:{listener.getsockname()[1]}",
                            f"{USER}@127.0.0.1")  # fmt: skip
        with tunnel(argv, lport):
            assert echo_through(lport, b"request") == b"reply after eof" * 10000
    thread.join(10)
    listener.close()
    assert bytes(received) == b"request"


def test_port_zero_allocates_and_reports(keyset, conduitd_server, echo_server):
    with conduitd_server() as daemon:
        argv = conduit_argv(keyset, daemon.port, "-N", "-L", f"0:127.0.0.1:{echo_server.port}", f"{USER}@127.0.0.1")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=__import__("conftest").env_with_src())  # fmt: skip
        try:
            line = proc.stderr.readline().decode()
            assert line.startswith("Allocated port ") and "for local forward" in line
            port = int(line.split()[2])
            assert echo_through(port, b"ping") == b"ping"
        finally:
            proc.terminate()
            proc.wait(10)


def test_unix_socket_forward_modes(keyset, conduitd_server, echo_server, tmp_path):
    """-L /path:host:port makes a 0600 socket; -L port:/path reaches a unix socket on the server."""
    local_sock = tmp_path / "fwd.sock"
    server_sock = tmp_path / "srv.sock"
    unix_listener = socket.socket(socket.AF_UNIX)
    unix_listener.bind(str(server_sock))
    unix_listener.listen(4)

    def serve() -> None:
        for _ in range(5):  # the tunnel's readiness probe, then the real connection
            conn, _ = unix_listener.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    with conduitd_server() as daemon:
        lport = free_port()
        argv = conduit_argv(keyset, daemon.port, "-N", "-L", f"{local_sock}:127.0.0.1:{echo_server.port}",
                            "-L", f"{lport}:{server_sock}", f"{USER}@127.0.0.1")  # fmt: skip
        with tunnel(argv, lport):
            assert echo_through(lport, b"unix") == b"UNIX"
            assert (local_sock.stat().st_mode & 0o777) == 0o600
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(local_sock))
                s.sendall(b"via unix")
                s.shutdown(socket.SHUT_WR)
                assert s.recv(100) == b"via unix"
    unix_listener.close()


def test_errors_port_in_use(keyset, conduitd_server, echo_server):
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        with conduitd_server() as daemon:
            spec = f"127.0.0.1:{port}:127.0.0.1:{echo_server.port}"  # one address: ::1 would still bind
            result = run_client(conduit_argv(keyset, daemon.port, "-o", "ExitOnForwardFailure=yes", "-N", "-L", spec,
                                             f"{USER}@127.0.0.1"), timeout=20)  # fmt: skip
            assert result.returncode == 255
            assert f"bind [127.0.0.1]:{port}: Address already in use" in result.stderr.decode()
            # Without ExitOnForwardFailure the client warns and goes on with the forwards that did bind.
            other = free_port()
            argv = conduit_argv(keyset, daemon.port, "-N", "-L", spec, "-L", f"{other}:127.0.0.1:{echo_server.port}",
                                f"{USER}@127.0.0.1")  # fmt: skip
            with tunnel(argv, other) as proc:
                assert echo_through(other, b"still fine") == b"still fine"
            assert f"bind [127.0.0.1]:{port}: Address already in use" in proc.stdout.read().decode()
    finally:
        busy.close()


@pytest.mark.parametrize("server", ["conduitd", "sshd"])
def test_errors_destination_refused_and_unresolvable(server, keyset, server_factory):
    closed_port = free_port()
    with server_factory[server]() as daemon:
        p1, p2 = free_port(), free_port()
        argv = conduit_argv(keyset, daemon.port, "-N", "-L", f"{p1}:127.0.0.1:{closed_port}",
                            "-L", f"{p2}:no-such-host.invalid:80", f"{USER}@127.0.0.1")  # fmt: skip
        with tunnel(argv, p1) as proc:
            wait_for_port(p2)
            assert closed_without_reply(p1)
            assert closed_without_reply(p2)
        log = proc.stdout.read().decode()
    assert "open failed: connect failed: Connection refused" in log
    assert "open failed: connect failed: Name or service not known" in log


@pytest.mark.parametrize("server", ["conduitd", "sshd"])
def test_errors_server_refuses_channel(server, keyset, server_factory, echo_server):
    with server_factory[server]("AllowTcpForwarding no\n") as daemon:
        lport = free_port()
        argv = conduit_argv(keyset, daemon.port, "-N", "-L", f"{lport}:127.0.0.1:{echo_server.port}",
                            f"{USER}@127.0.0.1")  # fmt: skip
        with tunnel(argv, lport) as proc:
            assert closed_without_reply(lport)
        log = proc.stdout.read().decode()
    assert "open failed: administratively prohibited" in log
    assert echo_server.connections == 0


def test_errors_privileged_port_as_user(keyset, conduitd_server, echo_server):
    """Without the right to bind low ports (root minus CAP_NET_BIND_SERVICE), -L 110 fails like ssh's."""
    if os.getuid() != 0:
        pytest.skip("needs root to drop the capability (an ordinary user gets the same error without it)")
    with conduitd_server() as daemon:
        argv = conduit_argv(keyset, daemon.port, "-o", "ExitOnForwardFailure=yes", "-N", "-L",
                            f"110:127.0.0.1:{echo_server.port}", f"{USER}@127.0.0.1")  # fmt: skip
        drop = ["setpriv", "--inh-caps=-net_bind_service", "--bounding-set=-net_bind_service"]
        result = run_client([*drop, *argv], timeout=30)
    stderr = result.stderr.decode()
    assert result.returncode == 255, stderr
    assert "bind [127.0.0.1]:110: Permission denied" in stderr
    assert "Could not request local forwarding." in stderr
