"""The audit trail: one record per forwarded connection when it ends and per refusal.

Every record goes to the log as one readable line and, when ``AuditLog`` names a file, as one JSON object per
line there (appended, flushed per record so a crash loses nothing and ``tail -f`` works).
"""

from __future__ import annotations

import json
import logging
import time
from typing import IO, Any

log = logging.getLogger("sshconduit.audit")

_file: IO[str] | None = None
_path: str | None = None


def configure(path: str | None) -> None:
    """Open (or, on reload, reopen: log rotation) the JSON-lines file; None: log lines only."""
    global _file, _path
    if _file is not None:
        _file.close()
        _file = None
    _path = path
    if path:
        try:
            _file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the daemon's life
        except OSError as exc:
            log.error('Cannot open AuditLog "%s": %s', path, exc.strerror)


def _write(record: dict[str, Any]) -> None:
    if _file is None:
        return
    try:
        _file.write(json.dumps(record, separators=(",", ":")) + "\n")
        _file.flush()
    except OSError as exc:
        log.error('AuditLog "%s": %s', _path, exc.strerror)


def refused(user: str | None, address: str | None, kind: str, destination: str, reason: str) -> None:
    """A login or a channel the server would not allow (or could not open)."""
    log.info(
        "audit: refused %s%s for %s from %s: %s",
        kind,
        f" to {destination}" if destination else "",
        user or "-",
        address or "-",
        reason,
    )
    _write(
        {
            "time": round(time.time(), 3),
            "event": "refused",
            "user": user,
            "address": address,
            "kind": kind,
            "destination": destination,
            "reason": reason,
        }
    )


def finished(
    user: str | None,
    address: str | None,
    kind: str,
    destination: str,
    bytes_from_client: int,
    bytes_to_client: int,
    duration: float,
    reason: str = "closed",
) -> None:
    """A forwarded connection that has ended."""
    log.info(
        "audit: %s for %s from %s to %s %s: %d bytes from client, %d bytes to client, %.3fs",
        kind,
        user or "-",
        address or "-",
        destination,
        reason,
        bytes_from_client,
        bytes_to_client,
        duration,
    )
    if _file is None:  # no AuditLog: the log line is all (this runs for every forwarded connection)
        return
    _write(
        {
            "time": round(time.time(), 3),
            "event": "forward",
            "user": user,
            "address": address,
            "kind": kind,
            "destination": destination,
            "bytes_from_client": bytes_from_client,
            "bytes_to_client": bytes_to_client,
            "duration": round(duration, 3),
            "reason": reason,
        }
    )


def track(bridge: Any, user: str | None, address: str | None, kind: str, destination: str) -> Any:
    """Write one ``finished`` record when this forward's StreamBridge ends; returns the bridge."""
    bridge.on_finish = lambda b, seconds: finished(user, address, kind, destination, b.bytes_in, b.bytes_out, seconds)
    return bridge
