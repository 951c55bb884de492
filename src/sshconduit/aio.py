"""Drives the sans-IO core over an asyncio transport: the only place that touches the SSH socket.

Bytes from the socket go to ``Transport.receive_data``; the events that come back are routed to the auth
layer, the connection layer and the per-channel handlers. Everything the core queues to send is written in one
``writelines`` per loop iteration, so many small packets cost one system call: what a read's handlers queue goes
out at the end of that read, and a channel's EOF and CLOSE wait a few turns to ride with the next packet (a
forward's next CHANNEL_OPEN or OPEN_CONFIRMATION), as OpenSSH batches a channel's end with the next one's start.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

from . import auth, connection, evloop, limits, messages
from .crypto import keys
from .errors import ChannelOpenError, Disconnected, DisconnectReason, HostKeyError, ProtocolError, SSHError
from .transport import HostKeyReceived, KexComplete, PeerDisconnected, Role, Transport, TransportConfig

# A read at least this big means bulk data is arriving: ACK it now, from this process (see data_received).
BULK_READ = 16 * 1024
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
# Window auto-tuning asks TCP for the network's round trip (connection.ConnectionLayer.path_rtt) this often.
PATH_RTT_INTERVAL = 1.0
_TCP_INFO_LENGTH = 152  # Linux's struct tcp_info up to tcpi_min_rtt (4.6+)
_TCP_INFO_MIN_RTT = struct.Struct("=148xI")  # tcpi_min_rtt: microseconds, ~0 before the first sample

log = logging.getLogger("sshconduit")

LATE_FLUSH_TURNS = 3  # see SSHConnection.schedule_late_flush

HostKeyChecker = Callable[[keys.PublicKey, str], None]  # raises HostKeyError to refuse
ChannelOpener = Callable[["SSHConnection", connection.ChannelOpenRequest], Awaitable["ChannelHandler"]]
GlobalRequestHandler = Callable[["SSHConnection", connection.GlobalRequestReceived], Awaitable[bytes | None]]


class ChannelHandler:
    """What a channel's owner (a forward, a session) is told. Subclasses override what they need."""

    conn: SSHConnection
    channel_id: int

    def bind(self, conn: SSHConnection, channel_id: int) -> None:
        self.conn = conn
        self.channel_id = channel_id

    def opened(self, type_data: bytes) -> None:
        pass

    def open_failed(self, error: ChannelOpenError) -> None:
        pass

    def data_received(self, data: bytes, data_type: int | None) -> None:
        self.conn.consumed(self.channel_id, len(data))

    def window_opened(self) -> None:
        pass

    def eof_received(self) -> None:
        pass

    def close_received(self) -> None:
        pass

    def request_received(self, request_type: str, data: bytes) -> bool:
        return False

    def request_replied(self, ok: bool) -> None:
        pass

    def connection_lost(self) -> None:
        """The SSH connection is gone; the channel will get no more events."""
        self.close_received()


class SSHConnection(asyncio.Protocol):
    """One SSH connection, client or server side."""

    def __init__(
        self,
        role: Role,
        config: TransportConfig | None = None,
        *,
        host_keys: tuple[keys.PrivateKey, ...] = (),
        host_key_checker: HostKeyChecker | None = None,
        auth_policy: auth.AuthPolicy | None = None,
        channel_opener: ChannelOpener | None = None,
        global_request_handler: GlobalRequestHandler | None = None,
        max_auth_tries: int = limits.MAX_AUTH_ATTEMPTS,
        banner: str | None = None,
        login_grace_time: float = limits.LOGIN_GRACE_TIME,
        max_channels: int = limits.MAX_CHANNELS,
    ) -> None:
        self.role = role
        self.core = Transport(role, config, host_keys)
        self.loop = asyncio.get_running_loop()
        self._host_key_checker = host_key_checker
        self._auth_policy = auth_policy
        self._channel_opener = channel_opener
        self._global_request_handler = global_request_handler
        self._max_auth_tries = max_auth_tries
        self._banner = banner
        self._login_grace_time = login_grace_time
        self._max_channels = max_channels
        self._grace_timer: asyncio.TimerHandle | None = None
        self._rekey_timer: asyncio.TimerHandle | None = None
        self._socket: asyncio.Transport | None = None
        self._tcp_socket: socket.socket | None = None  # TCP on Linux: bulk reads are ACKed at once, RTT read
        self._path_rtt_due = 0.0  # when to ask TCP for its round trip again
        self._flush_scheduled = False
        self._late_flush: asyncio.Handle | None = None  # a pending schedule_late_flush
        self._batch_end: list[Callable[[], None]] = []  # run once the events of one read are handled
        self._batch_last: list[Callable[[], None]] = []  # after those: what is on no connection's critical path
        self.peername: tuple[str, int] = ("?", 0)
        self.local_address = "?"
        self.local_port = 0
        self.connection_made_hook: Callable[[], None] | None = None
        self.auth_succeeded_hook: Callable[[], None] | None = None  # server: limits, ClientAlive
        # ClientAliveInterval counts the peer's silence from here; time.monotonic: uvloop's loop.time() is in ms
        self.last_received = time.monotonic()
        self.cleanup_callbacks: list[Callable[[], None]] = []  # run once when the connection goes (listeners)
        self.kex_done: asyncio.Future[None] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.auth_messages: asyncio.Queue[messages.Message] = asyncio.Queue()
        self.server_auth: auth.ServerAuth | None = None
        self._kbd_exchange: Any = None  # the policy's keyboard-interactive conversation in progress (PAM)
        self.user: str | None = None
        self.channels: connection.ConnectionLayer | None = None
        self.handlers: dict[int, ChannelHandler] = {}
        self._global_replies: list[asyncio.Future[tuple[bool, bytes]]] = []
        self._global_answering: asyncio.Task[None] | None = None  # replies must go out in arrival order
        self.close_reason: SSHError | None = None
        self.peer_is_us = False  # the peer is sshconduit too: bulk channels use bigger packets and windows

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check here.
        transport = cast(asyncio.Transport, transport)
        self._socket = transport
        sock = transport.get_extra_info("socket")
        if _TCP_QUICKACK is not None and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Our own socket object on a duplicate descriptor, closed with the connection: uvloop's stand-in makes
            # a socket object, and a getsockname system call, for each setsockopt.
            self._tcp_socket = socket.socket(sock.family, sock.type, sock.proto, os.dup(sock.fileno()))
        peer = transport.get_extra_info("peername")
        if peer:
            self.peername = (str(peer[0]), int(peer[1]))
        local = transport.get_extra_info("sockname")
        if local:
            self.local_address, self.local_port = str(local[0]), int(local[1])
        if self.connection_made_hook is not None:
            self.connection_made_hook()
        if self.role is Role.SERVER:
            self._grace_timer = self.loop.call_later(self._login_grace_time, self._grace_expired)
        self.core.start()
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self._tcp_socket is not None and (len(data) >= BULK_READ or self.channels is None):
            # Otherwise the kernel sends the delayed ACK while it processes the peer's next send; on the same host
            # that work (and the freeing of the peer's acknowledged buffers) runs on the peer's CPU time, and a
            # sender at full CPU, such as sshd during a download, slows by about a fifth.
            # Before the channels start (key exchange and auth), a peer without TCP_NODELAY, such as ssh -N,
            # holds a small packet back until its last one is acknowledged (Nagle): ssh writes NEWKEYS and
            # SERVICE_REQUEST apart, and a delayed ACK here added 40 ms to its setup.
            self._tcp_socket.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        self._flush_scheduled = True  # what the handlers queue goes out in the _flush below: no call_soon each
        self.last_received = time.monotonic()
        if self.channels is not None:
            self.channels.now = self.last_received  # the clock for receive-window auto-tuning
            if self.last_received >= self._path_rtt_due and self._tcp_socket is not None:
                self._path_rtt_due = self.last_received + PATH_RTT_INTERVAL
                self.channels.path_rtt = tcp_min_rtt(self._tcp_socket)
        self._step(self._receive, data)

    def _receive(self, data: bytes) -> None:
        self._handle_events(self.core.receive_data(data))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tcp_socket is not None:
            self._tcp_socket.close()  # the descriptor's last duplicate: the kernel closes the socket now
            self._tcp_socket = None
        if self._grace_timer:
            self._grace_timer.cancel()
        if self._rekey_timer:
            self._rekey_timer.cancel()
        if self.close_reason is None:
            self.close_reason = Disconnected(DisconnectReason.CONNECTION_LOST, "Connection closed by remote host")
            if self.role is Role.SERVER:  # as sshd: a peer that just hangs up still leaves a trace
                preauth = "" if self.user else " [preauth]"
                log.info("Connection closed by %s port %d%s", self.peername[0], self.peername[1], preauth)
        for handler in list(self.handlers.values()):
            try:
                handler.connection_lost()
            except Exception:
                log.exception("channel %d: error while closing", handler.channel_id)
        self.handlers.clear()
        callbacks, self.cleanup_callbacks = self.cleanup_callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("error while cleaning up the connection")
        for fut in (self.kex_done, self.closed):
            if not fut.done():
                if fut is self.closed:
                    fut.set_result(None)
                else:
                    fut.set_exception(self.close_reason)
                    fut.exception()  # retrieved: on a server nobody awaits kex_done, and asyncio would warn
        for reply in self._global_replies:
            if not reply.done():
                reply.set_exception(self.close_reason)
        self.auth_messages.put_nowait(messages.Disconnect(DisconnectReason.CONNECTION_LOST, "connection lost"))

    # --- writing ---

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._late_flush is not None:  # this write takes what it was waiting for: no more idle loop turns
            self._late_flush.cancel()
            self._late_flush = None
        out = self.core.data_to_send()
        if out and self._socket is not None and not self._socket.is_closing():
            self._socket.writelines(out)
        if self.core.closed and self._socket is not None and not self._socket.is_closing():
            self._socket.close()

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def schedule_late_flush(self) -> None:
        """Flush LATE_FLUSH_TURNS loop turns from now: for what is on no critical path (a channel's EOF and CLOSE),
        so it shares a write with what the callbacks of the same poll lead to: the client's CHANNEL_OPEN for a
        forward's next connection (its connection_made runs after an already scheduled flush), the server's
        OPEN_CONFIRMATION for an open whose connect had to wait. Any flush before then cancels it."""
        if self._late_flush is None:
            self._late_flush = self.loop.call_soon(self._late_flush_turn, LATE_FLUSH_TURNS - 1)

    def _late_flush_turn(self, turns: int) -> None:
        if turns:
            self._late_flush = self.loop.call_soon(self._late_flush_turn, turns - 1)
            return
        self._late_flush = None
        self._flush()

    def send(self, *parts: bytes | memoryview) -> None:
        self.core.send(*parts)
        self.schedule_flush()

    # --- closing ---

    def _step(self, step: Callable[[Any], None], arg: Any) -> None:
        """Run one step of the core, then write what it queued. Whatever goes wrong in it closes this connection
        alone, with a DISCONNECT where one can still be sent: the peer's error, or an error of ours."""
        try:
            step(arg)
        except ProtocolError as exc:
            self._protocol_error(exc)
        except SSHError as exc:
            self.abort(exc)
        except Exception:  # a bug, or input that got past every check: not asyncio's "Fatal error" and a reset
            self._internal_error()
        finally:
            self._flush()

    def _internal_error(self) -> None:
        # One line, the exception's name and message on it (cli.logs); the traceback at debug level (-ddd, -vvv).
        log.exception("Disconnecting %s port %d: internal error", *self.peername)
        self.close_reason = ProtocolError("internal error")
        try:
            self.core.disconnect(DisconnectReason.PROTOCOL_ERROR, "internal error")  # as OpenSSH's fatal exits
        except Exception:  # the core cannot even seal a packet: the socket closes without one (_flush)
            log.debug("no DISCONNECT could be sealed", exc_info=True)

    def _protocol_error(self, exc: ProtocolError) -> None:
        who = f"authenticating user {exc.user} " if isinstance(exc, auth.TooManyAuthFailures) else ""
        preauth = " [preauth]" if self.role is Role.SERVER and self.user is None else ""
        log.info("Disconnecting %s%s port %d: %s%s", who, self.peername[0], self.peername[1], exc, preauth)
        self.close_reason = exc
        self.core.disconnect(exc.reason, str(exc))
        self._flush()

    def abort(self, exc: SSHError) -> None:
        self.close_reason = exc
        if self._socket is not None:
            self._socket.close()

    def close(self, description: str = "disconnected by user") -> None:
        if self.close_reason is None:
            self.close_reason = Disconnected(DisconnectReason.BY_APPLICATION, description)
        self.core.disconnect(DisconnectReason.BY_APPLICATION, description)
        self._flush()
        if self._socket is not None:
            self._socket.close()

    def drop(self, description: str) -> None:
        """close(), then let go of what the peer has not taken: a dead peer never drains the write buffer, and
        until the socket closes its listeners and channels stay (sshd's process exits at this point)."""
        self.close(description)
        if self._socket is not None:
            self._socket.abort()

    def _grace_expired(self) -> None:
        if self.user is None:
            log.info("Timeout before authentication for %s port %d", *self.peername)  # sshd's words
            self.close_reason = ProtocolError("Timeout before authentication", DisconnectReason.BY_APPLICATION)
            self.core.disconnect(DisconnectReason.BY_APPLICATION, "Timeout before authentication")
            self._flush()

    # --- event routing ---

    def _handle_events(self, events: list[object]) -> None:
        try:
            for event in events:
                # self.channels, not a copy: USERAUTH_SUCCESS earlier in this batch may have just started it.
                if self.channels is not None and isinstance(event, messages.Message) and 80 <= event.ID <= 100:
                    self._handle_channel_events(self.channels.handle(event))
                elif isinstance(event, HostKeyReceived):
                    self._check_host_key(event)
                elif isinstance(event, KexComplete):
                    self._kex_complete(event)
                elif isinstance(event, PeerDisconnected):
                    self.close_reason = Disconnected(event.reason, event.description)
                    if self._socket is not None:
                        self._socket.close()
                elif isinstance(event, messages.Message):
                    self._handle_message(event)
        finally:  # also when a message breaks the protocol: a channel closed earlier in the read closes its socket
            self._end_batch()

    def _end_batch(self) -> None:
        while self._batch_end or self._batch_last:
            if self._batch_end:
                callbacks, self._batch_end = self._batch_end, []
            else:
                callbacks, self._batch_last = self._batch_last, []
            for callback in callbacks:
                callback()

    def at_batch_end(self, callback: Callable[[], None], last: bool = False) -> None:
        """Call ``callback`` once the packets of the current read are handled (a bridge writes them in one go).
        ``last`` ones run after the others: a socket's shutdown or close is a system call, and on loopback the
        peer's TCP work runs inside it, so it waits until another channel's reply has been written."""
        (self._batch_last if last else self._batch_end).append(callback)

    def _check_host_key(self, event: HostKeyReceived) -> None:
        if self._host_key_checker is not None:
            try:
                self._host_key_checker(event.key, event.algorithm)
            except HostKeyError as exc:
                self.close_reason = exc
                self.core.disconnect(DisconnectReason.HOST_KEY_NOT_VERIFIABLE, "host key verification failed")
                if not self.kex_done.done():
                    self.kex_done.set_exception(exc)
                return
        self._handle_events(self.core.accept_host_key())

    def _kex_complete(self, event: KexComplete) -> None:
        self._arm_rekey_timer()  # as OpenSSH, the time limit counts from each exchange's end
        if not event.initial:
            return
        if self.role is Role.SERVER:
            assert self.core.session_id is not None and self._auth_policy is not None
            self.server_auth = auth.ServerAuth(
                self.send,
                self.core.session_id,
                self._auth_policy,
                max_tries=self._max_auth_tries,
                banner=self._banner,
            )
        if not self.kex_done.done():
            self.kex_done.set_result(None)

    def _arm_rekey_timer(self) -> None:
        if self._rekey_timer:
            self._rekey_timer.cancel()
            self._rekey_timer = None
        if self.core.config.rekey_seconds > 0:
            self._rekey_timer = self.loop.call_later(self.core.config.rekey_seconds, self._rekey_due)

    def set_rekey_limit(self, limit: tuple[int | None, int | None]) -> None:
        """RekeyLimit's (bytes, seconds) for this connection from now on; a changed time limit counts from now."""
        old = self.core.config
        config = copy.copy(old)  # a server's connections share theirs
        config.set_rekey_limit(limit)
        if (config.rekey_bytes, config.rekey_seconds) != (old.rekey_bytes, old.rekey_seconds):
            self.core.config = config
            if config.rekey_seconds != old.rekey_seconds:
                self._arm_rekey_timer()

    def _rekey_due(self) -> None:
        self._rekey_timer = None
        self.core.rekey()
        self._flush()

    def _handle_message(self, msg: messages.Message) -> None:
        if self.role is Role.CLIENT:
            if self.channels is None and 5 <= msg.ID < 80:
                if isinstance(msg, messages.UserauthSuccess):
                    # Start channels now, in wire order: sshd's hostkeys-00 request can follow in the same read.
                    self.start_connection_layer()
                self.auth_messages.put_nowait(msg)
                return
        elif self.server_auth is not None and self.channels is None:
            self._server_auth_events(self.server_auth.handle(msg))
            return
        if 50 <= msg.ID < 80:
            return  # late auth messages after success are ignored (RFC 4252 5.1)
        raise ProtocolError(f"unexpected message {msg.ID}")

    def _server_auth_events(self, events: list[object]) -> None:
        for event in events:
            if isinstance(event, auth.AuthSucceeded):
                self._auth_succeeded(event)
            elif isinstance(event, auth.AuthFailed):
                self._log_auth("Failed", event)
            elif isinstance(event, auth.AuthPartial):
                self._log_auth("Partial", event)
            elif isinstance(event, auth.PasswordCheck):
                self._auth_task(self._check_password(event))
            elif isinstance(event, auth.KbdInteractiveStep):
                self._auth_task(self._kbd_interactive(event))
            elif isinstance(event, auth.AccountCheck):
                self._auth_task(self._check_account(event))
            elif isinstance(event, auth.KbdInteractiveAbandoned) and self._kbd_exchange is not None:
                self._kbd_exchange.abort()
                self._kbd_exchange = None

    def _auth_task(self, check: Coroutine[Any, Any, None]) -> None:
        """A check that blocks (PAM, crypt, the monitor) runs as a task the connection's end cancels."""
        self.cleanup_callbacks.append(self.loop.create_task(check).cancel)

    async def _kbd_interactive(self, step: auth.KbdInteractiveStep) -> None:
        """One round of the policy's keyboard-interactive conversation (PAM); a failure is delayed as a password's."""
        assert self.server_auth is not None
        started = time.monotonic()
        try:
            if step.responses is None:
                if self._kbd_exchange is not None:
                    self._kbd_exchange.abort()
                self._kbd_exchange = exchange = self._auth_policy.kbd_interactive_exchange(step.user)  # type: ignore[union-attr]
                self.cleanup_callbacks.append(exchange.abort)
                round_: auth.KbdRound = await exchange.start()
            elif self._kbd_exchange is None:
                round_ = auth.KbdFinished(False)
            else:
                round_ = await self._kbd_exchange.answer(step.responses)
        except Exception as exc:  # a broken backend refuses; its message names no answer
            log.error("keyboard-interactive for %s failed: %s", step.user, type(exc).__name__)
            round_ = auth.KbdFinished(False)
        if isinstance(round_, auth.KbdFinished):
            self._kbd_exchange = None
            if not round_.ok:
                await failure_floor(started)
        self._after_auth_check(lambda: self.server_auth.kbd_interactive_round(step, round_))  # type: ignore[union-attr]

    async def _check_account(self, check: auth.AccountCheck) -> None:
        """UsePAM: pam_acct_mgmt before a key login is accepted (blocks: in a thread)."""
        assert self.server_auth is not None and self._auth_policy is not None
        try:
            ok = await self.loop.run_in_executor(None, self._auth_policy.check_account, check.user)  # type: ignore[attr-defined]
        except Exception as exc:
            log.error("account check for %s failed: %s", check.user, type(exc).__name__)
            ok = False
        self._after_auth_check(lambda: self.server_auth.account_checked(check, ok))  # type: ignore[union-attr]

    def _after_auth_check(self, answer: Callable[[], list[object]]) -> None:
        if not self.core.closed:
            self._step(lambda answer: self._server_auth_events(answer()), answer)

    async def _check_password(self, check: auth.PasswordCheck) -> None:
        """A blocking password check (PAM, crypt, the privsep monitor) in a thread; a failure takes at least
        FAILED_PASSWORD_MIN_TIME, so guessing stays slow whatever the backend."""
        assert self.server_auth is not None and self._auth_policy is not None
        started = time.monotonic()
        try:
            check_password = functools.partial(self._auth_policy.check_password, method=check.method)  # type: ignore[call-arg]
            ok = await self.loop.run_in_executor(None, check_password, check.user, check.password)
        except Exception as exc:  # a broken backend refuses; its message names no secret (the password is ours)
            log.error("password check for %s failed: %s", check.user, type(exc).__name__)
            ok = False
        if not ok:
            await failure_floor(started)
        self._after_auth_check(lambda: self.server_auth.password_checked(check, ok))  # type: ignore[union-attr]

    def _auth_succeeded(self, event: auth.AuthSucceeded) -> None:
        self.user = event.user
        if self._grace_timer:
            self._grace_timer.cancel()
        self._log_auth("Accepted", event)
        self.start_connection_layer()
        if self.auth_succeeded_hook is not None:
            self.auth_succeeded_hook()

    def _log_auth(self, outcome: str, event: auth.AuthSucceeded | auth.AuthFailed | auth.AuthPartial) -> None:
        """sshd's line: ``Accepted publickey for alice from 10.0.0.1 port 5555 ssh2: ED25519 SHA256:...``, with
        keyboard-interactive/pam when PAM asked the questions."""
        key = f": {event.key.label} {event.key.fingerprint()}" if event.key else ""
        method = event.method
        if method == "keyboard-interactive" and getattr(self._auth_policy, "kbd_interactive_conversation", False):
            method = "keyboard-interactive/pam"
        log.info("%s %s for %s from %s port %d ssh2%s", outcome, method, event.user, *self.peername, key)

    def start_connection_layer(self) -> None:
        # core.send, not self.send: each caller of the layer flushes as its message needs (EOF and CLOSE late)
        self.channels = connection.ConnectionLayer(self.core.send, max_channels=self._max_channels)
        self.peer_is_us = "sshconduit" in (self.core.peer_version or "")
        if self.peer_is_us:
            self.channels.max_payload = limits.PEER_MAX_PAYLOAD

    # --- channels ---

    def _handle_channel_events(self, events: list[object]) -> None:
        for event in events:
            if type(event) is connection.ChannelDataReceived:  # most events: no table lookup, no try
                handler = self.handlers.get(event.channel_id)
                if handler is not None:
                    handler.data_received(event.data, event.data_type)
                continue
            try:
                _CHANNEL_EVENT_ROUTES[type(event)](self, event)
            except SSHError:
                raise
            except Exception:
                channel_id = getattr(event, "channel_id", None)
                log.exception("channel %s: error handling %s", channel_id, type(event).__name__)
                if channel_id is not None and self.channels is not None and self.channels.is_open(channel_id):
                    self.channels.close(channel_id)

    def _on_window_opened(self, event: connection.ChannelWindowOpened) -> None:
        handler = self.handlers.get(event.channel_id)
        if handler:
            handler.window_opened()

    def _on_eof_received(self, event: connection.ChannelEofReceived) -> None:
        handler = self.handlers.get(event.channel_id)
        if handler:
            handler.eof_received()

    def _on_close_received(self, event: connection.ChannelCloseReceived) -> None:
        handler = self.handlers.pop(event.channel_id, None)
        if handler:
            handler.close_received()

    def _on_open_request(self, event: connection.ChannelOpenRequest) -> None:
        evloop.start_eagerly(self._answer_channel_open(event))

    def _on_opened(self, event: connection.ChannelOpened) -> None:
        handler = self.handlers.get(event.channel_id)
        if handler:
            handler.opened(event.type_data)

    def _on_open_failed(self, event: connection.ChannelOpenFailed) -> None:
        handler = self.handlers.pop(event.channel_id, None)
        if handler:
            handler.open_failed(ChannelOpenError(event.reason, event.description))

    def _on_request_received(self, event: connection.ChannelRequestReceived) -> None:
        assert self.channels is not None
        handler = self.handlers.get(event.channel_id)
        ok = handler.request_received(event.request_type, event.data) if handler else False
        if event.want_reply and self.channels.is_open(event.channel_id):
            self.channels.reply_request(event.channel_id, ok)

    def _on_request_replied(self, event: connection.ChannelRequestReplied) -> None:
        handler = self.handlers.get(event.channel_id)
        if handler:
            handler.request_replied(event.ok)

    def _on_global_request(self, event: connection.GlobalRequestReceived) -> None:
        previous = self._global_answering
        self._global_answering = self.loop.create_task(self._answer_global_request(event, previous))

    def _on_global_replied(self, event: connection.GlobalRequestReplied) -> None:
        if self._global_replies:
            fut = self._global_replies.pop(0)
            if not fut.done():
                fut.set_result((event.ok, event.data))

    async def _answer_channel_open(self, event: connection.ChannelOpenRequest) -> None:
        channels = self.channels
        assert channels is not None
        try:
            if self._channel_opener is None:
                raise ChannelOpenError(3, f"unknown channel type {event.channel_type}")
            handler = await self._channel_opener(self, event)
        except ChannelOpenError as exc:
            if not self.core.closed:
                channels.reject_channel(event.channel_id, exc.reason, exc.description)
                self.schedule_flush()
            return
        except Exception:
            log.exception("channel %d: error opening %s", event.channel_id, event.channel_type)
            channels.reject_channel(event.channel_id, 2, "internal error")
            self.schedule_flush()
            return
        if self.core.closed:
            handler.connection_lost()
            return
        handler.bind(self, event.channel_id)
        self.handlers[event.channel_id] = handler
        channels.accept_channel(event.channel_id, *handler_window(handler, self.peer_is_us))
        self._flush()  # now, not a loop turn later: each forwarded connection waits on this round trip
        handler.opened(b"")

    async def _answer_global_request(
        self, event: connection.GlobalRequestReceived, previous: asyncio.Task[None] | None
    ) -> None:
        result: bytes | None = None
        if self._global_request_handler is not None:
            try:
                result = await self._global_request_handler(self, event)
            except Exception:
                log.exception("global request %s failed", event.name)
        if previous is not None:
            await asyncio.wait([previous])
        if event.want_reply and self.channels is not None and not self.core.closed:
            self.channels.reply_global(result is not None, result or b"")
            self.schedule_flush()

    # --- API for channel owners ---

    def open_channel(self, handler: ChannelHandler, channel_type: str, type_data: bytes = b"") -> int:
        if self.channels is None or self.core.closed:
            raise Disconnected(DisconnectReason.CONNECTION_LOST, "not connected")
        window, max_packet = handler_window(handler, self.peer_is_us)
        channel_id = self.channels.open_channel(channel_type, type_data, window, max_packet)
        handler.bind(self, channel_id)
        self.handlers[channel_id] = handler
        self._flush()  # the open's round trip is on a new forwarded connection's critical path
        return channel_id

    async def global_request(self, name: str, data: bytes = b"") -> tuple[bool, bytes]:
        if self.channels is None:
            raise Disconnected(DisconnectReason.CONNECTION_LOST, "not connected")
        fut: asyncio.Future[tuple[bool, bytes]] = self.loop.create_future()
        self._global_replies.append(fut)
        self.channels.global_request(name, True, data)
        self.schedule_flush()
        return await fut

    def send_data(self, channel_id: int, data: bytes | memoryview, data_type: int | None = None) -> int:
        assert self.channels is not None
        try:
            if data_type is None:
                sent = self.channels.send_data(channel_id, data)
            else:
                sent = self.channels.send_extended_data(channel_id, data, data_type)
        except connection.ChannelClosedError:
            return 0  # the channel is going away; its close event will reach the handler
        if sent:
            self.schedule_flush()
        return sent

    def consumed(self, channel_id: int, nbytes: int) -> None:
        if self.channels is not None and self.channels.is_open(channel_id):
            self.channels.now = time.monotonic()  # may run long after the read (a socket drained)
            self.channels.consumed(channel_id, nbytes)
            self.schedule_flush()

    def send_eof(self, channel_id: int) -> None:
        if self.channels is not None and self.channels.is_open(channel_id):
            self.channels.send_eof(channel_id)
            self.schedule_late_flush()

    def close_channel(self, channel_id: int) -> None:
        if self.channels is not None and self.channels.is_open(channel_id):
            self.channels.close(channel_id)
            self.schedule_late_flush()

    def send_request(self, channel_id: int, request_type: str, want_reply: bool, data: bytes = b"") -> None:
        if self.channels is not None and self.channels.is_open(channel_id):
            self.channels.send_request(channel_id, request_type, want_reply, data)
            self.schedule_flush()


# The connection layer's events (other than data, which _handle_channel_events takes first) and who handles each.
_CHANNEL_EVENT_ROUTES: dict[type, Callable[[SSHConnection, Any], None]] = {
    connection.ChannelWindowOpened: SSHConnection._on_window_opened,
    connection.ChannelEofReceived: SSHConnection._on_eof_received,
    connection.ChannelCloseReceived: SSHConnection._on_close_received,
    connection.ChannelOpenRequest: SSHConnection._on_open_request,
    connection.ChannelOpened: SSHConnection._on_opened,
    connection.ChannelOpenFailed: SSHConnection._on_open_failed,
    connection.ChannelRequestReceived: SSHConnection._on_request_received,
    connection.ChannelRequestReplied: SSHConnection._on_request_replied,
    connection.GlobalRequestReceived: SSHConnection._on_global_request,
    connection.GlobalRequestReplied: SSHConnection._on_global_replied,
}


async def failure_floor(started: float) -> None:
    """A refused password or keyboard-interactive answer takes at least FAILED_PASSWORD_MIN_TIME from ``started``,
    so guessing stays slow whatever the backend (the privsep monitor waits too, for a subverted child)."""
    await asyncio.sleep(max(0.0, limits.FAILED_PASSWORD_MIN_TIME - (time.monotonic() - started)))


def handler_window(handler: ChannelHandler, peer_is_us: bool = False) -> tuple[int, int]:
    """The window and max packet a handler asks for (class attributes), else OpenSSH's defaults.

    A handler with ``bulk = True`` (a forwarded stream) gets the larger limits when the peer is sshconduit.
    """
    if peer_is_us and getattr(handler, "bulk", False):
        return limits.PEER_WINDOW, limits.PEER_MAX_PACKET
    return (
        getattr(handler, "window", limits.DEFAULT_WINDOW),
        getattr(handler, "max_packet", limits.DEFAULT_MAX_PACKET),
    )


def tcp_min_rtt(sock: socket.socket) -> float:
    """TCP's minimum round trip on ``sock`` in seconds (Linux's tcpi_min_rtt); 0.0 when the kernel has none."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LENGTH)
    except (OSError, AttributeError):  # not Linux (no TCP_INFO), or the socket is gone
        return 0.0
    if len(info) < _TCP_INFO_LENGTH:
        return 0.0
    (micros,) = _TCP_INFO_MIN_RTT.unpack(info)
    return 0.0 if micros == 0xFFFFFFFF else micros / 1e6
