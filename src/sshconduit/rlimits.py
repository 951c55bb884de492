"""Process limits the CLIs raise at start: every forwarded connection holds a socket on each side."""

from __future__ import annotations

import contextlib
import resource


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as far as allowed); returns the soft limit now in force.

    The default soft limit (often 1024) would cap a client's -L or a server's direct-tcpip channels near 1,000
    concurrent connections; the hard limit is what the administrator allows, so take it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft
    # RLIM_INFINITY is refused for NOFILE on Linux; the kernel's nr_open ceiling (2^20 by default) is not.
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft
