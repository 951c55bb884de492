"""Who may log in and open what: the server's answers to the core's questions (sshd_config(5) semantics)."""

from __future__ import annotations

import hmac
import logging
import os
import pwd
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .config.authorized_keys import AuthorizedKey, KeyOptions, find_authorized_key, load_authorized_keys
from .crypto import keys

log = logging.getLogger("sshconduit.policy")

PasswordChecker = Callable[[str, str], bool]

OPEN_PROHIBITED = 1


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
    allow_users: Sequence[str] = ()
    deny_users: Sequence[str] = ()
    serving_uid: int = field(default_factory=os.getuid)
    client_address: str | None = None
    # what the accepted key's authorized_keys line allowed, once a key has been accepted
    key_options: KeyOptions | None = None

    # --- AuthPolicy ---

    def _user_allowed(self, user: str) -> bool:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            return False
        if self.serving_uid != 0 and entry.pw_uid != self.serving_uid:
            return False  # an unprivileged server serves its own user only
        if user in self.deny_users:
            return False
        return not self.allow_users or user in self.allow_users

    def allowed_methods(self, user: str) -> list[str]:
        methods = []
        if self.pubkey_authentication:
            methods.append("publickey")
        if self.password_checker is not None and (user != "root" or self.permit_root_login == "yes"):
            if self.password_authentication:
                methods.append("password")
            if self.kbd_interactive_authentication:
                methods.append("keyboard-interactive")
        return methods

    def check_publickey(self, user: str, key: keys.PublicKey) -> bool:
        if not self._user_allowed(user):
            return False
        if user == "root" and self.permit_root_login == "no":
            return False
        entry = self._find_key(user, key)
        if entry is None:
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

    def check_password(self, user: str, password: str) -> bool:
        if self.password_checker is None or not self._user_allowed(user):
            return False
        return self.password_checker(user, password)

    # --- forwarding ---

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
