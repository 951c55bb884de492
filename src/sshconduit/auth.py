"""User authentication (RFC 4252, RFC 4256) for both roles.

The server side is a sans-IO state machine: it is handed each auth message and asks an ``AuthPolicy`` (the
paramiko ServerInterface idea) whether a user, key or password is good. The client side is a set of message
builders; the asyncio client drives them, because asking an agent or a person for a signature or a password
waits on the outside world.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from . import limits, messages, wire
from .authmethods import ANY, MethodLists
from .crypto import keys
from .errors import DisconnectReason, ProtocolError

log = logging.getLogger("sshconduit.auth")

SERVICE_USERAUTH = "ssh-userauth"
SERVICE_CONNECTION = "ssh-connection"


def publickey_signed_data(session_id: bytes, user: str, algorithm: str, key_blob: bytes) -> bytes:
    """What a publickey request signs (RFC 4252 7)."""
    return b"".join(
        (
            wire.string(session_id),
            b"\x32",
            wire.string(user),
            wire.string(SERVICE_CONNECTION),
            wire.string("publickey"),
            b"\x01",
            wire.string(algorithm),
            wire.string(key_blob),
        )
    )


# --- client side builders ---


def none_request(user: str) -> messages.UserauthRequest:
    return messages.UserauthRequest(user, SERVICE_CONNECTION, "none")


def publickey_request(
    user: str, algorithm: str, key_blob: bytes, signature: bytes | None = None
) -> messages.UserauthRequest:
    tail = wire.string(signature) if signature is not None else b""
    data = messages.PublickeyAuth(signature is not None, algorithm, key_blob, tail).encode()
    return messages.UserauthRequest(user, SERVICE_CONNECTION, "publickey", data)


def password_request(user: str, password: str) -> messages.UserauthRequest:
    return messages.UserauthRequest(
        user, SERVICE_CONNECTION, "password", messages.PasswordAuth(False, password).encode()
    )


def keyboard_interactive_request(user: str) -> messages.UserauthRequest:
    data = messages.KbdInteractiveAuth("", "").encode()
    return messages.UserauthRequest(user, SERVICE_CONNECTION, "keyboard-interactive", data)


# --- server side ---


class AuthPolicy(Protocol):
    """Answers the server's questions; every method must be quick (it runs on the event loop)."""

    def allowed_methods(self, user: str) -> list[str]: ...

    def check_publickey(self, user: str, key: keys.PublicKey) -> bool: ...

    def check_password(self, user: str, password: str) -> bool: ...


class TooManyAuthFailures(ProtocolError):
    """MaxAuthTries reached; the user is kept for sshd's log line."""

    def __init__(self, user: str) -> None:
        super().__init__("Too many authentication failures", DisconnectReason.NO_MORE_AUTH_METHODS_AVAILABLE)
        self.user = user


@dataclass(frozen=True, slots=True)
class AuthSucceeded:
    user: str
    method: str
    key: keys.PublicKey | None


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """One failed attempt, for the log (``Failed publickey for alice from ...``)."""

    user: str
    method: str
    key: keys.PublicKey | None


@dataclass(frozen=True, slots=True)
class AuthPartial:
    """A method succeeded but AuthenticationMethods wants more (``Partial publickey for alice from ...``)."""

    user: str
    method: str
    key: keys.PublicKey | None


@dataclass(frozen=True, slots=True)
class PasswordCheck:
    """A password the policy checks off the event loop (it blocks: PAM, crypt); answer with
    ``ServerAuth.password_checked``. Messages that arrive meanwhile wait, as sshd handles one request at a time."""

    user: str
    method: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ServiceStarted:
    service: str


class ServerAuth:
    """Answers SERVICE_REQUEST and USERAUTH_REQUEST until a user is authenticated."""

    def __init__(
        self,
        send: Callable[..., None],
        session_id: bytes,
        policy: AuthPolicy,
        *,
        max_tries: int = limits.MAX_AUTH_ATTEMPTS,
        banner: str | None = None,
        signature_algorithms: tuple[str, ...] = (),
    ) -> None:
        self._send = send
        self._session_id = session_id
        self._policy = policy
        self._max_tries = max_tries
        self._banner = banner
        self._banner_sent = False
        self._signature_algorithms = signature_algorithms
        self._service_started = False
        self._failures = 0
        self._kbd_user: str | None = None
        self._lists: MethodLists | None = None  # AuthenticationMethods progress, from the first request
        self._used_keys: list[bytes] = []  # publickey,publickey needs two different keys (sshd)
        self._checking: PasswordCheck | None = None
        self._waiting: list[messages.Message] = []
        self.user: str | None = None  # set once authenticated

    def handle(self, msg: messages.Message) -> list[object]:
        if self._checking is not None:
            if len(self._waiting) >= limits.MAX_AUTH_MESSAGES_WAITING:
                raise ProtocolError("too many authentication requests while a password is checked")
            self._waiting.append(msg)
            return []
        if isinstance(msg, messages.ServiceRequest):
            if msg.service != SERVICE_USERAUTH or self._service_started:
                raise ProtocolError(f"service {msg.service!r} not available", DisconnectReason.SERVICE_NOT_AVAILABLE)
            self._service_started = True
            self._send(messages.ServiceAccept(SERVICE_USERAUTH).encode())
            return [ServiceStarted(SERVICE_USERAUTH)]
        if not self._service_started:
            raise ProtocolError("authentication before the ssh-userauth service was requested")
        if self.user is not None:
            return []  # RFC 4252 5.1: requests after success are ignored
        if isinstance(msg, messages.UserauthRequest):
            return self._on_request(msg)
        if isinstance(msg, messages.UserauthInfoResponse) and self._kbd_user is not None:
            user, self._kbd_user = self._kbd_user, None
            responses = msg.responses()
            if len(responses) != 1:
                return self._conclude(user, "keyboard-interactive", None, False)
            return self._check_password(user, "keyboard-interactive", responses[0])
        raise ProtocolError(f"unexpected message {msg.ID} during authentication")

    def _on_request(self, msg: messages.UserauthRequest) -> list[object]:
        if msg.service != SERVICE_CONNECTION:
            raise ProtocolError(f"service {msg.service!r} not available", DisconnectReason.SERVICE_NOT_AVAILABLE)
        user = msg.user
        methods = self._offered(user)  # names the user: Match blocks apply from here
        if not self._banner_sent:  # as sshd: once, at the first request, the banner Match chose for this user
            self._banner_sent = True
            banner_text = getattr(self._policy, "banner_text", None)
            banner = (banner_text() if banner_text is not None else None) or self._banner
            if banner is not None:
                self._send(messages.UserauthBanner(banner).encode())
        if msg.method == "none" or msg.method not in methods:
            self._fail(user)
            return []
        if msg.method == "publickey":
            return self._on_publickey(user, messages.PublickeyAuth.decode(msg.method_data))
        if msg.method == "password":
            password = messages.PasswordAuth.decode(msg.method_data)
            if password.change:
                return self._conclude(user, "password", None, False)
            return self._check_password(user, "password", password.password)
        if msg.method == "keyboard-interactive":
            self._kbd_user = user
            self._send(messages.UserauthInfoRequest.build("", "", [("Password: ", False)]).encode())
            return []
        self._fail(user)
        return []

    def _on_publickey(self, user: str, req: messages.PublickeyAuth) -> list[object]:
        try:
            key = keys.parse_public_blob(req.key_blob)
        except Exception:
            self._fail(user)
            return []
        if key.blob in self._used_keys:
            log.info("refusing previously-used %s key", key.label)
            self._fail(user)
            return []
        # PubkeyAcceptedAlgorithms: the policy's, Match-resolved for this user, else the server's own
        accepted = getattr(self._policy, "pubkey_accepted_algorithms", None) or self._signature_algorithms
        if req.algorithm not in key.signature_algorithms() or (accepted and req.algorithm not in accepted):
            self._fail(user)
            return []
        if not req.has_signature:  # a query: would this key do?
            if self._policy.check_publickey(user, key):
                self._send(messages.UserauthPkOk(req.algorithm, req.key_blob).encode())
            else:
                self._fail(user)
            return []
        signature = wire.Reader(req.signature_data).string()
        signed = publickey_signed_data(self._session_id, user, req.algorithm, req.key_blob)
        signed_check = getattr(self._policy, "check_signed_publickey", None)  # privsep: the monitor verifies
        if signed_check is not None:
            ok = signed_check(user, key, signed, signature, req.algorithm)
        else:
            ok = key.verify(signed, signature, req.algorithm) and self._policy.check_publickey(user, key)
        return self._conclude(user, "publickey", key, ok)

    def _offered(self, user: str) -> list[str]:
        """The enabled methods AuthenticationMethods lets the client try now (binds the user: Match applies)."""
        enabled = self._policy.allowed_methods(user)
        if self._lists is None and enabled:
            lists = getattr(self._policy, "authentication_methods", ANY)
            self._lists = MethodLists(lists, lambda method: method in self._policy.allowed_methods(user))
        return self._lists.offered(enabled) if self._lists is not None else enabled

    def _check_password(self, user: str, method: str, password: str) -> list[object]:
        if getattr(self._policy, "password_check_blocks", False):
            self._checking = PasswordCheck(user, method, password)
            return [self._checking]
        return self._conclude(user, method, None, self._policy.check_password(user, password))

    def password_checked(self, check: PasswordCheck, ok: bool) -> list[object]:
        """The answer to a PasswordCheck; then the messages that waited for it. May raise TooManyAuthFailures."""
        if check is not self._checking:
            return []
        self._checking = None
        events = self._conclude(check.user, check.method, None, ok)
        while self._waiting and self._checking is None:
            events.extend(self.handle(self._waiting.pop(0)))
        return events

    def _conclude(self, user: str, method: str, key: keys.PublicKey | None, ok: bool) -> list[object]:
        if ok and key is not None:
            self._used_keys.append(key.blob)
        if ok and self._lists is not None and not self._lists.succeeded(method):
            offered = [m for m in self._offered(user) if m != "none"]
            self._send(messages.UserauthFailure(tuple(offered), True).encode())
            return [AuthPartial(user, method, key)]
        if ok:
            self.user = user
            self._send(messages.UserauthSuccess().encode())
            return [AuthSucceeded(user, method, key)]
        self._failures += 1
        # a policy may carry its own limit, set per user (sshd_config Match) once the user is known
        max_tries = getattr(self._policy, "max_auth_tries", None)
        if self._failures >= (self._max_tries if max_tries is None else max_tries):
            raise TooManyAuthFailures(user)
        self._fail(user)
        return [AuthFailed(user, method, key)]

    def _fail(self, user: str) -> None:
        methods = [m for m in self._offered(user) if m != "none"]
        self._send(messages.UserauthFailure(tuple(methods), False).encode())
