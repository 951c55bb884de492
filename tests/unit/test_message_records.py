"""Messages are immutable records of their wire fields: built positionally or by name with defaults, equal and
hashed by value, shown with their fields, and encoded and decoded by the one codec."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from sshconduit import messages


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
