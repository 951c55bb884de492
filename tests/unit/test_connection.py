"""ConnectionLayer: two layers back to back through an in-memory pipe of encoded payloads."""

from __future__ import annotations

from collections import Counter, deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sshconduit import limits, messages
from sshconduit.connection import (
    ChannelClosedError,
    ChannelCloseReceived,
    ChannelDataReceived,
    ChannelEofReceived,
    ChannelOpened,
    ChannelOpenFailed,
    ChannelOpenRequest,
    ChannelRequestReceived,
    ChannelRequestReplied,
    ChannelWindowOpened,
    ConnectionLayer,
    Event,
    GlobalRequestReceived,
    GlobalRequestReplied,
)
from sshconduit.errors import ChannelOpenError, ProtocolError


class Side:
    """One layer plus the payloads it has sent and not yet delivered, and what it has received."""

    def __init__(self, name: str, max_channels: int = limits.MAX_CHANNELS) -> None:
        self.name = name
        self.outbox: deque[bytes] = deque()
        self.sent_types: Counter[int] = Counter()
        self.part_types: list[type] = []
        self.layer = ConnectionLayer(self._send, max_channels=max_channels)
        self.events: list[Event] = []

    def _send(self, *parts: bytes | memoryview) -> None:
        self.part_types.extend(type(p) for p in parts)
        payload = b"".join(parts)  # what the transport would encrypt as one packet
        self.sent_types[payload[0]] += 1
        self.outbox.append(payload)


class Pair:
    def __init__(self, max_channels: int = limits.MAX_CHANNELS) -> None:
        self.a = Side("a")
        self.b = Side("b", max_channels)

    def deliver(self, src: Side, dst: Side, count: int | None = None) -> list[Event]:
        """Move up to ``count`` payloads (all when None) from src to dst, decoding them with the codec."""
        new: list[Event] = []
        moved = 0
        while src.outbox and (count is None or moved < count):
            msg = messages.decode_message(src.outbox.popleft())
            new.extend(dst.layer.handle(msg))
            moved += 1
        dst.events.extend(new)
        return new

    def pump(self) -> tuple[list[Event], list[Event]]:
        """Deliver both ways until quiet; returns the new events at a and at b."""
        at_a: list[Event] = []
        at_b: list[Event] = []
        for _ in range(10_000):
            if not self.a.outbox and not self.b.outbox:
                return at_a, at_b
            at_b += self.deliver(self.a, self.b)
            at_a += self.deliver(self.b, self.a)
        raise AssertionError("pipe never went quiet")

    def open(self, window: int = limits.DEFAULT_WINDOW, max_packet: int = limits.DEFAULT_MAX_PACKET, **kw):
        """a opens a channel, b accepts it with the given window; returns (a's id, b's id)."""
        a_id = self.a.layer.open_channel("direct-tcpip", b"td", **kw)
        (request,) = self.deliver(self.a, self.b)
        assert isinstance(request, ChannelOpenRequest)
        self.b.layer.accept_channel(request.channel_id, window=window, max_packet=max_packet)
        (opened,) = self.deliver(self.b, self.a)
        assert opened == ChannelOpened(a_id, b"")
        return a_id, request.channel_id


def received(events: list[Event], channel_id: int, data_type: int | None = None) -> bytes:
    return b"".join(
        e.data
        for e in events
        if isinstance(e, ChannelDataReceived) and e.channel_id == channel_id and e.data_type == data_type
    )


# --- open / accept / reject ---


def test_open_accept_carries_parameters() -> None:
    p = Pair()
    a_id = p.a.layer.open_channel("direct-tcpip", b"\x00\x01", window=5000, max_packet=700)
    assert a_id == 0 and not p.a.layer.is_open(a_id)
    (req,) = p.deliver(p.a, p.b)
    assert req == ChannelOpenRequest(0, "direct-tcpip", b"\x00\x01", 5000, 700)
    p.b.layer.accept_channel(req.channel_id, window=9000, max_packet=1234, type_data=b"xy")
    (opened,) = p.deliver(p.b, p.a)
    assert opened == ChannelOpened(a_id, b"xy")
    assert p.a.layer.is_open(a_id) and p.b.layer.is_open(req.channel_id)
    assert p.a.layer.peer_window(a_id) == 9000 and p.a.layer.peer_max_packet(a_id) == 1234
    assert p.b.layer.peer_window(req.channel_id) == 5000 and p.b.layer.peer_max_packet(req.channel_id) == 700
    assert p.a.layer.remote_id(a_id) == req.channel_id and p.b.layer.remote_id(req.channel_id) == a_id


def test_reject_frees_ids_both_sides() -> None:
    p = Pair()
    a_id = p.a.layer.open_channel("session")
    (req,) = p.deliver(p.a, p.b)
    p.b.layer.reject_channel(req.channel_id, 1, "administratively prohibited")
    assert p.b.layer.channel_ids() == []
    (failed,) = p.deliver(p.b, p.a)
    assert failed == ChannelOpenFailed(a_id, 1, "administratively prohibited")
    assert p.a.layer.channel_ids() == []
    assert p.a.layer.open_channel("session") == a_id  # reused


def test_max_channels_rejects_automatically_without_event() -> None:
    p = Pair(max_channels=2)
    ids = [p.a.layer.open_channel("direct-tcpip") for _ in range(3)]
    at_b = p.deliver(p.a, p.b)
    assert [type(e) for e in at_b] == [ChannelOpenRequest, ChannelOpenRequest]
    at_a = p.deliver(p.b, p.a)
    assert at_a == [ChannelOpenFailed(ids[2], 4, "too many channels")]
    with pytest.raises(ChannelOpenError):
        p.b.layer.open_channel("x")  # b's table is full for its own opens too


def test_close_before_confirmation_closes_after_it() -> None:
    p = Pair()
    a_id = p.a.layer.open_channel("session")
    p.a.layer.close(a_id)
    (req,) = p.deliver(p.a, p.b)
    p.b.layer.accept_channel(req.channel_id)
    at_a, at_b = p.pump()
    assert at_a == [ChannelCloseReceived(a_id)] and at_b == [ChannelCloseReceived(req.channel_id)]
    assert p.a.sent_types[messages.ChannelClose.ID] == 1 and p.b.sent_types[messages.ChannelClose.ID] == 1
    assert p.a.layer.channel_ids() == [] and p.b.layer.channel_ids() == []


# --- data and windows ---


def test_data_both_ways_window_exhaustion_and_resumption() -> None:
    p = Pair()
    a_id, b_id = p.open(window=100_000, max_packet=32_768)
    payload = bytes(range(256)) * 1200  # 307,200 bytes
    sent = p.a.layer.send_data(a_id, payload)
    assert sent == 100_000 and p.a.layer.send_window(a_id) == 0
    assert p.a.layer.send_data(a_id, payload[sent:]) == 0
    at_b = p.deliver(p.a, p.b)
    assert [len(e.data) for e in at_b] == [32_768, 32_768, 32_768, 1696]
    assert received(at_b, b_id) == payload[:sent]
    p.b.layer.consumed(b_id, 49_999)  # below half of the window: no adjust yet
    assert not p.b.outbox
    p.b.layer.consumed(b_id, 1)
    assert p.deliver(p.b, p.a) == [ChannelWindowOpened(a_id)]
    assert p.a.layer.send_window(a_id) == 50_000
    got = p.a.layer.send_data(a_id, memoryview(payload)[sent:])
    assert got == 50_000
    sent += got
    p.b.layer.consumed(b_id, 50_000)
    p.pump()
    p.b.layer.consumed(b_id, 50_000)
    p.pump()
    sent += p.a.layer.send_data(a_id, payload[sent:])
    p.pump()
    assert received(p.b.events, b_id) == payload[:sent] and sent == 250_000
    # and the other way, with stderr
    assert p.b.layer.send_data(b_id, b"hello") == 5
    assert p.b.layer.send_extended_data(b_id, b"oops", 1) == 4
    at_a, _ = p.pump()
    assert received(at_a, a_id) == b"hello" and received(at_a, a_id, 1) == b"oops"


def test_send_splits_at_peer_max_packet_without_copies() -> None:
    p = Pair()
    a_id, _ = p.open(max_packet=1000)
    p.a.part_types.clear()
    data = bytearray(b"z" * 3500)
    assert p.a.layer.send_data(a_id, data) == 3500
    assert p.a.part_types == [bytes, memoryview] * 4
    at_b = p.deliver(p.a, p.b)
    assert [len(e.data) for e in at_b] == [1000, 1000, 1000, 500]
    assert p.a.layer.send_extended_data(a_id, b"e" * 2500) == 2500
    assert [len(e.data) for e in p.deliver(p.a, p.b)] == [1000, 1000, 500]


def test_window_adjusts_are_batched() -> None:
    p = Pair()
    a_id, b_id = p.open()  # 2 MiB window, 32 KiB packets
    data = memoryview(bytes(10 * 1024 * 1024))
    offset = 0
    for _ in range(10_000):
        if offset == len(data):
            break
        offset += p.a.layer.send_data(a_id, data[offset:])
        for event in p.deliver(p.a, p.b):
            p.b.layer.consumed(b_id, len(event.data))  # the application reads every packet at once
        p.deliver(p.b, p.a)
    assert offset == len(data)
    assert len(received(p.b.events, b_id)) == len(data)
    adjusts = p.b.sent_types[messages.ChannelWindowAdjust.ID]
    assert 5 <= adjusts <= 12, adjusts  # ~1 per MiB, not one per 32 KiB packet (320)


def test_window_adjust_overflow_is_a_violation() -> None:
    p = Pair()
    a_id, _ = p.open()
    with pytest.raises(ProtocolError):
        p.a.layer.handle(messages.ChannelWindowAdjust(a_id, limits.MAX_WINDOW))
    assert p.a.layer.handle(messages.ChannelWindowAdjust(a_id, 5)) == []  # window was big: no event


# --- half-close and close ---


def test_half_close_our_eof_first_peer_keeps_sending() -> None:
    p = Pair()
    a_id, b_id = p.open()
    p.a.layer.send_data(a_id, b"request")
    p.a.layer.send_eof(a_id)
    p.a.layer.send_eof(a_id)  # idempotent
    with pytest.raises(ChannelClosedError):
        p.a.layer.send_data(a_id, b"more")
    assert p.a.layer.send_window(a_id) == 0
    _, at_b = p.pump()
    assert at_b == [ChannelDataReceived(b_id, b"request", None), ChannelEofReceived(b_id)]
    p.b.layer.send_data(b_id, b"response")
    p.b.layer.send_eof(b_id)
    at_a, _ = p.pump()
    assert at_a == [ChannelDataReceived(a_id, b"response", None), ChannelEofReceived(a_id)]
    p.b.layer.close(b_id)
    at_a, at_b = p.pump()
    assert at_a == [ChannelCloseReceived(a_id)] and at_b == [ChannelCloseReceived(b_id)]
    assert p.a.sent_types[messages.ChannelEof.ID] == 1 and p.b.sent_types[messages.ChannelClose.ID] == 1
    assert p.a.layer.channel_ids() == [] and p.b.layer.channel_ids() == []


def test_half_close_peer_eof_first_we_keep_sending() -> None:
    p = Pair()
    a_id, b_id = p.open()
    p.b.layer.send_eof(b_id)
    at_a, _ = p.pump()
    assert at_a == [ChannelEofReceived(a_id)]
    assert p.a.layer.send_data(a_id, b"still flowing") == 13
    p.a.layer.close(a_id)
    at_a, at_b = p.pump()
    assert at_b == [ChannelDataReceived(b_id, b"still flowing", None), ChannelCloseReceived(b_id)]
    assert at_a == [ChannelCloseReceived(a_id)]


def test_no_window_adjust_once_the_peer_can_send_no_more() -> None:
    p = Pair()
    a_id, b_id = p.open(window=100)
    assert p.a.layer.send_data(a_id, b"x" * 150) == 100
    p.a.layer.send_eof(a_id)
    p.pump()
    p.b.layer.consumed(b_id, 100)  # all of the window, but after EOF there is nothing to re-open
    assert p.b.sent_types[messages.ChannelWindowAdjust.ID] == 0
    a2, b2 = p.open(window=100)
    p.a.layer.send_data(a2, b"y" * 100)
    p.pump()
    p.b.layer.close(b2)
    p.b.layer.consumed(b2, 100)  # nothing may follow our CLOSE
    assert p.b.sent_types[messages.ChannelWindowAdjust.ID] == 0
    with pytest.raises(ValueError):
        p.b.layer.consumed(b2, 1)  # more than was ever delivered


def test_close_ordering_and_id_reuse() -> None:
    p = Pair()
    a0, b0 = p.open()
    a1, b1 = p.open()
    assert (a0, a1, b0, b1) == (0, 1, 0, 1)
    p.a.layer.close(a0)
    p.a.layer.close(a0)  # CLOSE goes out once
    assert not p.a.layer.is_open(a0)
    with pytest.raises(ChannelClosedError):
        p.a.layer.send_data(a0, b"x")
    assert p.a.layer.open_channel("x") == 2  # 0 is not free until b's CLOSE arrives
    at_b = p.deliver(p.a, p.b)
    assert at_b[0] == ChannelCloseReceived(b0)
    assert at_b[1].channel_id == 0  # b replied CLOSE and freed 0 at once, so a's new open reuses it
    p.b.layer.accept_channel(at_b[1].channel_id)
    at_a = p.deliver(p.b, p.a)
    assert at_a[0] == ChannelCloseReceived(a0) and a0 not in p.a.layer.channel_ids()
    assert p.a.layer.open_channel("x") == 0  # lowest free id reused
    assert p.a.sent_types[messages.ChannelClose.ID] == 1 and p.b.sent_types[messages.ChannelClose.ID] == 1


def test_simultaneous_close_sends_one_close_each() -> None:
    p = Pair()
    a_id, b_id = p.open()
    p.a.layer.send_data(a_id, b"in flight")
    p.a.layer.close(a_id)
    p.b.layer.close(b_id)
    at_a, at_b = p.pump()
    assert at_a == [ChannelCloseReceived(a_id)]
    assert at_b == [ChannelCloseReceived(b_id)]  # the data racing b's CLOSE is dropped, not an error
    assert p.a.sent_types[messages.ChannelClose.ID] == 1 and p.b.sent_types[messages.ChannelClose.ID] == 1
    assert p.a.layer.channel_ids() == [] and p.b.layer.channel_ids() == []


def test_ten_thousand_channels() -> None:
    p = Pair()
    ids = [p.a.layer.open_channel("direct-tcpip") for _ in range(10_000)]
    for event in p.deliver(p.a, p.b):
        p.b.layer.accept_channel(event.channel_id, window=4096, max_packet=1024)
    opened = p.deliver(p.b, p.a)
    assert ids == list(range(10_000)) and len(opened) == 10_000
    assert all(p.a.layer.is_open(i) for i in ids)
    for i in ids[::2]:
        p.a.layer.send_data(i, b"%d" % i)
    _, at_b = p.pump()
    assert received(at_b, 9998) == b"9998"
    for i in ids:
        p.a.layer.close(i)
    at_a, at_b = p.pump()
    assert len(at_a) == len(at_b) == 10_000
    assert p.a.layer.channel_ids() == [] and p.b.layer.channel_ids() == []
    assert p.a.layer.open_channel("again") == 0


# --- requests ---


def test_channel_request_replies_in_order() -> None:
    p = Pair()
    a_id, b_id = p.open()
    p.a.layer.send_request(a_id, "exec", True, messages.ExecReq(b"ls").encode())
    p.a.layer.send_request(a_id, "env", False, b"")
    p.a.layer.send_request(a_id, "keepalive@openssh.com", True)
    _, at_b = p.pump()
    assert at_b == [
        ChannelRequestReceived(b_id, "exec", True, b"\x00\x00\x00\x02ls"),
        ChannelRequestReceived(b_id, "env", False, b""),
        ChannelRequestReceived(b_id, "keepalive@openssh.com", True, b""),
    ]
    p.b.layer.reply_request(b_id, False)
    p.b.layer.reply_request(b_id, True)
    with pytest.raises(ValueError):
        p.b.layer.reply_request(b_id, True)  # only two wanted a reply
    at_a, _ = p.pump()
    assert at_a == [ChannelRequestReplied(a_id, False), ChannelRequestReplied(a_id, True)]


def test_global_request_replies_in_order() -> None:
    p = Pair()
    fwd = messages.TcpipForward("127.0.0.1", 0).encode()
    p.a.layer.global_request("tcpip-forward", True, fwd)
    p.a.layer.global_request("unknown@example.com", True)
    p.a.layer.global_request("no-reply@example.com", False)
    _, at_b = p.pump()
    assert [e.name for e in at_b] == ["tcpip-forward", "unknown@example.com", "no-reply@example.com"]
    assert at_b[0] == GlobalRequestReceived("tcpip-forward", True, fwd)
    p.b.layer.reply_global(True, b"\x00\x00\x30\x39")
    p.b.layer.reply_global(False)
    with pytest.raises(ValueError):
        p.b.layer.reply_global(True)
    at_a, _ = p.pump()
    assert at_a == [GlobalRequestReplied(True, b"\x00\x00\x30\x39"), GlobalRequestReplied(False, b"")]


# --- peer violations ---


def _violations() -> dict[str, object]:
    """Message sequences, built from b's own id for the channel, that b must refuse (the last one raises)."""
    return {
        "data beyond window": lambda me: [messages.ChannelData(me, b"x" * 400)] * 3,
        "data over max packet": lambda me: [messages.ChannelData(me, b"x" * 501)],
        "stderr beyond window": lambda me: [messages.ChannelExtendedData(me, 1, b"x" * 500)] * 3,
        "data for unknown channel": lambda me: [messages.ChannelData(me + 7, b"x")],
        "adjust for unknown channel": lambda me: [messages.ChannelWindowAdjust(me + 7, 1)],
        "request for unknown channel": lambda me: [messages.ChannelRequest(me + 7, "x", False)],
        "confirmation for open channel": lambda me: [messages.ChannelOpenConfirmation(me, 5, 10, 10)],
        "failure for unknown channel": lambda me: [messages.ChannelOpenFailure(me + 7, 2, "")],
        "open with max packet 0": lambda me: [messages.ChannelOpen("x", 9, 100, 0)],
        "not a connection message": lambda me: [messages.Ignore(b"")],
    }


@pytest.mark.parametrize("name", list(_violations()))
def test_violations_raise(name: str) -> None:
    p = Pair()
    _, b_id = p.open(window=1000, max_packet=500)  # b grants a 1000 bytes in packets of at most 500
    *fine, bad = _violations()[name](b_id)
    for msg in fine:
        p.b.layer.handle(msg)
    with pytest.raises(ProtocolError):
        p.b.layer.handle(bad)


def test_data_after_peer_eof_and_second_close_raise() -> None:
    p = Pair()
    a_id, b_id = p.open()
    p.a.layer.send_eof(a_id)
    p.pump()
    with pytest.raises(ProtocolError):
        p.b.layer.handle(messages.ChannelData(b_id, b"late"))
    with pytest.raises(ProtocolError):
        p.b.layer.handle(messages.ChannelEof(b_id))
    p.a.layer.close(a_id)
    p.pump()
    with pytest.raises(ProtocolError):
        p.b.layer.handle(messages.ChannelClose(b_id))


def test_data_before_confirmation_raises() -> None:
    p = Pair()
    a_id = p.a.layer.open_channel("session")
    with pytest.raises(ProtocolError):
        p.a.layer.handle(messages.ChannelData(a_id, b"early"))


def test_confirmation_with_zero_max_packet_raises() -> None:
    p = Pair()
    a_id = p.a.layer.open_channel("session")
    with pytest.raises(ProtocolError):
        p.a.layer.handle(messages.ChannelOpenConfirmation(a_id, 3, 100, 0))


def test_session_after_no_more_sessions_raises() -> None:
    p = Pair()
    p.a.layer.open_channel("session")
    p.a.layer.global_request("no-more-sessions@openssh.com", False)
    p.a.layer.open_channel("direct-tcpip")  # other types stay allowed
    p.a.layer.open_channel("session")
    with pytest.raises(ProtocolError):
        p.deliver(p.a, p.b)
    assert len(p.b.layer.channel_ids()) == 2  # the session and the direct-tcpip before the violation


# --- random interleavings never make the peer raise ---

_OPS = st.one_of(
    st.tuples(st.just("send"), st.sampled_from("ab"), st.integers(0, 70_000)),
    st.tuples(st.just("stderr"), st.sampled_from("ab"), st.integers(0, 5_000)),
    st.tuples(st.just("consume"), st.sampled_from("ab"), st.floats(0, 1)),
    st.tuples(st.just("eof"), st.sampled_from("ab"), st.just(0)),
    st.tuples(st.just("close"), st.sampled_from("ab"), st.just(0)),
    st.tuples(st.just("request"), st.sampled_from("ab"), st.booleans()),
    st.tuples(st.just("reply"), st.sampled_from("ab"), st.booleans()),
    st.tuples(st.just("deliver"), st.sampled_from("ab"), st.integers(1, 5)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_OPS, max_size=60), st.integers(100, 200_000), st.integers(1, 40_000))
def test_random_interleavings_never_violate(ops, window: int, max_packet: int) -> None:
    p = Pair()
    a_id = p.a.layer.open_channel("session", window=window, max_packet=max_packet)
    (req,) = p.deliver(p.a, p.b)
    b_id = req.channel_id
    p.b.layer.accept_channel(b_id, window=window, max_packet=max_packet)
    p.deliver(p.b, p.a)
    sides = {"a": (p.a, p.b, a_id), "b": (p.b, p.a, b_id)}
    accepted = {"a": bytearray(), "b": bytearray()}
    unconsumed = {"a": 0, "b": 0}
    owed = {"a": 0, "b": 0}

    def note(name: str, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, ChannelDataReceived):
                unconsumed[name] += len(e.data)
            elif isinstance(e, ChannelRequestReceived) and e.want_reply:
                owed[name] += 1

    counter = 0
    for op, name, arg in ops:
        me, peer, cid = sides[name]
        layer = me.layer
        try:
            if op == "send":
                counter += 1
                chunk = bytes([counter % 256]) * arg
                accepted[name] += chunk[: layer.send_data(cid, chunk)]
            elif op == "stderr":
                layer.send_extended_data(cid, b"e" * arg)
            elif op == "consume":
                n = int(unconsumed[name] * arg)
                layer.consumed(cid, n)
                unconsumed[name] -= n
            elif op == "eof":
                layer.send_eof(cid)
            elif op == "close":
                layer.close(cid)
            elif op == "request":
                layer.send_request(cid, "keepalive@openssh.com", arg)
            elif op == "reply" and owed[name]:
                layer.reply_request(cid, arg)
                owed[name] -= 1
            elif op == "deliver":
                note(peer.name, p.deliver(me, peer, arg))
        except ChannelClosedError:
            pass  # our own side is shut: the API refusing is fine, the peer never sees it
    for _ in range(1000):  # drain, the applications consuming everything
        if not p.a.outbox and not p.b.outbox:
            break
        for name in "ab":
            me, peer, cid = sides[name]
            note(peer.name, p.deliver(me, peer))
        for name in "ab":
            me, _, cid = sides[name]
            me.layer.consumed(cid, unconsumed[name])
            unconsumed[name] = 0
    # Every byte that arrived is a prefix of what the sender's layer accepted, in order.
    assert accepted["a"].startswith(received(p.b.events, b_id))
    assert accepted["b"].startswith(received(p.a.events, a_id))
    closed_a = any(isinstance(e, ChannelCloseReceived) for e in p.a.events)
    closed_b = any(isinstance(e, ChannelCloseReceived) for e in p.b.events)
    assert closed_a == closed_b
    if closed_a:
        assert p.a.layer.channel_ids() == [] and p.b.layer.channel_ids() == []
    else:  # nobody closed: all accepted data arrived, and the channel is still usable both ways
        assert received(p.b.events, b_id) == accepted["a"]
        assert received(p.a.events, a_id) == accepted["b"]
        assert p.a.layer.is_open(a_id) and p.b.layer.is_open(b_id)
