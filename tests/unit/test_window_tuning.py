"""Receive-window auto-tuning, driven by a simulated link with a round-trip time and a line rate."""

from __future__ import annotations

import heapq
import itertools

import pytest

from sshconduit import limits, messages
from sshconduit.connection import ChannelDataReceived, ChannelOpenRequest, ConnectionLayer


class SimLink:
    """``a`` streams to ``b`` over a link of ``rtt`` seconds and ``rate`` bytes/s; b's reader takes ``read_rate``."""

    def __init__(self, rtt: float, rate: float, read_rate: float = 0.0, path_rtt: float = 0.0) -> None:
        self.rtt, self.rate, self.read_rate = rtt, rate, read_rate
        self.now = 0.0
        self.queue: list[tuple[float, int, str, bytes]] = []
        self.seq = itertools.count()
        self.link_free = 0.0  # when the a->b line finishes its current packet
        self.reader_free = 0.0
        self.received = 0
        self.a = ConnectionLayer(lambda *parts: self._post("b", b"".join(parts)))
        self.b = ConnectionLayer(lambda *parts: self._post("a", b"".join(parts)))
        self.a.now = self.b.now = 0.0
        self.b.path_rtt = path_rtt  # what TCP would tell b's adapter (0: not known)

    def _post(self, dst: str, payload: bytes) -> None:
        if dst == "b":  # data serialises on the line, then takes half a round trip
            self.link_free = max(self.link_free, self.now) + len(payload) / self.rate
            arrival = self.link_free + self.rtt / 2
        else:
            arrival = self.now + self.rtt / 2
        heapq.heappush(self.queue, (arrival, next(self.seq), dst, payload))

    def open(self) -> tuple[int, int]:
        a_id = self.a.open_channel("direct-tcpip", b"td")
        request = self.step()
        assert isinstance(request[0], ChannelOpenRequest)
        self.b.accept_channel(request[0].channel_id)  # OpenSSH's 2 MiB default window
        self.step()
        return a_id, request[0].channel_id

    def step(self) -> list[object]:
        self.now, _, dst, payload = heapq.heappop(self.queue)
        layer = self.a if dst == "a" else self.b
        layer.now = self.now + 1.0  # any clock with a nonzero origin
        return layer.handle(messages.decode_message(payload))

    def run(self, total: int, seconds: float) -> list[tuple[float, int]]:
        """Stream ``total`` bytes; returns (time, a's view of the window) after each adjust a receives."""
        a_id, b_id = self.open()
        data = memoryview(bytes(limits.MAX_AUTO_WINDOW))
        sent = 0
        windows: list[tuple[float, int]] = []
        for _ in range(200_000):  # bounded in steps as well as simulated time
            if sent < total:
                sent += self.a.send_data(a_id, data[: min(len(data), total - sent)])
            if not self.queue or self.now > seconds:
                break
            dst = self.queue[0][2]
            for event in self.step():
                if isinstance(event, ChannelDataReceived):
                    self.received += len(event.data)
                    if self.read_rate:  # a slow reader: it takes the bytes later, at its own pace
                        self.reader_free = max(self.reader_free, self.now) + len(event.data) / self.read_rate
                        self.now = self.reader_free
                    self.b.now = self.now + 1.0
                    self.b.consumed(b_id, len(event.data))
            if dst == "a":
                windows.append((self.now, self.a.peer_window(a_id)))
        return windows


def test_window_grows_on_a_long_fat_link_up_to_the_cap() -> None:
    link = SimLink(rtt=0.05, rate=400e6)  # 50 ms, 400 MB/s: the BDP is 20 MB
    windows = link.run(total=400 * 1024 * 1024, seconds=5.0)
    largest = max(w for _, w in windows)
    assert largest > limits.DEFAULT_WINDOW  # grew past OpenSSH's 2 MiB
    assert largest <= limits.MAX_AUTO_WINDOW
    assert link.b.window_growth == limits.MAX_AUTO_WINDOW - limits.DEFAULT_WINDOW
    # With 2 MiB per 50 ms the whole transfer would take 10 s; the grown window does it in well under 5 s.
    assert link.received == 400 * 1024 * 1024, link.received
    assert link.now < 3.0, link.now


def test_window_grows_on_a_long_fat_link_when_tcp_says_its_round_trip() -> None:
    link = SimLink(rtt=0.05, rate=400e6, path_rtt=0.05)
    link.run(total=400 * 1024 * 1024, seconds=5.0)
    assert link.b.window_growth == limits.MAX_AUTO_WINDOW - limits.DEFAULT_WINDOW
    assert link.received == 400 * 1024 * 1024
    assert link.now < 3.0, link.now


@pytest.mark.parametrize("rtt", [0.0002, 0.002])
def test_window_stays_on_a_short_link_when_tcp_says_its_round_trip(rtt: float) -> None:
    # The queue of a line slower than the sender inflates our own samples (see the test below); TCP's
    # minimum round trip has no queue in it, so the window stays where it started.
    link = SimLink(rtt=rtt, rate=400e6, path_rtt=rtt)
    link.run(total=64 * 1024 * 1024, seconds=5.0)
    assert link.received == 64 * 1024 * 1024
    assert link.b.window_growth == 0


@pytest.mark.parametrize("rtt", [0.0002, 0.002])
def test_window_stays_small_on_a_short_link(rtt: float) -> None:
    link = SimLink(rtt=rtt, rate=400e6)  # a LAN: the BDP is 80-800 KB, below 2 MiB
    link.run(total=64 * 1024 * 1024, seconds=5.0)
    assert link.received == 64 * 1024 * 1024
    # The RTT estimate includes the queue of a link slower than the sender, so one doubling can happen;
    # never the run to MAX_AUTO_WINDOW a long link gets.
    assert link.b.window_growth <= limits.DEFAULT_WINDOW


def test_window_stays_for_a_slow_reader() -> None:
    link = SimLink(rtt=0.05, rate=400e6, read_rate=10e6)  # the reader, not the window, is the limit
    link.run(total=16 * 1024 * 1024, seconds=5.0)
    assert link.received == 16 * 1024 * 1024
    assert link.b.window_growth == 0


def test_no_clock_no_tuning() -> None:
    link = SimLink(rtt=0.05, rate=400e6)
    link.a.now = link.b.now = 0.0
    a_id, b_id = link.open()
    link.b.now = 0.0
    # Without a clock from the adapter the layer keeps the window it was given.
    for _ in range(8):
        assert link.a.send_data(a_id, bytes(limits.DEFAULT_WINDOW)) == limits.DEFAULT_WINDOW
        for payload in list(link.queue):
            if payload[2] == "b":
                for event in link.b.handle(messages.decode_message(payload[3])):
                    if isinstance(event, ChannelDataReceived):
                        link.b.consumed(b_id, len(event.data))
        link.queue = [q for q in link.queue if q[2] == "a"]
        while link.queue:
            link.a.handle(messages.decode_message(heapq.heappop(link.queue)[3]))
        assert link.a.peer_window(a_id) == limits.DEFAULT_WINDOW
    assert link.b.window_growth == 0


def test_connection_wide_cap_and_release_on_close(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_CONNECTION_WINDOW_GROWTH", 3 * limits.DEFAULT_WINDOW)
    link = SimLink(rtt=0.05, rate=400e6)
    link.run(total=200 * 1024 * 1024, seconds=5.0)
    assert link.b.window_growth == 3 * limits.DEFAULT_WINDOW  # wanted 7 x 2 MiB more, held to the cap
    (b_id,) = link.b.channel_ids()
    link.b.close(b_id)
    for _ in range(100):
        if not link.queue:
            break
        link.step()
    assert link.b.channel_ids() == []
    assert link.b.window_growth == 0  # the closed channel's share is free again
