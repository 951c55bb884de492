"""Per-channel state for the connection layer (RFC 4254 section 5): windows and half-close.

A channel has two independent directions, as in OpenSSH's nchan.c:

    input  (peer -> us):  open --EOF received--> eof --CLOSE received--> closed
    output (us -> peer):  open --EOF sent-----> eof --CLOSE sent-------> closed

EOF one way leaves the other way flowing. CLOSE is sent at most once and ends our output. The channel's
local id is freed only once CLOSE has been both sent and received; since the layer answers a received CLOSE
with its own at once, "CLOSE received" never outlives the message that carried it.
"""

from __future__ import annotations

from enum import Enum

from . import limits
from .errors import ProtocolError

# A CHANNEL_DATA payload adds 9 bytes (type, recipient, length) to the data; EXTENDED_DATA adds 13.
DATA_OVERHEAD = 9
EXTENDED_DATA_OVERHEAD = 13


class OpenState(Enum):
    OPENING = "opening"  # we sent CHANNEL_OPEN, awaiting the peer's confirmation or failure
    OFFERED = "offered"  # the peer sent CHANNEL_OPEN, awaiting our accept or reject
    OPEN = "open"


class Channel:
    """One channel's bookkeeping; the ConnectionLayer owns all decisions about messages."""

    __slots__ = (
        "close_pending",
        "close_sent",
        "eof_received",
        "eof_sent",
        "local_id",
        "local_max_packet",
        "peer_max_packet",
        "recv_granted",
        "recv_initial",
        "recv_total",
        "recv_unadjusted",
        "recv_unconsumed",
        "recv_window",
        "remote_id",
        "replies_expected",
        "replies_owed",
        "rtt",
        "rtt_mark",
        "rtt_mark_time",
        "send_chunk",
        "send_ext_chunk",
        "send_window",
        "state",
        "tune_bytes",
        "tune_time",
    )

    def __init__(self, local_id: int, state: OpenState, recv_window: int, local_max_packet: int) -> None:
        self.local_id = local_id
        self.state = state
        self.remote_id = -1  # unknown until the peer names its side
        # Receive direction: what we granted, what the peer may still send, what the application holds.
        self.recv_granted = recv_window
        self.recv_initial = recv_window  # before auto-tuning grew it
        self.recv_window = recv_window
        self.recv_unconsumed = 0  # delivered to the application, not yet consumed
        self.recv_unadjusted = 0  # consumed, not yet given back with a WINDOW_ADJUST
        # Auto-tuning (see grow_window): bytes received in all, the round trip seen through our adjusts,
        # and the bytes and start time of the current measuring cycle.
        self.recv_total = 0
        self.rtt = 0.0  # seconds; 0 = no sample yet
        self.rtt_mark = -1  # the peer's send limit before our last timed adjust; -1 = none outstanding
        self.rtt_mark_time = 0.0
        self.tune_bytes = 0
        self.tune_time = 0.0
        self.local_max_packet = local_max_packet
        # Send direction: the peer's window and packet limit.
        self.send_window = 0
        self.peer_max_packet = 0
        self.send_chunk = 0
        self.send_ext_chunk = 0
        # Half-close: input is eof_received (CLOSE received frees the channel); output is eof_sent/close_sent.
        self.eof_received = False
        self.eof_sent = False
        self.close_sent = False
        self.close_pending = False  # close() called before the peer confirmed our open
        self.replies_owed = 0  # peer's want_reply requests we have not answered
        self.replies_expected = 0  # our want_reply requests the peer has not answered

    def set_peer_limits(self, window: int, max_packet: int, max_payload: int = limits.MAX_PAYLOAD_WE_SEND) -> None:
        if max_packet < 1:
            raise ProtocolError(f"channel {self.local_id}: peer maximum packet size {max_packet} is invalid")
        self.send_window = window
        self.peer_max_packet = max_packet
        self.send_chunk = min(max_packet, max_payload - DATA_OVERHEAD)
        self.send_ext_chunk = min(max_packet, max_payload - EXTENDED_DATA_OVERHEAD)

    def take_received(self, nbytes: int, now: float = 0.0) -> None:
        """Charge ``nbytes`` of incoming data against the window we granted; a peer over it is a violation."""
        if self.eof_received:
            raise ProtocolError(f"channel {self.local_id}: data after EOF")
        if nbytes > self.local_max_packet:
            raise ProtocolError(
                f"channel {self.local_id}: data packet of {nbytes} bytes over maximum {self.local_max_packet}"
            )
        if nbytes > self.recv_window:
            raise ProtocolError(f"channel {self.local_id}: peer ignored channel window ({nbytes} > {self.recv_window})")
        self.recv_window -= nbytes
        self.recv_total += nbytes
        if self.recv_total > self.rtt_mark >= 0 and now:
            # The peer could not send past the old limit before our adjust reached it: this is at least one
            # round trip (more if it still had window left), so the minimum over samples estimates the RTT.
            sample = now - self.rtt_mark_time
            self.rtt = sample if not self.rtt else min(self.rtt, sample)
            self.rtt_mark = -1

    def consume(self, nbytes: int) -> int:
        """The application took ``nbytes``; return the WINDOW_ADJUST increment to send now, or 0 to wait."""
        if nbytes < 0 or nbytes > self.recv_unconsumed:
            raise ValueError(f"channel {self.local_id}: consumed {nbytes} bytes, only {self.recv_unconsumed} pending")
        self.recv_unconsumed -= nbytes
        if self.eof_received or self.close_sent:
            return 0  # the peer will send nothing more, so there is nothing to re-open
        self.recv_unadjusted += nbytes
        # Batch: give the window back once half of what we granted is consumed, or an eighth once the application
        # holds nothing. Without the second rule, after an adjust that overshot half by a packet the rest of a
        # burst stays just short of half and idles a round trip: half a window per RTT on a long link.
        if self.recv_unadjusted < max(1, self.recv_granted // 2) and (
            self.recv_unconsumed or self.recv_unadjusted < max(1, self.recv_granted // 8)
        ):
            return 0
        increment = self.recv_unadjusted
        self.recv_unadjusted = 0
        self.recv_window += increment
        return increment

    def grow_window(self, increment: int, now: float, allowance: int, path_rtt: float = 0.0) -> int:
        """Auto-tune like Linux's receive-buffer tuning, when we send a WINDOW_ADJUST of ``increment`` at ``now``.

        Over each cycle of one window's worth of data, the rate times the RTT is what the link could carry;
        a window below 1.5x that is the bottleneck, so double it (to MAX_AUTO_WINDOW and ``allowance``).
        Returns the extra bytes to add to the adjust being sent, or 0. ``now`` 0 (no clock) disables tuning.

        Our own samples time the peer's sending through the rest of its window, so a queue in the sockets
        between us counts as round trip, and the queue grows with the window: on loopback they read 0.6-3.6 ms
        against TCP's 0.005 ms, the window grew to 8 MiB, and sshd, which reads ahead into its channel buffer as
        far as the window lets it, took 10,000-48,000 page faults growing that buffer in one 256 MiB download.
        ``path_rtt``, the network's own minimum when the transport knows it, has no queue in it.
        """
        if not now:
            return 0
        if self.rtt_mark < 0:
            self.rtt_mark = self.recv_total + self.recv_window - increment
            self.rtt_mark_time = now
        if not self.tune_time:
            self.tune_time = now  # the first cycle starts at the first adjust
            return 0
        self.tune_bytes += increment
        if self.tune_bytes < self.recv_granted:
            return 0
        elapsed = now - self.tune_time
        rate_bytes = self.tune_bytes
        self.tune_bytes = 0
        self.tune_time = now
        rtt = min(self.rtt, path_rtt) if self.rtt and path_rtt else self.rtt
        if not rtt or rate_bytes * rtt * 1.5 <= self.recv_granted * max(elapsed, 1e-9):
            return 0
        extra = min(self.recv_granted, limits.MAX_AUTO_WINDOW - self.recv_granted, allowance)
        if extra <= 0:
            return 0
        self.recv_granted += extra
        self.recv_window += extra
        return extra

    @property
    def output_open(self) -> bool:
        return not (self.eof_sent or self.close_sent)
