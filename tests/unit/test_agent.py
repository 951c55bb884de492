"""agent.py against a real OpenSSH ssh-agent on a temporary socket."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sshconduit import wire
from sshconduit.agent import AgentClient, AgentError
from sshconduit.crypto.keys import generate_private_key, load_public_key_file

KEYGEN = {
    "ssh-ed25519": ["-t", "ed25519"],
    "ecdsa-sha2-nistp256": ["-t", "ecdsa", "-b", "256"],
    "ecdsa-sha2-nistp521": ["-t", "ecdsa", "-b", "521"],
    "ssh-rsa": ["-t", "rsa", "-b", "2048"],
}
T = TypeVar("T")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("agent")
    sock = str(directory / "agent.sock")
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("ssh-agent did not start")
            time.sleep(0.02)
        env = dict(os.environ, SSH_AUTH_SOCK=sock)
        for key_type, args in KEYGEN.items():
            path = directory / key_type
            subprocess.run(
                ["ssh-keygen", "-q", *args, "-N", "", "-C", f"comment {key_type}", "-f", str(path)],
                check=True,
                capture_output=True,
                timeout=60,
            )
            subprocess.run(["ssh-add", "-q", str(path)], env=env, check=True, capture_output=True, timeout=30)
        yield sock, directory
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_identities_match_the_added_keys(agent: tuple[str, Path]) -> None:
    sock, directory = agent

    async def go() -> list:
        client = await AgentClient.connect(sock)
        assert client is not None
        try:
            return await client.identities()
        finally:
            client.close()

    identities = run(go())
    expected = {load_public_key_file(directory / f"{t}.pub"): f"comment {t}" for t in KEYGEN}
    assert dict(identities) == expected
    assert len(identities) == len(KEYGEN)


def test_signatures_verify_for_every_key_and_algorithm(agent: tuple[str, Path]) -> None:
    sock, _ = agent
    data = b"session id and userauth request"

    async def go() -> None:
        async with await AgentClient.connect(sock) as client:
            for key, _comment in await client.identities():
                for alg in key.signature_algorithms():
                    if alg == "ssh-rsa":
                        continue
                    signature = await client.sign(key, data, alg)
                    assert wire.Reader(signature).text() == alg
                    assert key.verify(data, signature, alg)
                    assert not key.verify(data + b"!", signature, alg)

    run(go())


def test_agent_refuses_unknown_key_and_bad_algorithm(agent: tuple[str, Path]) -> None:
    sock, _ = agent
    stranger = generate_private_key().public

    async def go() -> None:
        async with await AgentClient.connect(sock) as client:
            with pytest.raises(AgentError):
                await client.sign(stranger, b"x", "ssh-ed25519")
            with pytest.raises(AgentError):
                await client.sign(stranger, b"x", "rsa-sha2-256")
            # the connection still works after a refusal
            assert len(await client.identities()) == len(KEYGEN)

    run(go())


def test_connect_without_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    assert run(AgentClient.connect()) is None
    assert run(AgentClient.connect(str(tmp_path / "nothing.sock"))) is None


def test_connect_uses_ssh_auth_sock(agent: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    sock, _ = agent
    monkeypatch.setenv("SSH_AUTH_SOCK", sock)

    async def go() -> int:
        client = await AgentClient.connect()
        assert client is not None
        try:
            return len(await client.identities())
        finally:
            client.close()

    assert run(go()) == len(KEYGEN)


def test_oversized_or_garbage_reply_is_an_error(tmp_path: Path) -> None:
    """A fake agent that answers with a length over the limit, then one with a truncated body."""
    sock = str(tmp_path / "fake.sock")

    async def go() -> None:
        replies = [wire.pack_u32(10_000_000), wire.pack_u32(9) + bytes([12]) + wire.pack_u32(1)]

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(5)
            writer.write(replies.pop(0))
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(handle, sock)
        async with server:
            for _ in range(2):
                client = await AgentClient.connect(sock)
                assert client is not None
                with pytest.raises(AgentError):
                    await client.identities()
                client.close()

    run(go())
