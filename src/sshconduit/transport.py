"""The SSH transport layer (RFC 4253) as a sans-IO state machine.

Fed bytes with ``receive_data``, it returns events: transport events defined here, and every decoded message
above the transport (auth, connection) as its ``messages`` object. Bytes to send come out of
``data_to_send``. It runs the version exchange, the binary packet protocol, key exchange with strict kex
(OpenSSH's PROTOCOL 1.10) and rekeying in either direction; while a kex runs, upper-layer packets we are asked
to send are held and released, in order, after our NEWKEYS (as Go's handshake.go does).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from . import limits, messages
from .crypto import ciphers as protection
from .crypto import kex, keys
from .errors import DisconnectReason, KexError, ProtocolError
from .messages import KexInit, Message

log = logging.getLogger("sshconduit.transport")

SOFTWARE_VERSION = "SSH-2.0-sshconduit_0.1"
STRICT_KEX_CLIENT = "kex-strict-c-v00@openssh.com"
STRICT_KEX_SERVER = "kex-strict-s-v00@openssh.com"
EXT_INFO_CLIENT = "ext-info-c"
EXT_INFO_SERVER = "ext-info-s"
_PSEUDO_KEX = {STRICT_KEX_CLIENT, STRICT_KEX_SERVER, EXT_INFO_CLIENT, EXT_INFO_SERVER}

# Messages a peer may send while a key exchange runs (RFC 4253 7.1): generic transport messages but the
# service ones, and the kex range. Strict kex narrows the initial exchange to the kex messages only.
_KEX_ALLOWED = frozenset({1, 2, 3, 4, 20, 21, *range(30, 50)})
_STRICT_ALLOWED = frozenset({1, 20, 21, *range(30, 50)})
_U32_PAIR = struct.Struct(">II")


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass
class TransportConfig:
    kex_algorithms: Sequence[str] = kex.DEFAULT_KEX_ALGORITHMS
    host_key_algorithms: Sequence[str] = ()  # client: empty means "every algorithm we can verify"
    ciphers: Sequence[str] = protection.CLIENT_CIPHERS  # a server's order does not matter (RFC 4253 7.1)
    macs: Sequence[str] = tuple(protection.MACS)
    rekey_bytes: int = limits.DEFAULT_REKEY_BYTES
    rekey_seconds: float = 0.0  # RekeyLimit's time: rekey this long after each exchange, 0 never (aio times it)
    software_version: str = SOFTWARE_VERSION
    strict_kex: bool = True

    def __post_init__(self) -> None:
        # Config files carry OpenSSH's full lists (sntrup761, umac, ...); offer only what we implement.
        self.kex_algorithms = tuple(a for a in self.kex_algorithms if a in kex.KEX_ALGORITHMS)
        self.ciphers = tuple(a for a in self.ciphers if a in protection.CIPHERS)
        self.macs = tuple(a for a in self.macs if a in protection.MACS)
        self.host_key_algorithms = tuple(a for a in self.host_key_algorithms if a in SIGNATURE_ALGORITHMS)

    def set_rekey_limit(self, limit: tuple[int | None, int | None]) -> None:
        """RekeyLimit's (bytes, seconds) as ssh_config and sshd_config give it; None is the default."""
        self.rekey_bytes = limit[0] or limits.DEFAULT_REKEY_BYTES
        self.rekey_seconds = float(limit[1] or 0)


DEFAULT_HOST_KEY_ALGORITHMS = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
)
# Everything we can verify: the defaults plus SHA-1 RSA, which is offered only when configured.
SIGNATURE_ALGORITHMS = frozenset((*DEFAULT_HOST_KEY_ALGORITHMS, "ssh-rsa"))


@dataclass(frozen=True)
class Algorithms:
    kex: str
    host_key: str
    cipher_c2s: str
    cipher_s2c: str
    mac_c2s: str | None
    mac_s2c: str | None

    def describe(self, role: Role) -> str:
        out, inn = (self.cipher_c2s, self.cipher_s2c) if role is Role.CLIENT else (self.cipher_s2c, self.cipher_c2s)
        mac_out, mac_in = (self.mac_c2s, self.mac_s2c) if role is Role.CLIENT else (self.mac_s2c, self.mac_c2s)
        return (
            f"kex: algorithm: {self.kex}; host key algorithm: {self.host_key}; "
            f"cipher out: {out} MAC: {mac_out or '<implicit>'}; cipher in: {inn} MAC: {mac_in or '<implicit>'}"
        )


# --- events ---


@dataclass(frozen=True, slots=True)
class HostKeyReceived:
    """Client only: the server proved it holds this key. Call accept_host_key() or disconnect."""

    key: keys.PublicKey
    algorithm: str


@dataclass(frozen=True, slots=True)
class KexComplete:
    initial: bool
    algorithms: Algorithms


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    reason: int
    description: str


@dataclass(frozen=True, slots=True)
class ExtInfoReceived:
    extensions: dict[str, bytes] = field(default_factory=dict)


def _negotiate(what: str, client: Sequence[str], server: Sequence[str]) -> str:
    for name in client:
        if name in server:
            return name
    raise KexError(f"no matching {what} found. Their offer: {','.join(server)}")


class Transport:
    def __init__(
        self,
        role: Role,
        config: TransportConfig | None = None,
        host_keys: Sequence[keys.PrivateKey] = (),
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.role = role
        self.config = config or TransportConfig()
        self._random = random
        self._host_keys: dict[str, keys.PrivateKey] = {}
        for key in host_keys:
            for alg in key.public.signature_algorithms():
                if alg != "ssh-rsa":  # SHA-1 signatures are off by default, as in OpenSSH 8.8+
                    self._host_keys.setdefault(alg, key)
        self.local_version = self.config.software_version
        self.peer_version: str | None = None
        self._in = bytearray()
        self._out: list[bytes] = []
        self._opener: protection.PacketOpener
        self._open_packet: Callable[[int, memoryview], bytes | memoryview]
        self._use_opener(protection.null_opener())
        self._sealer: protection.PacketSealer = protection.null_sealer()
        self._seq_in = 0
        self._seq_out = 0
        self._packet_length: int | None = None
        self._pre_version_lines = 0  # counted across reads: a server may send them one per segment
        # kex state
        self.session_id: bytes | None = None
        self.algorithms: Algorithms | None = None
        self.host_key: keys.PublicKey | None = None
        self.strict_kex = False
        self.peer_ext_info = False  # the peer asked for EXT_INFO from us
        self.ext_info: dict[str, bytes] = {}  # server: extensions our EXT_INFO lists beside server-sig-algs
        self.peer_extensions: dict[str, bytes] = {}  # client: the server's EXT_INFO
        self.server_sig_algs: tuple[str, ...] | None = None
        self._kex_count = 0  # completed exchanges
        self._our_kexinit: bytes | None = None
        self._peer_kexinit: bytes | None = None
        self._kex_client: kex.KexClient | None = None
        self._pending_keys: tuple[protection.PacketSealer, protection.PacketOpener] | None = None
        self._awaiting_host_key: kex.KexOutcome | None = None
        self._newkeys_sent = False
        self._newkeys_received = False
        self._skip_guessed_packet = False
        self._held: list[tuple[bytes | memoryview, ...]] = []
        # Per direction, as OpenSSH counts RekeyLimit: traffic both ways does not add up to a rekey.
        self._sent_since_kex = 0
        self._received_since_kex = 0
        self._closed = False

    # --- public API ---

    def start(self) -> None:
        """Queue our version line and our first KEXINIT (sent at once, as OpenSSH does)."""
        self._out.append(self.local_version.encode("ascii") + b"\r\n")
        self._send_kexinit()

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    @property
    def in_kex(self) -> bool:
        return self._our_kexinit is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, *parts: bytes | memoryview) -> None:
        """Send one upper-layer payload, the concatenation of ``parts``; held while a key exchange runs."""
        if self._closed:
            return
        if self._our_kexinit is not None or self._held:
            self._held.append(tuple(bytes(p) for p in parts))  # the caller may reuse its buffers
            return
        self._seal(parts)
        if self._sent_since_kex > self.config.rekey_bytes:
            self.rekey()

    def rekey(self) -> None:
        """Start a key exchange now (no-op if one is running or the first has not finished)."""
        if self._our_kexinit is None and self._kex_count > 0 and not self._closed:
            log.debug("rekeying")
            self._send_kexinit()

    def disconnect(self, reason: int, description: str) -> None:
        """Queue a DISCONNECT and refuse to send or receive anything after it."""
        if self._closed:
            return
        try:
            self._seal((messages.Disconnect(reason, description).encode(),))
        finally:
            self._closed = True

    def accept_host_key(self) -> list[object]:
        """Client: the host key event was answered yes; finish the exchange and go on reading."""
        outcome = self._awaiting_host_key
        if outcome is None:
            raise RuntimeError("no host key is waiting for a decision")
        self._awaiting_host_key = None
        events: list[object] = []
        self._finish_exchange(outcome, events)
        return events + self.receive_data(b"")

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[object]:
        """Feed bytes from the peer; returns events. Raises ProtocolError when the peer breaks the protocol."""
        if self._closed:
            return []
        buf: bytes | bytearray | memoryview
        if self._in or self.peer_version is None:
            self._in += data
            buf = self._in
        else:
            buf = data  # no partial packet waiting (the usual case): parse the read where it is, no copy
        events: list[object] = []
        if self.peer_version is None and not self._read_version():
            return events
        opener, open_packet = self._opener, self._open_packet
        pos, end = 0, len(buf)
        with memoryview(buf) as view:
            while self._awaiting_host_key is None and not self._closed:
                if self._packet_length is None:
                    if end - pos < opener.header_size:
                        break
                    # The opener refuses a length out of bounds (ciphers._check_length).
                    self._packet_length = opener.packet_length(self._seq_in, view[pos : pos + opener.header_size])
                total = 4 + self._packet_length + opener.mac_size
                if end - pos < total:
                    break
                payload = open_packet(self._seq_in, view[pos : pos + total])
                pos += total
                self._packet_length = None
                self._seq_in = (self._seq_in + 1) & 0xFFFFFFFF
                self._received_since_kex += total
                self._dispatch(payload, events)
                if self._opener is not opener:  # NEWKEYS switched it
                    opener, open_packet = self._opener, self._open_packet
        if buf is self._in:
            del self._in[:pos]
        elif pos < end:
            self._in += buf[pos:]  # only the partial packet is kept
        if self._received_since_kex > self.config.rekey_bytes:
            self.rekey()
        return events

    # --- version exchange ---

    def _read_version(self) -> bool:
        buf = self._in
        while True:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > limits.MAX_VERSION_LINE:
                    raise ProtocolError("version line too long", DisconnectReason.PROTOCOL_VERSION_NOT_SUPPORTED)
                return False
            line = bytes(buf[:end]).rstrip(b"\r")
            del buf[: end + 1]
            if line.startswith(b"SSH-"):
                break
            # Only a server may send other lines before its version (RFC 4253 4.2).
            self._pre_version_lines += 1
            if self.role is Role.SERVER:
                raise ProtocolError("Invalid SSH identification string", DisconnectReason.PROTOCOL_ERROR)
            if self._pre_version_lines > limits.MAX_PRE_VERSION_LINES or end > limits.MAX_VERSION_LINE:
                raise ProtocolError("too many lines before the version line")
        if len(line) > limits.MAX_VERSION_LINE:
            raise ProtocolError("version line too long")
        if not (line.startswith(b"SSH-2.0-") or line.startswith(b"SSH-1.99-")):
            raise ProtocolError(
                f"Protocol major versions differ: {line[:32]!r}", DisconnectReason.PROTOCOL_VERSION_NOT_SUPPORTED
            )
        self.peer_version = line.decode("ascii", "replace")
        log.debug("Remote protocol version %s", self.peer_version)
        return True

    # --- packets ---

    def _use_opener(self, opener: protection.PacketOpener) -> None:
        """Open the peer's packets with ``opener`` from now on; its open call is looked up here, not per read:
        open_view where the opener has one (no copy out of the body)."""
        self._opener = opener
        self._open_packet = getattr(opener, "open_view", None) or opener.open

    def _seal(self, parts: Sequence[bytes | memoryview]) -> None:
        packet = self._sealer.seal(self._seq_out, parts)
        self._seq_out = (self._seq_out + 1) & 0xFFFFFFFF
        self._sent_since_kex += len(packet)
        self._out.append(packet)

    def _send_transport(self, msg: Message) -> None:
        self._seal((msg.encode(),))

    def _dispatch(self, payload: bytes | memoryview, events: list[object]) -> None:
        msg_id = payload[0] if payload else -1
        if msg_id == 94 and self._kex_count and self._peer_kexinit is None and len(payload) >= 9:
            recipient, length = _U32_PAIR.unpack_from(payload, 1)
            if length == len(payload) - 9:
                # CHANNEL_DATA, most packets of a forward: no generic codec, one copy of the data
                events.append(messages.ChannelData(recipient, bytes(payload[9:])))
                return
        payload = bytes(payload)
        if self._peer_kexinit is not None and not self._newkeys_received:
            allowed = _STRICT_ALLOWED if self.strict_kex and self._kex_count == 0 else _KEX_ALLOWED
            if msg_id not in allowed or (msg_id == 20):
                raise ProtocolError(f"unexpected message {msg_id} during key exchange")
        if msg_id == 20:
            self._on_kexinit(payload, events)
        elif msg_id == 21:
            self._on_newkeys(events)
        elif 30 <= msg_id < 50:
            self._on_kex_message(payload, events)
        elif msg_id == 1:
            msg = messages.decode_message(payload)
            assert isinstance(msg, messages.Disconnect)
            self._closed = True
            events.append(PeerDisconnected(msg.reason, msg.description))
        elif msg_id in (2, 3, 4):
            pass  # IGNORE, UNIMPLEMENTED, DEBUG: nothing to do
        elif msg_id == 7:
            # Only valid under the new keys (RFC 8308 2.4): a plaintext one is an injection that, without
            # strict kex, would survive a Terrapin-style drop of the real one and downgrade server-sig-algs.
            if self._kex_count == 0 and not self._newkeys_received:
                raise ProtocolError("EXT_INFO before the first NEWKEYS")
            self._on_ext_info(payload, events)
        elif self._kex_count == 0:
            raise ProtocolError(f"message {msg_id} before the first key exchange finished")
        else:
            try:
                events.append(messages.decode_message(payload))
            except KeyError:
                self._send_transport(messages.Unimplemented((self._seq_in - 1) & 0xFFFFFFFF))

    # --- key exchange ---

    def _kexinit_message(self) -> KexInit:
        cfg = self.config
        kex_names = list(cfg.kex_algorithms)
        if self._kex_count == 0:  # pseudo-algorithms go in the first KEXINIT only
            if self.role is Role.CLIENT:
                kex_names += [EXT_INFO_CLIENT] + ([STRICT_KEX_CLIENT] if cfg.strict_kex else [])
            else:
                kex_names += [EXT_INFO_SERVER] + ([STRICT_KEX_SERVER] if cfg.strict_kex else [])
        if self.role is Role.SERVER:
            host_algs = [a for a in (cfg.host_key_algorithms or DEFAULT_HOST_KEY_ALGORITHMS) if a in self._host_keys]
            host_algs += [a for a in self._host_keys if a not in host_algs and not cfg.host_key_algorithms]
        else:
            host_algs = list(cfg.host_key_algorithms or DEFAULT_HOST_KEY_ALGORITHMS)
        return KexInit(
            self._random(16),
            tuple(kex_names),
            tuple(host_algs),
            tuple(cfg.ciphers),
            tuple(cfg.ciphers),
            tuple(cfg.macs),
            tuple(cfg.macs),
            ("none",),
            ("none",),
            (),
            (),
            False,
        )

    def _send_kexinit(self) -> None:
        payload = self._kexinit_message().encode()
        self._our_kexinit = payload
        self._newkeys_sent = False
        self._newkeys_received = False
        self._seal((payload,))

    def _on_kexinit(self, payload: bytes, events: list[object]) -> None:
        if self._peer_kexinit is not None:
            raise ProtocolError("second KEXINIT during key exchange")
        msg = messages.decode_message(payload)
        assert isinstance(msg, KexInit)
        self._peer_kexinit = payload
        if self._our_kexinit is None:
            self._send_kexinit()
        assert self._our_kexinit is not None
        ours = messages.decode_message(self._our_kexinit)
        assert isinstance(ours, KexInit)
        client, server = (ours, msg) if self.role is Role.CLIENT else (msg, ours)
        if self._kex_count == 0:
            if self.role is Role.SERVER:
                self.peer_ext_info = EXT_INFO_CLIENT in msg.kex_algorithms
                self.strict_kex = self.config.strict_kex and STRICT_KEX_CLIENT in msg.kex_algorithms
            else:
                self.peer_ext_info = EXT_INFO_SERVER in msg.kex_algorithms
                self.strict_kex = self.config.strict_kex and STRICT_KEX_SERVER in msg.kex_algorithms
            if self.strict_kex and self._seq_in != 1:
                raise ProtocolError("strict kex: KEXINIT was not the first packet")
        client_kex = [k for k in client.kex_algorithms if k not in _PSEUDO_KEX]
        kex_name = _negotiate("key exchange method", client_kex, server.kex_algorithms)
        host_key_alg = _negotiate("host key type", client.server_host_key_algorithms, server.server_host_key_algorithms)
        cipher_c2s = _negotiate("cipher", client.ciphers_c2s, server.ciphers_c2s)
        cipher_s2c = _negotiate("cipher", client.ciphers_s2c, server.ciphers_s2c)
        mac_c2s = None if protection.CIPHERS[cipher_c2s].aead else _negotiate("MAC", client.macs_c2s, server.macs_c2s)
        mac_s2c = None if protection.CIPHERS[cipher_s2c].aead else _negotiate("MAC", client.macs_s2c, server.macs_s2c)
        _negotiate("compression", client.compression_c2s, server.compression_c2s)
        _negotiate("compression", client.compression_s2c, server.compression_s2c)
        self.algorithms = Algorithms(kex_name, host_key_alg, cipher_c2s, cipher_s2c, mac_c2s, mac_s2c)
        log.debug("%s", self.algorithms.describe(self.role))
        # A wrong guess by the peer means its next kex packet is to be dropped (RFC 4253 7).
        self._skip_guessed_packet = msg.first_kex_packet_follows and (
            msg.kex_algorithms[:1] != (kex_name,) or msg.server_host_key_algorithms[:1] != (host_key_alg,)
        )
        ctx = self._exchange_context()
        if self.role is Role.CLIENT:
            self._kex_client = kex.start_client_kex(kex_name, ctx)
            self._send_transport_raw(self._kex_client.init_message())

    def _send_transport_raw(self, payload: bytes) -> None:
        self._seal((payload,))

    def _exchange_context(self) -> kex.ExchangeContext:
        assert self._our_kexinit is not None and self._peer_kexinit is not None and self.peer_version
        ours, theirs = self.local_version.encode(), self.peer_version.encode()
        if self.role is Role.CLIENT:
            return kex.ExchangeContext(ours, theirs, self._our_kexinit, self._peer_kexinit)
        return kex.ExchangeContext(theirs, ours, self._peer_kexinit, self._our_kexinit)

    def _on_kex_message(self, payload: bytes, events: list[object]) -> None:
        if self._peer_kexinit is None or self.algorithms is None:
            raise ProtocolError("key exchange message outside a key exchange")
        if self._skip_guessed_packet:
            self._skip_guessed_packet = False
            return
        if self._pending_keys is not None:
            raise ProtocolError("unexpected key exchange message")
        if self.role is Role.SERVER:
            host_key = self._host_keys[self.algorithms.host_key]
            alg = self.algorithms.host_key
            server = kex.start_server_kex(
                self.algorithms.kex,
                self._exchange_context(),
                host_key.public.blob,
                lambda data: host_key.sign(data, alg),
            )
            reply, outcome = server.handle_init(payload)
            self._send_transport_raw(reply)
            self._finish_exchange(outcome, events)
            return
        if self._kex_client is None:
            raise ProtocolError("unexpected key exchange message")
        outcome = self._kex_client.handle_reply(payload)
        self._kex_client = None
        try:
            host_key = keys.parse_public_blob(outcome.host_key_blob)
        except Exception as exc:
            raise KexError("server host key could not be parsed") from exc
        if not host_key.verify(outcome.exchange_hash, outcome.signature, self.algorithms.host_key):
            raise KexError("incorrect signature from the server's host key")
        if self.host_key is not None:
            if host_key != self.host_key:
                raise KexError("server host key changed during rekey")
            self._finish_exchange(outcome, events)
            return
        self.host_key = host_key
        self._awaiting_host_key = outcome
        events.append(HostKeyReceived(host_key, self.algorithms.host_key))

    def _finish_exchange(self, outcome: kex.KexOutcome, events: list[object]) -> None:
        """Derive the new keys, send NEWKEYS and switch our sending side to them."""
        assert self.algorithms is not None
        if self.session_id is None:
            self.session_id = outcome.exchange_hash
        algs = self.algorithms

        def derive(letter: bytes, size: int) -> bytes:
            assert self.session_id is not None
            return kex.derive_key(
                outcome.hash_name, outcome.shared_secret, outcome.exchange_hash, self.session_id, letter, size
            )

        def protector_keys(cipher: str, mac: str | None, letters: bytes) -> tuple[str, str | None, bytes, bytes, bytes]:
            info = protection.CIPHERS[cipher]
            mac_size = protection.MACS[mac].key_size if mac else 0
            iv = derive(letters[0:1], info.iv_size) if info.iv_size else b""
            return cipher, mac, derive(letters[1:2], info.key_size), iv, derive(letters[2:3], mac_size) if mac else b""

        c2s = protector_keys(algs.cipher_c2s, algs.mac_c2s, b"ACE")
        s2c = protector_keys(algs.cipher_s2c, algs.mac_s2c, b"BDF")
        out_keys, in_keys = (c2s, s2c) if self.role is Role.CLIENT else (s2c, c2s)
        self._pending_keys = (protection.new_sealer(*out_keys), protection.new_opener(*in_keys))
        self._send_transport(messages.NewKeys())
        self._sealer = self._pending_keys[0]
        if self.strict_kex:
            self._seq_out = 0
        self._newkeys_sent = True
        if self._kex_count == 0 and self.role is Role.SERVER and self.peer_ext_info:
            self._send_transport(self._server_ext_info())
        self._maybe_end_kex(events)

    def _server_ext_info(self) -> messages.ExtInfo:
        # Every user-key signature algorithm we can verify (RFC 8308 3.1).
        return messages.ExtInfo.from_pairs(
            {"server-sig-algs": ",".join(DEFAULT_HOST_KEY_ALGORITHMS).encode(), **self.ext_info}
        )

    def _on_newkeys(self, events: list[object]) -> None:
        if self._pending_keys is None or self._newkeys_received:
            raise ProtocolError("unexpected NEWKEYS")
        self._use_opener(self._pending_keys[1])
        if self.strict_kex:
            self._seq_in = 0
        self._newkeys_received = True
        self._maybe_end_kex(events)

    def _maybe_end_kex(self, events: list[object]) -> None:
        if not (self._newkeys_sent and self._newkeys_received):
            return
        initial = self._kex_count == 0
        self._kex_count += 1
        self._our_kexinit = self._peer_kexinit = None
        self._pending_keys = None
        self._sent_since_kex = self._received_since_kex = 0
        assert self.algorithms is not None
        events.append(KexComplete(initial, self.algorithms))
        held, self._held = self._held, []
        for parts in held:
            self._seal(parts)

    def _on_ext_info(self, payload: bytes, events: list[object]) -> None:
        msg = messages.decode_message(payload)
        assert isinstance(msg, messages.ExtInfo)
        extensions = msg.pairs()
        self.peer_extensions = extensions
        sig_algs = extensions.get("server-sig-algs")
        if sig_algs is not None:
            self.server_sig_algs = tuple(sig_algs.decode("ascii", "replace").split(","))
        events.append(ExtInfoReceived(extensions))
