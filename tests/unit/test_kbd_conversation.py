"""keyboard-interactive driven by the policy's conversation (UsePAM) in the sans-IO server auth: each round's
prompts and echo flags go out as INFO_REQUEST, answers go back to the conversation, PAM's last text is shown,
a new request abandons it; a key login waits for the account check, in the core and in the privsep monitor."""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
from pathlib import Path

import pytest
from test_authmethods import ALG, SESSION_ID, server

from sshconduit import auth, messages
from sshconduit.crypto import keys
from sshconduit.errors import ProtocolError
from sshconduit.policy import ServerPolicy
from sshconduit.privsep_child import Monitor, _b64
from sshconduit.server import ServerOptions
from sshconduit.system_password import SystemPasswordChecker


class ConversationPolicy:
    kbd_interactive_conversation = True

    def __init__(self, good_keys: list[keys.PublicKey] = ()) -> None:  # type: ignore[assignment]
        self.good_keys = [k.blob for k in good_keys]

    def allowed_methods(self, user: str) -> list[str]:
        return ["publickey", "keyboard-interactive"]

    def check_publickey(self, user: str, key: keys.PublicKey) -> bool:
        return key.blob in self.good_keys

    def check_password(self, user: str, password: str) -> bool:
        return False

    def account_check_needed(self, method: str) -> bool:
        return method == "publickey"


def kbd_request() -> messages.Message:
    return messages.decode_message(auth.keyboard_interactive_request("alice").encode())


def info_request(sent: list[messages.Message]) -> messages.UserauthInfoRequest:
    return messages.decode_as(messages.UserauthInfoRequest, sent[-1].encode())


def test_rounds_carry_prompts_echo_flags_and_text() -> None:
    server_auth, sent = server(ConversationPolicy())
    (start,) = server_auth.handle(kbd_request())
    assert isinstance(start, auth.KbdInteractiveStep) and start.responses is None
    first = auth.KbdPrompts("Welcome", (("Password: ", False),))
    assert server_auth.kbd_interactive_round(start, first) == []
    request = info_request(sent)
    assert request.instruction == "Welcome" and request.prompts() == [("Password: ", False)]
    (step,) = server_auth.handle(messages.UserauthInfoResponse.build(["hunter2"]))
    assert isinstance(step, auth.KbdInteractiveStep) and step.responses == ("hunter2",)
    assert "hunter2" not in repr(step)
    second = auth.KbdPrompts("", (("Token: ", True), ("PIN: ", False)))
    server_auth.kbd_interactive_round(step, second)
    assert info_request(sent).prompts() == [("Token: ", True), ("PIN: ", False)]
    (step,) = server_auth.handle(messages.UserauthInfoResponse.build(["123", "4"]))
    assert step.responses == ("123", "4")
    # success with a last message: a banner, as sshd
    events = server_auth.kbd_interactive_round(step, auth.KbdFinished(True, "Last login: never"))
    assert [type(e) for e in events] == [auth.AuthSucceeded] and server_auth.user == "alice"
    assert sent[-2:] == [messages.UserauthBanner("Last login: never"), messages.UserauthSuccess()]


def test_failure_reason_shown_in_a_round_without_prompts() -> None:
    server_auth, sent = server(ConversationPolicy())
    (start,) = server_auth.handle(kbd_request())
    server_auth.kbd_interactive_round(start, auth.KbdPrompts("", (("Password: ", False),)))
    (step,) = server_auth.handle(messages.UserauthInfoResponse.build(["x"]))
    assert server_auth.kbd_interactive_round(step, auth.KbdFinished(False, "Account locked")) == []
    assert info_request(sent).instruction == "Account locked" and info_request(sent).prompts() == []
    events = server_auth.handle(messages.UserauthInfoResponse.build([]))
    assert [type(e) for e in events] == [auth.AuthFailed] and server_auth.user is None


def test_wrong_number_of_replies_is_a_protocol_error() -> None:
    server_auth, _sent = server(ConversationPolicy())
    (start,) = server_auth.handle(kbd_request())
    server_auth.kbd_interactive_round(start, auth.KbdPrompts("", (("Password: ", False), ("Token: ", True))))
    with pytest.raises(ProtocolError, match="wrong number"):
        server_auth.handle(messages.UserauthInfoResponse.build(["only one"]))


def test_requests_wait_while_the_conversation_runs() -> None:
    server_auth, sent = server(ConversationPolicy())
    (start,) = server_auth.handle(kbd_request())
    assert server_auth.handle(kbd_request()) == []  # waits for the conversation's first round
    events = server_auth.kbd_interactive_round(start, auth.KbdPrompts("", (("Password: ", False),)))
    # then it runs: it abandons the questions just asked and starts a new conversation
    assert [type(e) for e in events] == [auth.KbdInteractiveAbandoned, auth.KbdInteractiveStep]
    assert len(sent) == 1
    assert server_auth.kbd_interactive_round(start, auth.KbdFinished(True)) == []  # stale: ignored
    assert server_auth.user is None


def test_a_new_request_abandons_unanswered_questions() -> None:
    server_auth, sent = server(ConversationPolicy())
    (start,) = server_auth.handle(kbd_request())
    server_auth.kbd_interactive_round(start, auth.KbdPrompts("", (("Password: ", False),)))
    events = server_auth.handle(kbd_request())
    assert [type(e) for e in events] == [auth.KbdInteractiveAbandoned, auth.KbdInteractiveStep]
    failed = server_auth.kbd_interactive_round(events[1], auth.KbdFinished(False))
    assert [type(e) for e in failed] == [auth.AuthFailed]
    assert sent[-1] == messages.UserauthFailure(("publickey", "keyboard-interactive"), False)


def test_key_login_waits_for_the_account_check() -> None:
    key = keys.generate_private_key("ssh-ed25519")
    server_auth, sent = server(ConversationPolicy([key.public]))
    blob = key.public.blob
    signature = key.sign(auth.publickey_signed_data(SESSION_ID, "alice", ALG, blob), ALG)
    (check,) = server_auth.handle(auth.publickey_request("alice", ALG, blob, signature))
    assert isinstance(check, auth.AccountCheck) and sent == [] and server_auth.user is None
    with pytest.raises(auth.AccountRefused, match="Access denied for user alice by PAM account configuration"):
        server_auth.account_checked(check, False)
    assert sent == [] and server_auth.user is None

    server_auth, sent = server(ConversationPolicy([key.public]))
    (check,) = server_auth.handle(auth.publickey_request("alice", ALG, blob, signature))
    assert [type(e) for e in server_auth.account_checked(check, True)] == [auth.AuthSucceeded]
    assert sent == [messages.UserauthSuccess()]


class AccountPolicy(ServerPolicy):
    """UsePAM yes, with pam_acct_mgmt's answer chosen by the test."""

    account_ok = False

    def check_account(self, user: str) -> bool:
        return self.account_ok


async def ask(sock: socket.socket, op: str, **fields: object) -> dict:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, json.dumps({"op": op, **fields}).encode())
    return json.loads(await asyncio.wait_for(loop.sock_recv(sock, 65536), 5))


@pytest.mark.parametrize("account_ok", [False, True])
def test_monitor_needs_the_account_check_before_a_key_login_counts(tmp_path: Path, account_ok: bool) -> None:
    user = getpass.getuser()
    host_key, key = keys.generate_private_key("ssh-ed25519"), keys.generate_private_key("ssh-ed25519")
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(f"{key.public.key_type} {_b64(key.public.blob)}\n")
    policy = AccountPolicy(authorized_keys_files=(str(authorized),), password_checker=SystemPasswordChecker(True))
    policy.account_ok = account_ok
    options = ServerOptions(host_keys=(host_key,), policy=policy)

    async def run() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.setblocking(False)
        monitor = Monitor(ours, options, "127.0.0.1")
        try:
            assert not (await ask(theirs, "check_account", user=user))["ok"]  # nothing to check yet
            await ask(theirs, "sign", key=_b64(host_key.public.blob), data=_b64(SESSION_ID), alg=ALG)
            signature = key.sign(auth.publickey_signed_data(SESSION_ID, user, ALG, key.public.blob), ALG)
            fields = {"user": user, "key": _b64(key.public.blob), "alg": ALG, "signature": _b64(signature)}
            assert (await ask(theirs, "check_signed", **fields))["ok"]
            assert monitor.user is None  # the key alone does not start the user's helper
            assert not (await ask(theirs, "start_helper"))["ok"]
            assert (await ask(theirs, "check_account", user=user))["ok"] is account_ok
            assert monitor.user == (user if account_ok else None)
            assert not (await ask(theirs, "check_account", user=user))["ok"]  # one check per login
        finally:
            monitor.close()
            theirs.close()

    asyncio.run(run())
