"""ClientAliveInterval frees the -R port of a client that went silent without closing its TCP connection.

A killed client's kernel sends FIN at once (test_remote_forward covers that); a client that is stopped, hung or
behind a dead link keeps the connection open, and only ClientAlive notices. SIGSTOP makes exactly that client.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import USER, echo_through, free_port
from test_remote_forward import (  # noqa: F401 (servers: the fixture)
    FAIL_EXIT,
    client,
    port_is_free,
    read_line_matching,
    refused,
    remote_argv,
    remote_tunnel,
    servers,
)

INTERVAL, COUNT_MAX = 1, 2
# The client is dropped at the first check after COUNT_MAX unanswered probes: conduitd after (COUNT_MAX + 1) x
# INTERVAL of silence, sshd 9.2 (the reference case) after about twice that (measured: 6 s for 1 x 2). The
# slack covers a loaded test machine, not the protocol.
BOUND = 2 * (COUNT_MAX + 1) * INTERVAL + 4.0
ALIVE = f"ClientAliveInterval {INTERVAL}\nClientAliveCountMax {COUNT_MAX}\n"
CONDUIT_CLIENT = Path(__file__).with_name("conduit_remote_client.py")


def client_argv(peer: str, keyset, server_port: int, dest_port: int) -> list[str]:
    if peer == "ssh":
        return remote_argv(keyset, server_port, "-N", "-R", f"0:127.0.0.1:{dest_port}", log_level="INFO")
    return [sys.executable, str(CONDUIT_CLIENT), str(server_port), str(keyset.client_key), USER, "127.0.0.1",
            str(dest_port)]  # fmt: skip


@contextlib.contextmanager
def stopped_later(proc) -> Iterator[None]:
    """Whatever happens, continue a SIGSTOPped client so that it can be stopped for good."""
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)


def flood(port: int, stop: threading.Event) -> socket.socket:
    """A forwarded connection that keeps sending towards the client: data in flight when the client stops."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def send() -> None:
        chunk = b"x" * 65536
        with contextlib.suppress(OSError):
            for _ in range(2000):  # at most 128 MiB; the stopped client's window ends it much sooner
                if stop.is_set():
                    return
                sock.sendall(chunk)

    threading.Thread(target=send, daemon=True).start()
    return sock


def held(port: int) -> bool:
    return not port_is_free(port) and not refused("127.0.0.1", port)


@pytest.mark.parametrize(
    ("server", "peer"), [("conduitd", "ssh"), ("conduitd", "conduit"), ("sshd", "ssh")], ids=["ssh", "conduit", "sshd"]
)
def test_client_alive_frees_the_port_of_a_stopped_client(server, peer, keyset, servers, echo_server):  # noqa: F811
    """sshd is here as the reference: the same scenario, the same bound, the same log line."""
    with servers[server](ALIVE) as daemon:
        with client(client_argv(peer, keyset, daemon.port, echo_server.port)) as proc, stopped_later(proc):
            found = read_line_matching(proc, r"Allocated port (\d+) for remote forward to 127\.0\.0\.1:")
            port = int(found.group(1))
            assert echo_through(port, b"through the allocated port") == b"through the allocated port"
            stop_sending = threading.Event()
            in_flight = [flood(port, stop_sending) for _ in range(12)]
            try:
                time.sleep(0.5)  # the flood is under way
                os.kill(proc.pid, signal.SIGSTOP)
                stopped = time.monotonic()
                # poll by binding, not connecting: a connection would be activity on the server's side (sshd 9.2
                # checks the client only when nothing at all happens for ClientAliveInterval)
                while not port_is_free(port) and time.monotonic() - stopped < BOUND:
                    time.sleep(0.1)
                elapsed = time.monotonic() - stopped
                assert not held(port), f"port {port} still held {elapsed:.1f}s after the client stopped"
                print(f"{server}/{peer}: port {port} freed {elapsed:.1f}s after the client stopped")
            finally:
                stop_sending.set()
                for sock in in_flight:
                    sock.close()
        # the port is free for anyone, a new client asking for exactly that port included
        argv = remote_argv(keyset, daemon.port, "-N", *FAIL_EXIT, "-R", f"{port}:127.0.0.1:{echo_server.port}")
        with remote_tunnel(argv, port):
            assert echo_through(port, b"rebound") == b"rebound"
        log = daemon.output()
    assert f"Timeout, client not responding from user {USER} 127.0.0.1 port" in log, log


def test_without_client_alive_a_stopped_client_keeps_the_port(keyset, conduitd_server, echo_server):
    """The control: the same stopped client under ClientAliveInterval 0 still holds its port after BOUND."""
    with conduitd_server("ClientAliveInterval 0\n") as daemon:
        with client(client_argv("ssh", keyset, daemon.port, echo_server.port)) as proc, stopped_later(proc):
            port = int(read_line_matching(proc, r"Allocated port (\d+) for remote forward to ").group(1))
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(BOUND)
            assert held(port)
        log = daemon.output()
    assert "Timeout, client not responding" not in log


def test_free_port_helper_sees_a_listener():
    """held() must see a bound port, or the tests above could not fail."""
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen(1)
        assert held(port)
    assert not held(port)
