"""The SSH connection protocol (RFC 4254) as a sans-IO state machine.

The transport hands ``ConnectionLayer.handle`` decoded messages 80..100 and gets back events; everything the
layer sends goes through the ``send(*parts)`` callable given at construction, one SSH payload per call (the
payload is the concatenation of the parts). ``send`` must use the parts before it returns: on the data path
they are memoryviews of the caller's buffer.

A peer that breaks the protocol raises ``ProtocolError``; misuse by the caller raises ``ChannelClosedError``
(the channel is gone or its output is shut) or ``ValueError``.

Answering is the caller's job: every ``ChannelOpenRequest`` needs ``accept_channel``/``reject_channel``, and
every ``ChannelRequestReceived``/``GlobalRequestReceived`` with ``want_reply`` needs ``reply_request``/
``reply_global`` (with ``ok=False`` for an unknown request type), in any order of requests but answered in
order of arrival, as RFC 4254 section 4 requires. The only automatic answers are a CLOSE to a received CLOSE
and "resource shortage" to opens beyond ``max_channels`` (no event is emitted for those).
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Callable
from dataclasses import dataclass

from . import limits, messages
from .channel import Channel, OpenState
from .errors import ChannelOpenError, ProtocolError, SSHError

SendFn = Callable[..., None]

OPEN_ADMINISTRATIVELY_PROHIBITED = 1
OPEN_CONNECT_FAILED = 2
OPEN_UNKNOWN_CHANNEL_TYPE = 3
OPEN_RESOURCE_SHORTAGE = 4

NO_MORE_SESSIONS = "no-more-sessions@openssh.com"

_EXTENDED_DATA_HEADER = struct.Struct(">BIII")  # message 95, recipient, data type, length


class ChannelClosedError(SSHError):
    """The channel is gone, or our side of it is shut (EOF or CLOSE sent)."""


# --- events; every channel_id is our local id ---


@dataclass(frozen=True, slots=True)
class ChannelOpenRequest:
    """The peer wants a channel; the id is reserved until accept_channel or reject_channel."""

    channel_id: int
    channel_type: str
    type_data: bytes
    peer_window: int
    peer_max_packet: int


@dataclass(frozen=True, slots=True)
class ChannelOpened:
    channel_id: int
    type_data: bytes


@dataclass(frozen=True, slots=True)
class ChannelOpenFailed:
    """Our open was refused; the id is already free."""

    channel_id: int
    reason: int
    description: str


@dataclass(frozen=True, slots=True)
class ChannelDataReceived:
    channel_id: int
    data: bytes
    data_type: int | None  # None for CHANNEL_DATA, else the EXTENDED_DATA type (1 = stderr)


@dataclass(frozen=True, slots=True)
class ChannelWindowOpened:
    """The peer's window grew from below one packet: sending can resume."""

    channel_id: int


@dataclass(frozen=True, slots=True)
class ChannelEofReceived:
    channel_id: int


@dataclass(frozen=True, slots=True)
class ChannelCloseReceived:
    """The peer closed; the layer has sent its own CLOSE if needed and freed the id."""

    channel_id: int


@dataclass(frozen=True, slots=True)
class ChannelRequestReceived:
    channel_id: int
    request_type: str
    want_reply: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class ChannelRequestReplied:
    channel_id: int
    ok: bool


@dataclass(frozen=True, slots=True)
class GlobalRequestReceived:
    name: str
    want_reply: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class GlobalRequestReplied:
    ok: bool
    data: bytes


Event = (
    ChannelOpenRequest
    | ChannelOpened
    | ChannelOpenFailed
    | ChannelDataReceived
    | ChannelWindowOpened
    | ChannelEofReceived
    | ChannelCloseReceived
    | ChannelRequestReceived
    | ChannelRequestReplied
    | GlobalRequestReceived
    | GlobalRequestReplied
)


def _check_window_args(window: int, max_packet: int) -> None:
    if not 0 <= window <= limits.MAX_WINDOW:
        raise ValueError(f"window {window} out of range")
    if not 1 <= max_packet <= limits.MAX_WINDOW:
        raise ValueError(f"maximum packet {max_packet} out of range")


class ConnectionLayer:
    """Channel table, windows, EOF/CLOSE ordering, channel and global requests."""

    def __init__(self, send: SendFn, *, max_channels: int = limits.MAX_CHANNELS) -> None:
        self._send = send
        self._max_channels = max_channels
        self._channels: dict[int, Channel] = {}
        self._free_ids: list[int] = []  # min-heap: the lowest free id is reused first, as OpenSSH does
        self._next_id = 0
        self._global_replies_owed = 0
        self.window_growth = 0  # bytes auto-tuning added to receive windows of open channels (capped)
        self.now = 0.0  # the adapter's clock at the current input, for window auto-tuning; 0 = no clock
        self.path_rtt = 0.0  # the network's round trip as the adapter's transport measured it; 0 = unknown
        self._global_replies_expected = 0
        self._no_more_sessions = False
        self.max_payload = limits.MAX_PAYLOAD_WE_SEND  # raised to PEER_MAX_PAYLOAD for a sshconduit peer
        self._handlers: dict[type[messages.Message], Callable[..., list[Event]]] = {
            messages.GlobalRequest: self._on_global_request,
            messages.RequestSuccess: self._on_request_success,
            messages.RequestFailure: self._on_request_failure,
            messages.ChannelOpen: self._on_open,
            messages.ChannelOpenConfirmation: self._on_open_confirmation,
            messages.ChannelOpenFailure: self._on_open_failure,
            messages.ChannelWindowAdjust: self._on_window_adjust,
            messages.ChannelData: self._on_data,
            messages.ChannelExtendedData: self._on_extended_data,
            messages.ChannelEof: self._on_eof,
            messages.ChannelClose: self._on_close,
            messages.ChannelRequest: self._on_channel_request,
            messages.ChannelSuccess: self._on_channel_success,
            messages.ChannelFailure: self._on_channel_failure,
        }

    # --- input ---

    def handle(self, msg: messages.Message) -> list[Event]:
        """Feed one decoded message 80..100; returns the events it causes."""
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise ProtocolError(f"message {msg.ID} is not part of the connection protocol")
        return handler(msg)

    def _open_channel_for(self, recipient: int) -> Channel:
        """The channel a peer message names; it must be one both sides know as open."""
        channel = self._channels.get(recipient)
        if channel is None or channel.state is not OpenState.OPEN:
            raise ProtocolError(f"message for channel {recipient}, which is not open")
        return channel

    def _on_data(self, msg: messages.ChannelData) -> list[Event]:
        channel = self._open_channel_for(msg.recipient_channel)
        data = msg.data
        channel.take_received(len(data), self.now)
        if channel.close_sent or not data:
            return []  # in flight when we closed: the application is done with this channel
        channel.recv_unconsumed += len(data)
        return [ChannelDataReceived(channel.local_id, data, None)]

    def _on_extended_data(self, msg: messages.ChannelExtendedData) -> list[Event]:
        channel = self._open_channel_for(msg.recipient_channel)
        data = msg.data
        channel.take_received(len(data), self.now)
        if channel.close_sent or not data:
            return []
        channel.recv_unconsumed += len(data)
        return [ChannelDataReceived(channel.local_id, data, msg.data_type)]

    def _on_window_adjust(self, msg: messages.ChannelWindowAdjust) -> list[Event]:
        channel = self._open_channel_for(msg.recipient_channel)
        old = channel.send_window
        new = old + msg.bytes_to_add
        if new > limits.MAX_WINDOW:
            # RFC 4254 5.2: the window MUST NOT exceed 2^32-1; OpenSSH treats this as fatal too.
            raise ProtocolError(f"channel {channel.local_id}: window adjust {msg.bytes_to_add} overflows {old}")
        channel.send_window = new
        # Only a window that was too small for a full packet can have stalled the sender.
        if old < channel.send_chunk and new > old and channel.output_open:
            return [ChannelWindowOpened(channel.local_id)]
        return []

    def _on_eof(self, msg: messages.ChannelEof) -> list[Event]:
        channel = self._open_channel_for(msg.recipient_channel)
        if channel.eof_received:
            raise ProtocolError(f"channel {channel.local_id}: second EOF")
        channel.eof_received = True
        return [ChannelEofReceived(channel.local_id)]

    def _on_close(self, msg: messages.ChannelClose) -> list[Event]:
        # A second CLOSE finds the id already freed, so it fails the lookup as a violation.
        channel = self._open_channel_for(msg.recipient_channel)
        if not channel.close_sent:
            self._send(messages.ChannelClose(channel.remote_id).encode())
            channel.close_sent = True
        self._free(channel.local_id)
        return [ChannelCloseReceived(channel.local_id)]

    def _on_open(self, msg: messages.ChannelOpen) -> list[Event]:
        if msg.max_packet < 1:
            raise ProtocolError(f"channel open with maximum packet size {msg.max_packet}")
        if msg.channel_type == "session" and self._no_more_sessions:
            raise ProtocolError("session channel opened after no-more-sessions@openssh.com")
        if len(self._channels) >= self._max_channels:
            self._send(
                messages.ChannelOpenFailure(msg.sender_channel, OPEN_RESOURCE_SHORTAGE, "too many channels").encode()
            )
            return []
        channel = self._new_channel(OpenState.OFFERED, limits.DEFAULT_WINDOW, limits.DEFAULT_MAX_PACKET)
        channel.remote_id = msg.sender_channel
        channel.set_peer_limits(msg.initial_window, msg.max_packet, self.max_payload)
        return [
            ChannelOpenRequest(channel.local_id, msg.channel_type, msg.type_data, msg.initial_window, msg.max_packet)
        ]

    def _pending_open(self, recipient: int) -> Channel:
        channel = self._channels.get(recipient)
        if channel is None or channel.state is not OpenState.OPENING:
            raise ProtocolError(f"open reply for channel {recipient}, which we are not opening")
        return channel

    def _on_open_confirmation(self, msg: messages.ChannelOpenConfirmation) -> list[Event]:
        channel = self._pending_open(msg.recipient_channel)
        channel.remote_id = msg.sender_channel
        channel.set_peer_limits(msg.initial_window, msg.max_packet, self.max_payload)
        channel.state = OpenState.OPEN
        if channel.close_pending:  # closed by the application while the open was in flight
            self._send(messages.ChannelClose(channel.remote_id).encode())
            channel.close_sent = True
            return []
        return [ChannelOpened(channel.local_id, msg.type_data)]

    def _on_open_failure(self, msg: messages.ChannelOpenFailure) -> list[Event]:
        channel = self._pending_open(msg.recipient_channel)
        self._free(channel.local_id)
        return [ChannelOpenFailed(channel.local_id, msg.reason, msg.description)]

    def _on_channel_request(self, msg: messages.ChannelRequest) -> list[Event]:
        channel = self._open_channel_for(msg.recipient_channel)
        if msg.want_reply:
            channel.replies_owed += 1
        return [ChannelRequestReceived(channel.local_id, msg.request_type, msg.want_reply, msg.request_data)]

    def _channel_reply(self, recipient: int, ok: bool) -> list[Event]:
        channel = self._open_channel_for(recipient)
        if channel.replies_expected == 0:
            return []  # unsolicited: OpenSSH ignores these too
        channel.replies_expected -= 1
        return [ChannelRequestReplied(channel.local_id, ok)]

    def _on_channel_success(self, msg: messages.ChannelSuccess) -> list[Event]:
        return self._channel_reply(msg.recipient_channel, True)

    def _on_channel_failure(self, msg: messages.ChannelFailure) -> list[Event]:
        return self._channel_reply(msg.recipient_channel, False)

    def _on_global_request(self, msg: messages.GlobalRequest) -> list[Event]:
        if msg.name == NO_MORE_SESSIONS:
            self._no_more_sessions = True
        if msg.want_reply:
            self._global_replies_owed += 1
        return [GlobalRequestReceived(msg.name, msg.want_reply, msg.request_data)]

    def _global_reply(self, ok: bool, data: bytes) -> list[Event]:
        if self._global_replies_expected == 0:
            return []  # unsolicited: ignored, as OpenSSH does
        self._global_replies_expected -= 1
        return [GlobalRequestReplied(ok, data)]

    def _on_request_success(self, msg: messages.RequestSuccess) -> list[Event]:
        return self._global_reply(True, msg.response_data)

    def _on_request_failure(self, msg: messages.RequestFailure) -> list[Event]:
        return self._global_reply(False, b"")

    # --- the channel table ---

    def _new_channel(self, state: OpenState, window: int, max_packet: int) -> Channel:
        if self._free_ids:
            local_id = heapq.heappop(self._free_ids)
        else:
            local_id = self._next_id
            self._next_id += 1
        channel = Channel(local_id, state, window, max_packet)
        self._channels[local_id] = channel
        return channel

    def _free(self, local_id: int) -> None:
        channel = self._channels.pop(local_id)
        self.window_growth -= channel.recv_granted - channel.recv_initial
        heapq.heappush(self._free_ids, local_id)

    def _channel(self, local_id: int) -> Channel:
        channel = self._channels.get(local_id)
        if channel is None:
            raise ChannelClosedError(f"channel {local_id} does not exist")
        return channel

    def channel_ids(self) -> list[int]:
        return list(self._channels)

    def is_open(self, local_id: int) -> bool:
        """Confirmed by both sides and not yet closed by us."""
        channel = self._channels.get(local_id)
        return channel is not None and channel.state is OpenState.OPEN and not channel.close_sent

    def remote_id(self, local_id: int) -> int:
        channel = self._channel(local_id)
        if channel.remote_id < 0:
            raise ValueError(f"channel {local_id}: the peer has not confirmed it yet")
        return channel.remote_id

    def peer_max_packet(self, local_id: int) -> int:
        return self._channel(local_id).peer_max_packet

    def peer_window(self, local_id: int) -> int:
        return self._channel(local_id).send_window

    # --- opening ---

    def open_channel(
        self,
        channel_type: str,
        type_data: bytes = b"",
        window: int = limits.DEFAULT_WINDOW,
        max_packet: int = limits.DEFAULT_MAX_PACKET,
    ) -> int:
        _check_window_args(window, max_packet)
        if len(self._channels) >= self._max_channels:
            raise ChannelOpenError(OPEN_RESOURCE_SHORTAGE, "too many open channels")
        channel = self._new_channel(OpenState.OPENING, window, max_packet)
        self._send(messages.ChannelOpen(channel_type, channel.local_id, window, max_packet, type_data).encode())
        return channel.local_id

    def _offered(self, local_id: int) -> Channel:
        channel = self._channel(local_id)
        if channel.state is not OpenState.OFFERED:
            raise ValueError(f"channel {local_id} is not awaiting an answer to the peer's open")
        return channel

    def accept_channel(
        self,
        local_id: int,
        window: int = limits.DEFAULT_WINDOW,
        max_packet: int = limits.DEFAULT_MAX_PACKET,
        type_data: bytes = b"",
    ) -> None:
        _check_window_args(window, max_packet)
        channel = self._offered(local_id)
        channel.recv_granted = channel.recv_window = channel.recv_initial = window
        channel.local_max_packet = max_packet
        channel.state = OpenState.OPEN
        self._send(
            messages.ChannelOpenConfirmation(channel.remote_id, local_id, window, max_packet, type_data).encode()
        )

    def reject_channel(self, local_id: int, reason: int, description: str) -> None:
        channel = self._offered(local_id)
        self._free(local_id)
        self._send(messages.ChannelOpenFailure(channel.remote_id, reason, description).encode())

    # --- data ---

    def _writable(self, local_id: int) -> Channel:
        channel = self._channel(local_id)
        if not channel.output_open:
            raise ChannelClosedError(f"channel {local_id}: output is shut (EOF or CLOSE sent)")
        return channel

    def send_window(self, local_id: int) -> int:
        """Bytes the peer will take now (0 before the open is confirmed or after EOF/CLOSE sent)."""
        channel = self._channel(local_id)
        if channel.state is not OpenState.OPEN or not channel.output_open:
            return 0
        return channel.send_window

    def send_data(self, local_id: int, data: bytes | bytearray | memoryview) -> int:
        """Send as much of ``data`` as the peer's window allows; returns the bytes taken."""
        channel = self._writable(local_id)
        if channel.state is not OpenState.OPEN:
            return 0
        total = min(len(data), channel.send_window)
        if total == 0:
            return 0
        send = self._send
        header = messages.channel_data_header
        remote = channel.remote_id
        chunk = channel.send_chunk
        if total <= chunk:
            send(header(remote, total), data if total == len(data) else memoryview(data)[:total])
        else:
            view = memoryview(data)
            for start in range(0, total, chunk):
                part = view[start : min(start + chunk, total)]
                send(header(remote, len(part)), part)
        channel.send_window -= total
        return total

    def send_extended_data(self, local_id: int, data: bytes | bytearray | memoryview, data_type: int = 1) -> int:
        channel = self._writable(local_id)
        if channel.state is not OpenState.OPEN:
            return 0
        total = min(len(data), channel.send_window)
        if total == 0:
            return 0
        pack = _EXTENDED_DATA_HEADER.pack
        remote = channel.remote_id
        chunk = channel.send_ext_chunk
        view = memoryview(data)
        for start in range(0, total, chunk):
            part = view[start : min(start + chunk, total)]
            self._send(pack(messages.ChannelExtendedData.ID, remote, data_type, len(part)), part)
        channel.send_window -= total
        return total

    def consumed(self, local_id: int, nbytes: int) -> None:
        """The application took ``nbytes`` of received data; re-opens the peer's window in batches.

        A no-op for a channel already freed (a socket may drain after the peer's CLOSE).
        """
        channel = self._channels.get(local_id)
        if channel is None:
            return
        increment = channel.consume(nbytes)
        if increment:
            allowance = limits.MAX_CONNECTION_WINDOW_GROWTH - self.window_growth
            extra = channel.grow_window(increment, self.now, allowance, self.path_rtt)
            self.window_growth += extra
            increment += extra
            self._send(messages.ChannelWindowAdjust(channel.remote_id, increment).encode())

    # --- half-close and close ---

    def send_eof(self, local_id: int) -> None:
        """Shut our output; idempotent. Before the open is confirmed there is no one to tell: ValueError."""
        channel = self._channels.get(local_id)
        if channel is None or not channel.output_open:
            return
        if channel.state is not OpenState.OPEN:
            raise ValueError(f"channel {local_id}: EOF before the channel is open")
        channel.eof_sent = True
        self._send(messages.ChannelEof(channel.remote_id).encode())

    def close(self, local_id: int) -> None:
        """Send CLOSE once; the peer's CLOSE frees the id. Idempotent.

        On a channel the peer offered and we have not answered, this rejects it (connect failed) and frees
        the id at once. On one we are still opening, CLOSE goes out when the confirmation arrives (no
        ChannelOpened is emitted); the end is then ChannelCloseReceived, or ChannelOpenFailed if refused.
        """
        channel = self._channels.get(local_id)
        if channel is None or channel.close_sent:
            return
        if channel.state is OpenState.OFFERED:
            self.reject_channel(local_id, OPEN_CONNECT_FAILED, "channel closed")
        elif channel.state is OpenState.OPENING:
            channel.close_pending = True
        else:
            channel.close_sent = True
            self._send(messages.ChannelClose(channel.remote_id).encode())

    # --- requests ---

    def send_request(self, local_id: int, request_type: str, want_reply: bool, data: bytes = b"") -> None:
        channel = self._channel(local_id)
        if channel.state is not OpenState.OPEN or channel.close_sent:
            raise ChannelClosedError(f"channel {local_id}: not open for requests")
        if want_reply:
            channel.replies_expected += 1
        self._send(messages.ChannelRequest(channel.remote_id, request_type, want_reply, data).encode())

    def reply_request(self, local_id: int, ok: bool) -> None:
        """Answer the oldest unanswered want_reply request on the channel (dropped once we sent CLOSE)."""
        channel = self._channels.get(local_id)
        if channel is None:
            return
        if channel.replies_owed == 0:
            raise ValueError(f"channel {local_id}: no request awaits a reply")
        channel.replies_owed -= 1
        if channel.close_sent:
            return
        reply = messages.ChannelSuccess if ok else messages.ChannelFailure
        self._send(reply(channel.remote_id).encode())

    def global_request(self, name: str, want_reply: bool, data: bytes = b"") -> None:
        if want_reply:
            self._global_replies_expected += 1
        self._send(messages.GlobalRequest(name, want_reply, data).encode())

    def reply_global(self, ok: bool, data: bytes = b"") -> None:
        """Answer the oldest unanswered want_reply global request."""
        if self._global_replies_owed == 0:
            raise ValueError("no global request awaits a reply")
        self._global_replies_owed -= 1
        reply = messages.RequestSuccess(data) if ok else messages.RequestFailure()
        self._send(reply.encode())
