"""More of ssh -L: 1 GiB each way, who may reach a forward, bind addresses, config forms, a command beside them."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading
import time

import pytest
from conftest import USER, conduit_argv, echo_through, env_with_src, free_port, run_client, ssh_argv, tunnel

GIB = 1 << 30
CHUNK = 1 << 20


def chunks(seed: bytes, total: int):
    """A deterministic stream: a random 1 MiB block with the chunk number stamped in front of each copy."""
    block = hashlib.sha256(seed).digest() * (CHUNK // 32)
    for i in range(total // CHUNK):
        yield i.to_bytes(8, "big") + block[8:]


def stream_digest(seed: bytes, total: int) -> str:
    digest = hashlib.sha256()
    for chunk in chunks(seed, total):
        digest.update(chunk)
    return digest.hexdigest()


class SourceSink:
    """Per connection: hash everything received until EOF while sending `total` bytes of its own stream."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.received: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        for _ in range(8):  # the tunnel's readiness probe, then the transfers
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        def send() -> None:
            try:
                for chunk in chunks(b"down", self.total):
                    conn.sendall(chunk)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        digest, size = hashlib.sha256(), 0
        with conn:
            while data := conn.recv(CHUNK):
                digest.update(data)
                size += len(data)
            sender.join(120)
        if size:
            self.received.append(digest.hexdigest())

    def close(self) -> None:
        self.sock.close()


def transfer(port: int, total: int) -> str:
    """Send our stream up while hashing what comes down; returns the digest of what came down."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:

        def send() -> None:
            for chunk in chunks(b"up", total):
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        digest = hashlib.sha256()
        while data := s.recv(CHUNK):
            digest.update(data)
        sender.join(120)
    return digest.hexdigest()


@pytest.mark.parametrize("pair", ["conduit-conduitd", "conduit-sshd", "ssh-conduitd"])
def test_one_gib_each_way_arrives_identical(pair, keyset, openssh_server, conduitd_server):
    client, server = pair.split("-")
    service = SourceSink(GIB)
    try:
        with (conduitd_server if server == "conduitd" else openssh_server)() as daemon:
            lport = free_port()
            argv = (conduit_argv if client == "conduit" else ssh_argv)(
                keyset, daemon.port, "-N", "-c", "aes128-gcm@openssh.com", "-L", f"{lport}:127.0.0.1:{service.port}",
                f"{USER}@127.0.0.1",
            )  # fmt: skip
            with tunnel(argv, lport):
                down = transfer(lport, GIB)
                # Our upload may still be in flight: keep the tunnel up until the service has read to EOF.
                for _ in range(600):
                    if service.received:
                        break
                    time.sleep(0.1)
        assert down == stream_digest(b"down", GIB)
        assert service.received == [stream_digest(b"up", GIB)]
    finally:
        service.close()


def test_unix_socket_forward_is_private_to_its_user(keyset, conduitd_server, echo_server, tmp_path):
    """The 0600 socket: another local user cannot connect, the owner can."""
    if os.getuid() != 0:
        pytest.skip("needs root to act as a second user")
    tmp_path.chmod(0o755)
    path = tmp_path / "private.sock"
    with conduitd_server() as daemon:
        argv = conduit_argv(
            keyset, daemon.port, "-N", "-L", f"{path}:127.0.0.1:{echo_server.port}", f"{USER}@127.0.0.1"
        )
        probe = free_port()  # a second TCP forward only to know when the client is ready
        with tunnel([*argv[:-1], "-L", f"{probe}:127.0.0.1:{echo_server.port}", argv[-1]], probe):
            other_user = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
                 f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(path)!r})"],
                capture_output=True, timeout=20,
            )  # fmt: skip
            assert other_user.returncode != 0
            assert b"PermissionError" in other_user.stderr
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                s.sendall(b"owner")
                s.shutdown(socket.SHUT_WR)
                assert s.recv(100) == b"owner"


def test_a_file_left_at_a_unix_listener_path_needs_stream_local_bind_unlink(keyset, conduitd_server, echo_server,
                                                                             tmp_path):  # fmt: skip
    """As ssh: a stale socket file makes the bind fail; -o StreamLocalBindUnlink=yes removes it first."""
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # closed without unlinking: the file stays, as after a crash
    spec = f"{path}:127.0.0.1:{echo_server.port}"
    with conduitd_server() as daemon:
        refused = run_client(conduit_argv(keyset, daemon.port, "-o", "ExitOnForwardFailure=yes", "-N", "-L", spec,
                                          f"{USER}@127.0.0.1"), timeout=20)  # fmt: skip
        assert refused.returncode == 255
        assert f"bind {path}: Address already in use" in refused.stderr.decode()
        probe = free_port()  # a second TCP forward only to know when the client is ready
        argv = conduit_argv(keyset, daemon.port, "-N", "-o", "StreamLocalBindUnlink=yes", "-L", spec,
                            "-L", f"{probe}:127.0.0.1:{echo_server.port}", f"{USER}@127.0.0.1")  # fmt: skip
        with tunnel(argv, probe), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)
            s.connect(str(path))
            s.sendall(b"unlinked first")
            s.shutdown(socket.SHUT_WR)
            assert s.recv(100) == b"unlinked first"


def listening_addresses(port: int) -> set[str]:
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


def test_bind_addresses_loopback_by_default_all_with_g(keyset, conduitd_server, echo_server):
    with conduitd_server() as daemon:
        for extra, expected in (([], {"127.0.0.1", "[::1]"}), (["-g"], {"0.0.0.0"}), ([], {"[::1]"})):
            lport = free_port()
            spec = f"[::1]:{lport}:127.0.0.1:{echo_server.port}" if expected == {"[::1]"} else None
            spec = spec or f"{lport}:127.0.0.1:{echo_server.port}"
            argv = conduit_argv(keyset, daemon.port, "-N", *extra, "-L", spec, f"{USER}@127.0.0.1")
            host = "::1" if expected == {"[::1]"} else "127.0.0.1"
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env_with_src())
            try:
                from conftest import wait_for_port

                wait_for_port(lport, proc, host=host)
                assert listening_addresses(lport) >= expected
                if expected == {"0.0.0.0"}:
                    assert "127.0.0.1" not in listening_addresses(lport)
                assert echo_through(lport, b"bound", host=host) == b"bound"
            finally:
                proc.terminate()
                proc.wait(10)


def test_local_forward_from_options_and_config_file(keyset, conduitd_server, echo_server, tmp_path):
    """LocalForward via -o and via an ssh_config Host block, as ssh reads them."""
    with conduitd_server() as daemon:
        p1, p2 = free_port(), free_port()
        config = tmp_path / "ssh_config"
        config.write_text(
            f"Host tunnelhost\n  HostName 127.0.0.1\n  Port {daemon.port}\n  User {USER}\n"
            f"  IdentityFile {keyset.client_key}\n  LocalForward {p2} 127.0.0.1:{echo_server.port}\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n"
        )
        argv = conduit_argv(keyset, daemon.port, "-N", "-o", f"LocalForward={p1} 127.0.0.1:{echo_server.port}",
                            "tunnelhost")  # fmt: skip
        argv[argv.index("-F") + 1] = str(config)
        with tunnel(argv, p1):
            assert echo_through(p1, b"from -o") == b"from -o"
            assert echo_through(p2, b"from file") == b"from file"


def test_command_runs_beside_the_forwards(keyset, conduitd_server, echo_server):
    """Without -N the command (here one that uses the forward itself) runs while the forward is up."""
    with conduitd_server() as daemon:
        lport = free_port()
        script = (
            f"import socket; s = socket.create_connection(('127.0.0.1', {lport})); s.sendall(b'beside');"
            " s.shutdown(socket.SHUT_WR); print(s.recv(100).decode())"
        )
        check = f'python3 -c "{script}"'
        result = run_client(
            conduit_argv(keyset, daemon.port, "-L", f"{lport}:127.0.0.1:{echo_server.port}", f"{USER}@127.0.0.1",
                         f"sleep 0.3; {check}"),
        )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"beside\n"


def test_verbose_shows_each_forwarded_connection(keyset, conduitd_server, echo_server):
    with conduitd_server() as daemon:
        lport = free_port()
        argv = conduit_argv(keyset, daemon.port, "-v", "-N", "-L", f"{lport}:127.0.0.1:{echo_server.port}",
                            f"{USER}@127.0.0.1")  # fmt: skip
        with tunnel(argv, lport) as proc:
            assert echo_through(lport, b"x" * 12345) == b"x" * 12345
        log = proc.stdout.read().decode()
    assert f"Connection to port {lport} forwarding to 127.0.0.1:{echo_server.port} requested." in log
    assert "12345 bytes out, 12345 bytes in" in log
