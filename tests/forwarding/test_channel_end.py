"""How a -L connection's channel ends. Each side sends EOF when its socket reaches EOF, and CLOSE once both
directions are done; between sshconduit peers the side whose EOF would come last sends CLOSE alone (RFC 4254 5.3
allows it), one packet fewer per connection. With sshd on the other side both packets go, as OpenSSH sends them.
The application sees the same bytes and the same half-close either way."""

from __future__ import annotations

import asyncio
import hashlib
import socket

import pytest
from conftest import USER, recv_until_eof, serve_each

import sshconduit
from sshconduit import connection, messages

WAIT = 10.0  # seconds a channel may take to finish closing


class EndProbe:
    """The EOFs and CLOSEs this process's connection layer receives and sends, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[str] = []
        layer = connection.ConnectionLayer
        for name, label in (("_on_eof", "got eof"), ("_on_close", "got close")):
            monkeypatch.setattr(layer, name, self._recording(getattr(layer, name), label))
        original_send_eof, original_close = layer.send_eof, layer.close

        def send_eof(this: connection.ConnectionLayer, local_id: int) -> None:
            self.seen.append("sent eof")
            original_send_eof(this, local_id)

        def close(this: connection.ConnectionLayer, local_id: int) -> None:
            self.seen.append("sent close")
            original_close(this, local_id)

        monkeypatch.setattr(layer, "send_eof", send_eof)
        monkeypatch.setattr(layer, "close", close)

    def _recording(self, method, label: str):  # type: ignore[no-untyped-def]
        def recorded(this: connection.ConnectionLayer, msg: messages.Message) -> list[connection.Event]:
            self.seen.append(label)
            return method(this, msg)  # type: ignore[no-any-return]

        return recorded


def services() -> tuple[socket.socket, socket.socket]:
    """One that reads to EOF and then answers (the client ends first), one that greets and hangs up."""
    answering, greeting = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))

    def answer(conn: socket.socket) -> None:
        with conn:
            conn.sendall(hashlib.sha256(recv_until_eof(conn, 20)).digest())

    def greet(conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"hello, and goodbye")

    serve_each(answering, answer)
    serve_each(greeting, greet)
    return answering, greeting


async def until_channels_closed(client: sshconduit.SSHClient) -> None:
    channels = client.conn.channels
    assert channels is not None
    for _ in range(int(WAIT / 0.01)):
        if not channels.channel_ids():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"channels still open after {WAIT}s: {channels.channel_ids()}")


@pytest.mark.parametrize("server_kind", ["conduitd", "sshd"])
def test_the_last_side_to_end_sends_close_alone_only_between_sshconduit_peers(
    server_kind, keyset, conduitd_server, openssh_server, monkeypatch
):
    probe = EndProbe(monkeypatch)
    answering, greeting = services()

    def client_ends_first(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"request")
            s.shutdown(socket.SHUT_WR)
            return recv_until_eof(s, 20)

    def service_ends_first(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            return recv_until_eof(s, 20)  # then close, after the service's EOF

    async def main(port: int) -> tuple[bytes, list[str], bytes, list[str]]:
        client = await sshconduit.connect("127.0.0.1", port, username=USER, client_keys=[str(keyset.client_key)],
                                          known_hosts=(), strict_host_key_checking="no")  # fmt: skip
        async with (
            client,
            client.forward_local(0, "127.0.0.1", answering.getsockname()[1]) as to_answering,
            client.forward_local(0, "127.0.0.1", greeting.getsockname()[1]) as to_greeting,
        ):
            answer = await asyncio.to_thread(client_ends_first, to_answering.port)
            await until_channels_closed(client)
            first, probe.seen = probe.seen, []
            greeting_seen = await asyncio.to_thread(service_ends_first, to_greeting.port)
            await until_channels_closed(client)
            return answer, first, greeting_seen, probe.seen

    start = conduitd_server if server_kind == "conduitd" else openssh_server
    with start() as daemon:
        answer, first, greeting_seen, second = asyncio.run(main(daemon.port))
    answering.close()
    greeting.close()
    assert answer == hashlib.sha256(b"request").digest()
    assert greeting_seen == b"hello, and goodbye"
    if server_kind == "conduitd":
        assert first == ["sent eof", "got close"]  # the server's EOF would have come last: CLOSE alone
        assert second == ["got eof", "sent close", "got close"]  # ours would have: CLOSE alone
    else:
        assert first == ["sent eof", "got eof", "sent close", "got close"]
        assert second == ["got eof", "sent eof", "sent close", "got close"]
