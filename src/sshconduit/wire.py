"""SSH data types (RFC 4251 section 5): a reader over a buffer and the encoders."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from .errors import ProtocolError

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_unpack_u32 = _U32.unpack_from
_unpack_u64 = _U64.unpack_from
pack_u32 = _U32.pack
pack_u64 = _U64.pack


class Reader:
    """Reads SSH types from a bytes-like object; a short buffer raises ProtocolError."""

    __slots__ = ("_buf", "_end", "_pos")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self._buf = data
        self._pos = pos
        self._end = len(data)

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def _take(self, n: int) -> int:
        start = self._pos
        if n < 0 or start + n > self._end:
            raise ProtocolError("truncated message")
        self._pos = start + n
        return start

    def byte(self) -> int:
        return self._buf[self._take(1)]

    def boolean(self) -> bool:
        return self._buf[self._take(1)] != 0

    def uint32(self) -> int:
        return _unpack_u32(self._buf, self._take(4))[0]

    def uint64(self) -> int:
        return _unpack_u64(self._buf, self._take(8))[0]

    def fixed(self, layout: struct.Struct) -> tuple[Any, ...]:
        """A run of fixed-size fields (bytes, booleans, integers) in one call."""
        return layout.unpack_from(self._buf, self._take(layout.size))

    def raw(self, n: int) -> bytes:
        start = self._take(n)
        return bytes(self._buf[start : start + n])

    def string(self) -> bytes:
        return self.raw(self.uint32())

    def text(self) -> str:
        try:
            return self.string().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("string is not valid UTF-8") from exc

    def name_list(self) -> tuple[str, ...]:
        data = self.string()
        if not data:
            return ()
        try:
            return tuple(data.decode("ascii").split(","))
        except UnicodeDecodeError as exc:
            raise ProtocolError("name-list is not ASCII") from exc

    def mpint(self) -> int:
        return int.from_bytes(self.string(), "big", signed=True)

    def rest(self) -> bytes:
        start = self._pos
        self._pos = self._end
        return bytes(self._buf[start : self._end])

    def expect_end(self) -> None:
        if self._pos != self._end:
            raise ProtocolError("unexpected data after end of message")


def byte(value: int) -> bytes:
    return bytes((value,))


def boolean(value: bool) -> bytes:
    return b"\x01" if value else b"\x00"


def string(value: bytes | str) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8")
    return _U32.pack(len(value)) + value


def name_list(names: Iterable[str]) -> bytes:
    return string(",".join(names).encode("ascii"))


def mpint(value: int) -> bytes:
    if value == 0:
        return b"\x00\x00\x00\x00"
    length = (value.bit_length() + 8) // 8  # room for the sign bit
    return string(value.to_bytes(length, "big", signed=True))
