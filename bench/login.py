#!/usr/bin/env python3
"""Login time: ``ssh -o BatchMode=yes ... true`` against OpenSSH's sshd and conduitd, in ONE run.

Starts (as root, on 127.0.0.1, with bench/run.py's throwaway keys and servers) OpenSSH's sshd, conduitd with
``UsePrivilegeSeparation no`` and conduitd with ``UsePrivilegeSeparation yes``, then times N logins to each,
interleaved round by round so that background load hits every server alike, and prints the medians.

    python3 bench/login.py             # 15 logins per server
    python3 bench/login.py -n 40
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import PEERS, free_port, start_conduitd, wait_port

WARMUP = 2  # logins per server not counted: the first ones pay for page cache and a fork server's start-up


def start_sshd(keys: Path, stack: contextlib.ExitStack) -> int:
    port = free_port()
    proc = subprocess.Popen(
        [str(PEERS / "openssh-sshd"), str(port), str(keys)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    stack.callback(proc.kill)
    wait_port(port, proc)
    return port


def login(keys: Path, port: int) -> float:
    argv = [
        "ssh", "-F", "none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-i", str(keys / "id_ed25519"),
        "-p", str(port), f"{getpass.getuser()}@127.0.0.1", "true",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"login to port {port} failed: {done.stderr.decode(errors='replace').strip()}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=15, help=f"logins per server (after {WARMUP} warm-up ones)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("login.py: run as root (sshd, and conduitd's privilege separation, need it)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-login-") as tmp, contextlib.ExitStack() as stack:
        keys = Path(tmp)
        servers = {"openssh sshd": start_sshd(keys, stack)}  # first: it makes the keys
        servers["conduitd UsePrivilegeSeparation no"] = start_conduitd(keys, stack, "no")
        servers["conduitd UsePrivilegeSeparation yes"] = start_conduitd(keys, stack, "yes")
        times: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(WARMUP):
            for port in servers.values():
                login(keys, port)
        for _ in range(args.n):
            for name, port in servers.items():
                times[name].append(login(keys, port))
    print(f"login time, ssh -o BatchMode=yes ... true, {args.n} logins each, ms (median, min, max):")
    for name, samples in times.items():
        ms = [t * 1000 for t in samples]
        print(f"  {name:38} {statistics.median(ms):7.1f} {min(ms):7.1f} {max(ms):7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
