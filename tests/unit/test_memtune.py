"""The malloc settings the command-line tools apply at start (memtune)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from sshconduit import memtune


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_glibc_takes_the_settings() -> None:
    # In a child: the settings last for the process's life, and this one runs other tests.
    code = "from sshconduit import memtune; raise SystemExit(0 if memtune.tune_malloc() else 1)"
    src = str(Path(memtune.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src)
    env.pop("SSHCONDUIT_MALLOC_TUNE", None)
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSHCONDUIT_MALLOC_TUNE", "0")
    assert memtune.tune_malloc() is False


def test_thresholds_cover_a_read_and_a_packet() -> None:
    from sshconduit import limits

    assert max(256_000, limits.MAX_PACKET_LENGTH) < memtune.MMAP_THRESHOLD
    assert memtune.TRIM_THRESHOLD >= memtune.MMAP_THRESHOLD
