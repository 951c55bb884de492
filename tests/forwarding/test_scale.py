"""Thousands of forwarded connections held open at once: over one SSH connection, and over many.

Runs bench/scale.py (the benchmark prints the same figures for 10,000 channels / 1,000 connections).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

SCALE = Path(__file__).resolve().parents[2] / "bench" / "scale.py"


def _soft_nofile_1024() -> None:
    # As a login shell's default: conduit and conduitd must raise their own limits to get past ~1,000.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))


def run_scale(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCALE), "--json", "--timeout", "60", *args],
        capture_output=True, text=True, timeout=120, preexec_fn=_soft_nofile_1024,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_thousand_channels_on_one_connection() -> None:
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2200:
        pytest.skip("hard RLIMIT_NOFILE below 2,200")
    result = run_scale("--channels", "2000")
    assert result["opened"] == 2000 and result["bad_echoes"] == 0, result
    # All were open at the same moment: each process held a socket for every one (over the soft limit of 1024).
    assert result["conduit"]["fds_at_n"] >= 2000, result
    assert result["conduitd"]["fds_at_n"] >= 2000, result


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege separation needs root")
def test_two_thousand_channels_through_a_separated_connection() -> None:
    """UsePrivilegeSeparation (conduitd's default as root): every socket comes from the user's helper, and a
    burst of opens must wait for the helper rather than fail."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2200:
        pytest.skip("hard RLIMIT_NOFILE below 2,200")
    result = run_scale("--channels", "2000", "--privsep", "yes")
    assert result["opened"] == 2000 and result["bad_echoes"] == 0, result


def test_two_hundred_ssh_connections_each_with_a_forward() -> None:
    result = run_scale("--connections", "200")
    assert result["opened"] == 200 and result["bad_echoes"] == 0, result
    assert result["conduitd"]["fds_at_n"] >= 400, result  # an SSH socket and a forwarded socket each
