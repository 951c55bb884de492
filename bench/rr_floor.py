#!/usr/bin/env python3
"""How many new forwarded connections per second (tunnelbench's rr) a Python forwarder can reach on this machine
at best, measured in one run beside OpenSSH's ssh↔sshd and conduit↔conduitd.

The floor is a forwarder shaped like an SSH tunnel and nothing more: a client process that accepts and sends
each connection's bytes as frames over ONE persistent TCP connection, and a server process that connects to the
destination for each new frame id. It has a raw epoll loop, a 9-byte frame header, no windows and no checks. It
is only fit for rr (it has no flow control), which is all it is for. Four of them, each a step nearer conduit:
  - the floor: the fewest messages that carry rr (open with the first bytes, data, EOF and CLOSE);
  - + aes128-gcm: each frame sealed and opened with AES-128-GCM as aes128-gcm@openssh.com does;
  - + SSH's channel messages: the server confirms each open and sends EOF and CLOSE at the destination's EOF,
    and the client answers that CLOSE, as an SSH channel does in rr;
  - + on uvloop: the same, driven by uvloop's add_reader on the raw sockets (conduit's SocketStream) instead of
    a raw epoll loop (asyncio's own loop when uvloop is not installed).
What is left between the last one and conduit is conduit's own work per connection.

    python3 bench/rr_floor.py                      # 5 rounds of 2000 connections each, interleaved
    python3 bench/rr_floor.py --connections 3000 --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

import run

sys.path.insert(0, str(run.ROOT / "src"))  # the halves choose their loop as conduit does, installed or not
from sshconduit.evloop import loop_factory

FRAME = struct.Struct("!cII")  # kind, connection id, payload length
LENGTH = struct.Struct("!I")
OPEN, CONFIRM, DATA, EOF, CLOSE = b"O", b"K", b"D", b"E", b"C"
READ = 256 * 1024


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


class FloorHalf:
    """One half of the floor forwarder. client: accept on listen_port and carry connections over one connection to
    the server half at target_port. server: take that one connection on listen_port and connect to the destination
    at target_port for each new id. The subclasses drive it: a raw epoll loop, or an asyncio loop's add_reader.

    With ``ssh_messages`` the halves exchange what an SSH channel does in rr: the server confirms each open, sends
    EOF and CLOSE at the destination's EOF, and the client answers that CLOSE. Without, the client sends EOF and
    CLOSE at its socket's EOF and the server answers CLOSE: the fewest messages that carry rr.
    """

    def __init__(self, role: str, listen_port: int, target_port: int, gcm: bool, ssh_messages: bool) -> None:
        self.role, self.target_port, self.ssh_messages = role, target_port, ssh_messages
        self.framing = Framing(gcm)
        self.listener = socket.create_server(("127.0.0.1", listen_port), backlog=1024)
        if role == "server":
            print(listen_port, flush=True)
            self.mux, _ = self.listener.accept()
            self.listener.close()
        else:
            self.mux = socket.create_connection(("127.0.0.1", target_port))
            self.listener.setblocking(False)
            print(listen_port, flush=True)
        self.mux.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = memoryview(bytearray(READ))  # recv() of a fresh 256 KiB bytes costs mmap, mremap and munmap
        self.by_fd: dict[int, tuple[int, socket.socket]] = {}
        self.by_id: dict[int, socket.socket] = {}
        self.watched: set[int] = set()
        self.next_id = 0

    def watch(self, fd: int) -> None:
        self.watched.add(fd)
        self.register(fd)

    def unwatch(self, fd: int) -> None:
        """Stop reading ``fd``; once only: the server stops at the destination's EOF, before the CLOSE drops it."""
        if fd in self.watched:
            self.watched.remove(fd)
            self.unregister(fd)

    def register(self, fd: int) -> None:
        raise NotImplementedError

    def unregister(self, fd: int) -> None:
        raise NotImplementedError

    def receive(self, sock: socket.socket) -> bytes:
        return bytes(self.buffer[: sock.recv_into(self.buffer)])

    def send(self, *frames: bytes) -> None:
        self.mux.sendall(b"".join(map(self.framing.seal, frames)))

    def add(self, conn_id: int, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.by_fd[sock.fileno()] = (conn_id, sock)
        self.by_id[conn_id] = sock
        self.watch(sock.fileno())

    def drop(self, sock: socket.socket) -> None:
        conn_id, _ = self.by_fd.pop(sock.fileno())
        self.by_id.pop(conn_id, None)
        self.unwatch(sock.fileno())
        sock.close()

    def accept(self) -> None:
        with contextlib.suppress(BlockingIOError):
            sock, _ = self.listener.accept()
            sock.setblocking(False)
            try:
                first = self.receive(sock)
            except BlockingIOError:
                first = b""
            self.next_id += 1
            self.add(self.next_id, sock)
            self.send(FRAME.pack(OPEN, self.next_id, len(first)) + first)

    def mux_readable(self) -> None:
        data = self.receive(self.mux)
        if not data:
            raise ConnectionError("the other half closed")
        for frame in self.framing.frames(data):
            kind, conn_id, _n = FRAME.unpack_from(frame)
            payload = frame[FRAME.size :]
            target = self.by_id.get(conn_id)
            if kind == OPEN:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                sock.connect_ex(("127.0.0.1", self.target_port))  # loopback: done inside connect()
                self.add(conn_id, sock)
                if payload:
                    sock.send(payload)
                if self.ssh_messages:
                    self.send(FRAME.pack(CONFIRM, conn_id, 0))
            elif target is None or kind == CONFIRM:
                continue
            elif kind == DATA:
                target.send(payload)
            elif kind == EOF:
                target.shutdown(socket.SHUT_WR)
            elif kind == CLOSE:
                self.drop(target)
                if (self.role == "server") != self.ssh_messages:  # the answer to the other half's CLOSE
                    self.send(FRAME.pack(CLOSE, conn_id, 0))

    def socket_readable(self, fd: int) -> None:
        conn_id, sock = self.by_fd[fd]
        try:
            data = self.receive(sock)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.send(FRAME.pack(DATA, conn_id, len(data)) + data)
        elif self.role == "client" and not self.ssh_messages:  # rr's client closed: tell the server, forget it
            self.drop(sock)
            self.send(FRAME.pack(EOF, conn_id, 0), FRAME.pack(CLOSE, conn_id, 0))
        else:  # the socket goes when the other half's CLOSE comes
            self.unwatch(fd)
            if self.ssh_messages:  # as a channel: EOF, and from the server, whose destination is done, CLOSE too
                frames = [FRAME.pack(EOF, conn_id, 0)]
                if self.role == "server":
                    frames.append(FRAME.pack(CLOSE, conn_id, 0))
                self.send(*frames)


class EpollHalf(FloorHalf):
    def run(self) -> None:
        self.poll = select.epoll()
        if self.role == "client":
            self.poll.register(self.listener.fileno(), select.EPOLLIN)
        self.poll.register(self.mux.fileno(), select.EPOLLIN)
        listener, mux = (self.listener.fileno() if self.role == "client" else -1), self.mux.fileno()
        while True:
            for fd, _events in self.poll.poll():
                if fd == listener:
                    self.accept()
                elif fd == mux:
                    self.mux_readable()
                elif fd in self.by_fd:
                    self.socket_readable(fd)

    def register(self, fd: int) -> None:
        self.poll.register(fd, select.EPOLLIN)

    def unregister(self, fd: int) -> None:
        self.poll.unregister(fd)


class LoopHalf(FloorHalf):
    """Driven by an asyncio event loop's add_reader on the raw sockets, as conduit's SocketStream is. send() stays
    the blocking sendall, which is fine for rr's small frames: they never meet a full socket buffer (uvloop makes
    the descriptor non-blocking, so one that did would raise)."""

    def run(self) -> None:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        if self.role == "client":
            self.loop.add_reader(self.listener.fileno(), self.accept)
        self.loop.add_reader(self.mux.fileno(), self._mux_readable)
        await self.done

    def _mux_readable(self) -> None:
        try:
            self.mux_readable()
        except ConnectionError:
            self.done.set_result(None)

    def register(self, fd: int) -> None:
        self.loop.add_reader(fd, self.socket_readable, fd)

    def unregister(self, fd: int) -> None:
        self.loop.remove_reader(fd)


def start_floor(stack: contextlib.ExitStack, dport: int, variant: str) -> int:
    """Both halves as child processes; returns the port the client half forwards. ``variant`` holds "gcm",
    "ssh" (SSH's messages) and "loop" (asyncio's loop, uvloop when installed) as it likes."""
    mux_port, local_port = run.free_port(), run.free_port()
    for role, listen, target in (("server", mux_port, dport), ("client", local_port, mux_port)):
        command = [sys.executable, __file__, "half", role, str(listen), str(target), variant]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        stack.callback(proc.kill)
        assert proc.stdout is not None
        proc.stdout.readline()  # the half listens
    return local_port


def floors() -> dict[str, str]:
    """Row name: variant, each a step nearer conduit."""
    loop = "uvloop" if loop_factory() else "asyncio's loop"
    return {
        "python floor": "",
        "python floor + aes128-gcm": "gcm",
        "  + SSH's channel messages": "gcm,ssh",
        f"  + those on {loop}": "gcm,ssh,loop",
    }


# ------------------------------------------------------------------------------------------------ the run
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=2000, help="connections per rr round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tb = run.load_tunnelbench()
    with tempfile.TemporaryDirectory(prefix="rr-floor-") as tmp, contextlib.ExitStack() as stack:
        keys = Path(tmp)
        ports = run.start_servers(keys, stack)
        templates = run.tunnels(keys, ports)
        dport = run.start_destination(stack)
        forwarded: dict[str, int] = {}
        for name in ("openssh/gcm", "conduit-conduitd/gcm"):
            tunnel = tb.Tunnel(name, templates[name], dport)
            tunnel.start()
            stack.callback(tunnel.stop)
            forwarded[name] = tunnel.port
        for name, variant in floors().items():
            forwarded[name] = start_floor(stack, dport, variant)
        for name, port in forwarded.items():
            if not tb.roundtrip(port):
                raise SystemExit(f"{name}: no reply through the forward")
        rates: dict[str, list[float]] = {name: [] for name in forwarded}
        for i in range(args.rounds):
            for name, port in run.round_order(list(forwarded.items()), i, args.rounds):
                rates[name].append(tb.w_rr(port, args.connections))
    base = statistics.median(rates["openssh/gcm"])
    print(f"rr, {args.rounds} rounds of {args.connections} connections, {os.cpu_count()} cores; medians:")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:28s} {median:7.0f} conn/s  {median / base:.2f}x OpenSSH   rounds: {[round(v) for v in values]}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["half"]:
        variant = sys.argv[5].split(",") if len(sys.argv) > 5 else []
        half = (LoopHalf if "loop" in variant else EpollHalf)(
            sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), "gcm" in variant, "ssh" in variant
        )
        with contextlib.suppress(ConnectionError):  # the other half went first, at the end of the run
            half.run()
    else:
        sys.exit(main())
