#!/usr/bin/env python3
"""Compare conduit/conduitd against OpenSSH, AsyncSSH and Paramiko (sshtunnel) in ONE tunnelbench run.

Starts the servers on loopback with throwaway keys (OpenSSH sshd, conduitd, an AsyncSSH server), runs the
workloads of ../shared/bench/tunnelbench.py (its destination, tunnels and measurements, imported) over every tunnel,
interleaved round by round, and writes bench/RESULTS.md: medians per tunnel and the ratios conduit/OpenSSH and
conduit/AsyncSSH from that one run. Each round takes the tunnels in another order (turned and, every other round,
reversed), where tunnelbench's own loop keeps one order: where a tunnel sits in a round, and what ran just before
it, moves its figures. ssh->sshd (aes128-gcm) runs twice in each round, so the run also shows how far one tunnel
moves between slots.

    python3 bench/run.py                 # full run (512 MiB streams, 3 rounds)
    python3 bench/run.py --quick         # 64 MiB streams, 1 round: a smoke test of every tunnel
    python3 bench/run.py --privsep yes   # conduitd separated (its default as root; the bench's is no)
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import functools
import getpass
import importlib.util
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = Path(os.environ.get("SSHCONDUIT_SHARED", ROOT.parent / "shared"))
TUNNELBENCH = SHARED / "bench" / "tunnelbench.py"
PEERS = SHARED / "bench" / "peers"
GCM = "aes128-gcm@openssh.com"
NOISE_TUNNEL = "openssh-again/gcm"  # openssh/gcm measured twice in one run
RR_CONNECTIONS, CONC_CONNECTIONS, CONC_BYTES = 300, 50, 2 << 20  # tunnelbench's defaults: --rr, --conns, --conn-bytes
COLUMNS = [
    ("setup_s", "setup s", False),
    ("up_MBps", "up MB/s", True),
    ("down_MBps", "down MB/s", True),
    ("rr_conn_per_s", "rr conn/s", True),
    ("conc_MBps", "conc MB/s", True),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening after {timeout}s")


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def start_servers(keys: Path, stack: contextlib.ExitStack, privsep: str = "no") -> dict[str, int]:
    ports = {"sshd": free_port(), "conduitd": free_port(), "asyncssh": free_port()}
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd = subprocess.Popen(
        [str(PEERS / "openssh-sshd"), str(ports["sshd"]), str(keys)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(sshd.kill)
    wait_port(ports["sshd"], sshd)
    start_conduitd(keys, stack, privsep, ports["conduitd"])
    if os.geteuid() == 0:  # separated connections, conduitd's default as root, in the same run
        ports["conduitd-privsep"] = start_conduitd(keys, stack, "yes")
    if shutil.which("python3") and _has_module("asyncssh"):
        peer = subprocess.Popen(
            [sys.executable, str(PEERS / "asyncssh-forward"), "server", str(ports["asyncssh"]), str(keys)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(peer.kill)
        wait_port(ports["asyncssh"], peer)
    return ports


def start_conduitd(keys: Path, stack: contextlib.ExitStack, privsep: str, port: int | None = None) -> int:
    """conduitd on 127.0.0.1 with the throwaway keys; returns its port once it listens."""
    port = port or free_port()
    config = keys / f"conduitd_config.{privsep}.{port}"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {keys}/host_ed25519\n"
        f"AuthorizedKeysFile {keys}/authorized_keys\nStrictModes no\nPidFile none\nLogLevel ERROR\n"
        f"UsePrivilegeSeparation {privsep}\n"
    )
    conduitd = subprocess.Popen(
        [sys.executable, "-m", "sshconduit.cli.conduitd", "-D", "-e", "-f", str(config)],
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(conduitd.kill)
    wait_port(port, conduitd)
    return port


@functools.cache  # asked by start_servers, tunnels and missing_peers: one interpreter start per module
def _has_module(name: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True).returncode == 0


PEER_MODULES = ("asyncssh", "sshtunnel")  # the Python peers, from the bench extra: pip install -e '.[bench]'


def missing_peers() -> list[str]:
    return [name for name in PEER_MODULES if not _has_module(name)]


def tunnels(keys: Path, ports: dict[str, int]) -> dict[str, str]:
    user = getpass.getuser()
    key = keys / "id_ed25519"
    common = f"-F none -N -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -i {key}"
    conduit = f"PYTHONPATH={ROOT / 'src'} {sys.executable} -m sshconduit.cli.conduit {common}"
    ssh = f"ssh {common}"
    fwd = "-L {lport}:{dhost}:{dport}"
    out = {}
    for label, cipher in (("gcm", f"-c {GCM}"), ("default", "")):
        out[f"conduit-conduitd/{label}"] = f"{conduit} {cipher} -p {ports['conduitd']} {fwd} {user}@127.0.0.1"
        out[f"openssh/{label}"] = f"{ssh} {cipher} -p {ports['sshd']} {fwd} {user}@127.0.0.1"
        out[f"conduit-sshd/{label}"] = f"{conduit} {cipher} -p {ports['sshd']} {fwd} {user}@127.0.0.1"
        out[f"ssh-conduitd/{label}"] = f"{ssh} {cipher} -p {ports['conduitd']} {fwd} {user}@127.0.0.1"
        if label == "gcm":  # the same tunnel again, in another slot of each round: the run's own noise (markdown)
            out[NOISE_TUNNEL] = out["openssh/gcm"]
    if "conduitd-privsep" in ports:
        out["conduit-conduitd-privsep/gcm"] = (
            f"{conduit} -c {GCM} -p {ports['conduitd-privsep']} {fwd} {user}@127.0.0.1"
        )
    if "asyncssh" in ports and _has_module("asyncssh"):
        out["asyncssh/default"] = (
            f"{sys.executable} {PEERS / 'asyncssh-forward'} client {{lport}} {{dhost}} {{dport}} "
            f"{ports['asyncssh']} {key}"
        )
        out["asyncssh/gcm"] = (
            f"{sys.executable} {HERE / 'asyncssh_client.py'} {GCM} {{lport}} {{dhost}} {{dport}} "
            f"{ports['asyncssh']} {key}"
        )
    if _has_module("sshtunnel"):
        out["sshtunnel-sshd/default"] = (
            f"{sys.executable} {PEERS / 'paramiko-forward'} {{lport}} {{dhost}} {{dport}} {ports['sshd']} {key}"
        )
    return out


def load_tunnelbench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tunnelbench", TUNNELBENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_destination(stack: contextlib.ExitStack) -> int:
    """tunnelbench's destination server (echo, upload, download, ...), as tunnelbench starts it; returns its port."""
    destination = subprocess.Popen([sys.executable, str(TUNNELBENCH), "--serve"], stdout=subprocess.PIPE, text=True)
    stack.callback(destination.kill)
    assert destination.stdout is not None
    return int(destination.stdout.readline())


T = TypeVar("T")


def round_order(items: list[T], rnd: int, rounds: int) -> list[T]:
    """The tunnels in round ``rnd``: turned by an even share of the list each round and reversed every other
    round, so over the run each tunnel sits early and late and follows different tunnels."""
    shift = rnd * len(items) // max(rounds, 1)
    order = items[shift:] + items[:shift]
    return order[::-1] if rnd % 2 else order


def measure(tb: ModuleType, tunnel: Any, nbytes: int, figures: dict[str, list]) -> None:
    """One round of tunnelbench's workloads over ``tunnel``, in its order and rounded as it rounds them."""

    def record(key: str, value: float) -> None:
        figures.setdefault(key, []).append(_rounded(key, value))

    try:
        tunnel.start()  # inside: a tunnel that never got ready may still be running
        if tunnel.setup_s is not None:
            record("setup_s", tunnel.setup_s)
        port = tunnel.port
        record("up_MBps", tb.w_up(port, nbytes))
        record("down_MBps", tb.w_down(port, nbytes))
        record("rr_conn_per_s", tb.w_rr(port, RR_CONNECTIONS))
        record("conc_MBps", tb.w_conc(port, CONC_CONNECTIONS, CONC_BYTES))
        figures.setdefault("halfclose_ok", []).append(tb.w_halfclose(port))
    finally:
        tunnel.stop()


def run_rounds(templates: dict[str, str], rounds: int, nbytes: int, stack: contextlib.ExitStack) -> dict[str, dict]:
    """Every tunnel in every round, direct first and the others in round_order; medians per tunnel. A tunnel
    that fails keeps what it measured before, with the error, and is not run again (as tunnelbench does)."""
    tb = load_tunnelbench()
    dport = start_destination(stack)
    direct = tb.Tunnel("direct", None, dport)
    others = [tb.Tunnel(name, template, dport) for name, template in templates.items()]
    figures: dict[str, dict[str, list]] = {t.name: {} for t in (direct, *others)}
    errors: dict[str, str] = {}
    for rnd in range(rounds):
        for tunnel in (direct, *round_order(others, rnd, rounds)):
            if tunnel.name in errors:
                continue
            try:
                measure(tb, tunnel, nbytes, figures[tunnel.name])
            except Exception as exc:  # said in the results; the other tunnels go on
                errors[tunnel.name] = f"round {rnd}: {exc}"
    return medians(figures, errors)


def medians(figures: dict[str, dict[str, list]], errors: dict[str, str]) -> dict[str, dict]:
    """The median of each figure; halfclose true only if true in every round; the error, if any."""
    out: dict[str, dict] = {}
    for name, values in figures.items():
        out[name] = {k: all(v) if k == "halfclose_ok" else _median(k, v) for k, v in values.items()}
        if name in errors:
            out[name]["error"] = errors[name]
    return out


def _median(key: str, values: list[float]) -> float:
    return _rounded(key, statistics.median(values))  # the median of two rounds is a mean: to the same digits


def _rounded(key: str, value: float) -> float:
    """To the digits tunnelbench rounds each round's figure to."""
    return round(value, 4 if key == "setup_s" else 1)


def ratio(a: dict, b: dict, key: str, higher_better: bool) -> str:
    if key not in a or key not in b or not b[key] or not a[key]:
        return "-"
    value = a[key] / b[key] if higher_better else b[key] / a[key]
    return f"{value:.2f}x"


def congestion_control() -> str:
    """The kernel's default TCP congestion control, which every loopback stream here uses: with bbr (paced, for
    a link of microseconds) direct loopback moved about half what it did with cubic on the same machine."""
    try:
        name = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return ""
    return f", TCP congestion control {name}"


def markdown(results: dict, args: argparse.Namespace, elapsed: float, missing: list[str]) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"One run of `python3 bench/run.py {' '.join(sys.argv[1:])}` ({elapsed:.0f} s) on "
        f"{platform.node()}: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        f"{congestion_control()}. "
        f"Streams of {args.bytes >> 20} MiB, {args.rounds} round(s), each in another order, medians; "
        "tunnelbench from ../shared/bench; src byte-compiled first, as an installed package is.",
        "",
        "| tunnel | " + " | ".join(c[1] for c in COLUMNS) + " | halfclose | error |",
        "|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    if missing:
        lines[4:4] = [f"Left out, not installed: {', '.join(missing)} (`pip install -e '.[bench]'`).", ""]
    for name, r in results.items():
        cells = [str(r.get(k, "-")) for k, _, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r.get('halfclose_ok', '-')} | {r.get('error', '')} |")
    lines += [
        "",
        "Ratios from this run (higher is better for conduit; setup is inverted so >1 means faster):",
        "",
        "| comparison | " + " | ".join(c[1] for c in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    pairs = []
    for label in ("gcm", "default"):
        pairs += [
            (f"conduit-conduitd/{label}", f"openssh/{label}"),
            (f"conduit-sshd/{label}", f"openssh/{label}"),
            (f"ssh-conduitd/{label}", f"openssh/{label}"),
        ]
    pairs += [
        (NOISE_TUNNEL, "openssh/gcm"),
        ("conduit-conduitd-privsep/gcm", "openssh/gcm"),
        ("conduit-conduitd/default", "asyncssh/default"),
        ("conduit-conduitd/gcm", "asyncssh/gcm"),
        ("conduit-conduitd/gcm", "asyncssh/default"),  # the framing: AsyncSSH as it comes
        ("conduit-conduitd/default", "sshtunnel-sshd/default"),
    ]
    for a, b in pairs:
        if a in results and b in results:
            cells = [ratio(results[a], results[b], k, hb) for k, _, hb in COLUMNS]
            lines.append(f"| {a} / {b} | " + " | ".join(cells) + " |")
    if NOISE_TUNNEL in results and "openssh/gcm" in results:
        lines += [
            "",
            f"{NOISE_TUNNEL} is openssh/gcm run again, in another slot of each round. Its row is what the same "
            "tunnel measures in another slot of the same run: a ratio that differs from 1.00x by less than that "
            "row does is within this run's noise.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bytes", type=int, default=512 << 20)
    ap.add_argument("--quick", action="store_true", help="64 MiB, 1 round")
    ap.add_argument("--only", default="", help="comma-separated tunnel name prefixes to keep")
    ap.add_argument("--output", default=str(HERE / "RESULTS.md"))
    ap.add_argument(
        "--privsep",
        choices=("yes", "no"),
        default="no",
        help="conduitd's UsePrivilegeSeparation. Default no (the connection in the daemon, root connecting "
        "itself, as sshd's post-auth process does as the user); yes, conduitd's default as root, runs each "
        "connection unprivileged, with the user's helper making its forwarded sockets (ahead, in batches)",
    )
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.bytes = 1, 64 << 20
    # conduit and conduitd run from src: byte-compile it first, as pip does for an installed package (and
    # as Python's first import does, unless PYTHONDONTWRITEBYTECODE is set); else every start compiles it again.
    compileall.compile_dir(str(ROOT / "src"), quiet=1)
    missing = missing_peers()
    if missing:  # said, not silent: the comparison needs them
        print(
            f"bench/run.py: left out, not installed: {', '.join(missing)} (pip install -e '.[bench]')", file=sys.stderr
        )
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, contextlib.ExitStack() as stack:
        keys = Path(tmp)
        ports = start_servers(keys, stack, args.privsep)
        chosen = tunnels(keys, ports)
        if args.only:
            prefixes = tuple(args.only.split(","))
            chosen = {k: v for k, v in chosen.items() if k.startswith(prefixes)}
        started = time.monotonic()
        results = run_rounds(chosen, args.rounds, args.bytes, stack)
        elapsed = time.monotonic() - started
    print(json.dumps(results, indent=1))
    Path(args.output).write_text(markdown(results, args, elapsed, missing))
    print(f"wrote {args.output}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
