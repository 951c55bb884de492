"""sshconduit: an SSH-2 client and server built around port forwarding.

``connect()`` and ``Tunnel`` are the entry points; they are imported on first use so that the commands start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["SSHClient", "Tunnel", "__version__", "connect"]

if TYPE_CHECKING:
    from .client import SSHClient, connect
    from .sync import Tunnel


def __getattr__(name: str) -> Any:
    if name in ("connect", "SSHClient"):
        from . import client

        return getattr(client, name)
    if name == "Tunnel":
        from .sync import Tunnel

        return Tunnel
    raise AttributeError(name)
