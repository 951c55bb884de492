"""Interop with AsyncSSH and Paramiko, each as client (against conduitd) and as server (under conduit).

Acceptance ("SSH-2 core", point 2): the exec round trip ``echo ok-$((6*7)); exit 3`` prints ``ok-42`` and
exits 3 in all four pairings, and the same pairings carry a 1 MiB direct-tcpip stream through an echo server
with half-close intact. The algorithm tests check what each library negotiates by default and under forced
choices, from both ends of the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import paramiko
import pytest
from conftest import (
    USER,
    Daemon,
    KeySet,
    conduit_argv,
    echo_through,
    env_with_src,
    free_port,
    run_client,
    server_config_text,
    start_daemon,
    tunnel,
    wait_for_port,
)
from peers import (  # next to this file: pytest puts this directory on sys.path
    GREETING,
    PARAMIKO_KEX,
    PARAMIKO_LOG,
    AsyncsshServer,
    GreetThenDrain,
    Negotiated,
    ParamikoServer,
    asyncssh_kex_log,
    greet_then_send,
    log_matches,
    paramiko_client_negotiated,
)

from sshconduit.crypto.ciphers import CLIENT_CIPHERS

EXEC = "echo ok-$((6*7)); exit 3"
MIB = 1 << 20
TIMEOUT = 10.0
CLIENT_LOG = PARAMIKO_LOG + ".client"

# AsyncSSH's own classic-DH code warns through cryptography; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Diffie-Hellman over finite fields")

# What conduit settles on with each, nobody's defaults changed: its first choice the server also has. With AES in
# hardware that is aes128-gcm, which both have; else chacha20-poly1305, which Paramiko lacks, and aes128-ctr next.
DEFAULT_CIPHERS = {
    "asyncssh": CLIENT_CIPHERS[0],
    "paramiko": CLIENT_CIPHERS[0] if CLIENT_CIPHERS[0].endswith("-gcm@openssh.com") else "aes128-ctr",
}


def payload(size: int = MIB) -> bytes:
    return os.urandom(size)


# --- our side's view of the algorithms, from debug logs ---

KEX_LINE = re.compile(
    r"kex: algorithm: (?P<kex>\S+); host key algorithm: (?P<host_key>\S+); "
    r"cipher out: (?P<out>\S+) MAC: (?P<mac_out>\S+); cipher in: (?P<inn>\S+) MAC: (?P<mac_in>\S+)"
)


def _mac(value: str) -> str | None:
    return None if value == "<implicit>" else value  # AEAD ciphers carry their own tag


def parse_kex_lines(text: str, *, server: bool) -> list[Negotiated]:
    """conduit/conduitd's ``kex:`` debug lines; on the server 'out' is server-to-client."""
    found = []
    for m in KEX_LINE.finditer(text):
        out, mac_out, inn, mac_in = m["out"], _mac(m["mac_out"]), m["inn"], _mac(m["mac_in"])
        if server:
            found.append(Negotiated(m["kex"], m["host_key"], inn, out, mac_in, mac_out))
        else:
            found.append(Negotiated(m["kex"], m["host_key"], out, inn, mac_out, mac_in))
    return found


def same_view(ours: Negotiated, theirs: Negotiated) -> None:
    """Both ends agree on every field; a MAC of None means AEAD, a host_key of None that the peer hides it."""
    for name in ("kex", "host_key", "cipher_c2s", "cipher_s2c", "mac_c2s", "mac_s2c"):
        if name != "host_key" or theirs.host_key is not None:
            assert getattr(ours, name) == getattr(theirs, name), name


def assert_choice(ours: Negotiated, kex: str, cipher: str, mac: str | None) -> None:
    """The same cipher and MAC both ways (as every library here picks them) and the kex method."""
    got = (ours.kex, ours.cipher_c2s, ours.cipher_s2c, ours.mac_c2s, ours.mac_s2c)
    assert got == (kex, cipher, cipher, mac, mac)


# --- servers ---


@pytest.fixture
def greeter() -> Iterator[GreetThenDrain]:
    server = GreetThenDrain()
    yield server
    server.close()


@pytest.fixture
def asyncssh_server(keyset: KeySet):
    def start(host_key: str = "ed25519", **options: object) -> AsyncsshServer:
        return AsyncsshServer(keyset.host_keys[host_key], keyset.authorized_keys, **options)

    return start


@pytest.fixture
def paramiko_server(keyset: KeySet):
    def start(host_key: str = "ed25519", **options: tuple[str, ...]) -> ParamikoServer:
        return ParamikoServer(keyset.host_keys[host_key], keyset.authorized_keys, USER, **options)  # type: ignore[arg-type]

    return start


@pytest.fixture
def peer_server(request, asyncssh_server, paramiko_server):
    return {"asyncssh": asyncssh_server, "paramiko": paramiko_server}[request.param]


PEERS = pytest.mark.parametrize("peer_server", ["asyncssh", "paramiko"], indirect=True)


@pytest.fixture(scope="module")
def conduitd(keyset: KeySet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One conduitd for the client-side tests, logging its kex decisions to a file we can read."""
    with _conduitd(keyset, tmp_path_factory.mktemp("conduitd")) as daemon:
        yield daemon


@contextlib.contextmanager
def _conduitd(keyset: KeySet, directory: Path, extra: str = "") -> Iterator[Daemon]:
    port = free_port()
    config = directory / f"conduitd_config.{port}"
    config.write_text(server_config_text(keyset, port, extra="LogLevel DEBUG\n" + extra))
    log = directory / f"conduitd.{port}.log"
    argv = [sys.executable, "-m", "sshconduit.cli.conduitd", "-D", "-f", str(config), "-E", str(log)]
    with start_daemon(argv, port, config, env_with_src()) as daemon:
        daemon.log = log  # type: ignore[attr-defined]
        yield daemon


def conduitd_views(daemon: Daemon) -> list[Negotiated]:
    return parse_kex_lines(daemon.log.read_text(), server=True)  # type: ignore[attr-defined]


def run_conduit(keyset: KeySet, port: int, *args: str, stdin: bytes | None = None):
    return run_client(conduit_argv(keyset, port, *args), timeout=TIMEOUT * 2, stdin=stdin)


# --- conduit (client) → AsyncSSH / Paramiko (server) ---


@PEERS
def test_exec_round_trip_conduit_to_peer(peer_server, keyset):
    with peer_server() as server:
        result = run_conduit(keyset, server.port, f"{USER}@127.0.0.1", EXEC)
    assert result.stderr == b""
    assert result.stdout == b"ok-42\n"
    assert result.returncode == 3
    # the peer really ran it, with the command string intact
    assert server.record.commands == [EXEC]
    assert server.record.exit_statuses == [3]
    assert server.record.users[-1] == USER


@PEERS
def test_exec_stdin_and_stderr_conduit_to_peer(peer_server, keyset):
    """256 KiB of stdin through ``tr``, stderr kept apart, status 0, the EOF of stdin honoured."""
    data = bytes(range(97, 123)) * 10083  # a..z, 262158 bytes
    with peer_server() as server:
        result = run_conduit(keyset, server.port, f"{USER}@127.0.0.1", "tr a-z A-Z; echo err-$((1+1)) >&2", stdin=data)
    assert result.returncode == 0
    assert result.stderr == b"err-2\n"
    assert result.stdout == data.upper()


@PEERS
def test_local_forward_conduit_to_peer(peer_server, keyset, echo_server, greeter):
    """conduit -L through the peer's direct-tcpip: 1 MiB echoed, half-close carried each way."""
    data = payload()
    with peer_server() as server:
        lport, gport = free_port(), free_port()
        argv = conduit_argv(keyset, server.port, "-N", "-L", f"{lport}:127.0.0.1:{echo_server.port}",
                            "-L", f"{gport}:127.0.0.1:{greeter.port}", f"{USER}@127.0.0.1")  # fmt: skip
        with tunnel(argv, lport):
            # the echo server only closes after it reads our EOF; a lost half-close hangs here until TIMEOUT
            assert echo_through(lport, data, timeout=TIMEOUT) == data
            assert echo_through(lport, b"second") == b"second"
            wait_for_port(gport)
            # the far side's EOF comes first; our 1 MiB must still flow after it
            assert greet_then_send(gport, data, timeout=TIMEOUT) == GREETING
            assert greeter.wait_for(data)
    assert ("127.0.0.1", echo_server.port) in server.record.direct_tcpip
    assert ("127.0.0.1", greeter.port) in server.record.direct_tcpip
    assert server.record.errors == []


# --- AsyncSSH (client) → conduitd (server) ---


def asyncssh_connect(keyset: KeySet, port: int, **options: object):
    return asyncssh.connect(
        "127.0.0.1", port, known_hosts=None, client_keys=[str(keyset.client_key)], username=USER,
        agent_path=None, login_timeout=TIMEOUT, **options,
    )  # fmt: skip


def test_exec_round_trip_asyncssh_to_conduitd(conduitd, keyset):
    async def scenario() -> asyncssh.SSHCompletedProcess:
        async with asyncssh_connect(keyset, conduitd.port) as conn:
            return await asyncio.wait_for(conn.run(EXEC), TIMEOUT)

    result = asyncio.run(scenario())
    assert result.stdout == "ok-42\n"
    assert result.stderr == ""
    assert result.exit_status == 3
    assert result.exit_signal is None


def test_exec_stdin_and_stderr_asyncssh_to_conduitd(conduitd, keyset):
    data = b"\x00\xffbinary\r\n" * 20000

    async def scenario() -> asyncssh.SSHCompletedProcess:
        async with asyncssh_connect(keyset, conduitd.port) as conn:
            return await asyncio.wait_for(conn.run("cat; echo done >&2; exit 0", input=data, encoding=None), TIMEOUT)

    result = asyncio.run(scenario())
    assert result.exit_status == 0
    assert result.stderr == b"done\n"
    assert result.stdout == data


def test_local_forward_asyncssh_to_conduitd(conduitd, keyset, echo_server, greeter):
    """forward_local_port (AsyncSSH listens, opens direct-tcpip), then a raw channel closed with write_eof."""
    data = payload()

    async def scenario() -> tuple[bytes, bytes, bytes]:
        async with asyncssh_connect(keyset, conduitd.port) as conn:
            listener = await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", echo_server.port)
            try:
                through_listener = await asyncio.wait_for(
                    asyncio.to_thread(echo_through, listener.get_port(), data, timeout=TIMEOUT), TIMEOUT * 2
                )
            finally:
                listener.close()
            reader, writer = await conn.open_connection("127.0.0.1", echo_server.port)
            writer.write(data[: MIB // 4])
            writer.write_eof()
            through_channel = await asyncio.wait_for(reader.read(), TIMEOUT)  # read() ends only at EOF
            writer.close()
            # the far side half-closes first: its EOF must arrive while our direction still carries data
            reader, writer = await conn.open_connection("127.0.0.1", greeter.port)
            greeting = await asyncio.wait_for(reader.read(), TIMEOUT)
            writer.write(data)
            writer.write_eof()
            await asyncio.wait_for(writer.channel.wait_closed(), TIMEOUT)
            return through_listener, through_channel, greeting

    through_listener, through_channel, greeting = asyncio.run(scenario())
    assert through_listener == data
    assert through_channel == data[: MIB // 4]
    assert greeting == GREETING
    assert greeter.wait_for(data)


# --- Paramiko (client) → conduitd (server) ---


def paramiko_connect(
    keyset: KeySet, port: int, log_channel: str | None = None, **options: object
) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    if log_channel is not None:
        client.set_log_channel(log_channel)
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(
        "127.0.0.1", port, username=USER, key_filename=str(keyset.client_key), look_for_keys=False,
        allow_agent=False, timeout=TIMEOUT, banner_timeout=TIMEOUT, auth_timeout=TIMEOUT, **options,
    )  # fmt: skip
    return client


def paramiko_exec(client: paramiko.SSHClient, command: str, data: bytes = b"") -> tuple[bytes, bytes, int]:
    stdin, stdout, stderr = client.exec_command(command, timeout=TIMEOUT)
    if data:
        stdin.write(data)
    stdin.channel.shutdown_write()
    out = stdout.read()  # stdout first would deadlock only past the window of stderr; ours is tiny
    err = stderr.read()
    assert stdout.channel.status_event.wait(TIMEOUT), "no exit-status within the timeout"
    return out, err, stdout.channel.recv_exit_status()


def test_exec_round_trip_paramiko_to_conduitd(conduitd, keyset):
    client = paramiko_connect(keyset, conduitd.port)
    try:
        out, err, status = paramiko_exec(client, EXEC)
    finally:
        client.close()
    assert (out, err, status) == (b"ok-42\n", b"", 3)


def test_exec_stdin_and_stderr_paramiko_to_conduitd(conduitd, keyset):
    data = bytes(range(256)) * 1024
    client = paramiko_connect(keyset, conduitd.port)
    try:
        out, err, status = paramiko_exec(client, "cat; echo e >&2", data)
    finally:
        client.close()
    assert (err, status) == (b"e\n", 0)
    assert out == data


def paramiko_direct_echo(transport: paramiko.Transport, port: int, data: bytes) -> bytes:
    """A direct-tcpip channel: send from a thread, shutdown_write, read until the echo server's EOF."""
    chan = transport.open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 40000), timeout=TIMEOUT)
    chan.settimeout(TIMEOUT)

    def send() -> None:
        chan.sendall(data)
        chan.shutdown_write()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    chunks = []
    while chunk := chan.recv(65536):
        chunks.append(chunk)
    sender.join(TIMEOUT)
    chan.close()
    return b"".join(chunks)


def test_direct_tcpip_paramiko_to_conduitd(conduitd, keyset, echo_server, greeter):
    data = payload()
    client = paramiko_connect(keyset, conduitd.port)
    try:
        transport = client.get_transport()
        assert transport is not None
        assert paramiko_direct_echo(transport, echo_server.port, data) == data
        assert paramiko_direct_echo(transport, echo_server.port, b"again") == b"again"
        # the far side half-closes first: its EOF must arrive while our direction still carries data
        chan = transport.open_channel(
            "direct-tcpip", ("127.0.0.1", greeter.port), ("127.0.0.1", 40001), timeout=TIMEOUT
        )
        chan.settimeout(TIMEOUT)
        greeting = b"".join(iter(lambda: chan.recv(65536), b""))
        chan.sendall(data)
        chan.shutdown_write()
        assert greeter.wait_for(data)
        chan.close()
    finally:
        client.close()
    assert echo_server.connections == 2
    assert greeting == GREETING


def test_direct_tcpip_refused_to_peer_libraries(keyset, tmp_path, echo_server):
    """AllowTcpForwarding no: both libraries see open failure reason 1 (administratively prohibited)."""
    with _conduitd(keyset, tmp_path, "AllowTcpForwarding no\n") as daemon:

        async def asyncssh_attempt() -> int:
            async with asyncssh_connect(keyset, daemon.port) as conn:
                with pytest.raises(asyncssh.ChannelOpenError) as caught:
                    await asyncio.wait_for(conn.open_connection("127.0.0.1", echo_server.port), TIMEOUT)
                return caught.value.code

        assert asyncio.run(asyncssh_attempt()) == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
        client = paramiko_connect(keyset, daemon.port)
        try:
            with pytest.raises(paramiko.ChannelException) as caught:
                client.get_transport().open_channel(  # type: ignore[union-attr]
                    "direct-tcpip", ("127.0.0.1", echo_server.port), ("127.0.0.1", 1), timeout=TIMEOUT
                )
            assert caught.value.code == paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        finally:
            client.close()
    assert echo_server.connections == 0


# --- algorithms: defaults and forced choices, seen from both ends ---


def conduit_view(result) -> Negotiated:
    views = parse_kex_lines(result.stderr.decode(errors="replace"), server=False)
    assert len(views) == 1, result.stderr.decode(errors="replace")
    return views[0]


CONDUIT_FORCED = [
    pytest.param(
        ["-c", "aes256-ctr", "-m", "hmac-sha2-256-etm@openssh.com", "-o", "KexAlgorithms=ecdh-sha2-nistp256"],
        ("ecdh-sha2-nistp256", "aes256-ctr", "hmac-sha2-256-etm@openssh.com"),
        id="aes256-ctr+etm256+nistp256",
    ),
    pytest.param(
        ["-c", "aes128-gcm@openssh.com", "-o", "KexAlgorithms=diffie-hellman-group14-sha256"],
        ("diffie-hellman-group14-sha256", "aes128-gcm@openssh.com", None),
        id="aes128-gcm+dh14",
    ),
    pytest.param(
        ["-c", "aes256-gcm@openssh.com", "-o", "KexAlgorithms=curve25519-sha256@libssh.org"],
        ("curve25519-sha256@libssh.org", "aes256-gcm@openssh.com", None),
        id="aes256-gcm+curve25519",
    ),
    pytest.param(
        ["-c", "aes192-ctr", "-m", "hmac-sha2-512", "-o", "KexAlgorithms=ecdh-sha2-nistp384"],
        ("ecdh-sha2-nistp384", "aes192-ctr", "hmac-sha2-512"),
        id="aes192-ctr+sha512+nistp384",
    ),
]


@PEERS
def test_algorithms_default_conduit_to_peer(peer_server, keyset, request):
    peer = request.node.callspec.params["peer_server"]
    with peer_server() as server:
        result = run_conduit(keyset, server.port, "-v", f"{USER}@127.0.0.1", EXEC)
    assert (result.stdout, result.returncode) == (b"ok-42\n", 3)
    ours = conduit_view(result)
    [theirs] = server.record.negotiated
    same_view(ours, theirs)
    assert ours.kex == "mlkem768x25519-sha256"  # both libraries have it; it heads our list
    assert ours.host_key == "ssh-ed25519"
    assert ours.cipher_c2s == ours.cipher_s2c == DEFAULT_CIPHERS[peer]
    # an AEAD cipher (chacha20-poly1305, aes-gcm) carries its own MAC; only aes128-ctr takes our first MAC
    expected_mac = "hmac-sha2-256-etm@openssh.com" if DEFAULT_CIPHERS[peer] == "aes128-ctr" else None
    assert ours.mac_c2s == ours.mac_s2c == expected_mac


@PEERS
@pytest.mark.parametrize(("flags", "expected"), CONDUIT_FORCED)
def test_algorithms_forced_by_conduit(peer_server, keyset, flags, expected):
    with peer_server() as server:
        result = run_conduit(keyset, server.port, "-v", *flags, f"{USER}@127.0.0.1", EXEC)
    assert (result.stdout, result.returncode) == (b"ok-42\n", 3)
    ours = conduit_view(result)
    [theirs] = server.record.negotiated
    same_view(ours, theirs)
    assert_choice(ours, *expected)


def test_algorithms_forced_by_asyncssh_server_and_rsa_host_key(asyncssh_server, keyset):
    """The server narrows the choice; rsa-sha2-512 host key signatures are checked by our client."""
    with asyncssh_server(
        host_key="rsa", encryption_algs=["aes128-ctr"], mac_algs=["hmac-sha2-512-etm@openssh.com"],
        kex_algs=["ecdh-sha2-nistp521"],
    ) as server:  # fmt: skip
        result = run_conduit(keyset, server.port, "-v", f"{USER}@127.0.0.1", EXEC)
    assert (result.stdout, result.returncode) == (b"ok-42\n", 3)
    ours = conduit_view(result)
    same_view(ours, server.record.negotiated[0])
    assert ours == Negotiated("ecdh-sha2-nistp521", "rsa-sha2-512", "aes128-ctr", "aes128-ctr",
                              "hmac-sha2-512-etm@openssh.com", "hmac-sha2-512-etm@openssh.com")  # fmt: skip


def test_algorithms_forced_by_paramiko_server_and_ecdsa_host_key(paramiko_server, keyset):
    with paramiko_server(
        host_key="ecdsa", ciphers=("aes256-gcm@openssh.com",), kex=("diffie-hellman-group16-sha512",)
    ) as server:
        result = run_conduit(keyset, server.port, "-v", f"{USER}@127.0.0.1", EXEC)
    assert (result.stdout, result.returncode) == (b"ok-42\n", 3)
    ours = conduit_view(result)
    same_view(ours, server.record.negotiated[0])
    assert ours == Negotiated("diffie-hellman-group16-sha512", "ecdsa-sha2-nistp256",
                              "aes256-gcm@openssh.com", "aes256-gcm@openssh.com", None, None)  # fmt: skip


def asyncssh_client_view(conn: asyncssh.SSHClientConnection, kex_log: list[str]) -> Negotiated:
    def mac(value: str) -> str | None:
        return None if "gcm@" in value or "poly1305@" in value else value  # AEAD: AsyncSSH names the cipher

    return Negotiated(
        kex=kex_log[-1] if kex_log else "?",
        host_key=None,
        cipher_c2s=conn.get_extra_info("send_cipher"),
        cipher_s2c=conn.get_extra_info("recv_cipher"),
        mac_c2s=mac(conn.get_extra_info("send_mac")),
        mac_s2c=mac(conn.get_extra_info("recv_mac")),
    )


ASYNCSSH_CLIENT_CHOICES = [
    pytest.param({}, None, id="defaults"),
    pytest.param(
        {"encryption_algs": ["aes128-gcm@openssh.com"], "kex_algs": ["curve25519-sha256"]},
        ("curve25519-sha256", "aes128-gcm@openssh.com", None),
        id="aes128-gcm+curve25519",
    ),
    pytest.param(
        {
            "encryption_algs": ["aes256-ctr"],
            "mac_algs": ["hmac-sha2-256-etm@openssh.com"],
            "kex_algs": ["ecdh-sha2-nistp256"],
        },
        ("ecdh-sha2-nistp256", "aes256-ctr", "hmac-sha2-256-etm@openssh.com"),
        id="aes256-ctr+etm256+nistp256",
    ),
    pytest.param(
        {
            "encryption_algs": ["aes128-ctr"],
            "mac_algs": ["hmac-sha1"],
            "kex_algs": ["diffie-hellman-group14-sha256"],
            "server_host_key_algs": ["ssh-ed25519"],
        },
        ("diffie-hellman-group14-sha256", "aes128-ctr", "hmac-sha1"),
        id="aes128-ctr+sha1+dh14",
    ),
]


@pytest.mark.parametrize(("options", "expected"), ASYNCSSH_CLIENT_CHOICES)
def test_algorithms_asyncssh_client_to_conduitd(conduitd, keyset, options, expected):
    async def scenario() -> tuple[Negotiated, asyncssh.SSHCompletedProcess]:
        with asyncssh_kex_log() as kex_log:
            async with asyncssh_connect(keyset, conduitd.port, **options) as conn:
                result = await asyncio.wait_for(conn.run(EXEC), TIMEOUT)
                return asyncssh_client_view(conn, kex_log), result

    theirs, result = asyncio.run(scenario())
    assert (result.stdout, result.exit_status) == ("ok-42\n", 3)
    ours = conduitd_views(conduitd)[-1]
    same_view(ours, theirs)
    # with no choice forced: AsyncSSH's first preferences, which conduitd also has
    assert_choice(ours, *(expected or ("mlkem768x25519-sha256", "chacha20-poly1305@openssh.com", None)))
    assert ours.host_key == "ssh-ed25519"


def paramiko_disabled(kind: str, keep: tuple[str, ...]) -> list[str]:
    """Paramiko selects by exclusion: everything it prefers except what we keep."""
    preferred = {"ciphers": paramiko.Transport._preferred_ciphers, "macs": paramiko.Transport._preferred_macs,
                 "kex": paramiko.Transport._preferred_kex}[kind]  # fmt: skip
    return [name for name in preferred if name not in keep]


PARAMIKO_CLIENT_CHOICES = [
    pytest.param(None, ("mlkem768x25519-sha256", "aes128-ctr", "hmac-sha2-256"), id="defaults"),
    pytest.param(
        ("aes256-gcm@openssh.com", None, "ecdh-sha2-nistp384"),
        ("ecdh-sha2-nistp384", "aes256-gcm@openssh.com", None),
        id="aes256-gcm+nistp384",
    ),
    pytest.param(
        ("aes256-ctr", "hmac-sha2-512-etm@openssh.com", "curve25519-sha256@libssh.org"),
        ("curve25519-sha256@libssh.org", "aes256-ctr", "hmac-sha2-512-etm@openssh.com"),
        id="aes256-ctr+etm512+curve25519",
    ),
    pytest.param(
        ("aes128-gcm@openssh.com", None, "diffie-hellman-group14-sha256"),
        ("diffie-hellman-group14-sha256", "aes128-gcm@openssh.com", None),
        id="aes128-gcm+dh14",
    ),
]


@pytest.mark.parametrize(("force", "expected"), PARAMIKO_CLIENT_CHOICES)
def test_algorithms_paramiko_client_to_conduitd(conduitd, keyset, force, expected):
    disabled = {}
    if force is not None:
        cipher, mac, kex = force
        disabled = {
            "ciphers": paramiko_disabled("ciphers", (cipher,)),
            "kex": paramiko_disabled("kex", (kex,)),
        }
        if mac is not None:
            disabled["macs"] = paramiko_disabled("macs", (mac,))
    with log_matches(CLIENT_LOG, PARAMIKO_KEX) as kex_log:
        client = paramiko_connect(keyset, conduitd.port, CLIENT_LOG, disabled_algorithms=disabled)
    try:
        transport = client.get_transport()
        assert transport is not None
        theirs = paramiko_client_negotiated(transport, kex_log)
        out, err, status = paramiko_exec(client, EXEC)
    finally:
        client.close()
    assert (out, err, status) == (b"ok-42\n", b"", 3)
    ours = conduitd_views(conduitd)[-1]
    same_view(ours, theirs)
    assert_choice(ours, *expected)
    assert ours.host_key == "ssh-ed25519"


def test_forced_by_conduitd_server(keyset, tmp_path):
    """conduitd's Ciphers/MACs/KexAlgorithms narrow what both libraries get."""
    extra = "Ciphers aes192-ctr\nMACs hmac-sha2-512\nKexAlgorithms ecdh-sha2-nistp521\n"
    with _conduitd(keyset, tmp_path, extra) as daemon:

        async def asyncssh_run() -> tuple[Negotiated, int | None]:
            with asyncssh_kex_log() as kex_log:
                async with asyncssh_connect(keyset, daemon.port) as conn:
                    result = await asyncio.wait_for(conn.run(EXEC), TIMEOUT)
                    return asyncssh_client_view(conn, kex_log), result.exit_status

        asyncssh_view, asyncssh_status = asyncio.run(asyncssh_run())
        with log_matches(CLIENT_LOG, PARAMIKO_KEX) as kex_log:
            client = paramiko_connect(keyset, daemon.port, CLIENT_LOG)
        try:
            paramiko_view = paramiko_client_negotiated(client.get_transport(), kex_log)  # type: ignore[arg-type]
            _, _, paramiko_status = paramiko_exec(client, EXEC)
        finally:
            client.close()
        ours = conduitd_views(daemon)
    assert (asyncssh_status, paramiko_status) == (3, 3)
    assert len(ours) == 2
    for view, theirs in zip(ours, (asyncssh_view, paramiko_view), strict=True):
        same_view(view, theirs)
        assert view == Negotiated("ecdh-sha2-nistp521", "ssh-ed25519", "aes192-ctr", "aes192-ctr",
                                  "hmac-sha2-512", "hmac-sha2-512")  # fmt: skip
