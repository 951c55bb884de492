"""The privsep monitor's answers: it signs without handing out the key, and it grants a user's helper only after
it verified a login itself (a query, or a signature over another session id, is not one). And the server's end of
a user's helper keeps only the descriptors it asked for."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import getpass
import json
import os
import socket
import warnings
from pathlib import Path

import pytest

from sshconduit import privsep
from sshconduit.auth import publickey_signed_data
from sshconduit.crypto import keys
from sshconduit.policy import ServerPolicy
from sshconduit.privsep_child import Monitor, _b64, _unb64
from sshconduit.server import ServerOptions


async def ask(sock: socket.socket, op: str, **fields: object) -> dict:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, json.dumps({"op": op, **fields}).encode())
    return json.loads(await asyncio.wait_for(loop.sock_recv(sock, 65536), 5))


def test_monitor_verifies_logins_itself(tmp_path: Path) -> None:
    user = getpass.getuser()
    host_key = keys.generate_private_key("ssh-ed25519")
    client_key = keys.generate_private_key("ssh-ed25519")
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(f"{client_key.public.key_type} {_b64(client_key.public.blob)}\n")
    options = ServerOptions(host_keys=(host_key,), policy=ServerPolicy(authorized_keys_files=(str(authorized),)))
    alg = "ssh-ed25519"
    blob = client_key.public.blob

    async def run() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.setblocking(False)
        monitor = Monitor(ours, options, "127.0.0.1")
        try:
            assert not (await ask(theirs, "start_helper"))["ok"]  # nobody has logged in
            listed = await ask(theirs, "host_keys")
            assert [_unb64(k) for k in listed["keys"]] == [host_key.public.blob]
            message = _b64(b"any message of 25 bytes..")
            assert not (await ask(theirs, "sign", key=_b64(host_key.public.blob), data=message, alg=alg))["ok"]
            session_id, later = b"H" * 32, b"K" * 32
            for data in (session_id, later):  # a rekey signs again; the session id stays the first hash
                reply = await ask(theirs, "sign", key=_b64(host_key.public.blob), data=_b64(data), alg=alg)
                assert host_key.public.verify(data, _unb64(reply["signature"]), alg)
            assert (await ask(theirs, "check_publickey", user=user, key=_b64(blob)))["ok"]
            assert monitor.user is None  # a query authenticates nobody
            forged = client_key.sign(publickey_signed_data(later, user, alg, blob), alg)
            reply = await ask(theirs, "check_signed", user=user, key=_b64(blob), alg=alg, signature=_b64(forged))
            assert not reply["ok"] and monitor.user is None
            assert not (await ask(theirs, "start_helper"))["ok"]
            good = client_key.sign(publickey_signed_data(session_id, user, alg, blob), alg)
            reply = await ask(theirs, "check_signed", user=user, key=_b64(blob), alg=alg, signature=_b64(good))
            assert reply["ok"] and monitor.user == user
            assert reply["options"] is not None
        finally:
            monitor.close()
            theirs.close()

    asyncio.run(run())


def test_forward_helper_closes_descriptors_a_reply_carries_beyond_its_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply to a one-socket request carries one descriptor; any more that a reply brings are closed at once,
    not left to the garbage (a helper runs as the user, so its replies are not trusted to be well formed)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monkeypatch.setattr(privsep, "helper_source", lambda: ours)
    credentials = privsep.Credentials(getpass.getuser(), os.getuid(), os.getgid(), (), "/")

    async def run() -> socket.socket:
        helper = privsep.ForwardHelper(credentials)
        try:
            request = asyncio.ensure_future(helper.connect_unix("/nowhere"))
            asked = json.loads(await asyncio.wait_for(asyncio.get_running_loop().sock_recv(theirs, 65536), 5))
            reply = json.dumps({"id": asked["id"], "errno": 0}).encode()
            with contextlib.ExitStack() as sent:
                socks = [sent.enter_context(socket.socket()) for _ in range(3)]
                socket.send_fds(theirs, [reply], [s.fileno() for s in socks])
            return await asyncio.wait_for(request, 5)
        finally:
            helper.close()

    theirs.setblocking(False)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with asyncio.run(run()) as received:
                assert received.type == socket.SOCK_STREAM
            gc.collect()
        assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    finally:
        theirs.close()
