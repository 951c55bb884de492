"""conduitd with no config at all: the current user, on loopback, with a host key it makes itself."""

from __future__ import annotations

import subprocess
import sys

from conftest import USER, env_with_src, free_port, keygen, run_client, wait_for_port


def test_no_config_serves_the_user_with_their_own_keys(tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    key = keygen(home / ".ssh" / "id_ed25519")  # no authorized_keys: the user's own key is trusted
    state = tmp_path / "state"
    port = free_port()
    env = {**env_with_src(), "HOME": str(home), "XDG_STATE_HOME": str(state)}
    daemon = subprocess.Popen([sys.executable, "-m", "sshconduit.cli.conduitd", "-D", "-e", "-p", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for_port(port, daemon)
        argv = [sys.executable, "-m", "sshconduit.cli.conduit", "-F", "none", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-i", str(key), "-p", str(port),
                f"{USER}@127.0.0.1", "echo embedded-ok"]  # fmt: skip
        result = run_client(argv)
    finally:
        daemon.terminate()
        log = daemon.communicate(timeout=10)[0].decode()
    assert result.stdout == b"embedded-ok\n", result.stderr
    assert (state / "sshconduit" / "ssh_host_ed25519_key").exists()
    assert f"Generated host key {state}/sshconduit/ssh_host_ed25519_key" in log
    assert f"on 127.0.0.1 port {port} (embedded default" in log
