"""conduitd as root serving another system user: that user's sessions run with the user's ids, and the sockets of
the user's forwards are made by a helper running as the user, so the kernel applies the user's rights."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    KeySet,
    ensure_system_user,
    env_with_src,
    free_port,
    run_client,
    serve_each,
    ssh_argv,
    start_daemon,
    tunnel,
)

from sshconduit import privsep

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="privilege separation needs root")

TEST_USER = "conduit-test-user"
ESTABLISHED = "01"  # st column of /proc/net/tcp
WAIT = 15.0  # seconds any one connection in these tests may take


@pytest.fixture(scope="module")
def test_user(keyset: KeySet) -> pwd.struct_passwd:
    """A second system user whose ~/.ssh/authorized_keys holds the test key. Made once and kept: a concurrent run
    may be using it, so neither the user nor another run's key line is removed."""
    return ensure_system_user(TEST_USER, keyset.authorized_keys.read_text().strip())


@pytest.fixture(params=["in-process", "privsep"])
def daemon(request, keyset: KeySet, tmp_path: Path, test_user: pwd.struct_passwd):
    """conduitd as root: one process (``UsePrivilegeSeparation no``: post-auth work as the user), or privilege
    separation, the default as root (a process per connection, unprivileged until authenticated)."""
    port = free_port()
    config = tmp_path / "conduitd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {keyset.host_keys['ed25519']}\n"
        f"AuthorizedKeysFile .ssh/authorized_keys {keyset.authorized_keys}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nPidFile none\n"
        "AllowTcpForwarding yes\nAllowStreamLocalForwarding yes\n"
        + ("UsePrivilegeSeparation no\n" if request.param == "in-process" else "")
    )
    argv = [shutil.which("python3") or "python3", "-m", "sshconduit.cli.conduitd", "-D", "-e", "-f", str(config)]
    with start_daemon(argv, port, config, env_with_src()) as d:
        yield d


def run_as(keyset: KeySet, port: int, user: str, *command: str) -> subprocess.CompletedProcess:
    return run_client(ssh_argv(keyset, port, f"{user}@127.0.0.1", *command), timeout=WAIT)


def test_session_runs_as_the_user(keyset, daemon, test_user):
    out = run_as(keyset, daemon.port, TEST_USER, "id -u; id -g; pwd; echo $HOME")
    assert out.returncode == 0, out.stderr
    uid, gid, cwd, home = out.stdout.decode().split()
    assert (int(uid), int(gid)) == (test_user.pw_uid, test_user.pw_gid)
    assert cwd == home == test_user.pw_dir
    root = run_as(keyset, daemon.port, "root", "id -u")
    assert root.returncode == 0, root.stderr
    assert root.stdout.decode().split() == ["0"]


def test_pty_session_owns_its_terminal(keyset, daemon, test_user):
    out = run_client(
        ssh_argv(keyset, daemon.port, "-tt", f"{TEST_USER}@127.0.0.1", "id -u; stat -c %u $(tty)"), timeout=WAIT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().split() == [str(test_user.pw_uid)] * 2


class PeerRecorder:
    """A TCP echo service that records the source port of each connection that sent it data."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.peer_ports: list[int] = []
        serve_each(self.sock, self._echo)

    def _echo(self, conn: socket.socket) -> None:
        # only connections that carry data count: ssh's own probe of the forwarded port opens one too
        with conn:
            peer_port = conn.getpeername()[1]
            while data := conn.recv(65536):
                if peer_port not in self.peer_ports:
                    self.peer_ports.append(peer_port)
                conn.sendall(data)


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def tcp_socket_uid(local_port: int) -> int:
    """The owning uid of the established IPv4 TCP socket on 127.0.0.1:local_port, from /proc/net/tcp (a TIME_WAIT
    left by an earlier connection on the same port shows uid 0)."""
    want = f"0100007F:{local_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want and fields[3] == ESTABLISHED:
            return int(fields[7])
    raise AssertionError(f"no socket on 127.0.0.1:{local_port}")


def test_local_forward_connects_as_the_user(keyset, daemon, test_user):
    recorder = PeerRecorder()
    try:
        for user, uid in ((TEST_USER, test_user.pw_uid), ("root", 0)):
            lport = free_port()
            argv = ssh_argv(keyset, daemon.port, "-N", "-L", f"{lport}:127.0.0.1:{recorder.port}", f"{user}@127.0.0.1")
            with tunnel(argv, lport):
                # the first socket comes alone, the later ones from the batches the helper makes ahead
                for i in range(6):
                    with socket.create_connection(("127.0.0.1", lport), timeout=WAIT) as s:
                        s.sendall(b"ping")
                        assert s.recv(4) == b"ping"
                        assert tcp_socket_uid(recorder.peer_ports[-1]) == uid, f"connection {i}"
    finally:
        recorder.sock.close()


def test_helper_makes_forward_sockets_ahead_in_batches(test_user):
    """As root serving a user: each forward's socket is the user's, and the helper is asked for them in batches
    that grow with use, not once per forwarded connection."""
    creds = privsep.credentials_for(TEST_USER)
    assert creds is not None and creds.uid == test_user.pw_uid
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()

    async def main() -> list[str]:
        helper = privsep.ForwardHelper(creds)
        asked: list[str] = []
        request = helper._request

        def counting(message, fds=()):
            asked.append(message["op"])
            return request(message, fds)

        helper._request = counting  # type: ignore[method-assign]
        try:
            for i in range(20):
                sock = await asyncio.wait_for(helper.connect_tcp(*address), WAIT)
                with sock, listener.accept()[0]:
                    assert os.fstat(sock.fileno()).st_uid == test_user.pw_uid, f"connection {i}"
                    assert sock.getpeername() == address
                await asyncio.sleep(0.01)  # the next batch lands as a forward's later connections would find it
        finally:
            helper.close()
        return asked

    try:
        asked = asyncio.run(main())
    finally:
        listener.close()
    # batches of 1, 1, 2, 4, 8 and 16 sockets: six requests serve twenty connections
    assert asked == ["sockets"] * 6, asked


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])  # an address, connected without a helper thread
def test_a_refused_connect_as_the_user_reaches_the_client(keyset, daemon, test_user, host):
    argv = ssh_argv(keyset, daemon.port, "-W", f"{host}:{free_port()}", f"{TEST_USER}@127.0.0.1")
    argv[argv.index("LogLevel=ERROR")] = "LogLevel=INFO"
    result = run_client(argv, timeout=WAIT)
    assert result.returncode == 255
    assert "open failed: connect failed: Connection refused" in result.stderr.decode(errors="replace")


@contextlib.contextmanager
def unix_echo(path: Path, uid: int, gid: int) -> Iterator[None]:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chown(path, uid, gid)
    path.chmod(0o600)
    server.listen(8)
    serve_each(server, _echo)
    try:
        yield
    finally:
        server.close()


def echo_once(port: int, payload: bytes) -> bytes:
    """Send payload through the forward and read as much back; b"" when the far end closes (the open failed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        got = b""
        with contextlib.suppress(ConnectionResetError):
            s.sendall(payload)
            while len(got) < len(payload) and (chunk := s.recv(len(payload) - len(got))):
                got += chunk
    return got


def test_streamlocal_forward_has_only_the_users_rights(keyset, daemon, test_user):
    base = Path(tempfile.mkdtemp(prefix="conduit-privsep-", dir="/tmp"))
    base.chmod(0o755)
    mine, roots = base / "user.sock", base / "root.sock"
    try:
        with unix_echo(mine, test_user.pw_uid, test_user.pw_gid), unix_echo(roots, 0, 0):
            for user, path, reachable in (
                (TEST_USER, mine, True),
                (TEST_USER, roots, False),
                ("root", roots, True),  # the same socket is reachable for root: the refusal above is the uid's
            ):
                lport = free_port()
                argv = ssh_argv(keyset, daemon.port, "-N", "-L", f"{lport}:{path}", f"{user}@127.0.0.1")
                with tunnel(argv, lport):
                    got = echo_once(lport, b"hello")
                assert (got == b"hello") is reachable, (user, path, got)
        assert "Permission denied" in daemon.output()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_remote_forward_listens_as_the_user(keyset, daemon, test_user):
    """-R to a unix path: bound by the user's helper, so it lands owned by the user and only where the user may
    create files (a root-owned 0755 directory refuses it; root itself may bind there)."""
    base = Path(tempfile.mkdtemp(prefix="conduit-privsep-", dir="/tmp"))
    base.chmod(0o755)
    home_sock = Path(test_user.pw_dir) / f"fwd-{os.getpid()}.sock"
    try:
        for user, path, allowed in ((TEST_USER, home_sock, True), (TEST_USER, base / "u.sock", False)):
            argv = ssh_argv(
                keyset, daemon.port, "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"{path}:127.0.0.1:9",
                f"{user}@127.0.0.1",
            )  # fmt: skip
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                deadline = time.monotonic() + WAIT
                while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if allowed:
                    assert path.exists(), proc.stderr.read() if proc.poll() is not None else "no socket"
                    assert path.stat().st_uid == test_user.pw_uid
                    proc.terminate()
                    proc.wait(5)
                    deadline = time.monotonic() + WAIT
                    while path.exists() and time.monotonic() < deadline:
                        time.sleep(0.05)
                    assert not path.exists()  # removed (by the user's helper) when the connection went
                else:
                    assert proc.wait(WAIT) != 0
                    assert not path.exists()
            finally:
                if proc.poll() is None:
                    proc.terminate()
                proc.wait(5)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        home_sock.unlink(missing_ok=True)


def server_socket_inode(server_port: int, client_port: int) -> int:
    want_local, want_remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want_local and fields[2] == want_remote:
            return int(fields[9])
    raise AssertionError(f"no server socket for client port {client_port}")


def process_holding(inode: int, candidates: list[int]) -> int:
    for pid in candidates:
        with contextlib.suppress(OSError):
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]" for fd in os.listdir(f"/proc/{pid}/fd")):
                return pid
    raise AssertionError("no process holds the connection")


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


@contextlib.contextmanager
def preauth_connection(daemon) -> Iterator[int]:
    """A connection that exchanged versions and nothing more, held open: the pid of the process serving it."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=WAIT) as s:
        s.sendall(b"SSH-2.0-probe\r\n")
        assert read_banner(s).startswith(b"SSH-2.0-"), "the server closed the connection"
        inode = server_socket_inode(daemon.port, s.getsockname()[1])
        yield process_holding(inode, descendants(daemon.proc.pid))


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_preauth_process_holds_no_privileges(keyset, daemon, test_user):
    """Version exchanged, nothing authenticated: by default the process speaking to the client runs as sshd (or
    nobody); ``UsePrivilegeSeparation no`` keeps the connection in the root daemon (it drops only post-auth)."""
    names = {entry.pw_name for entry in pwd.getpwall()}
    unprivileged = next(pwd.getpwnam(name).pw_uid for name in ("sshd", "nobody") if name in names)
    with preauth_connection(daemon) as pid:
        if "UsePrivilegeSeparation no" in daemon.config.read_text():
            assert pid == daemon.proc.pid
            return
        assert pid != daemon.proc.pid  # a process of its own, not the listener
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        uids = next(line.split()[1:] for line in status if line.startswith("Uid:"))
        assert set(map(int, uids)) == {unprivileged}, uids
        assert unprivileged not in (0, test_user.pw_uid)


@pytest.mark.parametrize("daemon", ["privsep"], indirect=True)
def test_one_fork_server_kept_over_sighup_and_gone_on_sigterm(keyset, daemon):
    """Connection processes are forked by one pre-started fork server (a child of the daemon), not started as
    interpreters of their own; a reload keeps it (it reloads the file; test_daemon checks the new config is
    used); SIGTERM ends it and the connection processes (test_daemon_ops: their clients see the disconnect)."""
    with preauth_connection(daemon) as first, preauth_connection(daemon) as second:
        server = parent_of(first)
        assert parent_of(second) == server and parent_of(server) == daemon.proc.pid
        daemon.proc.send_signal(signal.SIGHUP)
        with preauth_connection(daemon) as third:
            assert parent_of(third) == server
        forkers = [pid for pid in descendants(daemon.proc.pid) if parent_of(pid) == daemon.proc.pid]
        assert forkers == [server]  # no spare per connection: one fork server
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(WAIT) == 0
        deadline = time.monotonic() + WAIT
        while any(map(alive, (server, first, second))) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(alive, (server, first, second)))


def read_banner(s: socket.socket) -> bytes:
    banner = b""
    while not banner.endswith(b"\n") and len(banner) < 256:
        chunk = s.recv(1)
        if not chunk:
            break
        banner += chunk
    return banner


def test_privsep_honours_max_startups(keyset, tmp_path, test_user):
    """Each unauthenticated connection costs a process: past MaxStartups the listener drops it at once."""
    port = free_port()
    config = tmp_path / "conduitd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {keyset.host_keys['ed25519']}\n"
        "PidFile none\nUsePrivilegeSeparation yes\nMaxStartups 2:100:2\n"
    )
    argv = [shutil.which("python3") or "python3", "-m", "sshconduit.cli.conduitd", "-D", "-e", "-f", str(config)]
    with start_daemon(argv, port, config, env_with_src()) as d, contextlib.ExitStack() as held:
        # until the start-up probe's process is reaped it still counts: retry the first two until they are in
        admitted: list[socket.socket] = []
        deadline = time.monotonic() + WAIT
        while len(admitted) < 2 and time.monotonic() < deadline:
            s = held.enter_context(socket.create_connection(("127.0.0.1", port), timeout=WAIT))
            if read_banner(s).startswith(b"SSH-2.0-"):
                admitted.append(s)
            else:
                s.close()
                time.sleep(0.05)
        assert len(admitted) == 2
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as third:
            assert read_banner(third) == b""  # two unauthenticated connections held: MaxStartups full
    assert "past MaxStartups" in d.output()  # read once the held connections' processes are gone


BANNER_PROBE = """
import socket, sys, time
deadline = time.monotonic() + 15
for _ in range(150):
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as sock:
            print(sock.recv(64).split(b"\\r\\n")[0].decode())
            break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
"""


@pytest.mark.parametrize("privsep", ["no", "yes"])
def test_default_listen_addresses_serve_both_families(keyset, tmp_path, privsep):
    # sshd_config's default is to listen on "::" and "0.0.0.0" at once; the separated listener once bound "::"
    # dual-stack, and then "0.0.0.0" failed: "Address already in use". Wildcards bind only inside a namespace
    # of the test's own, where loopback is the only interface.
    if shutil.which("ip") is None:
        pytest.skip("ip (iproute2) not found")
    namespace = f"cdlisten{os.getpid()}{privsep}"
    subprocess.run(["ip", "netns", "add", namespace], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True, timeout=10)
        config = tmp_path / "conduitd_config"
        config.write_text(
            f"Port 2222\nHostKey {keyset.host_keys['ed25519']}\nPidFile none\nUsePrivilegeSeparation {privsep}\n"
        )
        inside = ["ip", "netns", "exec", namespace]
        daemon = subprocess.Popen(
            [*inside, sys.executable, "-m", "sshconduit.cli.conduitd", "-D", "-e", "-f", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env_with_src(),
        )  # fmt: skip
        try:
            probe = [*inside, sys.executable, "-c", BANNER_PROBE]
            banners = [
                subprocess.run([*probe, host, "2222"], capture_output=True, text=True, timeout=30)
                for host in ("127.0.0.1", "::1")
            ]
        finally:
            daemon.terminate()
            said = daemon.communicate(timeout=10)[0].decode(errors="replace")
        for banner in banners:
            assert banner.stdout.startswith("SSH-2.0-"), (banner.stderr[-300:], said)
        assert "Address already in use" not in said
    finally:
        subprocess.run(["ip", "netns", "del", namespace], timeout=10)
