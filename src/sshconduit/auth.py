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
from .errors import DisconnectReason, ProtocolError, SSHError

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
class KbdPrompts:
    """One keyboard-interactive round a conversation (PAM) asks: RFC 4256 INFO_REQUEST prompts and echo flags."""

    instruction: str
    prompts: tuple[tuple[str, bool], ...]


@dataclass(frozen=True, slots=True)
class KbdFinished:
    """The conversation's verdict; ``instruction``: PAM's last messages (a banner on success, else shown in a round
    without prompts, as sshd)."""

    ok: bool
    instruction: str = ""


KbdRound = KbdPrompts | KbdFinished


@dataclass(frozen=True, slots=True)
class KbdInteractiveStep:
    """keyboard-interactive driven by the policy's conversation: start it (``responses`` None) or hand it the
    client's answers; answer with ``ServerAuth.kbd_interactive_round``. Messages that arrive meanwhile wait."""

    user: str
    responses: tuple[str, ...] | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class AccountCheck:
    """UsePAM: the account check (pam_acct_mgmt) sshd runs before accepting a login that PAM did not check;
    answer with ``ServerAuth.account_checked``."""

    user: str
    method: str
    key: keys.PublicKey | None


@dataclass(frozen=True, slots=True)
class KbdInteractiveAbandoned:
    """The client sent a new request instead of answering the conversation's questions: end the conversation."""


class AccountRefused(SSHError):
    """PAM's account stack refused an authenticated user: sshd drops the connection without a reply."""


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
        self._checking: PasswordCheck | KbdInteractiveStep | AccountCheck | None = None  # the policy is busy
        self._kbd_conversation = False  # the client's INFO_RESPONSE goes to the policy's conversation
        self._kbd_verdict: bool | None = None  # the conversation failed; a last round showed its messages
        self._kbd_asked = 0  # prompts in the round the client is answering
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
            if self._kbd_conversation and len(responses) != self._kbd_asked:
                raise ProtocolError("wrong number of keyboard-interactive replies")  # sshd's fatal()
            if self._kbd_verdict is not None:
                verdict, self._kbd_verdict = self._kbd_verdict, None
                return self._conclude(user, "keyboard-interactive", None, verdict)
            if self._kbd_conversation:
                self._checking = KbdInteractiveStep(user, tuple(responses))
                return [self._checking]
            if len(responses) != 1:
                return self._conclude(user, "keyboard-interactive", None, False)
            return self._check_password(user, "keyboard-interactive", responses[0])
        raise ProtocolError(f"unexpected message {msg.ID} during authentication")

    def _on_request(self, msg: messages.UserauthRequest) -> list[object]:
        if msg.service != SERVICE_CONNECTION:
            raise ProtocolError(f"service {msg.service!r} not available", DisconnectReason.SERVICE_NOT_AVAILABLE)
        events: list[object] = []
        if self._kbd_user is not None and self._kbd_conversation:  # RFC 4256 3.1: a new request ends it
            events.append(KbdInteractiveAbandoned())
        self._kbd_user, self._kbd_verdict = None, None
        return events + self._on_new_request(msg)

    def _on_new_request(self, msg: messages.UserauthRequest) -> list[object]:
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
            if getattr(self._policy, "kbd_interactive_conversation", False):  # PAM asks its own questions
                self._kbd_conversation = True
                self._checking = KbdInteractiveStep(user, None)
                return [self._checking]
            self._kbd_conversation = False
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
        return self._after_check(self._conclude(check.user, check.method, None, ok))

    def kbd_interactive_round(self, step: KbdInteractiveStep, round_: KbdRound) -> list[object]:
        """The conversation's next questions or its verdict; then the messages that waited. May raise."""
        if step is not self._checking:
            return []
        self._checking = None
        if isinstance(round_, KbdPrompts):
            self._kbd_user, self._kbd_asked = step.user, len(round_.prompts)
            self._send(messages.UserauthInfoRequest.build("", round_.instruction, list(round_.prompts)).encode())
            return self._after_check([])
        if round_.instruction and not round_.ok:  # as sshd: PAM's reason in a round with no prompts (RFC 4256 3.2)
            self._kbd_user, self._kbd_verdict, self._kbd_asked = step.user, False, 0
            self._send(messages.UserauthInfoRequest.build("", round_.instruction, []).encode())
            return self._after_check([])
        if round_.instruction:  # as sshd: what PAM said on success goes out as a banner
            self._send(messages.UserauthBanner(round_.instruction).encode())
        return self._after_check(self._conclude(step.user, "keyboard-interactive", None, round_.ok))

    def account_checked(self, check: AccountCheck, ok: bool) -> list[object]:
        """The answer to an AccountCheck: success, or AccountRefused (sshd's fatal())."""
        if check is not self._checking:
            return []
        self._checking = None
        if not ok:
            log.error("Access denied for user %s by PAM account configuration", check.user)  # sshd's words
            raise AccountRefused(f"Access denied for user {check.user} by PAM account configuration")
        return self._after_check(self._succeed(check.user, check.method, check.key))

    def _after_check(self, events: list[object]) -> list[object]:
        while self._waiting and self._checking is None:
            events.extend(self.handle(self._waiting.pop(0)))
        return events

    def _succeed(self, user: str, method: str, key: keys.PublicKey | None) -> list[object]:
        self.user = user
        self._send(messages.UserauthSuccess().encode())
        return [AuthSucceeded(user, method, key)]

    def _conclude(self, user: str, method: str, key: keys.PublicKey | None, ok: bool) -> list[object]:
        if ok and key is not None:
            self._used_keys.append(key.blob)
        if ok and self._lists is not None and not self._lists.succeeded(method):
            offered = [m for m in self._offered(user) if m != "none"]
            self._send(messages.UserauthFailure(tuple(offered), True).encode())
            return [AuthPartial(user, method, key)]
        if ok:
            account_check_needed = getattr(self._policy, "account_check_needed", None)
            if account_check_needed is not None and account_check_needed(method):
                self._checking = AccountCheck(user, method, key)
                return [self._checking]
            return self._succeed(user, method, key)
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
