"""ssh-agent client (draft-miller-ssh-agent): list identities and ask for signatures over a unix socket.

Messages are ``uint32 length || byte type || payload``; requests are answered in order, so one request
is in flight at a time.
"""

from __future__ import annotations

import asyncio
import os

from . import limits, wire
from .crypto.keys import RSA_SHA256, RSA_SHA512, PublicKey, parse_public_blob
from .errors import KeyError_, ProtocolError

SSH_AGENT_FAILURE = 5
SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENT_IDENTITIES_ANSWER = 12
SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14

SSH_AGENT_RSA_SHA2_256 = 2
SSH_AGENT_RSA_SHA2_512 = 4
_SIGN_FLAGS = {RSA_SHA256: SSH_AGENT_RSA_SHA2_256, RSA_SHA512: SSH_AGENT_RSA_SHA2_512}


class AgentError(KeyError_):
    """The agent refused a request, answered garbage, or went away."""


class AgentClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str | None = None) -> AgentClient | None:
        """Connect to `path` or $SSH_AUTH_SOCK; None when there is no agent to talk to."""
        path = path or os.environ.get("SSH_AUTH_SOCK")
        if not path:
            return None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout=limits.AGENT_TIMEOUT)
        except (OSError, TimeoutError):
            return None
        return cls(reader, writer)

    async def _request(self, message: bytes) -> tuple[int, wire.Reader]:
        async with self._lock:
            try:
                self._writer.write(wire.string(message))
                await asyncio.wait_for(self._writer.drain(), limits.AGENT_TIMEOUT)
                header = await asyncio.wait_for(self._reader.readexactly(4), limits.AGENT_TIMEOUT)
                length = wire.Reader(header).uint32()
                if not 1 <= length <= limits.MAX_AGENT_MESSAGE:
                    raise AgentError(f"agent sent a message of bad length {length}")
                body = await asyncio.wait_for(self._reader.readexactly(length), limits.AGENT_TIMEOUT)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self.close()
                raise AgentError(f"agent connection failed: {exc!r}") from None
        reader = wire.Reader(body)
        return reader.byte(), reader

    async def identities(self) -> list[tuple[PublicKey, str]]:
        """The agent's keys with their comments; keys we cannot use (certificates, DSA, FIDO) are skipped."""
        kind, reader = await self._request(wire.byte(SSH_AGENTC_REQUEST_IDENTITIES))
        if kind != SSH_AGENT_IDENTITIES_ANSWER:
            raise AgentError(f"agent refused to list identities (reply type {kind})")
        result: list[tuple[PublicKey, str]] = []
        try:
            count = reader.uint32()
            if count > limits.MAX_AGENT_IDENTITIES:
                raise AgentError(f"agent claims {count} identities")
            for _ in range(count):
                blob = reader.string()
                comment = reader.string().decode("utf-8", "replace")
                try:
                    result.append((parse_public_blob(blob), comment))
                except KeyError_:
                    continue
            reader.expect_end()
        except ProtocolError as exc:
            raise AgentError(f"malformed identities answer from agent: {exc}") from None
        return result

    async def sign(self, key: PublicKey, data: bytes, algorithm: str) -> bytes:
        """Signature blob over `data` by `key` with `algorithm` (rsa-sha2-* set the agent's flags)."""
        if algorithm not in key.signature_algorithms():
            raise AgentError(f"{algorithm} is not a signature algorithm for a {key.key_type} key")
        flags = _SIGN_FLAGS.get(algorithm, 0)
        request = wire.byte(SSH_AGENTC_SIGN_REQUEST) + wire.string(key.blob) + wire.string(data)
        kind, reader = await self._request(request + wire.pack_u32(flags))
        if kind != SSH_AGENT_SIGN_RESPONSE:
            raise AgentError(f"agent refused to sign with {key.label} key {key.fingerprint()}")
        try:
            signature = reader.string()
            reader.expect_end()
            sig_alg = wire.Reader(signature).text()
        except ProtocolError as exc:
            raise AgentError(f"malformed sign response from agent: {exc}") from None
        # An old agent may ignore the flags and answer ssh-rsa; the peer would reject it, so say so here.
        if sig_alg != algorithm:
            raise AgentError(f"agent signed with {sig_alg} instead of {algorithm}")
        return signature

    def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
