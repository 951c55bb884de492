"""Terminal modes of pty-req (RFC 4254 section 8) to and from termios, and the window size ioctl."""

from __future__ import annotations

import struct
import termios

from . import wire
from .limits import MAX_TERMINAL_MODES
from .wire import Reader

# --- terminal modes (RFC 4254 section 8): opcode -> termios name ---

_MODE_CHARS = {
    1: "VINTR", 2: "VQUIT", 3: "VERASE", 4: "VKILL", 5: "VEOF", 6: "VEOL", 7: "VEOL2", 8: "VSTART",
    9: "VSTOP", 10: "VSUSP", 12: "VREPRINT", 13: "VWERASE", 14: "VLNEXT", 18: "VDISCARD",
}  # fmt: skip
_MODE_IFLAGS = {30: "IGNPAR", 31: "PARMRK", 32: "INPCK", 33: "ISTRIP", 34: "INLCR", 35: "IGNCR", 36: "ICRNL"}
_MODE_IFLAGS |= {37: "IUCLC", 38: "IXON", 39: "IXANY", 40: "IXOFF", 41: "IMAXBEL", 42: "IUTF8"}
_MODE_LFLAGS = {50: "ISIG", 51: "ICANON", 52: "XCASE", 53: "ECHO", 54: "ECHOE", 55: "ECHOK", 56: "ECHONL"}
_MODE_LFLAGS |= {57: "NOFLSH", 58: "TOSTOP", 59: "IEXTEN", 60: "ECHOCTL", 61: "ECHOKE", 62: "PENDIN"}
_MODE_OFLAGS = {70: "OPOST", 71: "OLCUC", 72: "ONLCR", 73: "OCRNL", 74: "ONOCR", 75: "ONLRET"}
_MODE_CFLAGS = {92: "PARENB", 93: "PARODD"}
_MODE_CFLAGS_SIZE = {90: "CS7", 91: "CS8"}  # values of the multi-bit CSIZE field, not single bits
# index of each flag word in a termios.tcgetattr() list
_FLAG_TABLES = (
    (0, _MODE_IFLAGS),
    (3, _MODE_LFLAGS),
    (1, _MODE_OFLAGS),
    (2, _MODE_CFLAGS),
    (2, _MODE_CFLAGS_SIZE),
)
TTY_OP_END, _TTY_OP_ISPEED, _TTY_OP_OSPEED = 0, 128, 129
_DISABLED_CHAR = 255  # OpenSSH's _POSIX_VDISABLE on the wire


def encode_terminal_modes(attrs: list) -> bytes:
    """The pty-req modes string for a termios.tcgetattr() list."""
    out = bytearray()
    chars = attrs[6]
    for opcode, name in _MODE_CHARS.items():
        index = getattr(termios, name, None)
        if index is not None and index < len(chars):
            value = chars[index]
            value = value[0] if isinstance(value, bytes) else value
            out += bytes((opcode,)) + wire.pack_u32(_DISABLED_CHAR if value == 0 else value)
    for word, table in _FLAG_TABLES:
        for opcode, name in table.items():
            bit = getattr(termios, name, None)
            if bit is not None:
                on = (attrs[word] & termios.CSIZE) == bit if table is _MODE_CFLAGS_SIZE else attrs[word] & bit
                out += bytes((opcode,)) + wire.pack_u32(1 if on else 0)
    out += bytes((_TTY_OP_ISPEED,)) + wire.pack_u32(_baud(attrs[4]))
    out += bytes((_TTY_OP_OSPEED,)) + wire.pack_u32(_baud(attrs[5]))
    return bytes(out) + bytes((TTY_OP_END,))


def _baud(speed_constant: int) -> int:
    for name in dir(termios):
        if name.startswith("B") and name[1:].isdigit() and getattr(termios, name) == speed_constant:
            return int(name[1:])
    return 38400


def apply_terminal_modes(attrs: list, modes: bytes) -> list:
    """A copy of ``attrs`` with the peer's modes applied; unknown opcodes are skipped (RFC 4254 8)."""
    attrs = [*attrs[:6], list(attrs[6])]
    reader = Reader(modes)
    for _ in range(MAX_TERMINAL_MODES):
        if not reader.remaining:
            break
        opcode = reader.byte()
        if opcode == TTY_OP_END or opcode >= 160:  # 160..254 have undefined argument sizes: stop
            break
        value = reader.uint32()
        if opcode in _MODE_CHARS:
            index = getattr(termios, _MODE_CHARS[opcode], None)
            if index is not None and index < len(attrs[6]):
                char = 0 if value == _DISABLED_CHAR else value & 0xFF
                attrs[6][index] = bytes((char,)) if isinstance(attrs[6][index], bytes) else char
            continue
        for word, table in _FLAG_TABLES:
            bit = getattr(termios, table.get(opcode, ""), None)
            if bit is None:
                continue
            if table is _MODE_CFLAGS_SIZE:
                if value:  # "CS7 off" says nothing about which size is on
                    attrs[word] = (attrs[word] & ~termios.CSIZE) | bit
            else:
                attrs[word] = attrs[word] | bit if value else attrs[word] & ~bit
    return attrs


def winsize(columns: int, rows: int, width_px: int, height_px: int) -> bytes:
    clamp = 0xFFFF
    return struct.pack("HHHH", min(rows, clamp), min(columns, clamp), min(width_px, clamp), min(height_px, clamp))
