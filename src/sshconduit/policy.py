"""Who may log in and open what: the server's answers to the core's questions (sshd_config(5) semantics)."""

from __future__ import annotations

import hmac
import logging
import os
import pwd
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import audit
from .access import access_denial
from .config.authorized_keys import AuthorizedKey, KeyOptions, find_authorized_key, load_authorized_keys
from .config.patterns import match_pattern
from .crypto import keys
from .session_policy import ACCEPTED_ENV
from .system_password import SystemPasswordChecker, shadow_account_expired

if TYPE_CHECKING:
    from .pam_kbdint import KbdExchange

log = logging.getLogger("sshconduit.policy")

PasswordChecker = Callable[[str, str], bool]

OPEN_PROHIBITED = 1
PRIVILEGED_PORTS = 1024  # IPPORT_RESERVED: binding below it needs root


@dataclass
class ServerPolicy:
    """sshd's authentication and forwarding rules for one server configuration."""

    authorized_keys_files: Sequence[str] = (".ssh/authorized_keys", ".ssh/authorized_keys2")
    trusted_keys: Sequence[keys.PublicKey] = ()  # keys accepted for the serving user beyond the files
    pubkey_authentication: bool = True
    password_authentication: bool = False
    kbd_interactive_authentication: bool = False
    password_checker: PasswordChecker | None = None
    permit_root_login: str = "prohibit-password"
    allow_tcp_forwarding: str = "yes"  # yes | all | no | local | remote
    disable_forwarding: bool = False
    permit_open: Sequence[str] = ("any",)
    permit_listen: Sequence[str] = ("any",)
    gateway_ports: str = "no"  # no | yes | clientspecified
    allow_stream_local_forwarding: str = "yes"  # yes | all | no | local | remote
    stream_local_bind_mask: int = 0o177
    stream_local_bind_unlink: bool = False
    allow_users: Sequence[str] = ()
    deny_users: Sequence[str] = ()
    allow_groups: Sequence[str] = ()
    deny_groups: Sequence[str] = ()
    permit_tty: bool = True
    max_sessions: int = 10
    max_auth_tries: int | None = None  # None: the server's own; set when Match may change it per user
    authentication_methods: Sequence[str] = ("any",)  # AuthenticationMethods lists (authmethods.py)
    client_alive_interval: int = 0
    client_alive_count_max: int = 3
    rekey_limit: tuple[int | None, int | None] = (None, None)  # RekeyLimit bytes, seconds; applied after auth
    permit_empty_passwords: bool = False
    pubkey_accepted_algorithms: Sequence[str] = ()  # empty: every algorithm the key type has
    # sessions
    force_command: str | None = None  # ForceCommand: wins over authorized_keys command=
    accept_env: Sequence[str] = ACCEPTED_ENV  # conduitd sets sshd's (none unless configured)
    permit_user_environment: str = "no"  # yes | no | pattern list of names authorized_keys environment= may set
    subsystems: Mapping[str, str] = field(default_factory=dict)
    banner: str | None = None  # Banner: a file, read when the user is known (Match may change it)
    banner_texts: Mapping[str, str] = field(default_factory=dict)  # files read ahead by a privsep process
    chroot_directory: str | None = None  # ChrootDirectory, tokens unexpanded (chroot.py)
    serving_uid: int = field(default_factory=os.getuid)
    client_address: str | None = None
    local_address: str | None = None
    local_port: int = 0
    # Match blocks: called once with the first user name a USERAUTH_REQUEST names; updates this policy in place
    on_user: Callable[[ServerPolicy, str], None] | None = None
    bound_user: str | None = None
    _denial_logged: bool = False
    # what the accepted key's authorized_keys line allowed, once a key has been accepted
    key_options: KeyOptions | None = None

    # --- AuthPolicy ---

    def bind_user(self, user: str) -> bool:
        """Apply Match blocks for the first user named; False for a later request naming another user."""
        if self.bound_user is None:
            self.bound_user = user
            if self.on_user is not None:
                self.on_user(self, user)
        return user == self.bound_user

    def _user_allowed(self, user: str) -> bool:
        if not self.bind_user(user):
            return False  # sshd: "Change of username or service not allowed"
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            return False
        if self.serving_uid != 0 and entry.pw_uid != self.serving_uid:
            return False  # an unprivileged server serves its own user only
        reason = access_denial(
            user, self.client_address, self.allow_users, self.deny_users, self.allow_groups, self.deny_groups
        )
        if reason is None and self._shadow_expired(user):
            reason = "account has expired"
        if reason is not None and not self._denial_logged:
            self._denial_logged = True
            log.info("User %s from %s not allowed because %s", user, self.client_address, reason)
            audit.refused(user, self.client_address, "login", "", reason)
        return reason is None

    def _shadow_expired(self, user: str) -> bool:
        """UsePAM no (root): sshd itself refuses an account /etc/shadow says has expired, whatever the method."""
        checker = self.password_checker
        return isinstance(checker, SystemPasswordChecker) and not checker.use_pam and shadow_account_expired(user)

    def allowed_methods(self, user: str) -> list[str]:
        if not self.bind_user(user):
            return []
        methods = []
        if self.pubkey_authentication:
            methods.append("publickey")
        if self.password_checker is not None and (not _is_root(user) or self.permit_root_login == "yes"):
            if self.password_authentication:
                methods.append("password")
            if self.kbd_interactive_authentication:
                methods.append("keyboard-interactive")
        return methods

    def check_publickey(self, user: str, key: keys.PublicKey) -> bool:
        if not self._user_allowed(user):
            return False
        if _is_root(user) and self.permit_root_login == "no":
            log.info("ROOT LOGIN REFUSED FROM %s (PermitRootLogin no)", self.client_address)
            return False
        entry = self._find_key(user, key)
        if entry is None:
            return False
        if _is_root(user) and self.permit_root_login == "forced-commands-only" and entry.options.command is None:
            log.info("ROOT LOGIN REFUSED FROM %s (PermitRootLogin forced-commands-only, key without command=)",
                     self.client_address)  # fmt: skip
            return False
        self.key_options = entry.options
        return True

    def _find_key(self, user: str, key: keys.PublicKey) -> AuthorizedKey | None:
        home = pwd.getpwnam(user).pw_dir
        for pattern in self.authorized_keys_files:
            path = expand_tokens(pattern, user, home)
            entries, warnings = load_authorized_keys(path)
            for warning in warnings:
                log.warning("%s", warning)
            found = find_authorized_key(entries, key, self.client_address)
            if found is not None:
                return found
        if pwd.getpwnam(user).pw_uid == self.serving_uid:
            for trusted in self.trusted_keys:
                if hmac.compare_digest(trusted.blob, key.blob):
                    return AuthorizedKey(key, KeyOptions(), "", "trusted key")
        return None

    @property
    def password_check_blocks(self) -> bool:
        """The checker blocks (PAM, crypt): the server calls check_password in a thread."""
        return bool(getattr(self.password_checker, "blocking", False))

    def check_password(self, user: str, password: str, method: str = "password") -> bool:
        """``method``: password or keyboard-interactive, for the privsep monitor's AuthenticationMethods."""
        if self.password_checker is None or not self._user_allowed(user):
            return False
        if not password and not self.permit_empty_passwords:
            return False
        if _is_root(user) and self.permit_root_login != "yes":
            log.info("ROOT LOGIN REFUSED FROM %s (PermitRootLogin %s)", self.client_address, self.permit_root_login)
            return False
        if isinstance(self.password_checker, SystemPasswordChecker):
            return self.password_checker(user, password, self.client_address or "")  # PAM_RHOST
        return self.password_checker(user, password)

    # --- UsePAM (pam_kbdint.py, pam_session.py) ---

    @property
    def use_pam(self) -> bool:
        """UsePAM yes in a root server: PAM asks keyboard-interactive's questions and checks every login."""
        return isinstance(self.password_checker, SystemPasswordChecker) and self.password_checker.use_pam

    @property
    def kbd_interactive_conversation(self) -> bool:
        return self.use_pam

    def kbd_interactive_exchange(self, user: str) -> KbdExchange:
        """PAM's conversation for ``user``; a user who may not log in gets the same first question, then fails."""
        from .pam_kbdint import PamExchange, RefusedExchange

        if self.password_checker is None or not self._user_allowed(user):
            return RefusedExchange()
        if _is_root(user) and self.permit_root_login != "yes":
            log.info("ROOT LOGIN REFUSED FROM %s (PermitRootLogin %s)", self.client_address, self.permit_root_login)
            return RefusedExchange()
        return PamExchange(user, self.client_address or "", self.permit_empty_passwords)

    def account_check_needed(self, method: str) -> bool:
        """sshd's do_pam_account after a login PAM's authentication did not already check."""
        return self.use_pam and method not in ("password", "keyboard-interactive")

    def check_account(self, user: str) -> bool:
        """pam_acct_mgmt (blocks: the server calls it in a thread)."""
        from .pam_session import check_account

        return check_account(user, self.client_address or "")

    def banner_text(self) -> str | None:
        """The Banner file's text for this connection (Match applied), read when the user is known."""
        if self.banner is None:
            return None
        if self.banner in self.banner_texts:
            return self.banner_texts[self.banner]
        try:
            return Path(self.banner).read_text(errors="replace")
        except OSError as exc:
            log.info("Banner %s: %s", self.banner, exc.strerror or exc)
            return None

    # --- forwarding ---

    def streamlocal_forwarding_denial(self) -> str | None:
        """None when a direct-streamlocal channel may open, else the reason to log."""
        if self.disable_forwarding or self.allow_stream_local_forwarding not in ("yes", "all", "local"):
            return "AllowStreamLocalForwarding"
        if self.key_options is not None and not self.key_options.allows_port_forwarding():
            return "authorized_keys no-port-forwarding"
        return None

    def local_forwarding_denial(self, host: str, port: int) -> str | None:
        """None when a direct-tcpip to host:port may open, else the reason to log."""
        if self.disable_forwarding or self.allow_tcp_forwarding not in ("yes", "all", "local"):
            return "AllowTcpForwarding"
        if self.key_options is not None and not self.key_options.allows_port_forwarding():
            return "authorized_keys no-port-forwarding"
        if not permit_open_allows(self.permit_open, host, port):
            return "PermitOpen"
        if (
            self.key_options is not None
            and self.key_options.permitopen
            and not permit_open_allows(self.key_options.permitopen, host, port)
        ):
            return "authorized_keys permitopen"
        return None

    def remote_forwarding_denial(self, host: str, port: int, uid: int) -> str | None:
        """None when a tcpip-forward of host:port may listen for a user with this uid, else the reason to log."""
        if self.disable_forwarding or self.allow_tcp_forwarding not in ("yes", "all", "remote"):
            return "AllowTcpForwarding"
        if self.key_options is not None and not self.key_options.allows_port_forwarding():
            return "authorized_keys no-port-forwarding"
        if 0 < port < PRIVILEGED_PORTS and uid != 0:
            return "privileged port"  # as sshd's bind_permitted()
        key_listen = self.key_options.permitlisten if self.key_options is not None else []
        if key_listen and not permit_listen_allows(key_listen, host, port):
            return "authorized_keys permitlisten"
        if not permit_listen_allows(self.permit_listen, host, port):
            return "PermitListen"
        return None

    def remote_streamlocal_denial(self) -> str | None:
        """None when a streamlocal-forward@openssh.com may listen, else the reason to log."""
        if self.disable_forwarding or self.allow_stream_local_forwarding not in ("yes", "all", "remote"):
            return "AllowStreamLocalForwarding"
        if self.key_options is not None and not self.key_options.allows_port_forwarding():
            return "authorized_keys no-port-forwarding"
        return None


def _is_root(user: str) -> bool:
    """PermitRootLogin is about uid 0, whatever the account is called (sshd checks pw_uid)."""
    try:
        return pwd.getpwnam(user).pw_uid == 0
    except KeyError:
        return False


def expand_tokens(pattern: str, user: str, home: str) -> str:
    """sshd's %h, %u, %% in AuthorizedKeysFile; a relative path is under the home directory."""
    out = pattern.replace("%%", "\0").replace("%h", home).replace("%u", user).replace("\0", "%")
    out = os.path.expanduser(out)
    return out if os.path.isabs(out) else os.path.join(home, out)


def permit_open_allows(entries: Sequence[str], host: str, port: int) -> bool:
    """PermitOpen semantics: 'any', 'none', or host:port entries where either side may be '*'."""
    for entry in entries:
        if entry == "any":
            return True
        if entry == "none":
            return False
        want_host, _, want_port = entry.rpartition(":")
        want_host = want_host.strip("[]")
        if want_port not in ("*", str(port)):
            continue
        if want_host in ("*", host) or want_host.lower() == host.lower():
            return True
    return False


def permit_listen_allows(entries: Sequence[str], host: str, port: int) -> bool:
    """PermitListen / permitlisten= semantics: 'any', 'none', port (any host) or host:port; host is a pattern
    matched against the requested address, lowercased; port '*' is any port."""
    for entry in entries:
        if entry == "any":
            return True
        if entry == "none":
            return False
        if ":" in entry:
            want_host, _, want_port = entry.rpartition(":")
            want_host = want_host.strip("[]")
        else:
            want_host, want_port = "*", entry
        if want_port not in ("*", str(port)):
            continue
        if match_pattern(host.lower(), want_host):
            return True
    return False
