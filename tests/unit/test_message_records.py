"""Messages are immutable records of their wire fields: built positionally or by name with defaults, equal and
hashed by value, shown with their fields, and encoded and decoded by the one codec."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from sshconduit import messages, wire
from sshconduit.errors import ProtocolError


def test_fields_defaults_and_wire_layout() -> None:
    by_position = messages.Disconnect(11, "bye")
    by_name = messages.Disconnect(description="bye", reason=11, language="")
    assert by_position == by_name and hash(by_position) == hash(by_name)
    assert by_position != messages.Disconnect(11, "bye", "en")
    assert messages.Disconnect.__match_args__ == ("reason", "description", "language")
    assert repr(by_position) == "Disconnect(reason=11, description='bye', language='')"
    payload = by_position.encode()
    assert payload == b"\x01" + b"\x00\x00\x00\x0b" + b"\x00\x00\x00\x03bye" + b"\x00\x00\x00\x00"
    assert messages.decode_message(payload) == by_position
    with pytest.raises(TypeError):
        messages.Disconnect(11)  # type: ignore[call-arg]  # description has no default


def test_records_are_immutable_and_survive_pickling() -> None:
    message = messages.ChannelData(3, b"abc")
    with pytest.raises(AttributeError):
        message.data = b"changed"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del message.recipient_channel  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(message)) == message
    # two message types with the same field values are not equal
    assert messages.ChannelEof(3) != messages.ChannelClose(3)


def test_a_field_without_a_wire_type_is_refused_at_class_creation() -> None:
    with pytest.raises(TypeError, match="no wire type"):

        class Bad(messages.Message, msg_id=250, dispatch=False):
            count: int  # not one of the wire types (U32, Str, ...)

    # the module's own annotation names, as its message classes use them (annotations stay strings)
    namespace: dict[str, Any] = {}
    exec("class Good(Message, msg_id=251, dispatch=False):\n    count: U32 = 7", vars(messages), namespace)
    assert namespace["Good"]().count == 7
    assert namespace["Good"](8).encode() == b"\xfb\x00\x00\x00\x08"


def test_every_wire_type_in_any_order_is_written_and_read_as_wire_s_encoders_do() -> None:
    """The compiled codec folds adjacent fixed-size fields (and the message number) into one struct: the bytes
    must still be exactly the field-by-field encoding, and reading must undo it and check lengths."""
    namespace: dict[str, Any] = {}
    exec(
        "class Mixed(Message, msg_id=252, dispatch=False):\n"
        "    flag: Bool\n    small: Byte\n    count: U32\n    name: Text\n    big: U64\n    blob: Str\n"
        "    names: NameList\n    n: MPInt\n    cookie: Cookie\n    last: U32\n    tail: Rest\n"
        "class Leading(Message, msg_id=253, dispatch=False):\n    name: Text\n    count: U32\n",
        vars(messages),
        namespace,
    )
    mixed, leading = namespace["Mixed"], namespace["Leading"]
    value = mixed(True, 7, 9, "é", 2**40, b"xy", ("a", "b"), -5, b"c" * 16, 0xFFFFFFFF, b"rest")
    expected = b"".join(
        [
            b"\xfc",
            wire.boolean(True),
            wire.byte(7),
            wire.pack_u32(9),
            wire.string("é"),
            wire.pack_u64(2**40),
            wire.string(b"xy"),
            wire.name_list(["a", "b"]),
            wire.mpint(-5),
            b"c" * 16,
            wire.pack_u32(0xFFFFFFFF),
            b"rest",
        ]
    )
    assert value.encode() == expected
    assert messages.decode_as(mixed, expected) == value
    assert leading("x", 3).encode() == b"\xfd" + wire.string("x") + wire.pack_u32(3)
    assert messages.decode_as(leading, b"\xfd" + wire.string("x") + wire.pack_u32(3)) == leading("x", 3)
    assert messages.decode_as(mixed, b"\xfc\x02" + expected[2:]).flag is True  # any non-zero byte is true
    for cut in (2, 5, 9, len(expected) - 5):
        with pytest.raises(ProtocolError, match="truncated"):
            messages.decode_as(mixed, expected[:cut])
    with pytest.raises(ProtocolError, match="after end"):
        messages.decode_as(leading, b"\xfd" + wire.string("x") + wire.pack_u32(3) + b"!")
    window = messages.WindowChange(80, 24, 0, 0)  # a tail: no number in front
    assert window.encode() == b"".join(wire.pack_u32(v) for v in (80, 24, 0, 0))
    assert messages.WindowChange.decode(window.encode()) == window


def test_a_message_of_fixed_size_fields_decodes_in_one_unpack_with_the_same_checks() -> None:
    """EOF, CLOSE, WINDOW_ADJUST and kin skip the Reader (the forwarding path's most common messages): the same
    values, the same refusals of a short or a long payload, and the number checked as for any message."""
    adjust = messages.ChannelWindowAdjust(7, 2**32 - 1)
    assert messages.decode_message(adjust.encode()) == adjust
    assert messages.decode_message(messages.ChannelEof(3).encode()) == messages.ChannelEof(3)
    assert messages.decode_message(b"\x52") == messages.RequestFailure()  # no fields at all
    assert messages.decode_message(memoryview(b"\x61\x00\x00\x01\x00")) == messages.ChannelClose(256)
    for payload in (b"\x60\x00\x00\x00", b"\x5d" + bytes(7)):
        with pytest.raises(ProtocolError, match="truncated"):
            messages.decode_message(payload)
    for payload in (b"\x60" + bytes(5), b"\x52\x00", adjust.encode() + b"!"):
        with pytest.raises(ProtocolError, match="after end"):
            messages.decode_message(payload)
    with pytest.raises(ProtocolError, match="expected message 96"):
        messages.decode_as(messages.ChannelEof, messages.ChannelClose(3).encode())


def test_a_message_of_strings_and_integers_is_read_without_a_reader_with_the_reader_s_refusals(monkeypatch) -> None:
    """CHANNEL_OPEN, its direct-tcpip and open-data tails, OPEN_CONFIRMATION: a forward decodes these per
    connection, so they are read inline; what the Reader would refuse, it still refuses, in its own words."""
    tail = messages.DirectTcpip("10.0.0.1", 80, "127.0.0.1", 5555).encode() + messages.OpenData(b"GET /").encode()
    opening = messages.ChannelOpen("direct-tcpip", 3, 1 << 21, 1 << 15, tail)
    confirmation = messages.ChannelOpenConfirmation(3, 9, 1 << 21, 1 << 15)
    assert messages.KexInit._split is None and messages.KexdhReply._split is None  # name-lists, mpints: the Reader

    def no_reader(*args: object) -> None:
        raise AssertionError("the Reader was used")

    with monkeypatch.context() as patch:
        patch.setattr(wire.Reader, "__init__", no_reader)
        assert messages.decode_message(opening.encode()) == opening
        assert messages.decode_message(memoryview(opening.encode())) == opening
        assert messages.decode_message(confirmation.encode()) == confirmation
        request, rest = messages.DirectTcpip.decode_with_rest(tail)
        assert (request.host, request.port, request.originator_port) == ("10.0.0.1", 80, 5555)
        assert messages.OpenData.decode(rest) == messages.OpenData(b"GET /")
    payload = opening.encode()
    for cut in (3, 5, 17, 20):
        with pytest.raises(ProtocolError, match="truncated"):
            messages.decode_message(payload[:cut])
    not_utf8 = b"\x5a" + wire.string(b"\xff\xfe") + payload[1 + 4 + len("direct-tcpip") :]
    with pytest.raises(ProtocolError, match="not valid UTF-8"):
        messages.decode_message(not_utf8)
    with pytest.raises(ProtocolError, match="after end"):
        messages.OpenData.decode(messages.OpenData(b"x").encode() + b"!")
    with pytest.raises(ProtocolError, match="truncated"):
        messages.DirectTcpip.decode_with_rest(tail[:6])
