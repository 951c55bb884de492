"""AuthenticationMethods in the sans-IO server auth: lists in order, partial success, two different keys; a
blocking password check holds later requests until it is answered; the privsep monitor keeps its own count."""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
from pathlib import Path

import pytest

from sshconduit import auth, messages
from sshconduit.authmethods import MethodLists, check_satisfiable, enabled_in_config
from sshconduit.crypto import keys
from sshconduit.policy import ServerPolicy
from sshconduit.privsep_child import Monitor, _b64
from sshconduit.server import ServerOptions

SESSION_ID = b"S" * 32
ALG = "ssh-ed25519"
ALL = enabled_in_config(True, True, True)


def test_lists_advance_in_order() -> None:
    lists = MethodLists(["publickey,password", "publickey,keyboard-interactive:pam"], ALL)
    enabled = ["publickey", "password", "keyboard-interactive"]
    assert lists.offered(enabled) == ["publickey"]
    assert not lists.succeeded("publickey")
    assert lists.offered(enabled) == ["password", "keyboard-interactive"]
    assert lists.succeeded("keyboard-interactive")


def test_lists_with_a_disabled_method_are_dropped() -> None:
    no_password = enabled_in_config(True, False, True)
    lists = MethodLists(["password", "publickey,publickey"], no_password)
    assert lists.offered(["publickey", "keyboard-interactive"]) == ["publickey"]
    assert check_satisfiable(["password", "publickey,password"], no_password) is not None
    assert check_satisfiable(["password", "publickey"], no_password) is None
    assert check_satisfiable(["any"], enabled_in_config(False, False, False)) is None


class FakePolicy:
    def __init__(self, lists: list[str], good_keys: list[keys.PublicKey], blocks: bool = False) -> None:
        self.authentication_methods = lists
        self.good_keys = [k.blob for k in good_keys]
        self.password_check_blocks = blocks

    def allowed_methods(self, user: str) -> list[str]:
        return ["publickey", "password", "keyboard-interactive"]

    def check_publickey(self, user: str, key: keys.PublicKey) -> bool:
        return key.blob in self.good_keys

    def check_password(self, user: str, password: str, method: str = "password") -> bool:
        return password == "secret"


def signed_request(key: keys.PrivateKey, user: str = "alice") -> messages.UserauthRequest:
    blob = key.public.blob
    signature = key.sign(auth.publickey_signed_data(SESSION_ID, user, ALG, blob), ALG)
    return auth.publickey_request(user, ALG, blob, signature)


def server(policy: auth.AuthPolicy) -> tuple[auth.ServerAuth, list[messages.Message]]:
    """A ServerAuth past the service request, and the list of what it sends."""
    sent: list[messages.Message] = []
    server_auth = auth.ServerAuth(lambda payload: sent.append(messages.decode_message(payload)), SESSION_ID, policy)
    server_auth.handle(messages.ServiceRequest(auth.SERVICE_USERAUTH))
    sent.clear()
    return server_auth, sent


def test_publickey_then_password_reports_partial_success() -> None:
    key = keys.generate_private_key("ssh-ed25519")
    server_auth, sent = server(FakePolicy(["publickey,password"], [key.public]))
    server_auth.handle(auth.password_request("alice", "secret"))  # not offered yet: refused, not counted
    assert sent[-1] == messages.UserauthFailure(("publickey",), False)
    events = server_auth.handle(signed_request(key))
    assert [type(e) for e in events] == [auth.AuthPartial]
    assert sent[-1] == messages.UserauthFailure(("password",), True)
    events = server_auth.handle(auth.password_request("alice", "secret"))
    assert [type(e) for e in events] == [auth.AuthSucceeded] and server_auth.user == "alice"


def test_publickey_twice_needs_another_key() -> None:
    first, second = keys.generate_private_key("ssh-ed25519"), keys.generate_private_key("ssh-ed25519")
    server_auth, sent = server(FakePolicy(["publickey,publickey"], [first.public, second.public]))
    assert [type(e) for e in server_auth.handle(signed_request(first))] == [auth.AuthPartial]
    assert server_auth.handle(signed_request(first)) == [] and server_auth.user is None
    assert sent[-1] == messages.UserauthFailure(("publickey",), False)
    assert [type(e) for e in server_auth.handle(signed_request(second))] == [auth.AuthSucceeded]


def test_blocking_password_check_holds_later_requests() -> None:
    server_auth, sent = server(FakePolicy(["any"], [], blocks=True))
    events = server_auth.handle(auth.password_request("alice", "bad"))
    assert len(events) == 1 and isinstance(events[0], auth.PasswordCheck)
    assert "bad" not in repr(events[0])
    assert server_auth.handle(auth.password_request("alice", "secret")) == []  # waits its turn
    assert sent == []
    later = server_auth.password_checked(events[0], False)
    assert isinstance(later[0], auth.AuthFailed) and isinstance(later[1], auth.PasswordCheck)
    assert sent == [messages.UserauthFailure(("publickey", "password", "keyboard-interactive"), False)]
    assert [type(e) for e in server_auth.password_checked(later[1], True)] == [auth.AuthSucceeded]


async def ask(sock: socket.socket, op: str, **fields: object) -> dict:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, json.dumps({"op": op, **fields}).encode())
    return json.loads(await asyncio.wait_for(loop.sock_recv(sock, 65536), 5))


@pytest.mark.parametrize("methods", [["publickey,publickey"], ["any"]])
def test_monitor_grants_the_helper_only_after_every_method(tmp_path: Path, methods: list[str]) -> None:
    user = getpass.getuser()
    host_key = keys.generate_private_key("ssh-ed25519")
    first, second = keys.generate_private_key("ssh-ed25519"), keys.generate_private_key("ssh-ed25519")
    authorized = tmp_path / "authorized_keys"
    authorized.write_text("".join(f"{k.public.key_type} {_b64(k.public.blob)}\n" for k in (first, second)))
    policy = ServerPolicy(authorized_keys_files=(str(authorized),), authentication_methods=methods)
    options = ServerOptions(host_keys=(host_key,), policy=policy)

    async def check_signed(theirs: socket.socket, key: keys.PrivateKey) -> bool:
        signature = key.sign(auth.publickey_signed_data(SESSION_ID, user, ALG, key.public.blob), ALG)
        fields = {"user": user, "key": _b64(key.public.blob), "alg": ALG, "signature": _b64(signature)}
        return bool((await ask(theirs, "check_signed", **fields))["ok"])

    async def run() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.setblocking(False)
        monitor = Monitor(ours, options, "127.0.0.1")
        try:
            await ask(theirs, "sign", key=_b64(host_key.public.blob), data=_b64(SESSION_ID), alg=ALG)
            assert await check_signed(theirs, first)
            if methods == ["any"]:
                assert monitor.user == user
                return
            assert monitor.user is None  # one key of two: no helper yet
            assert not await check_signed(theirs, first)  # the same key again does not count
            assert monitor.user is None
            assert await check_signed(theirs, second)
            assert monitor.user == user
        finally:
            monitor.close()
            theirs.close()

    asyncio.run(run())


def test_blocking_password_failures_count_toward_max_auth_tries() -> None:
    server_auth, _ = server(FakePolicy(["any"], [], blocks=True))
    check = server_auth.handle(auth.password_request("alice", "bad"))[0]
    assert isinstance(server_auth.password_checked(check, False)[0], auth.AuthFailed)
    for _ in range(auth.limits.MAX_AUTH_ATTEMPTS - 2):
        server_auth.password_checked(server_auth.handle(auth.password_request("alice", "bad"))[0], False)
    with pytest.raises(auth.TooManyAuthFailures):
        server_auth.password_checked(server_auth.handle(auth.password_request("alice", "bad"))[0], False)
