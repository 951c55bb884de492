"""SSH servers built from AsyncSSH and Paramiko, run in-process on loopback for interop tests.

Each runs exec requests with ``/bin/sh -c`` and opens direct-tcpip channels to loopback destinations, and
records what it saw (commands, forward destinations, negotiated algorithms) so tests can check its view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import paramiko

THREAD_TIMEOUT = 10.0
PARAMIKO_LOG = "paramiko.transport.interop"
PARAMIKO_KEX = r"^Kex: (\S+)"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass
class Negotiated:
    """One connection's algorithms from the server's point of view (c2s = what the client sends)."""

    kex: str
    host_key: str | None
    cipher_c2s: str
    cipher_s2c: str
    mac_c2s: str | None
    mac_s2c: str | None


@dataclass
class PeerRecord:
    """What a test server saw; appended from its threads, read by the test after the client finished."""

    users: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    exit_statuses: list[int] = field(default_factory=list)
    direct_tcpip: list[tuple[str, int]] = field(default_factory=list)
    negotiated: list[Negotiated] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def authorized_blob(authorized_keys: Path) -> str:
    """The base64 key of the one line the keyset writes."""
    return authorized_keys.read_text().split()[1]


# --- a destination that half-closes first ---

GREETING = b"220 greeting, then EOF from this side\r\n"


class GreetThenDrain:
    """A TCP service that sends a greeting and shuts its write side at once, then reads to EOF.

    Through a forward, the client must see that EOF while its own direction stays open, and everything it
    sends afterwards must still arrive: the half-close the echo server cannot show (it closes last).
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []  # one entry per connection, once its client half-closed
        self.arrived = threading.Condition()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(THREAD_TIMEOUT)
        chunks = []
        with conn, contextlib.suppress(OSError):
            conn.sendall(GREETING)
            conn.shutdown(socket.SHUT_WR)
            while chunk := conn.recv(262144):
                chunks.append(chunk)
        with self.arrived:
            self.received.append(b"".join(chunks))
            self.arrived.notify_all()

    def wait_for(self, data: bytes, timeout: float = THREAD_TIMEOUT) -> bool:
        """True once some connection delivered exactly ``data`` (readiness probes deliver b"")."""
        with self.arrived:
            return self.arrived.wait_for(lambda: data in self.received, timeout)

    def close(self) -> None:
        self._stopping.set()
        self.sock.close()
        self._thread.join(THREAD_TIMEOUT)


def greet_then_send(port: int, data: bytes, timeout: float = THREAD_TIMEOUT) -> bytes:
    """Read the greeting up to its EOF, then send ``data`` and half-close; returns the greeting."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        chunks = []
        while chunk := sock.recv(65536):  # a lost EOF from the far side times out here
            chunks.append(chunk)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while sock.recv(65536):  # wait for the close, so nothing is cut off by ours
                pass
    return b"".join(chunks)


# --- AsyncSSH ---


class _Matches(logging.Handler):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__(logging.DEBUG)
        self.pattern = pattern
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if m := self.pattern.search(record.getMessage()):
            self.found.append(m[1])


@contextlib.contextmanager
def log_matches(logger_name: str, pattern: str) -> Iterator[list[str]]:
    """First groups of ``pattern`` in what ``logger_name`` logs (at DEBUG too) while the block runs."""
    logger = logging.getLogger(logger_name)
    handler = _Matches(re.compile(pattern))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@contextlib.contextmanager
def asyncssh_kex_log() -> Iterator[list[str]]:
    """The kex method of each AsyncSSH connection in this process, in order.

    AsyncSSH drops its kex object once the exchange ends and has no accessor for the name; its level-2 debug
    log is the one place that states it.
    """
    old_debug = asyncssh.logging.SSHLogger._debug_level
    asyncssh.set_debug_level(2)
    try:
        with log_matches("asyncssh", r"Key exchange alg: (\S+)") as found:
            yield found
    finally:
        asyncssh.logging.SSHLogger._debug_level = old_debug


def _aead_or(mac: str) -> str | None:
    """AsyncSSH reports an AEAD cipher's name as its MAC; the SSH view is 'no separate MAC'."""
    return None if "gcm@" in mac or "poly1305@" in mac else mac


class _AsyncsshServerHooks(asyncssh.SSHServer):
    def __init__(self, record: PeerRecord, kex_log: list[str]) -> None:
        self.record = record
        self.kex_log = kex_log
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn

    def begin_auth(self, username: str) -> bool:
        self.record.users.append(username)
        return True  # authorized_client_keys decides

    def auth_completed(self) -> None:
        conn = self.conn
        assert conn is not None
        keypair = conn.get_server_host_key()
        self.record.negotiated.append(
            Negotiated(
                kex=self.kex_log[-1] if self.kex_log else "?",  # one connection at a time in these tests
                host_key=keypair.sig_algorithm.decode() if keypair is not None else None,
                cipher_c2s=conn.get_extra_info("recv_cipher"),
                cipher_s2c=conn.get_extra_info("send_cipher"),
                mac_c2s=_aead_or(conn.get_extra_info("recv_mac")),
                mac_s2c=_aead_or(conn.get_extra_info("send_mac")),
            )
        )

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        self.record.direct_tcpip.append((dest_host, dest_port))
        return dest_host in LOOPBACK  # AsyncSSH then connects and relays, half-close included


async def _run_exec(process: asyncssh.SSHServerProcess, record: PeerRecord) -> None:
    """Relay the channel to ``/bin/sh -c command`` and back, then send its exit status."""
    command = process.command or ""
    record.commands.append(command)
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

    async def feed_stdin() -> None:
        with contextlib.suppress(OSError, asyncssh.Error, ConnectionError):
            while data := await process.stdin.read(65536):
                proc.stdin.write(data)
                await proc.stdin.drain()
        proc.stdin.close()

    async def relay(source: asyncio.StreamReader, sink: Any) -> None:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()

    feeder = asyncio.create_task(feed_stdin())
    try:
        await asyncio.wait_for(
            asyncio.gather(relay(proc.stdout, process.stdout), relay(proc.stderr, process.stderr)),
            THREAD_TIMEOUT,
        )
        status = await asyncio.wait_for(proc.wait(), THREAD_TIMEOUT)
    finally:
        feeder.cancel()
        if proc.returncode is None:
            proc.kill()
    record.exit_statuses.append(status)
    process.exit(status)


class AsyncsshServer:
    """``with AsyncsshServer(keyset) as srv: srv.port`` — an AsyncSSH server on its own loop in a thread."""

    def __init__(self, host_key: Path, authorized_keys: Path, **options: Any) -> None:
        self.host_key = host_key
        self.authorized_keys = authorized_keys
        self.options = options
        self.record = PeerRecord()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncssh.SSHAcceptor | None = None
        self._kex_log = asyncssh_kex_log()

    async def _start(self) -> None:
        record, kex_log = self.record, self._kex
        self._server = await asyncssh.listen(
            "127.0.0.1",
            0,
            server_host_keys=[str(self.host_key)],
            authorized_client_keys=str(self.authorized_keys),
            server_factory=lambda: _AsyncsshServerHooks(record, kex_log),
            process_factory=lambda process: _run_exec(process, record),
            encoding=None,
            allow_pty=False,
            agent_forwarding=False,
            x11_forwarding=False,
            **self.options,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()  # also closes the connections it accepted
            await self._server.wait_closed()

    def __enter__(self) -> AsyncsshServer:
        self._kex = self._kex_log.__enter__()
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(THREAD_TIMEOUT)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(THREAD_TIMEOUT)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(THREAD_TIMEOUT)
            if not self._thread.is_alive():
                self._loop.close()
            self._kex_log.__exit__(None, None, None)


# --- Paramiko ---


def _start_thread(target: Any, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _channel_to_socket(chan: paramiko.Channel, sock: socket.socket) -> None:
    with contextlib.suppress(OSError, EOFError):
        while data := chan.recv(65536):
            sock.sendall(data)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)  # the client's EOF, passed on


def _socket_to_channel(sock: socket.socket, chan: paramiko.Channel) -> None:
    with contextlib.suppress(OSError, EOFError):
        while data := sock.recv(65536):
            chan.sendall(data)
    with contextlib.suppress(OSError, EOFError):
        chan.shutdown_write()  # the destination's EOF, passed on


def _forward(chan: paramiko.Channel, destination: tuple[str, int], record: PeerRecord) -> None:
    try:
        sock = socket.create_connection(destination, timeout=THREAD_TIMEOUT)
    except OSError as exc:
        record.errors.append(f"connect {destination}: {exc}")
        chan.close()
        return
    sock.settimeout(THREAD_TIMEOUT)
    with sock:
        pumps = [_start_thread(_channel_to_socket, chan, sock), _start_thread(_socket_to_channel, sock, chan)]
        for pump in pumps:
            pump.join(THREAD_TIMEOUT * 2)
    chan.close()


def _pump_stdin(chan: paramiko.Channel, stdin: Any) -> None:
    with contextlib.suppress(OSError, EOFError):
        while data := chan.recv(65536):
            stdin.write(data)
            stdin.flush()
    with contextlib.suppress(OSError):
        stdin.close()


def _pump_output(stream: Any, send: Any) -> None:
    with contextlib.suppress(OSError, EOFError):
        while data := stream.read1(65536):
            send(data)


def _exec(chan: paramiko.Channel, command: str, record: PeerRecord) -> None:
    """Run the command; then EOF, exit-status and close, in the order OpenSSH's sshd sends them."""
    proc = subprocess.Popen(
        ["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _start_thread(_pump_stdin, chan, proc.stdin)
    outputs = [_start_thread(_pump_output, proc.stdout, chan.sendall),
               _start_thread(_pump_output, proc.stderr, chan.sendall_stderr)]  # fmt: skip
    for pump in outputs:
        pump.join(THREAD_TIMEOUT)
    try:
        status = proc.wait(THREAD_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        status = proc.wait(THREAD_TIMEOUT)
    record.exit_statuses.append(status)
    with contextlib.suppress(OSError, EOFError):
        chan.shutdown_write()
        chan.send_exit_status(status)
    chan.close()


class _ParamikoInterface(paramiko.ServerInterface):
    def __init__(self, user: str, blob: str, record: PeerRecord) -> None:
        self.user = user
        self.blob = blob
        self.record = record
        self.direct: dict[int, tuple[str, int]] = {}

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        self.record.users.append(username)
        if username == self.user and key.get_base64() == self.blob:
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        text = command.decode()
        self.record.commands.append(text)
        _start_thread(_exec, channel, text, self.record)
        return True

    def check_channel_direct_tcpip_request(self, chanid: int, origin: tuple, destination: tuple) -> int:
        host, port = destination
        self.record.direct_tcpip.append((host, port))
        if host not in LOOPBACK:
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        self.direct[chanid] = (host, port)
        return paramiko.OPEN_SUCCEEDED


class ParamikoServer:
    """``with ParamikoServer(...) as srv: srv.port``: paramiko.Transport in server mode, a thread per client.

    ``ciphers``/``macs``/``kex`` narrow the server's offer (None keeps Paramiko's defaults).
    """

    def __init__(
        self,
        host_key: Path,
        authorized_keys: Path,
        user: str,
        *,
        ciphers: tuple[str, ...] | None = None,
        macs: tuple[str, ...] | None = None,
        kex: tuple[str, ...] | None = None,
    ) -> None:
        self.host_key = paramiko.PKey.from_path(host_key)
        self.blob = authorized_blob(authorized_keys)
        self.user = user
        self.ciphers, self.macs, self.kex = ciphers, macs, kex
        self.record = PeerRecord()
        self.sock = socket.socket()
        self.port = 0
        self._stopping = threading.Event()
        self._transports: list[paramiko.Transport] = []
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> ParamikoServer:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._threads.append(_start_thread(self._accept))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self.sock.close()
        for transport in list(self._transports):
            transport.close()
        for thread in self._threads:
            thread.join(THREAD_TIMEOUT)

    def _accept(self) -> None:
        self.sock.settimeout(0.1)  # close() from another thread does not wake a blocked accept()
        while not self._stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self._threads.append(_start_thread(self._serve, conn))

    def _serve(self, conn: socket.socket) -> None:
        transport = paramiko.Transport(conn)
        self._transports.append(transport)
        channel = f"{PARAMIKO_LOG}.server{len(self._transports)}"
        transport.set_log_channel(channel)
        with log_matches(channel, PARAMIKO_KEX) as kex_log:
            self._run_transport(transport, kex_log)

    def _run_transport(self, transport: paramiko.Transport, kex_log: list[str]) -> None:
        options = transport.get_security_options()
        if self.ciphers is not None:
            options.ciphers = self.ciphers
        if self.macs is not None:
            options.digests = self.macs
        if self.kex is not None:
            options.kex = self.kex
        transport.add_server_key(self.host_key)
        interface = _ParamikoInterface(self.user, self.blob, self.record)
        try:
            transport.start_server(server=interface)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self.record.errors.append(f"start_server: {exc}")
            transport.close()
            return
        recorded = False
        while transport.is_active() and not self._stopping.is_set():
            chan = transport.accept(0.2)
            if not recorded and transport.is_authenticated():
                recorded = True
                self.record.negotiated.append(_paramiko_negotiated(transport, kex_log, server=True))
            if chan is not None and chan.get_id() in interface.direct:
                _start_thread(_forward, chan, interface.direct.pop(chan.get_id()), self.record)
        transport.close()


def _paramiko_negotiated(transport: paramiko.Transport, kex_log: list[str], *, server: bool) -> Negotiated:
    """Transport's local_* is what it sends: c2s is remote_* on a server, local_* on a client."""
    aead = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
    local_mac = None if transport.local_cipher in aead else transport.local_mac
    remote_mac = None if transport.remote_cipher in aead else transport.remote_mac
    kex = kex_log[-1] if kex_log else "?"  # Paramiko drops its kex engine when done; its log names it
    if server:
        return Negotiated(kex, transport.host_key_type, transport.remote_cipher, transport.local_cipher,
                          remote_mac, local_mac)  # fmt: skip
    return Negotiated(kex, transport.host_key_type, transport.local_cipher, transport.remote_cipher,
                      local_mac, remote_mac)  # fmt: skip


def paramiko_client_negotiated(transport: paramiko.Transport, kex_log: list[str]) -> Negotiated:
    return _paramiko_negotiated(transport, kex_log, server=False)
