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
from test_remote_forward import (
    FAIL_EXIT,
    client,
    port_is_free,
    read_line_matching,
    refused,
    remote_argv,
    remote_tunnel,
)

INTERVAL, COUNT_MAX = 1, 2
# sshd drops the client at the first check after COUNT_MAX unanswered probes: (COUNT_MAX + 1) x INTERVAL of
# silence; the slack covers the loaded test machine, not the protocol.
BOUND = (COUNT_MAX + 1) * INTERVAL + 6.0
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


@pytest.mark.parametrize("peer", ["ssh", "conduit"])
def test_client_alive_frees_the_port_of_a_stopped_client(peer, keyset, conduitd_server, echo_server):
    with conduitd_server(ALIVE) as daemon:
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
                while held(port) and time.monotonic() - stopped < BOUND:
                    time.sleep(0.1)
                elapsed = time.monotonic() - stopped
                assert not held(port), f"port {port} still held {elapsed:.1f}s after the client stopped"
                print(f"{peer}: port {port} freed {elapsed:.1f}s after the client stopped")
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
