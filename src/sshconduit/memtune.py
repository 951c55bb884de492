"""glibc malloc settings for the data path, applied once when a command-line tool starts.

Every socket read of the SSH connection is a fresh 256 KB bytes object (uvloop) and every decrypted packet
another 32-64 KiB one. With glibc's defaults the reads sit above the mmap threshold and the freed top of the
heap is trimmed, so each read maps or grows fresh memory and page-faults it in again: a measured 25-35% of the
receive side's throughput. A fixed mmap threshold and a larger trim threshold keep that memory in the heap for
reuse. ``SSHCONDUIT_MALLOC_TUNE=0`` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024  # above a read (256 KB) and a packet (MAX_PACKET_LENGTH)
TRIM_THRESHOLD = 64 * 1024 * 1024  # free memory the heap keeps before giving it back to the system


def tune_malloc() -> bool:
    """Apply the settings; False when the platform has no glibc mallopt (nothing changes then)."""
    if not sys.platform.startswith("linux") or os.environ.get("SSHCONDUIT_MALLOC_TUNE", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
