#!/usr/bin/env python3
"""AsyncSSH's client forwarding with a chosen cipher, for bench/run.py's asyncssh/gcm row (the shared peer
script, ../shared/bench/peers/asyncssh-forward, takes no cipher). Same connection and forward as that script.

    asyncssh_client.py CIPHER LPORT DHOST DPORT SSHPORT KEY
"""

import asyncio
import sys

import asyncssh


async def forward(cipher: str, lport: str, dhost: str, dport: str, sshport: str, key: str) -> None:
    async with asyncssh.connect(
        "127.0.0.1", int(sshport), username="root", client_keys=[key], known_hosts=None, encryption_algs=[cipher]
    ) as conn:
        listener = await conn.forward_local_port("127.0.0.1", int(lport), dhost, int(dport))
        await listener.wait_closed()


if __name__ == "__main__":
    asyncio.run(forward(*sys.argv[1:7]))
