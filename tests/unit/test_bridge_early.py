"""A forwarded socket is read before its channel opens: bounded buffering instead of a pause per connection."""

from __future__ import annotations

from sshconduit import limits
from sshconduit.forward.bridge import StreamBridge


class FakeSocket:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def write(self, data: bytes) -> None:
        self.calls.append(f"write {data!r}")

    def writelines(self, parts: list[bytes]) -> None:
        self.calls.append(f"writelines {b''.join(parts)!r}")

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.calls.append("eof")

    def close(self) -> None:
        self.calls.append("close")


class FakeConnection:
    """Takes at most ``window`` bytes of channel data, like a peer's window."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.sent: list[bytes] = []
        self.eofs = 0
        self.batch_end: list = []
        self.batch_last: list = []
        self.consumed_bytes = 0
        self.closed: list[int] = []
        self.peer_is_us = False

    def at_batch_end(self, callback, last: bool = False) -> None:  # type: ignore[no-untyped-def]
        (self.batch_last if last else self.batch_end).append(callback)

    def end_batch(self) -> None:  # as SSHConnection: the "last" callbacks after the others
        callbacks, self.batch_end, self.batch_last = self.batch_end + self.batch_last, [], []
        for callback in callbacks:
            callback()

    def consumed(self, channel_id: int, nbytes: int) -> None:
        self.consumed_bytes += nbytes

    def send_data(self, channel_id: int, data: bytes | memoryview) -> int:
        n = min(len(data), self.window)
        self.window -= n
        if n:
            self.sent.append(bytes(data[:n]))
        return n

    def send_eof(self, channel_id: int) -> None:
        self.eofs += 1

    def close_channel(self, channel_id: int) -> None:
        self.closed.append(channel_id)


def make_bridge(window: int) -> tuple[StreamBridge, FakeSocket, FakeConnection]:
    bridge = StreamBridge("test")
    conn = FakeConnection(window)
    bridge.bind(conn, 0)  # type: ignore[arg-type]
    sock = FakeSocket()
    bridge.socket_made(sock)  # type: ignore[arg-type]
    return bridge, sock, conn


def test_a_new_socket_is_not_paused_and_early_bytes_go_out_in_order_on_open() -> None:
    bridge, sock, conn = make_bridge(window=1 << 30)
    bridge.socket_data(b"first ")
    bridge.socket_data(b"second")
    assert sock.calls == []  # no pause/resume pair on the critical path of each connection
    assert conn.sent == []  # nothing before the open is confirmed
    bridge.opened(b"")
    assert b"".join(conn.sent) == b"first second"
    assert sock.calls == []
    bridge.socket_data(b" third")
    assert b"".join(conn.sent) == b"first second third"


def test_early_bytes_past_the_bound_pause_reading_until_the_channel_opens() -> None:
    bridge, sock, conn = make_bridge(window=1 << 30)
    chunk = b"x" * 65536
    chunks = limits.MAX_EARLY_SOCKET_BYTES // len(chunk) + 1
    for _ in range(chunks):
        bridge.socket_data(chunk)
    assert sock.calls == ["pause"]
    bridge.socket_data(chunk)  # a read already under way when the pause came: kept, no second pause
    assert sock.calls == ["pause"]
    bridge.opened(b"")
    assert sum(map(len, conn.sent)) == (chunks + 1) * len(chunk)
    assert sock.calls == ["pause", "resume"]


def test_early_bytes_beyond_the_peer_window_wait_for_window_adjust() -> None:
    bridge, sock, conn = make_bridge(window=10)
    bridge.socket_data(b"0123456789abcdef")
    bridge.socket_eof()
    bridge.opened(b"")
    assert conn.sent == [b"0123456789"]
    assert sock.calls == ["pause"]  # the window shut: stop reading
    assert conn.eofs == 0  # EOF only after every byte went out
    conn.window = 100
    bridge.window_opened()
    assert b"".join(conn.sent) == b"0123456789abcdef"
    assert conn.eofs == 1
    assert sock.calls == ["pause"]  # the socket already sent EOF: nothing to resume


def test_the_packets_of_one_read_reach_the_socket_in_one_write_and_before_the_eof() -> None:
    bridge, sock, conn = make_bridge(window=1 << 30)
    for part in (b"one ", b"two ", b"three"):
        bridge.data_received(part, None)
    assert sock.calls == []  # nothing written per packet
    conn.end_batch()
    assert sock.calls == ["writelines b'one two three'"]
    assert conn.consumed_bytes == len(b"one two three")
    bridge.data_received(b"last", None)
    bridge.eof_received()  # EOF in the same read: the data goes out first
    conn.end_batch()
    assert sock.calls[1:] == ["write b'last'", "eof"]


def test_a_socket_lost_after_the_channel_closed_leaves_the_channel_number_alone() -> None:
    """The socket's connection_lost comes a loop turn after close_received; by then a new channel may have the
    same number (the lowest free one is reused), and closing "our" channel would close that one."""
    bridge, _sock, conn = make_bridge(window=1 << 30)
    bridge.opened(b"")
    bridge.close_received()
    bridge.socket_lost()
    assert conn.closed == []
    bridge, _sock, conn = make_bridge(window=1 << 30)
    bridge.opened(b"")
    bridge.socket_lost()  # the socket went first: the channel must be closed
    assert conn.closed == [0]


def test_the_side_that_ends_last_sends_close_alone_to_sshconduit_and_eof_then_close_to_others() -> None:
    """The peer's EOF came first; our socket's EOF ends both directions. To an sshconduit peer a CLOSE alone says
    that (one packet fewer per connection); another peer gets EOF then CLOSE, as OpenSSH sends them."""
    for peer_is_us, eofs in ((True, 0), (False, 1)):
        bridge, _sock, conn = make_bridge(window=1 << 30)
        conn.peer_is_us = peer_is_us
        bridge.opened(b"")
        bridge.socket_data(b"request")
        bridge.eof_received()
        conn.end_batch()
        bridge.socket_eof()
        assert (conn.sent, conn.eofs, conn.closed) == ([b"request"], eofs, [0])
    # the other order (our EOF first) sends EOF to either peer: the channel stays open for the peer's reply
    bridge, _sock, conn = make_bridge(window=1 << 30)
    conn.peer_is_us = True
    bridge.opened(b"")
    bridge.socket_eof()
    assert (conn.eofs, conn.closed) == (1, [])
    bridge.eof_received()
    assert conn.closed == [0]
