#!/usr/bin/env python3
"""Scale: many forwarded connections over one SSH connection, or many SSH connections to one conduitd.

    python3 bench/scale.py --channels 10000      # one `conduit -N -L` to conduitd, 10,000 connections through it
    python3 bench/scale.py --connections 1000    # 1,000 SSH connections (the Python API), one forward each

Every forwarded connection goes to an echo service, sends a small unique line and reads it back; all are held
open at once, then every echo is checked. Prints the peak RSS (VmHWM) of conduit and conduitd, their RSS with
nothing open and with everything open, and the memory per channel (or per connection). ``--json`` prints the
figures as one JSON object (the test suite uses that). Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from run import free_port, stop_process, wait_port  # noqa: E402

from sshconduit.rlimits import raise_nofile  # noqa: E402

# The servers start with the limit this script was given, as from a shell: they must raise their own.
_NOFILE_AT_START = resource.getrlimit(resource.RLIMIT_NOFILE)


def _as_started() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, _NOFILE_AT_START)


CONNECTS_IN_FLIGHT = 256  # concurrent connect()s: a burst beyond the listen backlog only costs SYN retries
SSH_CONNECTS_IN_FLIGHT = 16


def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB, and how many fds it holds."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


# --- the echo service (its own process, so its sockets are not counted in anyone's RSS) ---


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def echo_server(port: int) -> None:
    raise_nofile()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# --- the servers ---


def start(tmp: Path, stack: contextlib.ExitStack, privsep: str = "no") -> tuple[subprocess.Popen[bytes], int, int]:
    """conduitd and the echo service; returns (conduitd, its port, echo port). conduitd serves the connections
    in its own process (UsePrivilegeSeparation no), whose memory and descriptors are the figures measured;
    ``privsep`` "yes" forks a process per connection instead (then the figures say little)."""
    for name in ("host_ed25519", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)], check=True)
    (tmp / "authorized_keys").write_text((tmp / "id_ed25519.pub").read_text())
    port, echo_port = free_port(), free_port()
    (tmp / "conduitd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {tmp}/host_ed25519\nAuthorizedKeysFile {tmp}/authorized_keys\n"
        "StrictModes no\nPidFile none\nLogLevel ERROR\nPermitRootLogin prohibit-password\nMaxStartups 100:30:200\n"
        f"UsePrivilegeSeparation {privsep}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    echo = subprocess.Popen([sys.executable, __file__, "echo", str(echo_port)], **quiet)  # type: ignore[call-overload]
    stack.callback(stop_process, echo, 10)
    conduitd = subprocess.Popen(
        [sys.executable, "-m", "sshconduit.cli.conduitd", "-D", "-e", "-f", str(tmp / "conduitd_config")],
        env=env,
        stdin=subprocess.DEVNULL,
        preexec_fn=_as_started,
        **quiet,  # type: ignore[arg-type]
    )
    stack.callback(stop_process, conduitd, 10)
    wait_port(echo_port, echo, 30.0)
    wait_port(port, conduitd, 30.0)
    return conduitd, port, echo_port


# --- the clients ---


async def open_many(port: int, count: int, timeout: float) -> tuple[list[asyncio.StreamWriter], int]:
    """``count`` connections to 127.0.0.1:port, each echoing its own line; returns the writers and bad echoes."""
    gate = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
    writers: list[asyncio.StreamWriter] = []
    echoes: dict[int, bytes] = {}

    async def one(i: int) -> None:
        line = b"connection %07d\n" % i
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024)
            writers.append(writer)
            writer.write(line)
        echoes[i] = await reader.readexactly(len(line))

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), timeout)
    bad = sum(1 for i in range(count) if echoes.get(i) != b"connection %07d\n" % i)
    return writers, bad


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


def run_channels(count: int, timeout: float, privsep: str = "no") -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp_s, contextlib.ExitStack() as stack:
        tmp = Path(tmp_s)
        conduitd, port, echo_port = start(tmp, stack, privsep)
        lport = free_port()
        conduit = subprocess.Popen(
            [
                sys.executable, "-m", "sshconduit.cli.conduit", "-F", "none", "-N", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-i", str(tmp / "id_ed25519"),
                "-p", str(port), "-L", f"127.0.0.1:{lport}:127.0.0.1:{echo_port}", f"{getpass.getuser()}@127.0.0.1",
            ],
            env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), preexec_fn=_as_started,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        stack.callback(stop_process, conduit, 10)
        wait_port(lport, conduit, 30.0)
        time.sleep(0.5)  # the probe connection's channel closes
        before = {"conduit": status(conduit.pid), "conduitd": status(conduitd.pid)}
        started = time.monotonic()
        writers, bad = asyncio.run(_hold(lport, count, timeout, conduit.pid, conduitd.pid))
        elapsed = time.monotonic() - started
        at_n = _HELD.pop()
        return _report("channels", count, bad, writers, elapsed, before, at_n)


_HELD: list[dict[str, dict[str, int]]] = []


async def _hold(lport: int, count: int, timeout: float, *pids: int) -> tuple[list[asyncio.StreamWriter], int]:
    writers, bad = await open_many(lport, count, timeout)
    await asyncio.sleep(0.2)
    _HELD.append({"conduit": status(pids[0]), "conduitd": status(pids[1])})
    await close_all(writers)
    return writers, bad


def _report(
    what: str,
    count: int,
    bad: int,
    writers: list[object],
    elapsed: float,
    before: dict[str, dict[str, int]],
    at_n: dict[str, dict[str, int]],
) -> dict[str, object]:
    out: dict[str, object] = {"mode": what, "count": count, "opened": len(writers), "bad_echoes": bad}
    out["seconds_to_open_all"] = round(elapsed, 2)
    for name in at_n:
        out[name] = {
            "rss_at_0_KiB": before[name]["VmRSS"],
            "rss_at_n_KiB": at_n[name]["VmRSS"],
            "peak_rss_KiB": at_n[name]["VmHWM"],
            "fds_at_n": at_n[name]["fds"],
            f"KiB_per_{what[:-1]}": round((at_n[name]["VmRSS"] - before[name]["VmRSS"]) / count, 2),
        }
    return out


def run_connections(count: int, timeout: float, privsep: str = "no") -> dict[str, object]:
    import sshconduit

    logging.getLogger("sshconduit").setLevel(logging.ERROR)  # not 1,000 "Allocated port" warnings

    with tempfile.TemporaryDirectory(prefix="scale-") as tmp_s, contextlib.ExitStack() as stack:
        tmp = Path(tmp_s)
        conduitd, port, echo_port = start(tmp, stack, privsep)
        time.sleep(0.5)
        before = status(conduitd.pid)

        async def main() -> tuple[list[object], int, float, dict[str, int]]:
            gate = asyncio.Semaphore(SSH_CONNECTS_IN_FLIGHT)
            async with contextlib.AsyncExitStack() as astack:

                async def one() -> int:
                    async with gate:
                        client = await sshconduit.connect(
                            "127.0.0.1", port, username=getpass.getuser(), client_keys=[str(tmp / "id_ed25519")],
                            known_hosts=(), strict_host_key_checking="no",
                        )  # fmt: skip
                        await astack.enter_async_context(client)
                        fwd = await astack.enter_async_context(client.forward_local(0, "127.0.0.1", echo_port))
                        return fwd.port

                started = time.monotonic()
                ports = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), timeout)
                echoes = []
                for i, fport in enumerate(ports):  # one forwarded connection through each SSH connection
                    reader, writer = await asyncio.open_connection("127.0.0.1", fport)
                    line = b"connection %07d\n" % i
                    writer.write(line)
                    echoes.append((line, reader, writer))
                bad = 0
                for line, reader, _ in echoes:
                    bad += await asyncio.wait_for(reader.readexactly(len(line)), timeout) != line
                elapsed = time.monotonic() - started
                await asyncio.sleep(0.2)
                at_n = status(conduitd.pid)
                await close_all([w for _, _, w in echoes])
                return [e[2] for e in echoes], bad, elapsed, at_n

        raise_nofile()
        writers, bad, elapsed, at_n = asyncio.run(main())
        out = _report("connections", count, bad, writers, elapsed, {"conduitd": before}, {"conduitd": at_n})
        return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "echo":
        asyncio.run(echo_server(int(sys.argv[2])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--channels", type=int, default=10_000, help="forwarded connections over one SSH connection")
    group.add_argument("--connections", type=int, help="SSH connections to conduitd, one forward each")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed to open everything")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--privsep", choices=("yes", "no"), default="no", help="conduitd's UsePrivilegeSeparation")
    args = ap.parse_args()
    limit = raise_nofile()
    needed = (args.connections * 4 if args.connections else args.channels) + 100
    if limit < needed:
        print(f"RLIMIT_NOFILE is {limit}, {needed} needed: raise the hard limit (ulimit -Hn)", file=sys.stderr)
        return 2
    if args.connections:
        result = run_connections(args.connections, args.timeout, args.privsep)
    else:
        result = run_channels(args.channels, args.timeout, args.privsep)
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=1))
    return 0 if result["bad_echoes"] == 0 and result["opened"] == result["count"] else 1


if __name__ == "__main__":
    sys.exit(main())
