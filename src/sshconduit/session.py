"""Sessions (RFC 4254 section 6): the server end in session_server, the client end in session_client."""

from __future__ import annotations

from .session_client import ClientSession, PtyRequest, run_interactive
from .session_server import ServerSession

__all__ = ["ClientSession", "PtyRequest", "ServerSession", "run_interactive"]
