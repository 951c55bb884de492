"""The forwarding data path's shortcuts: CHANNEL_DATA parsed without the generic codec, reads parsed in place,
the no-copy AEAD openers, and the larger channel limits used only between two sshconduit peers."""

from __future__ import annotations

import os
import random
import struct

import pytest
from test_transport import Pair, cipher_config

from sshconduit import limits, messages
from sshconduit.aio import ChannelHandler, handler_window
from sshconduit.crypto import ciphers, keys
from sshconduit.errors import ProtocolError
from sshconduit.forward.bridge import StreamBridge


@pytest.fixture(scope="module")
def host_key() -> keys.PrivateKey:
    return keys.generate_private_key("ssh-ed25519")


AEAD_AND_CTR = [
    ("chacha20-poly1305@openssh.com", None),
    ("aes128-gcm@openssh.com", None),
    ("aes256-gcm@openssh.com", None),
    ("aes128-ctr", "hmac-sha2-256-etm@openssh.com"),
    ("aes128-ctr", "hmac-sha2-256"),
]


@pytest.mark.parametrize(("cipher", "mac"), AEAD_AND_CTR)
def test_channel_data_survives_any_split_of_the_stream(host_key: keys.PrivateKey, cipher: str, mac: str | None) -> None:
    config = cipher_config(cipher, mac)
    pair = Pair(host_key, config, config).handshake()
    rng = random.Random(7)
    sent = [os.urandom(rng.randrange(0, 70_000)) for _ in range(40)]
    for index, data in enumerate(sent):
        pair.client.send(messages.channel_data_header(index, len(data)), data)
    wire = b"".join(pair.client.data_to_send())
    received: list[object] = []
    pos = 0
    while pos < len(wire):  # reads that end mid-header, mid-packet and on packet boundaries
        step = rng.choice((1, 3, 4, 17, 4096, 65536, 300_000))
        received += pair.server.receive_data(wire[pos : pos + step])
        pos += step
    data_events = [e for e in received if isinstance(e, messages.ChannelData)]
    assert [e.recipient_channel for e in data_events] == list(range(len(sent)))
    assert [e.data for e in data_events] == sent
    assert all(type(e.data) is bytes for e in data_events)  # handlers get bytes, never a view of a buffer


@pytest.mark.parametrize("declared", [0, 4, 6, 1000])
def test_channel_data_with_a_wrong_length_is_a_protocol_error(host_key: keys.PrivateKey, declared: int) -> None:
    pair = Pair(host_key).handshake()
    pair.client.send(b"\x5e" + struct.pack(">II", 0, declared) + b"fived")
    with pytest.raises(ProtocolError):
        pair.server.receive_data(b"".join(pair.client.data_to_send()))


@pytest.mark.parametrize("cipher", ["chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com"])
def test_open_view_matches_open(cipher: str) -> None:
    info = ciphers.CIPHERS[cipher]
    key, iv = os.urandom(info.key_size), os.urandom(info.iv_size)
    sealer = ciphers.new_sealer(cipher, None, key, iv, b"")
    by_open, by_view = ciphers.new_opener(cipher, None, key, iv, b""), ciphers.new_opener(cipher, None, key, iv, b"")
    for seq, size in enumerate((0, 1, 15, 16, 32_768, 65_000)):
        payload = os.urandom(size) + b"\x5e"
        packet = bytes(sealer.seal(seq, [payload]))
        for opener in (by_open, by_view):
            assert opener.packet_length(seq, packet[:4]) + 4 + opener.mac_size == len(packet)
        assert by_open.open(seq, packet) == payload
        assert bytes(by_view.open_view(seq, packet)) == payload  # type: ignore[attr-defined]


def test_larger_channel_limits_only_between_sshconduit_peers() -> None:
    bridge = StreamBridge("test")
    assert handler_window(bridge, peer_is_us=False) == (limits.DEFAULT_WINDOW, limits.DEFAULT_MAX_PACKET)
    assert handler_window(bridge, peer_is_us=True) == (limits.PEER_WINDOW, limits.PEER_MAX_PACKET)
    # a handler that does not ask for bulk limits (a session) keeps OpenSSH's, whoever the peer is
    assert handler_window(ChannelHandler(), peer_is_us=True) == (limits.DEFAULT_WINDOW, limits.DEFAULT_MAX_PACKET)
    # a CHANNEL_DATA packet of PEER_MAX_PACKET bytes fits in what every sshconduit accepts
    assert limits.PEER_MAX_PACKET + 9 <= limits.PEER_MAX_PAYLOAD
    assert limits.PEER_MAX_PAYLOAD + 1 + 255 + 4 <= limits.MAX_PACKET_LENGTH
