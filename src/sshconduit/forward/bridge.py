"""One stream socket pumped to and from one channel, with flow control both ways.

Every forward kind (local, remote, SOCKS, unix) is this pump plus a way to get the socket. Flow control: when
the peer's window is shut we pause reading the socket; when the socket's write buffer is full we stop telling
the connection layer that received bytes were consumed, so the peer's window closes. Half-close maps TCP EOF to
CHANNEL_EOF and back; the channel closes when both directions are done or the socket goes away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from .. import limits
from ..aio import ChannelHandler
from ..errors import ChannelOpenError
from .socket_stream import Stream

log = logging.getLogger("sshconduit.forward")


@dataclass
class ForwardCounters:
    """Per-forward totals for the API and the live view."""

    connections: int = 0
    active: int = 0
    failed: int = 0
    bytes_out: int = 0  # socket -> channel
    bytes_in: int = 0  # channel -> socket


class _SocketSide(asyncio.Protocol):
    """The asyncio protocol of the socket; forwards its callbacks to the bridge (names clash otherwise)."""

    def __init__(self, bridge: StreamBridge) -> None:
        self.bridge = bridge

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check here.
        transport = cast(asyncio.Transport, transport)
        self.bridge.socket_made(transport)

    def data_received(self, data: bytes) -> None:
        self.bridge.socket_data(data)

    def eof_received(self) -> bool:
        return self.bridge.socket_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        bridge = self.bridge
        # The socket's last callback. With this link gone the bridge and this side no longer hold each other, so a
        # closed forward's objects are freed at once, not by a garbage collection pass.
        del self.bridge
        bridge.socket_lost()

    def pause_writing(self) -> None:
        self.bridge.writing_paused = True

    def resume_writing(self) -> None:
        self.bridge.resume_socket_writing()


class StreamBridge(ChannelHandler):
    window = limits.DEFAULT_WINDOW
    max_packet = limits.DEFAULT_MAX_PACKET
    bulk = True  # between sshconduit peers: PEER_WINDOW and PEER_MAX_PACKET (aio.handler_window)

    def __init__(
        self,
        label: str,
        counters: ForwardCounters | None = None,
        on_open_failed: Callable[[StreamBridge, ChannelOpenError], None] | None = None,
    ) -> None:
        self.label = label
        self.counters = counters or ForwardCounters()
        self.on_socket_made: Callable[[StreamBridge, Stream], None] | None = None
        self.on_finish: Callable[[StreamBridge, float], None] | None = None  # the audit trail: (bridge, seconds)
        self._on_open_failed = on_open_failed
        self.sock: Stream | None = None
        self.protocol = _SocketSide(self)
        self.writing_paused = False
        self._channel_ready = False
        self._pending: memoryview | None = None  # socket bytes the peer's window has not taken yet
        self._early: list[bytes] = []  # socket bytes read before the channel was confirmed
        self._early_bytes = 0
        self._reading_paused = False
        self._socket_eof = False
        self._channel_eof = False
        self._eof_sent = False
        self._unconsumed = 0  # written to the socket while it was paused: not yet given back to the window
        self._batch: list[bytes] | None = None  # channel data of the current read, written at its end in one call
        self._finished = False
        self._counted = False
        self._started = time.monotonic()
        self.bytes_out = 0
        self.bytes_in = 0

    # --- socket side ---

    def socket_made(self, sock: Stream) -> None:
        self.sock = sock
        self._counted = True
        self.counters.connections += 1
        self.counters.active += 1
        # Pause only at half our window, not asyncio's 64 KiB: a pause holds back WINDOW_ADJUST, and a
        # sender that runs out of window waits a round trip. The window still bounds what we buffer.
        sock.set_write_buffer_limits(high=self.window // 2)
        # No pause until the channel opens: a pause and resume per connection cost two epoll changes on its
        # critical path. What arrives early is buffered, bounded by MAX_EARLY_SOCKET_BYTES.
        if self.on_socket_made is not None:
            self.on_socket_made(self, sock)

    def socket_data(self, data: bytes) -> None:
        if not self._channel_ready or self._pending is not None:
            self._early.append(data)
            self._early_bytes += len(data)
            if self._pending is not None or self._early_bytes > limits.MAX_EARLY_SOCKET_BYTES:
                self._pause_reading()
            return
        self._send(memoryview(data))

    def _send(self, view: memoryview) -> None:
        sent = self.conn.send_data(self.channel_id, view)
        self.count_out(sent)
        if sent < len(view):
            self._pending = view[sent:]
            self._pause_reading()

    def socket_eof(self) -> bool:
        self._socket_eof = True
        self._maybe_send_eof()
        return True  # keep the socket open for writing: half-close

    def socket_lost(self) -> None:
        self.sock = None
        if self._finished:
            return  # the channel went first: its number may already be a new channel's
        self._finish()
        if self._channel_ready:
            self.conn.close_channel(self.channel_id)

    def resume_socket_writing(self) -> None:
        self.writing_paused = False
        if self._unconsumed and not self._finished:
            n, self._unconsumed = self._unconsumed, 0
            self.conn.consumed(self.channel_id, n)

    # --- channel side ---

    def opened(self, type_data: bytes) -> None:
        self._channel_ready = True
        self._drain()

    def open_failed(self, error: ChannelOpenError) -> None:
        self.counters.failed += 1
        if self._on_open_failed is not None:
            self._on_open_failed(self, error)
        if self.sock is not None:
            self.sock.abort()

    def window_opened(self) -> None:
        self._drain()

    def _drain(self) -> None:
        """Send what the socket gave us while the channel could not take it, then read on."""
        while True:
            if self._pending is None:
                if not self._early:
                    break
                self._pending = memoryview(self._early.pop(0))
                self._early_bytes -= len(self._pending)
            view, self._pending = self._pending, None
            self._send(view)
            if self._pending is not None:
                return  # the window shut again
        self._resume_reading()
        self._maybe_send_eof()

    def _pause_reading(self) -> None:
        if self.sock is not None and not self._reading_paused:
            self._reading_paused = True
            self.sock.pause_reading()

    def _resume_reading(self) -> None:
        if self.sock is not None and self._reading_paused and self._pending is None and not self._socket_eof:
            self._reading_paused = False
            self.sock.resume_reading()

    def data_received(self, data: bytes, data_type: int | None) -> None:
        if self.sock is None or data_type is not None:
            self.conn.consumed(self.channel_id, len(data))
            return
        # One socket write per read from the SSH socket, not one per packet: an OpenSSH peer sends 32 KiB
        # packets, and a write system call each was most of the cost of a download.
        if self._batch is None:
            self._batch = [data]
            self.conn.at_batch_end(self._write_batch)
        else:
            self._batch.append(data)

    def _write_batch(self) -> None:
        batch, self._batch = self._batch, None
        if not batch or self.sock is None:
            return
        if len(batch) == 1:
            self.sock.write(batch[0])
        else:
            self.sock.writelines(batch)
        n = sum(map(len, batch))
        self.count_in(n)
        if self.writing_paused:
            self._unconsumed += n
        else:
            self.conn.consumed(self.channel_id, n)

    def eof_received(self) -> None:
        self._write_batch()
        self._channel_eof = True
        self.conn.at_batch_end(self._shutdown_socket_write, last=True)
        self._maybe_close()

    def close_received(self) -> None:
        self._write_batch()
        self._finish()
        self.conn.at_batch_end(self._close_socket, last=True)

    def _shutdown_socket_write(self) -> None:
        # Not once CLOSE came too (in the same read, as from OpenSSH and from us): the close sends the FIN.
        if self.sock is not None and not self._finished and self.sock.can_write_eof():
            self.sock.write_eof()

    def _close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()  # flushes what is buffered, then closes

    def connection_lost(self) -> None:
        self._finish()
        if self.sock is not None:
            self.sock.abort()

    # --- both ---

    def count_out(self, n: int) -> None:
        """Bytes from the socket into the channel (also those sent in the CHANNEL_OPEN)."""
        self.bytes_out += n
        self.counters.bytes_out += n

    def count_in(self, n: int) -> None:
        """Bytes from the channel to the socket (also the open data a server wrote)."""
        self.bytes_in += n
        self.counters.bytes_in += n

    def _maybe_send_eof(self) -> None:
        if (
            self._socket_eof
            and self._channel_ready
            and self._pending is None
            and not self._early
            and not self._eof_sent
        ):
            self._eof_sent = True
            if self._channel_eof and self.conn.peer_is_us:
                # Both directions end here: a CLOSE alone says so (RFC 4254 5.3 allows it), and an sshconduit
                # peer's bridge takes it as EOF then close, as it would the pair. One packet fewer per forwarded
                # connection; other peers get EOF then CLOSE, as OpenSSH sends them.
                self.conn.close_channel(self.channel_id)
                return
            self.conn.send_eof(self.channel_id)
            self._maybe_close()

    def _maybe_close(self) -> None:
        if self._eof_sent and self._channel_eof:
            self.conn.close_channel(self.channel_id)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._counted:
            self.counters.active -= 1
        duration = time.monotonic() - self._started
        log.debug("%s closed: %d bytes out, %d bytes in, %.3fs", self.label, self.bytes_out, self.bytes_in, duration)
        if self.on_finish is not None:
            self.on_finish(self, duration)
