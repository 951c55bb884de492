"""Exceptions shared by every layer.

A peer that breaks the protocol raises ProtocolError inside the sans-IO core; the asyncio adapter turns it
into one DISCONNECT with ``reason``, one log line, and closes that connection only.
"""

from __future__ import annotations

from enum import IntEnum


class DisconnectReason(IntEnum):
    """RFC 4253 section 11.1."""

    HOST_NOT_ALLOWED_TO_CONNECT = 1
    PROTOCOL_ERROR = 2
    KEY_EXCHANGE_FAILED = 3
    RESERVED = 4
    MAC_ERROR = 5
    COMPRESSION_ERROR = 6
    SERVICE_NOT_AVAILABLE = 7
    PROTOCOL_VERSION_NOT_SUPPORTED = 8
    HOST_KEY_NOT_VERIFIABLE = 9
    CONNECTION_LOST = 10
    BY_APPLICATION = 11
    TOO_MANY_CONNECTIONS = 12
    AUTH_CANCELLED_BY_USER = 13
    NO_MORE_AUTH_METHODS_AVAILABLE = 14
    ILLEGAL_USER_NAME = 15


class SSHError(Exception):
    """Base of every sshconduit error."""


class ProtocolError(SSHError):
    """The peer sent something the protocol forbids; the connection must be dropped."""

    def __init__(self, message: str, reason: DisconnectReason = DisconnectReason.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.reason = reason


class KexError(ProtocolError):
    def __init__(self, message: str) -> None:
        super().__init__(message, DisconnectReason.KEY_EXCHANGE_FAILED)


class MACError(ProtocolError):
    def __init__(self, message: str = "message authentication code incorrect") -> None:
        super().__init__(message, DisconnectReason.MAC_ERROR)


class Disconnected(SSHError):
    """The peer sent DISCONNECT, or the connection is gone."""

    def __init__(self, reason: int, description: str) -> None:
        super().__init__(f"Disconnected: {description}" if description else "Disconnected")
        self.reason = reason
        self.description = description


class HostKeyError(SSHError):
    """The server's host key is unknown or changed and policy says no."""


class AuthenticationError(SSHError):
    """Every method we could try failed: ``Permission denied (publickey,password).``"""

    def __init__(self, methods: list[str] | tuple[str, ...]) -> None:
        super().__init__(f"Permission denied ({','.join(methods)}).")
        self.methods = tuple(methods)


class KeyError_(SSHError):
    """A key file could not be read or a key blob is not understood."""


class ConfigError(SSHError):
    """A config file or option is wrong; the message names file and line."""


class ChannelOpenError(SSHError):
    """The peer refused a channel: ``open failed: administratively prohibited: ...``."""

    def __init__(self, reason: int, description: str) -> None:
        self.reason = reason
        self.description = description
        super().__init__(f"open failed: {channel_open_reason_text(reason)}: {description}")


_OPEN_REASONS = {
    1: "administratively prohibited",
    2: "connect failed",
    3: "unknown channel type",
    4: "resource shortage",
}


def channel_open_reason_text(reason: int) -> str:
    return _OPEN_REASONS.get(reason, f"unknown reason {reason}")
