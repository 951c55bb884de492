"""ssh -R against conduitd (and the same config under OpenSSH's sshd): tcpip-forward, streamlocal, policy, teardown."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import select
import socket
import stat
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import (
    USER,
    echo_through,
    echo_unix,
    env_with_src,
    free_port,
    keys_file,
    run_client,
    ssh_argv,
    stop_process,
    wait_for_port,
)

import sshconduit
from sshconduit import limits, messages
from sshconduit.config.authorized_keys import KeyOptions
from sshconduit.forward.remote import LOOPBACK, WILDCARD, RemoteForwards, bind_addresses
from sshconduit.limits import MAX_REMOTE_LISTENERS
from sshconduit.policy import ServerPolicy, permit_listen_allows

SERVERS = [pytest.param("conduitd", id="conduitd"), pytest.param("sshd", id="sshd")]
WAIT = 10.0  # seconds any single condition in these tests may take
FAIL_EXIT = ("-o", "ExitOnForwardFailure=yes")


@pytest.fixture
def servers(openssh_server, conduitd_server):
    return {"sshd": openssh_server, "conduitd": conduitd_server}


def remote_argv(keyset, port: int, *args: str, log_level: str = "ERROR") -> list[str]:
    argv = ssh_argv(keyset, port, *args, f"{USER}@127.0.0.1")
    argv[argv.index("LogLevel=ERROR")] = f"LogLevel={log_level}"  # ssh keeps the first -o value it sees
    return argv


@contextlib.contextmanager
def client(argv: list[str]) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env_with_src())  # fmt: skip
    try:
        yield proc
    finally:
        stop_process(proc)


@contextlib.contextmanager
def remote_tunnel(argv: list[str], port: int, host: str = "127.0.0.1") -> Iterator[subprocess.Popen]:
    """ssh -N -R until the server side listens on host:port."""
    with client(argv) as proc:
        wait_for_port(port, proc, host)
        yield proc


def read_line_matching(proc: subprocess.Popen, pattern: str) -> re.Match[str]:
    """The first output line of a running client that matches, within WAIT seconds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()  # byte by byte from the fd: a buffered readline would swallow the lines after it
    deadline = time.monotonic() + WAIT
    seen = []
    while time.monotonic() < deadline:
        raw = b""
        while not raw.endswith(b"\n"):
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            byte = os.read(fd, 1) if ready else b""
            if not byte:
                break
            raw += byte
        line = raw.decode(errors="replace")
        if not line:
            break
        seen.append(line)
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"no line matching {pattern!r} in {seen!r}")


def refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def port_is_free(port: int) -> bool:
    """Can a listener bind 127.0.0.1:port (SO_REUSEADDR, so only another listener stops it)?"""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            return False
    return True


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def forward_failure(keyset, daemon, spec: str) -> subprocess.CompletedProcess:
    return run_client(remote_argv(keyset, daemon.port, "-N", *FAIL_EXIT, "-R", spec), timeout=30)


# --- 1, 2: data through a remote forward ---


@pytest.mark.parametrize("server", SERVERS)
def test_remote_forward_echoes_with_half_close(server, keyset, servers, echo_server):
    with servers[server]() as daemon:
        port = free_port()
        with remote_tunnel(remote_argv(keyset, daemon.port, "-N", "-R", f"{port}:127.0.0.1:{echo_server.port}"), port):
            payload = os.urandom(1024 * 1024)
            assert hashlib.sha256(echo_through(port, payload)).digest() == hashlib.sha256(payload).digest()
            assert echo_through(port, b"second connection") == b"second connection"
            if has_ipv6_loopback():  # "localhost" (what ssh asks for by default) is both loopbacks
                assert echo_through(port, b"over ::1", host="::1") == b"over ::1"
        assert echo_server.connections >= 2


@pytest.mark.parametrize("server", SERVERS)
def test_port_zero_is_allocated_and_reported(server, keyset, servers, echo_server):
    with servers[server]() as daemon:
        argv = remote_argv(keyset, daemon.port, "-N", "-R", f"0:127.0.0.1:{echo_server.port}", log_level="INFO")
        with client(argv) as proc:
            found = read_line_matching(
                proc, rf"Allocated port (\d+) for remote forward to 127\.0\.0\.1:{echo_server.port}"
            )
            port = int(found.group(1))
            assert port > 0
            assert echo_through(port, b"through the allocated port") == b"through the allocated port"


# --- 3: AllowTcpForwarding / DisableForwarding ---


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("config", ["AllowTcpForwarding no", "AllowTcpForwarding local",
                                    "DisableForwarding yes\nAllowTcpForwarding yes"])  # fmt: skip
def test_remote_forward_refused_by_config(server, config, keyset, servers, echo_server):
    with servers[server](config) as daemon:
        port = free_port()
        result = forward_failure(keyset, daemon, f"{port}:127.0.0.1:{echo_server.port}")
        assert result.returncode == 255
        assert f"Error: remote port forwarding failed for listen port {port}" in result.stderr.decode()
        assert refused("127.0.0.1", port)
    if server == "conduitd":
        assert "remote port forward" in daemon.output()


@pytest.mark.parametrize("server", SERVERS)
def test_allow_tcp_forwarding_local_still_allows_local(server, keyset, servers, echo_server):
    with servers[server]("AllowTcpForwarding local") as daemon:
        result = run_client(remote_argv(keyset, daemon.port, "-W", f"127.0.0.1:{echo_server.port}"), stdin=b"ping")
        assert result.stdout == b"ping"


@pytest.mark.parametrize("server", SERVERS)
def test_allow_tcp_forwarding_remote_allows_remote_not_local(server, keyset, servers, echo_server):
    with servers[server]("AllowTcpForwarding remote") as daemon:
        port = free_port()
        with remote_tunnel(remote_argv(keyset, daemon.port, "-N", "-R", f"{port}:127.0.0.1:{echo_server.port}"), port):
            assert echo_through(port, b"remote ok") == b"remote ok"
        argv = remote_argv(keyset, daemon.port, "-W", f"127.0.0.1:{echo_server.port}", log_level="INFO")
        result = run_client(argv, stdin=b"ping")
        assert result.returncode == 255
        assert "administratively prohibited" in result.stderr.decode()


# --- 4: PermitListen, GatewayPorts ---


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("where", ["sshd_config", "authorized_keys"])  # PermitListen, or the key's permitlisten=
def test_permit_listen_restricts_ports(server, where, keyset, servers, echo_server, tmp_path):
    allowed, other = free_port(), free_port()
    while other == allowed:
        other = free_port()
    if where == "sshd_config":
        config = f"PermitListen {allowed}"
    else:
        config = keys_file(tmp_path, keyset, f'permitlisten="localhost:{allowed}"')
    with servers[server](config) as daemon:
        with remote_tunnel(remote_argv(keyset, daemon.port, "-N", "-R", f"{allowed}:127.0.0.1:{echo_server.port}"),
                           allowed):  # fmt: skip
            assert echo_through(allowed, b"allowed") == b"allowed"
        result = forward_failure(keyset, daemon, f"{other}:127.0.0.1:{echo_server.port}")
        assert result.returncode == 255
        assert f"remote port forwarding failed for listen port {other}" in result.stderr.decode()
        assert refused("127.0.0.1", other)
    if server == "conduitd":
        assert f"remote forward to host localhost port {other}, but the request was denied" in daemon.output()


@pytest.mark.parametrize("server", SERVERS)
def test_gateway_ports_no_binds_loopback_only(server, keyset, servers, echo_server):
    with servers[server]("GatewayPorts no") as daemon:
        port = free_port()
        argv = remote_argv(keyset, daemon.port, "-N", "-R", f"0.0.0.0:{port}:127.0.0.1:{echo_server.port}")
        with remote_tunnel(argv, port):
            assert echo_through(port, b"loopback") == b"loopback"
            assert refused("127.0.0.2", port)


@pytest.mark.parametrize("server", SERVERS)
def test_gateway_ports_clientspecified_binds_what_was_asked(server, keyset, servers, echo_server):
    with servers[server]("GatewayPorts clientspecified") as daemon:
        port = free_port()
        argv = remote_argv(keyset, daemon.port, "-N", "-R", f"127.0.0.2:{port}:127.0.0.1:{echo_server.port}")
        with remote_tunnel(argv, port, "127.0.0.2"):
            assert echo_through(port, b"as asked", host="127.0.0.2") == b"as asked"
            assert refused("127.0.0.1", port)


@pytest.mark.parametrize("server", SERVERS)
def test_gateway_ports_yes_binds_every_address(server, keyset, servers, echo_server):
    with servers[server]("GatewayPorts yes") as daemon:
        port = free_port()
        argv = remote_argv(keyset, daemon.port, "-N", "-R", f"{port}:127.0.0.1:{echo_server.port}")
        with remote_tunnel(argv, port, "127.0.0.2"):
            assert echo_through(port, b"everywhere", host="127.0.0.2") == b"everywhere"


def test_bind_error_is_refused_and_logged(keyset, conduitd_server, echo_server):
    with conduitd_server() as daemon, socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = forward_failure(keyset, daemon, f"127.0.0.1:{port}:127.0.0.1:{echo_server.port}")
        assert result.returncode == 255
        assert f"remote port forwarding failed for listen port {port}" in result.stderr.decode()
    assert f"bind [127.0.0.1]:{port}: Address already in use" in daemon.output()


# --- 5: listeners go with the connection ---


@pytest.mark.parametrize("server", SERVERS)
def test_listener_closes_when_client_is_killed(server, keyset, servers, echo_server):
    with servers[server]() as daemon:
        port = free_port()
        with remote_tunnel(remote_argv(keyset, daemon.port, "-N", "-R", f"{port}:127.0.0.1:{echo_server.port}"),
                           port) as proc:  # fmt: skip
            assert not port_is_free(port)
            proc.kill()  # no cancel-tcpip-forward, no disconnect: only the kernel's FIN
            proc.wait(5)
            deadline = time.monotonic() + WAIT
            while not port_is_free(port) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert port_is_free(port)


# --- 6: streamlocal ---


@pytest.mark.parametrize("server", SERVERS)
def test_streamlocal_forward_mode_0600(server, keyset, servers, echo_server, tmp_path):
    path = str(tmp_path / "x.sock")
    with (
        servers[server]() as daemon,
        client(remote_argv(keyset, daemon.port, "-N", "-R", f"{path}:127.0.0.1:{echo_server.port}")) as proc,
    ):
        deadline = time.monotonic() + WAIT
        while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        payload = os.urandom(1024 * 1024)
        assert echo_unix(path, payload) == payload


@pytest.mark.parametrize("server", SERVERS)
def test_streamlocal_bind_unlink(server, keyset, servers, echo_server, tmp_path):
    """A stale socket file blocks the forward unless StreamLocalBindUnlink yes removes it first."""
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # closing leaves the file behind
    spec = f"{path}:127.0.0.1:{echo_server.port}"
    with servers[server]() as daemon:
        result = forward_failure(keyset, daemon, spec)
        assert result.returncode == 255
        assert f"remote port forwarding failed for listen path {path}" in result.stderr.decode()
    with (
        servers[server]("StreamLocalBindUnlink yes") as daemon,
        client(remote_argv(keyset, daemon.port, "-N", *FAIL_EXIT, "-R", spec)) as proc,
    ):
        deadline = time.monotonic() + WAIT
        answer = b""
        while not answer and proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(ConnectionRefusedError, FileNotFoundError):
                answer = echo_unix(str(path), b"fresh socket")
            time.sleep(0.05)
        assert answer == b"fresh socket"


@pytest.mark.parametrize("server", SERVERS)
def test_streamlocal_refused_by_config(server, keyset, servers, echo_server, tmp_path):
    path = tmp_path / "no.sock"
    with servers[server]("AllowStreamLocalForwarding local") as daemon:
        result = forward_failure(keyset, daemon, f"{path}:127.0.0.1:{echo_server.port}")
        assert result.returncode == 255
        assert not path.exists()


# --- the global requests themselves, from our own client ---


def test_cancel_bad_requests_and_listener_cap(keyset, conduitd_server):
    async def main(port: int) -> None:
        client = await sshconduit.connect("127.0.0.1", port, username=USER, client_keys=[str(keyset.client_key)],
                                          known_hosts=(), strict_host_key_checking="no")  # fmt: skip
        async with client:
            conn = client.conn
            ok, data = await conn.global_request("tcpip-forward", messages.TcpipForward("127.0.0.1", 0).encode())
            assert ok and len(data) == 4
            bound = int.from_bytes(data, "big")
            assert not await asyncio.to_thread(refused, "127.0.0.1", bound)
            cancel = messages.TcpipForward("127.0.0.1", bound).encode()
            assert await conn.global_request("cancel-tcpip-forward", cancel) == (True, b"")
            assert await asyncio.to_thread(refused, "127.0.0.1", bound)
            assert (await conn.global_request("cancel-tcpip-forward", cancel))[0] is False
            assert (await conn.global_request("tcpip-forward", b"\x00\x00"))[0] is False  # truncated
            too_big = messages.TcpipForward("127.0.0.1", 70000).encode()
            assert (await conn.global_request("tcpip-forward", too_big))[0] is False
            any_port = messages.TcpipForward("127.0.0.1", 0).encode()
            extra = 5
            requests = [conn.global_request("tcpip-forward", any_port) for _ in range(MAX_REMOTE_LISTENERS + extra)]
            answers = await asyncio.gather(*requests)
            assert sum(ok for ok, _ in answers) == MAX_REMOTE_LISTENERS
            assert len({data for ok, data in answers if ok}) == MAX_REMOTE_LISTENERS  # distinct ports
            # the connection survived all of it
            assert (await conn.global_request("streamlocal-forward@openssh.com", b"\x00\x00\x00\x00"))[0] is False

    with conduitd_server() as daemon:
        asyncio.run(main(daemon.port))
    assert "too many forwards" in daemon.output()


class FakeConnection:
    """What RemoteForwards needs of an SSHConnection, for driving it without a peer."""

    def __init__(self) -> None:
        self.user = USER
        self.peername = ("127.0.0.1", 1)
        self.cleanup_callbacks: list = []


def test_listener_cap_holds_for_concurrent_requests(monkeypatch):
    monkeypatch.setattr(limits, "MAX_REMOTE_LISTENERS", 3)

    async def main() -> list[bytes | None]:
        forwards = RemoteForwards(FakeConnection(), ServerPolicy())  # type: ignore[arg-type]
        try:
            return await asyncio.gather(*[forwards.tcpip_forward("127.0.0.1", 0, True) for _ in range(6)])
        finally:
            forwards.close_all()

    answers = asyncio.run(main())
    assert sum(answer is not None for answer in answers) == 3


# --- policy and address rules, no sockets ---


def test_bind_addresses_follow_gateway_ports():
    assert bind_addresses("localhost", "no") == LOOPBACK
    assert bind_addresses("0.0.0.0", "no") == LOOPBACK
    assert bind_addresses("", "no") == LOOPBACK
    assert bind_addresses("127.0.0.1", "no") == ("127.0.0.1",)
    assert bind_addresses("::1", "no") == ("::1",)
    assert bind_addresses("127.0.0.1", "yes") == WILDCARD
    assert bind_addresses("localhost", "yes") == WILDCARD
    assert bind_addresses("", "clientspecified") == WILDCARD
    assert bind_addresses("*", "clientspecified") == WILDCARD
    assert bind_addresses("localhost", "clientspecified") == LOOPBACK
    assert bind_addresses("127.0.0.2", "clientspecified") == ("127.0.0.2",)
    assert bind_addresses("0.0.0.0", "clientspecified") == ("0.0.0.0",)


def test_permit_listen_entries():
    assert permit_listen_allows(["any"], "localhost", 80)
    assert not permit_listen_allows(["none"], "localhost", 8080)
    assert permit_listen_allows(["8080"], "anything", 8080)
    assert not permit_listen_allows(["8080"], "localhost", 8081)
    assert permit_listen_allows(["localhost:*"], "LocalHost", 9)
    assert not permit_listen_allows(["localhost:*"], "0.0.0.0", 9)
    assert permit_listen_allows(["127.0.0.*:22"], "127.0.0.2", 22)
    assert permit_listen_allows(["[::1]:22"], "::1", 22)
    assert permit_listen_allows(["*:*"], "", 0)


def test_remote_forwarding_denial_rules():
    policy = ServerPolicy()
    assert policy.remote_forwarding_denial("localhost", 8080, uid=1000) is None
    assert policy.remote_forwarding_denial("localhost", 80, uid=1000) == "privileged port"
    assert policy.remote_forwarding_denial("localhost", 80, uid=0) is None
    assert policy.remote_forwarding_denial("localhost", 0, uid=1000) is None
    for setting in ("no", "local"):
        assert ServerPolicy(allow_tcp_forwarding=setting).remote_forwarding_denial("localhost", 8080, 0)
    assert ServerPolicy(allow_tcp_forwarding="remote").remote_forwarding_denial("localhost", 8080, 0) is None
    assert ServerPolicy(disable_forwarding=True).remote_forwarding_denial("localhost", 8080, 0) == "AllowTcpForwarding"
    assert ServerPolicy(permit_listen=["9000"]).remote_forwarding_denial("localhost", 8080, 0) == "PermitListen"
    keyed = ServerPolicy(key_options=KeyOptions(permitlisten=["localhost:9000"]))
    assert keyed.remote_forwarding_denial("localhost", 9000, 0) is None
    assert keyed.remote_forwarding_denial("localhost", 9001, 0) == "authorized_keys permitlisten"
    assert keyed.remote_forwarding_denial("0.0.0.0", 9000, 0) == "authorized_keys permitlisten"
    no_pf = ServerPolicy(key_options=KeyOptions(no_port_forwarding=True))
    assert no_pf.remote_forwarding_denial("localhost", 9000, 0) == "authorized_keys no-port-forwarding"
    assert no_pf.remote_streamlocal_denial() == "authorized_keys no-port-forwarding"
    restricted = ServerPolicy(key_options=KeyOptions(restrict=True))
    assert restricted.remote_forwarding_denial("localhost", 9000, 0) == "authorized_keys no-port-forwarding"
    regranted = ServerPolicy(key_options=KeyOptions(restrict=True, port_forwarding=True))
    assert regranted.remote_forwarding_denial("localhost", 9000, 0) is None
    assert ServerPolicy(allow_stream_local_forwarding="local").remote_streamlocal_denial() == (
        "AllowStreamLocalForwarding"
    )
    assert ServerPolicy().remote_streamlocal_denial() is None


def test_remote_forwards_are_audited(keyset, conduitd_server, echo_server, tmp_path):
    """Every -R connection that ends, and every refused -R, leaves an AuditLog record."""
    import json

    audit_path = tmp_path / "audit.jsonl"
    allowed, other = free_port(), free_port()
    while other == allowed:
        other = free_port()
    with conduitd_server(f"PermitListen {allowed}\nAuditLog {audit_path}\n") as daemon:
        with remote_tunnel(remote_argv(keyset, daemon.port, "-N", "-R", f"{allowed}:127.0.0.1:{echo_server.port}"),
                           allowed):  # fmt: skip
            assert echo_through(allowed, b"audited") == b"audited"
            for _ in range(50):  # the record is written when the channel has closed on both sides
                if "forwarded-tcpip" in audit_path.read_text():
                    break
                time.sleep(0.1)
        assert forward_failure(keyset, daemon, f"{other}:127.0.0.1:{echo_server.port}").returncode == 255
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    forwards = [
        r for r in records if r["event"] == "forward" and r["kind"] == "forwarded-tcpip" and r["bytes_to_client"]
    ]
    refusals = [r for r in records if r["event"] == "refused" and r["kind"] == "tcpip-forward"]
    assert len(forwards) == 1, records
    assert forwards[0]["bytes_to_client"] == 7 and forwards[0]["bytes_from_client"] == 7
    assert [r["reason"] for r in refusals] == ["PermitListen"]
    assert refusals[0]["destination"].endswith(f":{other}")
