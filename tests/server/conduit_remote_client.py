"""sshconduit as an ``ssh -N -R 0:HOST:PORT`` client (the conduit CLI has no -R yet): for the ClientAlive tests.

usage: conduit_remote_client.py SERVER_PORT KEY_FILE USER DEST_HOST DEST_PORT
Prints ssh's "Allocated port N for remote forward to HOST:PORT" line, then serves forwarded-tcpip channels by
connecting them to HOST:PORT until the connection ends.
"""

from __future__ import annotations

import asyncio
import sys

import sshconduit
from sshconduit import messages
from sshconduit.forward import direct


async def main(server_port: int, key_file: str, user: str, host: str, port: int) -> int:
    client = await sshconduit.connect(
        "127.0.0.1", server_port, username=user, client_keys=[key_file], known_hosts=(), strict_host_key_checking="no"
    )

    async def opener(conn, event):  # type: ignore[no-untyped-def]
        return await direct.connect_tcp(host, port, f"forwarded-tcpip to {host}:{port}")

    client.conn._channel_opener = opener  # the public API has no remote forward yet
    ok, data = await client.conn.global_request("tcpip-forward", messages.TcpipForward("127.0.0.1", 0).encode())
    if not ok:
        print("Error: remote port forwarding failed for listen port 0", file=sys.stderr, flush=True)
        return 255
    allocated = int.from_bytes(data[:4], "big")
    print(f"Allocated port {allocated} for remote forward to {host}:{port}", flush=True)
    await client.wait_closed()
    return 255


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(asyncio.run(main(int(args[0]), args[1], args[2], args[3], int(args[4]))))
