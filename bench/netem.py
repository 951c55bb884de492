#!/usr/bin/env python3
"""One forwarded stream over a long fat link: OpenSSH ssh->sshd against conduit->conduitd, through ``-L``.

Builds two hosts of its own (network namespaces joined by a veth pair, 10.200.N.1 server / 10.200.N.2 client),
adds 25 ms each way (``tc qdisc ... netem delay 25ms``: 50 ms RTT), runs sshd, conduitd and a source service in
the server namespace and the clients in the client namespace, and times one download of --bytes through each
``-L``. Prints MB/s for both and the ratio conduit/OpenSSH. Needs root, ``ip`` and ``tc`` (iproute2).

When the kernel has no sch_netem (tc says "Specified qdisc kind is unknown"), the delay comes from a user-space
delay line instead: a relay in the client namespace that holds every chunk 25 ms in each direction and never
stops reading (the link has no bandwidth limit of its own, so the SSH window is what bounds a stream). The
output says which was used.

    python3 bench/netem.py                  # 128 MiB, 25 ms each way
    python3 bench/netem.py --bytes 67108864 --delay-ms 50
    python3 bench/netem.py --rounds 3 --mixed  # also conduit->sshd and ssh->conduitd
    python3 bench/netem.py --up                # upload: the server's window is the one that must grow
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import stop_process

ROOT = Path(__file__).resolve().parent.parent
SSH_PORT = 2201
CONDUITD_PORT = 2202
SOURCE_PORT = 9000
SINK_PORT = 9001
RELAY_OFFSET = 100  # the relay for server port P listens on the client's address, port P + 100


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def missing_reason() -> str | None:
    """Why namespaces cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install -y iproute2)"
    return None


class HostPair:
    """Two namespaces joined by veth: ``server`` (10.200.N.1) and ``client`` (10.200.N.2)."""

    def __init__(self, delay_ms: float) -> None:
        n = os.getpid() % 250 + 1
        self.server_ns, self.client_ns = f"cdsrv{os.getpid()}", f"cdcli{os.getpid()}"
        self.server_ip, self.client_ip = f"10.200.{n}.1", f"10.200.{n}.2"
        self.delay_ms = delay_ms
        self.mode = ""  # "netem" or "relay" once set up
        self.netem_error = ""

    def __enter__(self) -> HostPair:
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build(self) -> None:
        run("ip", "netns", "add", self.server_ns)
        run("ip", "netns", "add", self.client_ns)
        veth_s, veth_c = f"cds{os.getpid() % 100000}", f"cdc{os.getpid() % 100000}"
        run(
            "ip",
            "link",
            "add",
            veth_s,
            "netns",
            self.server_ns,
            "type",
            "veth",
            "peer",
            veth_c,
            "netns",
            self.client_ns,
        )
        for ns, dev, ip in ((self.server_ns, veth_s, self.server_ip), (self.client_ns, veth_c, self.client_ip)):
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        results = [
            run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay",
                f"{self.delay_ms}ms", check=False)
            for ns, dev in ((self.server_ns, veth_s), (self.client_ns, veth_c))
        ]  # fmt: skip
        failed = [r for r in results if r.returncode != 0]
        if failed:
            self.mode = "relay"
            self.netem_error = failed[0].stderr.strip()
        else:
            self.mode = "netem"

    def __exit__(self, *exc: object) -> None:
        for ns in (self.server_ns, self.client_ns):
            run("ip", "netns", "del", ns, check=False)  # deletes its veth end, and with it the pair

    def exec(self, ns: str, *cmd: str, **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kw)  # type: ignore[call-overload]

    def start_relay(self, port: int) -> subprocess.Popen[bytes] | None:
        """Without netem: the delay line in the client namespace toward server port ``port``."""
        if self.mode != "relay":
            return None
        return self.exec(
            self.client_ns, sys.executable, __file__, "relay", self.client_ip, str(port + RELAY_OFFSET),
            self.server_ip, str(port), str(self.delay_ms / 1000), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def ssh_address(self, port: int) -> tuple[str, int]:
        """Where a client in the client namespace reaches server port ``port`` across the delayed link."""
        if self.mode == "netem":
            return self.server_ip, port
        return self.client_ip, port + RELAY_OFFSET


# --- the user-space delay line (used when sch_netem is missing) ---


class _DelaySide(asyncio.Protocol):
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.peer: _DelaySide | None = None
        self.early: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.loop.call_later(self.delay, self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)  # the far side is still connecting
        elif self.peer.transport is not None and not self.peer.transport.is_closing():
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.loop.call_later(self.delay, self._deliver_eof)
        return True

    def _deliver_eof(self) -> None:
        if self.peer is not None and self.peer.transport is not None and self.peer.transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self.peer.transport.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.loop.call_later(self.delay * 2, self.peer.transport.close)


async def relay(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def factory() -> _DelaySide:
        inbound = _DelaySide(delay)

        async def connect() -> None:
            outbound = _DelaySide(delay)
            try:
                await loop.create_connection(lambda: outbound, *target)
            except OSError:
                if inbound.transport is not None:
                    inbound.transport.close()
                return
            inbound.peer, outbound.peer = outbound, inbound
            for data in inbound.early:
                inbound._deliver(data)
            inbound.early.clear()

        tasks.add(task := loop.create_task(connect()))
        task.add_done_callback(tasks.discard)
        return inbound

    server = await loop.create_server(factory, *listen, backlog=1024)
    async with server:
        await server.serve_forever()


# --- source and sink ---


def source(port: int, nbytes: int) -> None:
    """Serve ``nbytes`` of zeros to each connection, then close."""
    chunk = bytes(1 << 20)
    with socket.create_server(("127.0.0.1", port), backlog=64) as srv:
        while True:
            conn, _ = srv.accept()
            with conn:
                left = nbytes
                while left:
                    left -= conn.send(chunk[: min(left, len(chunk))])


def sink(port: int) -> None:
    """Read each connection to its EOF, then answer with the byte count."""
    buf = bytearray(1 << 20)
    with socket.create_server(("127.0.0.1", port), backlog=64) as srv:
        while True:
            conn, _ = srv.accept()
            with conn:
                got = 0
                while n := conn.recv_into(buf):
                    got += n
                conn.sendall(str(got).encode())


def push(port: int, nbytes: int, timeout: float) -> None:
    """Send ``nbytes`` to 127.0.0.1:port and half-close; print the count the far end saw and the seconds."""
    sock = _connect_local(port, timeout)
    chunk = bytes(1 << 20)
    started = time.monotonic()
    with sock:
        left = nbytes
        while left:
            left -= sock.send(chunk[: min(left, len(chunk))])
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while data := sock.recv(64):
            reply += data
    print(f"{int(reply or b'0')} {time.monotonic() - started:.4f}")


def echo_server(host: str, port: int) -> None:
    """Answer each connection's bytes until it closes (the netem test's far end)."""
    with socket.create_server((host, port)) as srv:
        while True:
            conn, _ = srv.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)


def round_trip(host: str, port: int, timeout: float) -> None:
    """Print the seconds one small message takes to come back from host:port (after connecting)."""
    deadline = time.monotonic() + timeout
    for _ in range(100):  # the relay may be up before the far end is: it then closes at once, so try again
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.monotonic()
            sock.sendall(b"ping")
            got = b""
            while len(got) < 4 and (chunk := sock.recv(4)):
                got += chunk
            if got == b"ping":
                print(f"{got.decode()} {time.monotonic() - started:.4f}")
                return
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise SystemExit(f"no echo from {host}:{port}")


def _connect_local(port: int, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    for _ in range(200):  # the forward's listener may not be up yet
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=timeout)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    raise SystemExit(f"nothing listening on 127.0.0.1:{port}")


def fetch(port: int, nbytes: int, timeout: float) -> None:
    """Read everything from 127.0.0.1:port; print seconds from connect to the last byte."""
    sock = _connect_local(port, timeout)
    started = time.monotonic()
    got = 0
    with sock:
        buf = bytearray(1 << 20)
        while got < nbytes:
            n = sock.recv_into(buf)
            if not n:
                break
            got += n
    print(f"{got} {time.monotonic() - started:.4f}")


# --- the comparison ---


def write_keys(tmp: Path) -> None:
    for name in ("host_ed25519", "id_ed25519"):
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name))
    (tmp / "authorized_keys").write_text((tmp / "id_ed25519.pub").read_text())
    (tmp / "authorized_keys").chmod(0o600)
    Path("/run/sshd").mkdir(exist_ok=True)


def start_servers(hosts: HostPair, tmp: Path, stack: contextlib.ExitStack) -> None:
    common = (
        f"HostKey {tmp}/host_ed25519\nAuthorizedKeysFile {tmp}/authorized_keys\nStrictModes no\n"
        f"PidFile none\nPermitRootLogin prohibit-password\nAllowTcpForwarding yes\nPasswordAuthentication no\n"
    )
    (tmp / "sshd_config").write_text(f"ListenAddress {hosts.server_ip}\nPort {SSH_PORT}\nUsePAM no\n{common}")
    (tmp / "conduitd_config").write_text(
        f"ListenAddress {hosts.server_ip}\nPort {CONDUITD_PORT}\nLogLevel ERROR\n{common}"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [
        hosts.exec(hosts.server_ns, "/usr/sbin/sshd", "-D", "-e", "-f", str(tmp / "sshd_config"), **quiet),
        hosts.exec(
            hosts.server_ns, sys.executable, "-m", "sshconduit.cli.conduitd", "-D", "-e", "-f",
            str(tmp / "conduitd_config"), env=env, **quiet,
        ),
        hosts.exec(hosts.server_ns, sys.executable, __file__, "source", str(SOURCE_PORT), str(BYTES[0]), **quiet),
        hosts.exec(hosts.server_ns, sys.executable, __file__, "sink", str(SINK_PORT), **quiet),
    ]  # fmt: skip
    procs += [p for port in (SSH_PORT, CONDUITD_PORT) if (p := hosts.start_relay(port)) is not None]
    for proc in procs:
        stack.callback(stop_process, proc)
    time.sleep(1.5)  # sshd and conduitd bind their addresses
    for proc in procs:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")


BYTES = [128 << 20]


def measure(
    hosts: HostPair, tmp: Path, client: list[str], port: int, lport: int, timeout: float, up: bool = False
) -> float:
    """Start ``client -N -L`` in the client namespace, time one download (upload if ``up``); returns MB/s."""
    host, sport = hosts.ssh_address(port)
    cmd = [
        *client, "-F", "none", "-N", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-i", str(tmp / "id_ed25519"), "-p", str(sport),
        "-L", f"127.0.0.1:{lport}:127.0.0.1:{SINK_PORT if up else SOURCE_PORT}", f"root@{host}",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    tunnel = hosts.exec(hosts.client_ns, *cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        out = subprocess.run(
            ["ip", "netns", "exec", hosts.client_ns, sys.executable, __file__, "push" if up else "fetch", str(lport),
             str(BYTES[0]), str(timeout)],
            capture_output=True, text=True, timeout=timeout + 30,
        )  # fmt: skip
        if out.returncode != 0:
            stop_process(tunnel)
            said = tunnel.stderr.read().decode(errors="replace") if tunnel.stderr else ""
            raise RuntimeError(f"fetch through {client[-1]} failed: {out.stderr.strip()[-300:]}; client: {said[-500:]}")
        got, seconds = out.stdout.split()
        if int(got) != BYTES[0]:
            raise RuntimeError(f"fetch through {client[-1]} got {got} of {BYTES[0]} bytes")
        return BYTES[0] / float(seconds) / 1e6
    finally:
        stop_process(tunnel)


def compare(
    bytes_: int, delay_ms: float, rounds: int, timeout: float, mixed: bool, up: bool = False
) -> dict[str, object]:
    BYTES[0] = bytes_
    with tempfile.TemporaryDirectory(prefix="netem-") as tmp_s, contextlib.ExitStack() as stack:
        tmp = Path(tmp_s)
        write_keys(tmp)
        hosts = stack.enter_context(HostPair(delay_ms))
        start_servers(hosts, tmp, stack)
        conduit = [sys.executable, "-m", "sshconduit.cli.conduit"]
        pairs = {"openssh": (["ssh"], SSH_PORT), "conduit": (conduit, CONDUITD_PORT)}
        if mixed:  # the client's window is what bounds a download: conduit's grows against sshd too
            pairs |= {"conduit-sshd": (conduit, SSH_PORT), "ssh-conduitd": (["ssh"], CONDUITD_PORT)}
        results: dict[str, list[float]] = {name: [] for name in pairs}
        lport = 7100
        for _ in range(rounds):
            for name, (client, port) in pairs.items():
                lport += 1
                results[name].append(round(measure(hosts, tmp, client, port, lport, timeout, up), 1))
        return {
            "mode": hosts.mode,
            "netem_error": hosts.netem_error,
            "rtt_ms": 2 * delay_ms,
            "bytes": bytes_,
            "MBps": results,
            "ratio": round(max(results["conduit"]) / max(results["openssh"]), 2),
        }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "source":
        source(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "sink":
        sink(int(sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "push":
        push(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "fetch":
        fetch(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "echo":
        echo_server(sys.argv[2], int(sys.argv[3]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "rtt":
        round_trip(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "relay":
        _, _, lhost, lport, thost, tport, delay = sys.argv
        asyncio.run(relay((lhost, int(lport)), (thost, int(tport)), float(delay)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes", type=int, default=128 << 20)
    ap.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay on each side (RTT is twice this)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds allowed for one transfer")
    ap.add_argument("--mixed", action="store_true", help="also conduit->sshd and ssh->conduitd")
    ap.add_argument("--up", action="store_true", help="upload (client to destination) instead of download")
    args = ap.parse_args()
    reason = missing_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    result = compare(args.bytes, args.delay_ms, args.rounds, args.timeout, args.mixed, args.up)
    if result["mode"] == "relay":
        print(f"sch_netem unavailable ({result['netem_error']}): using the user-space delay line")
    way = "upload" if args.up else "download"
    print(f"RTT {result['rtt_ms']:.0f} ms ({result['mode']}), {args.bytes >> 20} MiB one {way} through -L, MB/s:")
    for name, figures in result["MBps"].items():  # type: ignore[attr-defined]
        print(f"  {name:13} best {max(figures):7.1f}  {figures}")
    print(f"ratio conduit->conduitd / ssh->sshd: {result['ratio']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
