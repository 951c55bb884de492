"""The client's public API: ``connect()``, authentication, host-key checking and forwards."""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from . import auth, messages
from .agent import AgentClient
from .aio import SSHConnection
from .config.forward_spec import ForwardSpec, parse_forward
from .config.known_hosts import HostKeyStatus, KnownHosts
from .crypto import keys
from .errors import AuthenticationError, HostKeyError, ProtocolError, SSHError
from .forward.local import LocalForward
from .transport import Role, TransportConfig

log = logging.getLogger("sshconduit")

DEFAULT_IDENTITIES = ("id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk")
DEFAULT_AUTH_METHODS = ("publickey", "keyboard-interactive", "password")

PasswordPrompt = Callable[[str], str | None]


@dataclass
class ClientOptions:
    """Everything a connection needs; the CLI fills it from ssh_config, the API from keyword arguments."""

    host: str
    port: int = 22
    user: str = field(default_factory=getpass.getuser)
    host_key_alias: str | None = None  # the name to look up in known_hosts (default: host)
    identity_files: Sequence[str] | None = None  # None: ssh's default ~/.ssh/id_* files
    client_keys: Sequence[keys.PrivateKey] = ()
    identities_only: bool = False
    use_agent: bool = True
    agent_path: str | None = None
    password: str | None = None
    password_prompt: PasswordPrompt | None = None
    passphrase: bytes | None = None
    preferred_auth: Sequence[str] = DEFAULT_AUTH_METHODS
    known_hosts: Sequence[str] | None = None  # None: ~/.ssh/known_hosts; () with strict "no": no checks
    global_known_hosts: Sequence[str] = ("/etc/ssh/ssh_known_hosts",)
    strict_host_key_checking: str = "ask"  # yes | accept-new | no | ask
    transport: TransportConfig = field(default_factory=TransportConfig)
    connect_timeout: float | None = None
    batch_mode: bool = False
    banner: Callable[[str], None] | None = None


def _ssh_dir() -> Path:
    return Path.home() / ".ssh"


def _interactive_prompt(prompt: str) -> str | None:
    if not sys.stdin.isatty():
        return None
    try:
        return getpass.getpass(prompt)
    except (EOFError, KeyboardInterrupt):
        return None


class HostKeyVerifier:
    """OpenSSH's StrictHostKeyChecking against known_hosts files."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        user_files = [str(_ssh_dir() / "known_hosts")] if options.known_hosts is None else list(options.known_hosts)
        self.user_files = [os.path.expanduser(p) for p in user_files]
        self.known = KnownHosts([*self.user_files, *options.global_known_hosts])

    def __call__(self, key: keys.PublicKey, algorithm: str) -> None:
        opts = self.options
        name = opts.host_key_alias or opts.host
        log.debug("Server host key: %s %s", key.key_type, key.fingerprint())
        status, where = self.known.check(name, opts.port, key)
        strict = opts.strict_host_key_checking.lower()
        if status is HostKeyStatus.KNOWN:
            log.debug("Host '%s' is known and matches the %s host key.", name, key.label)
            return
        if status is HostKeyStatus.REVOKED:
            raise HostKeyError(f"Host key {key.fingerprint()} revoked by file {where}\nHost key verification failed.")
        if status is HostKeyStatus.CHANGED:
            warning = _changed_warning(name, key, where)
            if strict != "no":
                raise HostKeyError(warning + "\nHost key verification failed.")
            print(warning, file=sys.stderr)
            return
        display = name if opts.port == 22 else f"[{name}]:{opts.port}"
        if strict in ("yes", "true"):
            raise HostKeyError(
                f"No {key.label} host key is known for {display} and you have requested strict checking.\n"
                "Host key verification failed."
            )
        if strict == "ask":
            if opts.batch_mode or not sys.stdin.isatty():
                raise HostKeyError("Host key verification failed.")
            answer = input(
                f"The authenticity of host '{display}' can't be established.\n"
                f"{key.label} key fingerprint is {key.fingerprint()}.\n"
                "Are you sure you want to continue connecting (yes/no/[fingerprint])? "
            ).strip()
            if answer.lower() != "yes" and answer != key.fingerprint():
                raise HostKeyError("Host key verification failed.")
        if self.user_files and self.user_files[0] != "/dev/null":
            try:
                self.known.add(self.user_files[0], name, opts.port, key)
                log.warning("Warning: Permanently added '%s' (%s) to the list of known hosts.", display, key.label)
            except OSError as exc:
                log.warning("Failed to add the host to the list of known hosts (%s): %s", self.user_files[0], exc)


def _changed_warning(name: str, key: keys.PublicKey, where: str | None) -> str:
    bar = "@" * 59
    return (
        f"{bar}\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n{bar}\n"
        "IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n"
        "Someone could be eavesdropping on you right now (man-in-the-middle attack)!\n"
        "It is also possible that a host key has just been changed.\n"
        f"The fingerprint for the {key.label} key sent by the remote host is\n{key.fingerprint()}.\n"
        f"Offending {key.label} key in {where}\n"
        f"Host key for {name} has changed and you have requested strict checking."
    )


class _AuthConversation:
    """The client's side of RFC 4252: tries each method in turn until the server says yes."""

    def __init__(self, conn: SSHConnection, options: ClientOptions) -> None:
        self.conn = conn
        self.options = options
        self.methods: tuple[str, ...] = ()

    async def _reply(self) -> messages.Message:
        while True:
            msg = await self.conn.auth_messages.get()
            if isinstance(msg, messages.Disconnect):
                raise self.conn.close_reason or SSHError("connection lost during authentication")
            if isinstance(msg, messages.UserauthBanner):
                (self.options.banner or (lambda text: sys.stderr.write(text)))(msg.message)
                continue
            return msg

    async def _attempt(self, request: messages.Message) -> bool:
        self.conn.send(request.encode())
        reply = await self._reply()
        if isinstance(reply, messages.UserauthSuccess):
            return True
        if not isinstance(reply, messages.UserauthFailure):
            raise ProtocolError(f"unexpected message {reply.ID} during authentication")
        self.methods = reply.methods
        return False

    async def run(self) -> str:
        opts = self.options
        self.conn.send(messages.ServiceRequest(auth.SERVICE_USERAUTH).encode())
        if not isinstance(await self._reply(), messages.ServiceAccept):
            raise ProtocolError("server refused the ssh-userauth service")
        if await self._attempt(auth.none_request(opts.user)):
            return "none"
        tried: set[str] = set()
        for method in opts.preferred_auth:
            if method not in self.methods or method in tried:
                continue
            tried.add(method)
            log.debug("Next authentication method: %s", method)
            if method == "publickey" and await self._publickey():
                return method
            if method == "password" and await self._password():
                return method
            if method == "keyboard-interactive" and await self._keyboard_interactive():
                return method
        raise AuthenticationError(self.methods)

    def _algorithm_for(self, key: keys.PublicKey) -> str:
        algorithms = key.signature_algorithms()
        server_algs = self.conn.core.server_sig_algs
        if server_algs is not None:
            for alg in algorithms:
                if alg in server_algs:
                    return alg
        return algorithms[0]

    async def _publickey(self) -> bool:
        session_id = self.conn.core.session_id
        assert session_id is not None
        user = self.options.user
        async for public, signer in self._identities():
            alg = self._algorithm_for(public)
            log.debug("Offering public key: %s %s", public.label, public.fingerprint())
            signed = auth.publickey_signed_data(session_id, user, alg, public.blob)
            try:
                signature = await signer(signed, alg)
            except SSHError as exc:
                log.debug("signing with %s failed: %s", public.fingerprint(), exc)
                continue
            if await self._attempt(auth.publickey_request(user, alg, public.blob, signature)):
                log.debug("Authenticated with public key %s %s", public.label, public.fingerprint())
                return True
            if "publickey" not in self.methods:
                return False
        return False

    async def _identities(self):  # type: ignore[no-untyped-def]
        opts = self.options
        seen: set[keys.PublicKey] = set()
        for key in opts.client_keys:
            seen.add(key.public)
            yield key.public, _local_signer(key)
        agent = None
        if opts.use_agent and not opts.identities_only:
            agent = await AgentClient.connect(opts.agent_path)
        try:
            if agent is not None:
                for public, _comment in await agent.identities():
                    if public not in seen:
                        seen.add(public)
                        yield public, _agent_signer(agent, public)
            for path in self._identity_paths():
                key = self._load_identity(path)
                if key is not None and key.public not in seen:
                    seen.add(key.public)
                    yield key.public, _local_signer(key)
        finally:
            if agent is not None:
                agent.close()

    def _identity_paths(self) -> list[str]:
        files = self.options.identity_files
        if files is None:
            return [str(_ssh_dir() / name) for name in DEFAULT_IDENTITIES]
        return [os.path.expanduser(p) for p in files]

    def _load_identity(self, path: str) -> keys.PrivateKey | None:
        if not os.path.exists(path):
            return None
        try:
            return keys.load_private_key(path, self.options.passphrase)
        except keys.PassphraseRequired:
            prompt = self.options.password_prompt or _interactive_prompt
            answer = None if self.options.batch_mode else prompt(f"Enter passphrase for key '{path}': ")
            if not answer:
                return None
            try:
                return keys.load_private_key(path, answer.encode())
            except SSHError as exc:
                log.warning('Load key "%s": %s', path, exc)
                return None
        except SSHError as exc:
            log.warning('Load key "%s": %s', path, exc)
            return None

    def _ask(self, prompt: str) -> str | None:
        if self.options.batch_mode:
            return None
        return (self.options.password_prompt or _interactive_prompt)(prompt)

    async def _password(self) -> bool:
        opts = self.options
        for _ in range(3):  # NumberOfPasswordPrompts
            password = (
                opts.password if opts.password is not None else self._ask(f"{opts.user}@{opts.host}'s password: ")
            )
            if password is None:
                return False
            if await self._attempt(auth.password_request(opts.user, password)):
                return True
            if opts.password is not None or "password" not in self.methods:
                return False
            print("Permission denied, please try again.", file=sys.stderr)
        return False

    async def _keyboard_interactive(self) -> bool:
        opts = self.options
        self.conn.send(auth.keyboard_interactive_request(opts.user).encode())
        for _ in range(16):
            reply = await self._reply()
            if isinstance(reply, messages.UserauthSuccess):
                return True
            if isinstance(reply, messages.UserauthFailure):
                self.methods = reply.methods
                return False
            info = messages.decode_as(messages.UserauthInfoRequest, reply.encode())
            answers = []
            for prompt, _echo in info.prompts():
                answer = opts.password if opts.password is not None else self._ask(prompt)
                if answer is None:
                    return False
                answers.append(answer)
            self.conn.send(messages.UserauthInfoResponse.build(answers).encode())
        return False


def _local_signer(key: keys.PrivateKey):  # type: ignore[no-untyped-def]
    async def sign(data: bytes, algorithm: str) -> bytes:
        return key.sign(data, algorithm)

    return sign


def _agent_signer(agent: AgentClient, public: keys.PublicKey):  # type: ignore[no-untyped-def]
    async def sign(data: bytes, algorithm: str) -> bytes:
        return await agent.sign(public, data, algorithm)

    return sign


class SSHClient:
    """An authenticated client connection."""

    def __init__(self, conn: SSHConnection, options: ClientOptions) -> None:
        self.conn = conn
        self.options = options

    def forward_local(
        self,
        listen_port: int | str = 0,
        dest_host: str | None = None,
        dest_port: int | None = None,
        *,
        listen_host: str | None = None,
        gateway_ports: bool = False,
        stream_local_bind_unlink: bool = False,
    ) -> LocalForward:
        """``async with client.forward_local(0, "db", 5432) as fwd: fwd.port``; also takes an ``-L`` spec string.
        A unix-socket listener fails on an existing file unless ``stream_local_bind_unlink`` (as ssh's option)."""
        if isinstance(listen_port, str) and dest_host is None:
            spec = parse_forward(listen_port, "local")
        else:
            spec = ForwardSpec(listen_host, int(listen_port), None, dest_host, dest_port, None)
        return LocalForward(self.conn, spec, gateway_ports, stream_local_bind_unlink)

    async def close(self) -> None:
        self.conn.close()
        await self.conn.closed

    async def wait_closed(self) -> None:
        await self.conn.closed

    async def __aenter__(self) -> SSHClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def connect_with_options(options: ClientOptions) -> SSHClient:
    """Connect, check the host key, authenticate; raises SSHError subclasses or OSError."""
    loop = asyncio.get_running_loop()
    verifier: Callable[[keys.PublicKey, str], None] | None = None
    if not (options.strict_host_key_checking == "no" and options.known_hosts == ()):
        verifier = HostKeyVerifier(options)

    async def establish() -> SSHClient:
        _, conn = await loop.create_connection(
            lambda: SSHConnection(Role.CLIENT, options.transport, host_key_checker=verifier),
            options.host,
            options.port,
        )
        try:
            await conn.kex_done
            method = await _AuthConversation(conn, options).run()
            log.debug("Authentication succeeded (%s).", method)  # the adapter started channels on SUCCESS
        except BaseException:
            conn.close()
            raise
        return SSHClient(conn, options)

    if options.connect_timeout:
        return await asyncio.wait_for(establish(), options.connect_timeout)
    return await establish()


async def connect(
    host: str,
    port: int = 22,
    *,
    username: str | None = None,
    client_keys: Sequence[keys.PrivateKey | str] | None = None,
    password: str | None = None,
    known_hosts: Sequence[str] | None = None,
    strict_host_key_checking: str = "yes",
    transport: TransportConfig | None = None,
    use_agent: bool = True,
) -> SSHClient:
    """``async with await sshconduit.connect("host", username="me") as client: ...``

    ``client_keys`` takes loaded keys or key file paths; ``known_hosts=()`` with
    ``strict_host_key_checking="no"`` turns host-key checking off (tests, throwaway hosts only).
    """
    loaded = [k for k in client_keys or () if isinstance(k, keys.PrivateKey)]
    paths = [k for k in client_keys or () if isinstance(k, str)]
    options = ClientOptions(
        host=host,
        port=port,
        user=username or getpass.getuser(),
        client_keys=loaded,
        identity_files=paths if client_keys is not None else None,
        identities_only=client_keys is not None,
        use_agent=use_agent and client_keys is None,
        password=password,
        known_hosts=known_hosts,
        strict_host_key_checking=strict_host_key_checking,
        transport=transport or TransportConfig(),
        batch_mode=True,
    )
    return await connect_with_options(options)
