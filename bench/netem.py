#!/usr/bin/env python3
"""One forwarded stream over a long fat link: OpenSSH ssh->sshd against conduit->conduitd, through ``-L``.

Builds two hosts of its own (network namespaces joined by a veth pair, 10.200.N.1 server / 10.200.N.2 client),
adds 25 ms each way (``tc qdisc ... netem delay 25ms``: 50 ms RTT), runs sshd, conduitd and a source service in
the server namespace and the clients in the client namespace, and times one download of --bytes through each
``-L``. Prints MB/s for both and the ratio conduit/OpenSSH. Needs root, ``ip`` and ``tc`` (iproute2).

When the kernel has no sch_netem (tc says "Specified qdisc kind is unknown"), the delay comes from a user-space
delay line instead: the namespaces are joined by a TUN device each, and a process outside both carries every IP
packet from one to the other 25 ms later, never stopping reading (the link has no bandwidth limit of its own, so
the SSH window is what bounds a stream). As with netem, TCP in both namespaces sees the delay as its round trip.
The output says which was used.

    python3 bench/netem.py                  # 128 MiB, 25 ms each way
    python3 bench/netem.py --bytes 67108864 --delay-ms 50
    python3 bench/netem.py --rounds 3 --mixed  # also conduit->sshd and ssh->conduitd
    python3 bench/netem.py --up                # upload: the server's window is the one that must grow
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import fcntl
import os
import select
import shutil
import socket
import struct
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
TCP_BUFFERS = "4096 131072 134217728"  # min, default, max; Linux's 4 MiB send maximum held conduit to 57 MB/s
LINE_MTU = 16384  # one IP packet per read: within the line's CPU at 200 MB/s (65000 left TCP windows stuck at 84 KiB)
LINE_START_TIMEOUT = 10.0
TUNSETIFF = 0x400454CA  # linux/if_tun.h
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


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
    """Two namespaces, ``server`` (10.200.N.1) and ``client`` (10.200.N.2), joined by veth with netem on both
    ends, or by the user-space delay line where the kernel has no netem."""

    def __init__(self, delay_ms: float) -> None:
        n = os.getpid() % 250 + 1
        self.server_ns, self.client_ns = f"cdsrv{os.getpid()}", f"cdcli{os.getpid()}"
        self.server_ip, self.client_ip = f"10.200.{n}.1", f"10.200.{n}.2"
        self.delay_ms = delay_ms
        self.mode = ""  # "netem" or "tun" once set up
        self.netem_error = ""
        self.line: subprocess.Popen[bytes] | None = None  # the delay line's process ("tun")

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
            for name in ("tcp_rmem", "tcp_wmem"):  # TCP's own window must not be what caps a stream at 50 ms
                run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"net.ipv4.{name}={TCP_BUFFERS}")
        results = [
            run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay",
                f"{self.delay_ms}ms", check=False)
            for ns, dev in ((self.server_ns, veth_s), (self.client_ns, veth_c))
        ]  # fmt: skip
        failed = [r for r in results if r.returncode != 0]
        if not failed:
            self.mode = "netem"
            return
        self.netem_error = failed[0].stderr.strip()
        run("ip", "-n", self.server_ns, "link", "del", veth_s)  # and with it the client's end
        self._build_delay_line()
        self.mode = "tun"

    def _build_delay_line(self) -> None:
        """A TUN device in each namespace, both opened by the delay line's process, which carries packets."""
        tun_s, tun_c = f"cdts{os.getpid() % 100000}", f"cdtc{os.getpid() % 100000}"
        self.line = subprocess.Popen(
            [sys.executable, __file__, "line", tun_s, tun_c, str(self.delay_ms / 1000)], stdout=subprocess.PIPE
        )
        assert self.line.stdout is not None
        ready, _, _ = select.select([self.line.stdout], [], [], LINE_START_TIMEOUT)
        if not ready or self.line.stdout.readline() != b"ready\n":
            raise RuntimeError("the delay line did not start")
        for ns, dev, ip, peer in (
            (self.server_ns, tun_s, self.server_ip, self.client_ip),
            (self.client_ns, tun_c, self.client_ip, self.server_ip),
        ):
            run("ip", "link", "set", dev, "netns", ns)  # the process's descriptor stays attached to it
            run("ip", "-n", ns, "addr", "add", ip, "peer", peer, "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "mtu", str(LINE_MTU), "up")

    def __exit__(self, *exc: object) -> None:
        if self.line is not None:
            stop_process(self.line)  # its TUN devices go with it
        for ns in (self.server_ns, self.client_ns):
            run("ip", "netns", "del", ns, check=False)  # deletes a veth end there, and with it the pair

    def exec(self, ns: str, *cmd: str, **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kw)  # type: ignore[call-overload]


# --- the user-space delay line (used when sch_netem is missing) ---


def open_tun(name: str) -> int:
    """A new TUN device ``name`` (IP packets, no header), non-blocking; it lives while the descriptor is open."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


async def carry(source: int, target: int, delay: float) -> None:
    """Write each packet read from ``source`` to ``target`` ``delay`` seconds later, in order; forever."""
    loop = asyncio.get_running_loop()
    queue: collections.deque[tuple[float, bytes]] = collections.deque()

    def deliver() -> None:
        now = loop.time()
        while queue and queue[0][0] <= now:
            with contextlib.suppress(OSError):  # a full device queue drops the packet, as a link would
                os.write(target, queue.popleft()[1])
        if queue:
            loop.call_at(queue[0][0], deliver)

    def readable() -> None:
        for _ in range(64):  # what is queued now, bounded so the other direction gets its turn
            try:
                packet = os.read(source, LINE_MTU + 1024)
            except BlockingIOError:
                return
            queue.append((loop.time() + delay, packet))
            if len(queue) == 1:
                loop.call_at(queue[0][0], deliver)

    loop.add_reader(source, readable)
    await asyncio.Event().wait()


def delay_line(name_a: str, name_b: str, delay: float) -> None:
    a, b = open_tun(name_a), open_tun(name_b)
    print("ready", flush=True)

    async def both() -> None:
        await asyncio.gather(carry(a, b, delay), carry(b, a, delay))

    asyncio.run(both())


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
    """Print the seconds one small message takes to come back from host:port (after connecting), and TCP's
    minimum round trip on that connection."""
    deadline = time.monotonic() + timeout
    for _ in range(100):  # the echo server may not be listening yet: try again
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.monotonic()
            sock.sendall(b"ping")
            got = b""
            while len(got) < 4 and (chunk := sock.recv(4)):
                got += chunk
            if got == b"ping":
                from sshconduit.aio import tcp_min_rtt  # the tests run this with the package importable

                print(f"{got.decode()} {time.monotonic() - started:.4f} {tcp_min_rtt(sock):.4f}")
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
    cmd = [
        *client, "-F", "none", "-N", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-i", str(tmp / "id_ed25519"), "-p", str(port),
        "-L", f"127.0.0.1:{lport}:127.0.0.1:{SINK_PORT if up else SOURCE_PORT}", f"root@{hosts.server_ip}",
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
    if len(sys.argv) > 1 and sys.argv[1] == "line":
        delay_line(sys.argv[2], sys.argv[3], float(sys.argv[4]))
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
    if result["mode"] == "tun":
        print(f"sch_netem unavailable ({result['netem_error']}): using the user-space delay line")
    way = "upload" if args.up else "download"
    print(f"RTT {result['rtt_ms']:.0f} ms ({result['mode']}), {args.bytes >> 20} MiB one {way} through -L, MB/s:")
    for name, figures in result["MBps"].items():  # type: ignore[attr-defined]
        print(f"  {name:13} best {max(figures):7.1f}  {figures}")
    print(f"ratio conduit->conduitd / ssh->sshd: {result['ratio']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
