"""A destination that stops reading stops the sender through the window: nothing buffers without bound."""

from __future__ import annotations

import socket
import threading

import pytest
from conftest import USER, conduit_argv, free_port, ssh_argv, tunnel

LIMIT = 1 << 30  # give up after this much: without flow control the tunnel would swallow all of it


def bytes_accepted_until_stalled(port: int, stall: float = 2.0) -> int:
    """Write until the tunnel stops taking data for `stall` seconds; returns how much it took."""
    block = b"s" * 65536
    total = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(stall)
        while total < LIMIT:
            try:
                total += s.send(block)
            except TimeoutError:
                return total
    return total


@pytest.mark.parametrize("pair", ["conduit-conduitd", "ssh-conduitd", "conduit-sshd"])
def test_stalled_reader_stalls_writer(pair, keyset, conduitd_server, openssh_server):
    client, server = pair.split("-")
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_never_read() -> None:
        listener.settimeout(0.5)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            held.append(conn)

    thread = threading.Thread(target=accept_and_never_read, daemon=True)
    thread.start()
    try:
        with (conduitd_server if server == "conduitd" else openssh_server)() as daemon:
            lport = free_port()
            argv = (conduit_argv if client == "conduit" else ssh_argv)(
                keyset, daemon.port, "-N", "-L", f"{lport}:127.0.0.1:{listener.getsockname()[1]}", f"{USER}@127.0.0.1"
            )
            with tunnel(argv, lport):
                accepted = bytes_accepted_until_stalled(lport)
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in held:
            conn.close()
    # One 2 MiB channel window plus the kernel's socket buffers on each hop, not gigabytes.
    assert 0 < accepted < 64 * 1024 * 1024, accepted
