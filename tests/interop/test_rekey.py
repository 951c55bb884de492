"""A 200 MiB exec stream with rekeys forced in the middle, started by either side, arrives unchanged; RekeyLimit's
time rekeys a connection that sends nothing."""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess

import pytest
from conftest import USER, conduit_argv, env_with_src, ssh_argv

SIZE = 200 * 1024 * 1024


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rekey") / "blob"
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(SIZE // (1 << 20)):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            f.write(chunk)
    return path, digest.hexdigest()


def stream_digest(argv: list[str]) -> tuple[str, str]:
    """Run the client, hash its stdout as it streams; returns (sha256, stderr)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env_with_src())  # fmt: skip
    digest = hashlib.sha256()
    assert proc.stdout is not None
    while chunk := proc.stdout.read(1 << 20):
        digest.update(chunk)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode(errors="replace")
    return digest.hexdigest(), err.decode(errors="replace")


def test_conduit_initiates_rekeys_against_sshd(big_file, keyset, openssh_server):
    path, expected = big_file
    with openssh_server() as daemon:
        argv = conduit_argv(keyset, daemon.port, "-v", "-o", "RekeyLimit=16M", f"{USER}@127.0.0.1",
                            f"cat {shlex.quote(str(path))}")  # fmt: skip
        digest, log = stream_digest(argv)
    assert digest == expected
    # 200 MiB in, 16 MiB a key: 12 at most; what is in flight while each exchange runs (socket buffers and the
    # 2 MiB window, more on a loaded machine) passes under the old key, so fewer; none without volume rekeying.
    assert log.count("debug1: rekeying") >= 6


def test_sshd_initiates_rekeys_against_conduit(big_file, keyset, openssh_server):
    path, expected = big_file
    with openssh_server("RekeyLimit 16M\nLogLevel DEBUG1\n") as daemon:
        argv = conduit_argv(keyset, daemon.port, f"{USER}@127.0.0.1", f"cat {shlex.quote(str(path))}")
        digest, _ = stream_digest(argv)
        log = daemon.output()
    assert digest == expected
    assert log.count("SSH2_MSG_KEXINIT sent") >= 10


def test_ssh_initiates_rekeys_against_conduitd(big_file, keyset, conduitd_server):
    path, expected = big_file
    with conduitd_server() as daemon:
        argv = ssh_argv(keyset, daemon.port, "-o", "RekeyLimit=16M", f"{USER}@127.0.0.1",
                        f"cat {shlex.quote(str(path))}")  # fmt: skip
        argv[argv.index("LogLevel=ERROR")] = "LogLevel=DEBUG1"
        digest, log = stream_digest(argv)
    assert digest == expected
    assert log.count("SSH2_MSG_KEXINIT sent") >= 10


def test_conduit_rekeys_after_rekey_limit_time(keyset, openssh_server):
    """RekeyLimit's second value: a new exchange that long after the last, on a connection that sends nothing."""
    with openssh_server() as daemon:
        argv = conduit_argv(keyset, daemon.port, "-v", "-o", "RekeyLimit=default 1", f"{USER}@127.0.0.1", "sleep 3.5")
        _, log = stream_digest(argv)
    # at about 1, 2 and 3 s; none without the time limit (nothing is sent, so no volume rekey either)
    assert log.count("debug1: rekeying") >= 2


def test_conduitd_rekeys_at_its_rekey_limit(big_file, keyset, conduitd_server):
    """sshd_config's RekeyLimit, main section: conduitd starts the exchanges (it used to ignore the keyword)."""
    path, expected = big_file
    with conduitd_server("RekeyLimit 16M\n") as daemon:
        argv = ssh_argv(keyset, daemon.port, f"{USER}@127.0.0.1", f"cat {shlex.quote(str(path))}")
        argv[argv.index("LogLevel=ERROR")] = "LogLevel=DEBUG1"
        digest, log = stream_digest(argv)
    assert digest == expected
    # the first exchange's, then conduitd's: 200 MiB at 16 MiB a key, fewer for what is in flight meanwhile
    assert log.count("SSH2_MSG_KEXINIT received") >= 7


def test_conduitd_applies_a_match_blocks_rekey_limit_after_auth(keyset, conduitd_server):
    """RekeyLimit's time from a Match block for the user: a session that sends nothing is rekeyed by conduitd."""
    with conduitd_server(f"Match User {USER}\n  RekeyLimit default 1\n") as daemon:
        argv = ssh_argv(keyset, daemon.port, f"{USER}@127.0.0.1", "sleep 3.5")
        argv[argv.index("LogLevel=ERROR")] = "LogLevel=DEBUG1"
        _, log = stream_digest(argv)
    # the first exchange's, then at about 1, 2 and 3 s after auth; only the first without the Match block
    assert log.count("SSH2_MSG_KEXINIT received") >= 3
