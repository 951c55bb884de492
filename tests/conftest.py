"""Fixtures that start real peers on loopback with throwaway keys: OpenSSH's sshd, conduitd, echo services."""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
USER = getpass.getuser()
START_TIMEOUT = 15.0


def openssh_kex_methods() -> set[str]:
    out = subprocess.run(["ssh", "-Q", "kex"], capture_output=True, text=True, timeout=10).stdout
    return set(out.split())


def as_local_openssh_kex(csv: str) -> str:
    """Our default kex list as the installed OpenSSH would print it: without methods newer than it."""
    known = openssh_kex_methods()
    return ",".join(name for name in csv.split(",") if name in known)


def feed_client_transport(transport, data: bytes) -> list[object]:
    """Feed a client-side sans-IO Transport, saying yes to the host key; returns every event it produced."""
    from sshconduit.transport import HostKeyReceived

    events = transport.receive_data(data)
    produced = list(events)
    for _ in range(3):  # HostKeyReceived comes once, last in its batch
        if not events or not isinstance(events[-1], HostKeyReceived):
            break
        events = transport.accept_host_key()
        produced += events
    return produced


def env_with_src() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}:\n{out}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {host}:{port} within {START_TIMEOUT}s")


def keygen(path: Path, kind: str = "ed25519", passphrase: str = "") -> Path:
    if not path.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", f"test-{kind}", "-f", str(path)], check=True
        )
    return path


class KeySet:
    """Host keys of every type, a client key, and an authorized_keys file, in one temp dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host_keys = {
            "ed25519": keygen(root / "host_ed25519"),
            "ecdsa": keygen(root / "host_ecdsa", "ecdsa"),
            "rsa": keygen(root / "host_rsa", "rsa"),
        }
        self.client_key = keygen(root / "id_ed25519")
        self.authorized_keys = root / "authorized_keys"
        self.authorized_keys.write_text((root / "id_ed25519.pub").read_text())
        self.authorized_keys.chmod(0o600)


@pytest.fixture(scope="session")
def keyset(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    return KeySet(tmp_path_factory.mktemp("keys"))


class Daemon:
    def __init__(self, proc: subprocess.Popen, port: int, config: Path) -> None:
        self.proc = proc
        self.port = port
        self.config = config

    def output(self) -> str:
        self.stop()
        return self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def server_config_text(keyset: KeySet, port: int, host_key: str = "ed25519", extra: str = "") -> str:
    return (
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {keyset.host_keys[host_key]}\n"
        f"AuthorizedKeysFile {keyset.authorized_keys}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
        f"PidFile none\n{extra}"
    )


@contextlib.contextmanager
def start_daemon(argv: list[str], port: int, config: Path, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    daemon = Daemon(proc, port, config)
    try:
        wait_for_port(port, proc)
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def openssh_server(keyset: KeySet, tmp_path: Path):
    """Factory: ``with openssh_server(extra_config) as d: d.port``."""
    Path("/run/sshd").mkdir(exist_ok=True)

    def start(extra: str = "", host_key: str = "ed25519", args: tuple[str, ...] = ()):
        port = free_port()
        config = tmp_path / f"sshd_config.{port}"
        config.write_text(server_config_text(keyset, port, host_key, extra))
        return start_daemon([SSHD, "-D", "-e", "-f", str(config), *args], port, config)

    return start


@pytest.fixture
def conduitd_server(keyset: KeySet, tmp_path: Path):
    """Factory: ``with conduitd_server(extra_config) as d: d.port`` — our daemon on the same kind of file."""

    def start(extra: str = "", host_key: str = "ed25519", args: tuple[str, ...] = ()):
        port = free_port()
        config = tmp_path / f"conduitd_config.{port}"
        config.write_text(server_config_text(keyset, port, host_key, extra))
        argv = [sys.executable, "-m", "sshconduit.cli.conduitd", "-D", "-e", "-f", str(config), *args]
        return start_daemon(argv, port, config, env_with_src())

    return start


def ssh_argv(keyset: KeySet, port: int, *args: str) -> list[str]:
    """OpenSSH's client with no user config, throwaway known_hosts, batch mode."""
    return [
        "ssh", "-F", "none", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-i", str(keyset.client_key), "-p", str(port),
        *args,
    ]  # fmt: skip


def conduit_argv(keyset: KeySet, port: int, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "sshconduit.cli.conduit", "-F", "none", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-i", str(keyset.client_key),
        "-p", str(port), *args,
    ]  # fmt: skip


def run_client(
    argv: list[str], timeout: float = 30, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``env``: variables added to the client's environment (SSH_ASKPASS, ...)."""
    return subprocess.run(
        argv, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL, capture_output=True,
        timeout=timeout, env={**env_with_src(), **(env or {})},
    )  # fmt: skip


KEPT_KEYS = 20  # lines kept in a test user's authorized_keys: concurrent runs each add their own key


def ensure_system_user(name: str, key_line: str) -> pwd.struct_passwd:
    """A system user (made if missing; root only) whose ~/.ssh/authorized_keys holds ``key_line``. A user another
    run may be using stays, and so do other runs' key lines: remove a throwaway one with ``remove_system_user``."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        made = subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], capture_output=True, check=False)
        assert made.returncode in (0, 9), made.stderr  # 9: another run made it just now
    entry = pwd.getpwnam(name)
    ssh_dir = Path(entry.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    authorized = ssh_dir / "authorized_keys"
    lines = authorized.read_text().splitlines() if authorized.exists() else []
    if key_line not in lines:
        authorized.write_text("\n".join([*lines[-(KEPT_KEYS - 1) :], key_line]) + "\n")
    for path, mode in ((ssh_dir, 0o700), (authorized, 0o600)):
        os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(mode)
    return entry


def remove_system_user(name: str) -> None:
    """Remove a throwaway user and its home (it must run nothing by now)."""
    subprocess.run(["userdel", "-r", name], capture_output=True, check=False)


def serve_each(server: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    """Accept on ``server`` until it is closed, each connection handled by ``handle`` on a thread of its own."""

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


class EchoServer:
    """A threaded TCP echo service on a loopback address; counts its connections."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(512)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # a peer that resets (a killed client) ends the echo
            while data := conn.recv(262144):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def recv_until_eof(sock: socket.socket, timeout: float) -> bytes:
    """Everything the peer sends until its EOF; each recv waits at most ``timeout`` seconds."""
    sock.settimeout(timeout)
    out = bytearray()
    while part := sock.recv(1 << 18):
        out += part
    return bytes(out)


def echo_over(s: socket.socket, payload: bytes, timeout: float = 20) -> bytes:
    """Send payload from a thread (flow control would stall a send-then-read), half-close, read all back."""

    def send() -> None:
        with contextlib.suppress(OSError):
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = recv_until_eof(s, timeout)
    sender.join(timeout)
    return received


def echo_through(port: int, payload: bytes, host: str = "127.0.0.1", timeout: float = 20) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as s:
        return echo_over(s, payload, timeout)


def echo_unix(path: str, payload: bytes, timeout: float = 20) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        return echo_over(s, payload, timeout)


@contextlib.contextmanager
def tunnel(argv: list[str], lport: int) -> Iterator[subprocess.Popen]:
    """Run a client with -N -L until the forwarded port answers; stop it afterwards."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env_with_src())  # fmt: skip
    try:
        wait_for_port(lport, proc)
        yield proc
    finally:
        stop_process(proc)


def keys_file(tmp_path: Path, keyset: KeySet, options: str) -> str:
    """A Match block pointing this user at an authorized_keys file whose one line carries ``options``."""
    path = tmp_path / f"authorized_keys.{abs(hash(options))}"
    path.write_text(f"{options} {(keyset.root / 'id_ed25519.pub').read_text()}")
    path.chmod(0o600)
    return f"Match User {USER}\n  AuthorizedKeysFile {path}\n"
