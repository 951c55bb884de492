"""The Python API: async forwards as context managers with counters, and the blocking Tunnel for scripts."""

from __future__ import annotations

import asyncio
import gc

from conftest import USER, echo_through

import sshconduit


def test_async_forward_counts_connections_and_bytes(keyset, conduitd_server, echo_server):
    async def main(port: int) -> tuple[int, int, int, int]:
        client = await sshconduit.connect("127.0.0.1", port, username=USER, client_keys=[str(keyset.client_key)],
                                          known_hosts=(), strict_host_key_checking="no")  # fmt: skip
        async with client, client.forward_local(0, "127.0.0.1", echo_server.port) as fwd:
            for _ in range(3):
                data = await asyncio.to_thread(echo_through, fwd.port, b"z" * 70000)
                assert data == b"z" * 70000
            for _ in range(50):  # the last channel's close may still be on its way
                if fwd.counters.active == 0:
                    break
                await asyncio.sleep(0.02)
            c = fwd.counters
            return c.connections, c.active, c.bytes_out, c.bytes_in

    with conduitd_server() as daemon:
        connections, active, out, inn = asyncio.run(main(daemon.port))
    assert (connections, active, out, inn) == (3, 0, 210000, 210000)


def test_blocking_tunnel(keyset, openssh_server, echo_server):
    with openssh_server() as daemon:
        tunnel = sshconduit.Tunnel("127.0.0.1", 0, "127.0.0.1", echo_server.port, port=daemon.port, username=USER,
                                   client_keys=[str(keyset.client_key)], known_hosts=(),
                                   strict_host_key_checking="no")  # fmt: skip
        with tunnel:
            assert tunnel.port
            assert echo_through(tunnel.port, b"sync api") == b"sync api"


def test_closed_forward_connections_are_freed_without_the_garbage_collector(keyset, conduitd_server, echo_server):
    """A forwarded connection's bridge and socket side hold each other until the socket closes; after that
    nothing of the connection may stay alive waiting for a collection pass (memory with 10,000 channels)."""
    from sshconduit.forward.bridge import StreamBridge

    def live_bridges() -> int:
        return sum(isinstance(o, StreamBridge) for o in gc.get_objects())

    async def main(port: int) -> int:
        client = await sshconduit.connect("127.0.0.1", port, username=USER, client_keys=[str(keyset.client_key)],
                                          known_hosts=(), strict_host_key_checking="no")  # fmt: skip
        async with client, client.forward_local(0, "127.0.0.1", echo_server.port) as fwd:
            for _ in range(3):
                assert await asyncio.to_thread(echo_through, fwd.port, b"freed") == b"freed"
            for _ in range(100):  # each socket's connection_lost runs a loop turn after its close
                if fwd.counters.active == 0 and live_bridges() == 0:
                    break
                await asyncio.sleep(0.02)
            assert fwd.counters.connections == 3
            return live_bridges()

    gc.collect()
    gc.disable()
    try:
        with conduitd_server() as daemon:
            assert asyncio.run(main(daemon.port)) == 0
    finally:
        gc.enable()
