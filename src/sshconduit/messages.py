"""Message numbers and one codec per message (RFC 4250-4254), nothing else.

Each message is an immutable record (``_Record``) whose annotated fields, in order, are its wire layout; the
field types below name the SSH data type. ``encode()`` gives the payload, ``decode_message(payload)`` the
object. Method-specific tails (channel-open data, request data, auth method data) are a trailing ``Rest`` field
that the layer above decodes with the small codecs at the end of this file. Key-exchange messages 30-49 mean
different things per kex method, so they are not in the dispatch table: the kex method decodes them with
``decode_as``.
"""

from __future__ import annotations

import inspect
import struct
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Self, get_origin

from . import wire
from .errors import ProtocolError
from .wire import Reader, pack_u32

Byte = Annotated[int, "byte"]
Bool = Annotated[bool, "boolean"]
U32 = Annotated[int, "uint32"]
U64 = Annotated[int, "uint64"]
Str = Annotated[bytes, "string"]
Text = Annotated[str, "text"]
NameList = Annotated[tuple[str, ...], "name_list"]
MPInt = Annotated[int, "mpint"]
Cookie = Annotated[bytes, "cookie"]  # 16 raw bytes
Rest = Annotated[bytes, "rest"]  # everything left in the payload

# How the code compiled per record below writes and reads each SSH type. Adjacent fixed-size fields share one
# struct call; the others call wire's encoder or the Reader's method.
_FIXED = {"byte": "B", "boolean": "?", "uint32": "I", "uint64": "Q"}
_ENCODE = {
    "string": "_string({})",
    "text": "_string({})",
    "name_list": "_name_list({})",
    "mpint": "_mpint({})",
    "cookie": "bytes({})",
    "rest": "bytes({})",
}
_DECODE = {
    "string": "reader.string()",
    "text": "reader.text()",
    "name_list": "reader.name_list()",
    "mpint": "reader.mpint()",
    "cookie": "reader.raw(16)",
    "rest": "reader.rest()",
}
# The same reads inline in a record's _split(buf, pos), for the types that need no helper; {i} is the field.
_STRING_AT = "if end - pos < 4: return None\nn = _u32_at(buf, pos)[0]\npos += 4\nif end - pos < n: return None\n"
_SPLIT = {
    "string": _STRING_AT + "v{i} = bytes(buf[pos : pos + n])\npos += n",
    "text": _STRING_AT
    + "try: v{i} = str(buf[pos : pos + n], 'utf-8')\nexcept UnicodeDecodeError: return None\npos += n",
    "cookie": "if end - pos < 16: return None\nv{i} = bytes(buf[pos : pos + 16])\npos += 16",
    "rest": "v{i} = bytes(buf[pos:end])\npos = end",
}
_CODEC_SCOPE = {
    "_string": wire.string,
    "_name_list": wire.name_list,
    "_mpint": wire.mpint,
    "_Reader": Reader,
    "_u32_at": struct.Struct(">I").unpack_from,
}

_BY_ID: dict[int, type[Message]] = {}
# A field's wire type by its annotation's name: annotations stay strings here (from __future__ import annotations).
_WIRE_TYPES = {name: alias.__metadata__[0] for name, alias in list(globals().items()) if get_origin(alias) is Annotated}


class _Record:
    """An immutable record whose annotated fields, in order, are its wire layout.

    Each class gets code compiled for it: ``__init__``, ``_write()`` (its bytes, after the class's prefix) and
    ``_read(reader)`` (its field values). That is what ``dataclasses.dataclass(frozen=True)`` gave, at a fraction
    of the import time, and a message costs one call each way instead of one per field. A record whose fields
    need no helper to read also gets ``_split`` and ``_from_payload``, which read it without a Reader."""

    _field_names: ClassVar[tuple[str, ...]] = ()
    # (record, end of its fields) read from ``buf`` at ``pos``, or None where the Reader would refuse; None for
    # a record with a field that needs a helper to read (name-list, mpint)
    _split: ClassVar[Callable[[bytes | memoryview, int], tuple[Any, int] | None] | None] = None

    def __init_subclass__(cls, prefix: bytes = b"", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = {n: kind for n, kind in inspect.get_annotations(cls).items() if not kind.startswith("ClassVar")}
        unknown = [name for name, kind in own.items() if kind not in _WIRE_TYPES]
        if unknown:
            raise TypeError(f"{cls.__name__}: fields {unknown} have no wire type")
        cls._field_names = cls.__match_args__ = tuple(own)
        defaults = {f"_default_{name}": cls.__dict__[name] for name in own if name in cls.__dict__}
        params = "".join(f", {n}=_default_{n}" if f"_default_{n}" in defaults else f", {n}" for n in own)
        # Into the instance dict: a record is made for every message, and one setattr call per field cost twice this.
        body = "".join(f"\n    _own[{name!r}] = {name}" for name in own)
        body = f"\n    _own = self.__dict__{body}" if own else "\n    pass"
        scope: dict[str, Any] = {**defaults, **_CODEC_SCOPE}
        fields = [(name, _WIRE_TYPES[kind]) for name, kind in own.items()]
        scope["_cls"] = cls
        exec(f"def __init__(self{params}):{body}\n{_codec_source(fields, prefix, scope)}", scope)  # ours only
        cls.__init__ = scope["__init__"]  # type: ignore[misc]
        cls._write = scope["_write"]  # type: ignore[attr-defined]
        cls._read = staticmethod(scope["_read"])  # type: ignore[attr-defined]
        cls._split = staticmethod(scope["_split"]) if "_split" in scope else None  # type: ignore[assignment]
        if "_from_payload" in scope:
            cls._from_payload = staticmethod(scope["_from_payload"])  # type: ignore[attr-defined]

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._field_names)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a {type(self).__name__}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.__class__, self._values()))

    def encode(self) -> bytes:
        return self._write()  # type: ignore[attr-defined, no-any-return]

    @classmethod
    def decode_body(cls, reader: Reader) -> Self:
        """The record from the rest of ``reader``, which it must use up."""
        values = cls._read(reader)  # type: ignore[attr-defined]
        reader.expect_end()
        return cls(*values)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._field_names)
        return f"{type(self).__qualname__}({fields})"


def _codec_source(fields: list[tuple[str, str]], prefix: bytes, scope: dict[str, Any]) -> str:
    """The source of ``_write(self)``, ``_read(reader)`` and, where every field can be read inline, ``_split(buf,
    pos)`` for these (name, wire type) fields; the struct layouts they use go into ``scope``. ``prefix`` (a message
    number) leads the bytes written."""
    parts: list[str] = []  # expressions whose concatenation is the encoding
    reads: list[str] = []  # statements that set v0, v1, ... from the reader
    splits: list[str] = []  # the same, read inline from buf at pos; "return None" where the Reader would refuse
    run: list[int] = []  # adjacent fixed-size fields not yet written out
    head = prefix  # bytes due before the next field, folded into its struct if it is fixed-size

    def end_run() -> None:
        nonlocal head
        if not run:
            return
        layout = "".join(_FIXED[fields[i][1]] for i in run)
        name = f"_layout{len(scope)}"
        scope[name] = struct.Struct(">" + "B" * len(head) + layout).pack
        scope[name + "_in"] = unpack = struct.Struct(">" + layout)
        scope[name + "_at"] = unpack.unpack_from
        parts.append(f"{name}({', '.join([*map(str, head), *(f'self.{fields[i][0]}' for i in run)])})")
        targets = "".join(f"v{i}, " for i in run)
        reads.append(f"{targets}= reader.fixed({name}_in)")
        size = unpack.size
        splits.extend((f"if end - pos < {size}: return None", f"{targets}= {name}_at(buf, pos)", f"pos += {size}"))
        run.clear()
        head = b""

    for i, (name, kind) in enumerate(fields):
        if kind in _FIXED:
            run.append(i)
            continue
        end_run()
        if head:
            parts.append(repr(head))
            head = b""
        parts.append(_ENCODE[kind].format(f"self.{name}"))
        reads.append(f"v{i} = {_DECODE[kind]}")
        splits.extend(_SPLIT.get(kind, "").format(i=i).splitlines())
    end_run()
    if head:
        parts.append(repr(head))
    write = " + ".join(parts) or "b''"
    read = "".join(f"\n    {line}" for line in reads)
    values = "".join(f"v{i}, " for i in range(len(fields)))
    source = f"def _write(self):\n    return {write}\ndef _read(reader):{read}\n    return ({values})\n"
    if not fields and not prefix:
        return source  # the bases, Message and _Tail: their _from_payload reads with a Reader
    inline = all(kind in _FIXED or kind in _SPLIT for _name, kind in fields)
    if inline:
        # Read without a Reader, for the channel messages and tails a forward decodes per connection. Where the
        # Reader would refuse (short, not UTF-8), this gives None and the caller lets the Reader say why.
        body = "".join(f"\n    {line}" for line in splits)
        source += f"def _split(buf, pos):\n    end = len(buf){body}\n    return _cls({values}), pos\n"
    refuse = f"        return _cls.decode_body(_Reader(payload, {len(prefix)}))\n"  # in the Reader's words
    if all(kind in _FIXED for _name, kind in fields):
        # The whole record in one unpack: most channel messages (EOF, CLOSE, adjusts) are these.
        layout = struct.Struct(">" + "".join(_FIXED[kind] for _name, kind in fields))
        scope["_whole"] = layout.unpack_from
        source += (
            f"def _from_payload(payload):\n    if len(payload) != {len(prefix) + layout.size}:\n{refuse}"
            f"    return _cls(*_whole(payload, {len(prefix)}))\n"
        )
    elif inline:
        source += (
            f"def _from_payload(payload):\n    got = _split(payload, {len(prefix)})\n"
            f"    if got is None or got[1] != len(payload):\n{refuse}    return got[0]\n"
        )
    return source


class Message(_Record):
    """Base of every message: a record with a message number, in the dispatch table unless ``dispatch=False``."""

    ID: ClassVar[int] = 0

    def __init_subclass__(cls, msg_id: int, dispatch: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(prefix=bytes((msg_id,)), **kwargs)
        cls.ID = msg_id
        if dispatch:
            _BY_ID[msg_id] = cls

    @classmethod
    def _from_payload(cls, payload: bytes | memoryview) -> Self:
        """The message from its whole payload (number included); records read inline compile a faster one."""
        return cls.decode_body(Reader(payload, 1))


def decode_as(cls: type[Message], payload: bytes | memoryview) -> Any:
    """Decode ``payload`` (message number included) as ``cls``."""
    if not payload or payload[0] != cls.ID:
        raise ProtocolError(f"expected message {cls.ID}")
    return cls._from_payload(payload)


def decode_message(payload: bytes | memoryview) -> Message:
    """Decode any message in the dispatch table; an unknown number raises KeyError for UNIMPLEMENTED."""
    if not payload:
        raise ProtocolError("empty payload")
    return _BY_ID[payload[0]]._from_payload(payload)


# --- transport layer generic (RFC 4253) ---


class Disconnect(Message, msg_id=1):
    reason: U32
    description: Text
    language: Text = ""


class Ignore(Message, msg_id=2):
    data: Str = b""


class Unimplemented(Message, msg_id=3):
    sequence: U32


class Debug(Message, msg_id=4):
    always_display: Bool
    message: Text
    language: Text = ""


class ServiceRequest(Message, msg_id=5):
    service: Text


class ServiceAccept(Message, msg_id=6):
    service: Text


class ExtInfo(Message, msg_id=7):
    """RFC 8308: a count then name/value pairs; kept raw in ``data`` and read with ext_info_pairs()."""

    data: Rest

    @classmethod
    def from_pairs(cls, pairs: dict[str, bytes]) -> ExtInfo:
        body = b"".join(wire.string(k) + wire.string(v) for k, v in pairs.items())
        return cls(pack_u32(len(pairs)) + body)

    def pairs(self) -> dict[str, bytes]:
        reader = Reader(self.data)
        count = reader.uint32()
        if count > 64:
            raise ProtocolError("too many extensions")
        return {reader.text(): reader.string() for _ in range(count)}


# --- key exchange (RFC 4253 7) ---


class KexInit(Message, msg_id=20):
    cookie: Cookie
    kex_algorithms: NameList
    server_host_key_algorithms: NameList
    ciphers_c2s: NameList
    ciphers_s2c: NameList
    macs_c2s: NameList
    macs_s2c: NameList
    compression_c2s: NameList
    compression_s2c: NameList
    languages_c2s: NameList
    languages_s2c: NameList
    first_kex_packet_follows: Bool
    reserved: U32 = 0


class NewKeys(Message, msg_id=21):
    pass


class KexEcdhInit(Message, msg_id=30, dispatch=False):
    """Also curve25519, sntrup/mlkem hybrids: the client's public value as a string."""

    client_public: Str


class KexEcdhReply(Message, msg_id=31, dispatch=False):
    host_key: Str
    server_public: Str
    signature: Str


class KexdhInit(Message, msg_id=30, dispatch=False):
    e: MPInt


class KexdhReply(Message, msg_id=31, dispatch=False):
    host_key: Str
    f: MPInt
    signature: Str


# --- user authentication (RFC 4252) ---


class UserauthRequest(Message, msg_id=50):
    user: Text
    service: Text
    method: Text
    method_data: Rest = b""


class UserauthFailure(Message, msg_id=51):
    methods: NameList
    partial_success: Bool = False


class UserauthSuccess(Message, msg_id=52):
    pass


class UserauthBanner(Message, msg_id=53):
    message: Text
    language: Text = ""


class UserauthMethodReply(Message, msg_id=60):
    """Message 60 means PK_OK, INFO_REQUEST or PASSWD_CHANGEREQ depending on the method in progress: the
    auth layer re-reads it with ``decode_as`` for the class it expects."""

    data: Rest


class UserauthPkOk(Message, msg_id=60, dispatch=False):
    algorithm: Text
    key_blob: Str


class UserauthInfoRequest(Message, msg_id=60, dispatch=False):
    """RFC 4256; prompts follow as (text prompt, bool echo) pairs in ``prompts_data``."""

    name: Text
    instruction: Text
    language: Text
    prompts_data: Rest

    @classmethod
    def build(cls, name: str, instruction: str, prompts: list[tuple[str, bool]]) -> UserauthInfoRequest:
        body = b"".join(wire.string(p) + wire.boolean(echo) for p, echo in prompts)
        return cls(name, instruction, "", pack_u32(len(prompts)) + body)

    def prompts(self) -> list[tuple[str, bool]]:
        reader = Reader(self.prompts_data)
        count = reader.uint32()
        if count > 64:
            raise ProtocolError("too many prompts")
        return [(reader.text(), reader.boolean()) for _ in range(count)]


class UserauthInfoResponse(Message, msg_id=61):
    responses_data: Rest

    @classmethod
    def build(cls, responses: list[str]) -> UserauthInfoResponse:
        return cls(pack_u32(len(responses)) + b"".join(wire.string(r) for r in responses))

    def responses(self) -> list[str]:
        reader = Reader(self.responses_data)
        count = reader.uint32()
        if count > 64:
            raise ProtocolError("too many responses")
        return [reader.text() for _ in range(count)]


# --- connection protocol (RFC 4254) ---


class GlobalRequest(Message, msg_id=80):
    name: Text
    want_reply: Bool
    request_data: Rest = b""


class RequestSuccess(Message, msg_id=81):
    response_data: Rest = b""


class RequestFailure(Message, msg_id=82):
    pass


class ChannelOpen(Message, msg_id=90):
    channel_type: Text
    sender_channel: U32
    initial_window: U32
    max_packet: U32
    type_data: Rest = b""


class ChannelOpenConfirmation(Message, msg_id=91):
    recipient_channel: U32
    sender_channel: U32
    initial_window: U32
    max_packet: U32
    type_data: Rest = b""


class ChannelOpenFailure(Message, msg_id=92):
    recipient_channel: U32
    reason: U32
    description: Text
    language: Text = ""


class ChannelWindowAdjust(Message, msg_id=93):
    recipient_channel: U32
    bytes_to_add: U32


class ChannelData(Message, msg_id=94):
    recipient_channel: U32
    data: Str


class ChannelExtendedData(Message, msg_id=95):
    recipient_channel: U32
    data_type: U32
    data: Str


class ChannelEof(Message, msg_id=96):
    recipient_channel: U32


class ChannelClose(Message, msg_id=97):
    recipient_channel: U32


class ChannelRequest(Message, msg_id=98):
    recipient_channel: U32
    request_type: Text
    want_reply: Bool
    request_data: Rest = b""


class ChannelSuccess(Message, msg_id=99):
    recipient_channel: U32


class ChannelFailure(Message, msg_id=100):
    recipient_channel: U32


def channel_data_header(recipient: int, length: int) -> bytes:
    """The CHANNEL_DATA payload minus the data itself, so the hot path joins header and data once."""
    return b"\x5e" + pack_u32(recipient) + pack_u32(length)


# --- method-specific tails, decoded by the layer that owns them ---


class _Tail(_Record):
    """Like Message but for a tail inside another message: no number, no dispatch."""

    @classmethod
    def _from_payload(cls, data: bytes | memoryview) -> Self:
        """The record from all of ``data``; records read inline compile a faster one."""
        return cls.decode_body(Reader(data))

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls._from_payload(data)

    @classmethod
    def decode_with_rest(cls, data: bytes) -> tuple[Any, bytes]:
        """Decode a prefix of ``data``; the bytes after it are returned for an extension's fields."""
        got = cls._split(data, 0) if cls._split is not None else None
        if got is not None:
            return got[0], bytes(data[got[1] :])
        reader = Reader(data)
        values = cls._read(reader)  # type: ignore[attr-defined]
        return cls(*values), reader.raw(reader.remaining)


class DirectTcpip(_Tail):
    """CHANNEL_OPEN "direct-tcpip" and "forwarded-tcpip" (RFC 4254 7.1, 7.2)."""

    host: Text
    port: U32
    originator_host: Text
    originator_port: U32


class DirectStreamlocal(_Tail):
    """CHANNEL_OPEN "direct-streamlocal@openssh.com" (OpenSSH PROTOCOL 2.4)."""

    socket_path: Text
    reserved_host: Text = ""
    reserved_port: U32 = 0


# EXT_INFO from an sshconduit server: it takes a forward's first bytes inside the CHANNEL_OPEN, so the client
# need not wait a round trip for OPEN_CONFIRMATION before the first request (as TCP Fast Open does for SYN).
OPEN_DATA_EXTENSION = "open-data@sshconduit"


class OpenData(_Tail):
    """After a direct-tcpip or direct-streamlocal CHANNEL_OPEN's own fields, to a server that advertised
    OPEN_DATA_EXTENSION: the first bytes of the stream, written to the destination once it is connected."""

    data: Str


class ForwardedStreamlocal(_Tail):
    socket_path: Text
    reserved: Text = ""


class TcpipForward(_Tail):
    """GLOBAL_REQUEST "tcpip-forward" / "cancel-tcpip-forward"."""

    address: Text
    port: U32


class StreamlocalForward(_Tail):
    socket_path: Text


class PtyReq(_Tail):
    term: Text
    columns: U32
    rows: U32
    width_px: U32
    height_px: U32
    modes: Str


class WindowChange(_Tail):
    columns: U32
    rows: U32
    width_px: U32
    height_px: U32


class ExecReq(_Tail):
    command: Str


class EnvReq(_Tail):
    name: Text
    value: Text


class ExitStatus(_Tail):
    status: U32


class ExitSignal(_Tail):
    signal: Text
    core_dumped: Bool
    message: Text
    language: Text = ""


class SignalReq(_Tail):
    signal: Text


class PublickeyAuth(_Tail):
    """USERAUTH_REQUEST "publickey" method data; the signature is present iff has_signature."""

    has_signature: Bool
    algorithm: Text
    key_blob: Str
    signature_data: Rest = b""


class PasswordAuth(_Tail):
    change: Bool
    password: Text
    new_password_data: Rest = b""


class KbdInteractiveAuth(_Tail):
    language: Text
    submethods: Text
