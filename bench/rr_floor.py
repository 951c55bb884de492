#!/usr/bin/env python3
"""How many new forwarded connections per second (tunnelbench's rr) a Python forwarder can reach on this machine
at best, measured in one run beside OpenSSH's ssh↔sshd and conduit↔conduitd.

The floor is a forwarder shaped like an SSH tunnel and nothing more: a client process that accepts and sends
each connection's bytes as frames over ONE persistent TCP connection, and a server process that connects to the
destination for each new frame id. It has a raw epoll loop (no asyncio), a 9-byte frame header, no windows, no
channel confirmation and no checks; with ``--gcm`` each frame is sealed and opened with AES-128-GCM as
aes128-gcm@openssh.com does. It is only fit for rr (it has no flow control), which is all it is for: whatever
conduit does per connection, it cannot cost less than this.

    python3 bench/rr_floor.py                      # 5 rounds of 2000 connections each, interleaved
    python3 bench/rr_floor.py --connections 3000 --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import run

FRAME = struct.Struct("!cII")  # kind, connection id, payload length
LENGTH = struct.Struct("!I")
OPEN, DATA, EOF, CLOSE = b"O", b"D", b"E", b"C"
READ = 256 * 1024


def load_tunnelbench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tunnelbench", run.TUNNELBENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- the floor forwarder's two halves
class Framing:
    """Frames to bytes and back over the one connection: 4-byte length, body, and with gcm a 16-byte tag."""

    def __init__(self, gcm: bool) -> None:
        self.seal: Callable[[bytes], bytes] = self._plain_seal
        self.tag = 0
        if gcm:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aead = AESGCM(bytes(16))
            self._send_nonce = self._recv_nonce = 0
            self.seal, self.tag = self._gcm_seal, 16
        self._buffer = bytearray()

    @staticmethod
    def _plain_seal(body: bytes) -> bytes:
        return LENGTH.pack(len(body)) + body

    def _gcm_seal(self, body: bytes) -> bytes:
        self._send_nonce += 1
        length = LENGTH.pack(len(body))
        return length + self._aead.encrypt(self._send_nonce.to_bytes(12, "big"), body, length)

    def frames(self, data: bytes) -> list[bytes]:
        buf = self._buffer
        buf += data
        out = []
        while len(buf) >= 4:
            (n,) = LENGTH.unpack_from(buf)
            end = 4 + n + self.tag
            if len(buf) < end:
                break
            body = bytes(buf[4:end])
            if self.tag:
                self._recv_nonce += 1
                body = self._aead.decrypt(self._recv_nonce.to_bytes(12, "big"), body, bytes(buf[:4]))
            del buf[:end]
            out.append(body)
        return out


def forward_half(role: str, listen_port: int, target_port: int, gcm: bool) -> None:
    """client: accept on listen_port, carry connections over one connection to the server half at target_port.
    server: take that one connection on listen_port, connect to the destination at target_port per frame id."""
    framing = Framing(gcm)
    poll = select.epoll()
    listener = socket.create_server(("127.0.0.1", listen_port), backlog=1024)
    if role == "server":
        print(listen_port, flush=True)
        mux, _ = listener.accept()
        listener.close()
    else:
        mux = socket.create_connection(("127.0.0.1", target_port))
        listener.setblocking(False)
        poll.register(listener.fileno(), select.EPOLLIN)
        print(listen_port, flush=True)
    mux.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    poll.register(mux.fileno(), select.EPOLLIN)
    buffer = memoryview(bytearray(READ))  # recv() of a fresh 256 KiB bytes costs mmap, mremap and munmap

    def receive(sock: socket.socket) -> bytes:
        return bytes(buffer[: sock.recv_into(buffer)])

    by_fd: dict[int, tuple[int, socket.socket]] = {}
    by_id: dict[int, socket.socket] = {}
    next_id = 0

    def send(*frames: bytes) -> None:
        mux.sendall(b"".join(map(framing.seal, frames)))

    def add(conn_id: int, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        by_fd[sock.fileno()] = (conn_id, sock)
        by_id[conn_id] = sock
        poll.register(sock.fileno(), select.EPOLLIN)

    def drop(sock: socket.socket) -> None:
        conn_id, _ = by_fd.pop(sock.fileno())
        by_id.pop(conn_id, None)
        with contextlib.suppress(FileNotFoundError):  # the server half stops polling at the destination's EOF
            poll.unregister(sock.fileno())
        sock.close()

    while True:
        for fd, _events in poll.poll():
            if role == "client" and fd == listener.fileno():
                with contextlib.suppress(BlockingIOError):
                    sock, _ = listener.accept()
                    sock.setblocking(False)
                    try:
                        first = receive(sock)
                    except BlockingIOError:
                        first = b""
                    next_id += 1
                    add(next_id, sock)
                    send(FRAME.pack(OPEN, next_id, len(first)) + first)
            elif fd == mux.fileno():
                data = receive(mux)
                if not data:
                    return
                for frame in framing.frames(data):
                    kind, conn_id, _n = FRAME.unpack_from(frame)
                    payload = frame[FRAME.size :]
                    target = by_id.get(conn_id)
                    if kind == OPEN:
                        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                        sock.connect_ex(("127.0.0.1", target_port))  # loopback: done inside connect()
                        add(conn_id, sock)
                        if payload:
                            sock.send(payload)
                    elif target is None:
                        continue
                    elif kind == DATA:
                        target.send(payload)
                    elif kind == EOF:
                        target.shutdown(socket.SHUT_WR)
                    elif kind == CLOSE:
                        drop(target)
                        if role == "server":
                            send(FRAME.pack(CLOSE, conn_id, 0))
            elif fd in by_fd:
                conn_id, sock = by_fd[fd]
                try:
                    data = receive(sock)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    send(FRAME.pack(DATA, conn_id, len(data)) + data)
                elif role == "client":  # rr's client closed: tell the server and forget the socket
                    drop(sock)
                    send(FRAME.pack(EOF, conn_id, 0), FRAME.pack(CLOSE, conn_id, 0))
                else:  # the destination's EOF: its socket goes when the client's CLOSE comes
                    poll.unregister(fd)


def start_floor(stack: contextlib.ExitStack, dport: int, gcm: bool) -> int:
    """Both halves as child processes; returns the port the client half forwards."""
    flags = ["--gcm"] if gcm else []
    mux_port, local_port = run.free_port(), run.free_port()
    for role, listen, target in (("server", mux_port, dport), ("client", local_port, mux_port)):
        command = [sys.executable, __file__, "half", role, str(listen), str(target), *flags]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        stack.callback(proc.kill)
        assert proc.stdout is not None
        proc.stdout.readline()  # the half listens
    return local_port


# ------------------------------------------------------------------------------------------------ the run
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=2000, help="connections per rr round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tb = load_tunnelbench()
    with tempfile.TemporaryDirectory(prefix="rr-floor-") as tmp, contextlib.ExitStack() as stack:
        keys = Path(tmp)
        ports = run.start_servers(keys, stack)
        templates = run.tunnels(keys, ports)
        serve = [sys.executable, str(run.TUNNELBENCH), "--serve"]  # the destination tunnelbench starts for itself
        destination = subprocess.Popen(serve, stdout=subprocess.PIPE, text=True)
        stack.callback(destination.kill)
        assert destination.stdout is not None
        dport = int(destination.stdout.readline())
        forwarded: dict[str, int] = {}
        for name in ("openssh/gcm", "conduit-conduitd/gcm"):
            tunnel = tb.Tunnel(name, templates[name], dport)
            tunnel.start()
            stack.callback(tunnel.stop)
            forwarded[name] = tunnel.port
        forwarded["python floor"] = start_floor(stack, dport, gcm=False)
        forwarded["python floor + aes128-gcm"] = start_floor(stack, dport, gcm=True)
        for name, port in forwarded.items():
            if not tb.roundtrip(port):
                raise SystemExit(f"{name}: no reply through the forward")
        rates: dict[str, list[float]] = {name: [] for name in forwarded}
        for i in range(args.rounds):
            order = list(forwarded.items())
            for name, port in order if i % 2 == 0 else reversed(order):
                rates[name].append(tb.w_rr(port, args.connections))
    base = statistics.median(rates["openssh/gcm"])
    print(f"rr, {args.rounds} rounds of {args.connections} connections, {os.cpu_count()} cores; medians:")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:28s} {median:7.0f} conn/s  {median / base:.2f}x OpenSSH   rounds: {[round(v) for v in values]}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["half"]:
        with contextlib.suppress(ConnectionError):  # the other half went first, at the end of the run
            forward_half(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), "--gcm" in sys.argv[5:])
    else:
        sys.exit(main())
