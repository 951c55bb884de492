"""Root conduitd checking a system user's password: through PAM (UsePAM yes), else /etc/shadow and crypt(3).

Both ways block (PAM modules sleep after a failure; yescrypt is slow by design), so the checker says
``blocking = True`` and the server calls it in a thread. Nothing here logs or keeps the password.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

from . import pam

log = logging.getLogger("sshconduit.auth")

SHADOW = "/etc/shadow"
SECONDS_PER_DAY = 86400


@cache
def _crypt() -> Any:
    name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
    try:
        function = ctypes.CDLL(name).crypt
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    function.restype = ctypes.c_char_p
    return function


_crypt_lock = threading.Lock()  # crypt(3) returns a static buffer


def shadow_entry(user: str, path: str = SHADOW) -> list[str] | None:
    """The user's /etc/shadow fields, or None."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 9 and fields[0] == user:
                    return fields
    except OSError as exc:
        log.error("cannot read %s: %s", path, exc.strerror)
    return None


def shadow_account_expired(user: str, path: str = SHADOW) -> bool:
    """The account's expiry date (shadow field 8) has passed; logs sshd's line."""
    fields = shadow_entry(user, path)
    if fields is None or not fields[7].isdigit() or int(fields[7]) > int(time.time()) // SECONDS_PER_DAY:
        return False
    log.info("User %s account has expired", user)  # sshd's words
    return True


def check_shadow_password(user: str, password: str, permit_empty: bool, path: str = SHADOW) -> bool:
    """crypt(3) the password with the stored hash's setting and compare; refuse locked and expired accounts."""
    fields = shadow_entry(user, path)
    if fields is None:
        return False
    stored, last_change = fields[1], fields[2]
    if shadow_account_expired(user, path):
        return False
    if last_change == "0":
        log.info("User %s must change the password; conduitd cannot", user)
        return False
    if stored == "":
        return permit_empty and password == ""
    if stored.startswith(("!", "*")) or "\0" in password:
        return False  # locked, no password, or a password crypt(3) cannot take
    crypt = _crypt()
    if crypt is None:
        return False
    with _crypt_lock:
        result = crypt(password.encode(), stored.encode())
    return result is not None and not result.startswith(b"*") and hmac.compare_digest(result, stored.encode())


@dataclass(frozen=True)
class SystemPasswordChecker:
    """A PasswordChecker for system users; ``blocking``: the server calls it off the event loop."""

    use_pam: bool
    permit_empty: bool = False
    blocking = True

    def __call__(self, user: str, password: str, rhost: str = "") -> bool:
        if self.use_pam:
            return pam.check_password(user, password, rhost, self.permit_empty)
        return check_shadow_password(user, password, self.permit_empty)


def system_password_checker(use_pam: bool, permit_empty: bool) -> SystemPasswordChecker | None:
    """The checker a root server uses, or None (with one log line why) when it cannot check passwords."""
    if os.geteuid() != 0:
        return None  # not root: only the serving user, by key (or a checker given through the API)
    if use_pam and not pam.available():
        log.error("UsePAM yes but libpam.so.0 cannot be loaded: password authentication is refused")
        return None
    if not use_pam and _crypt() is None:
        log.error("UsePAM no and libcrypt cannot be loaded: password authentication is refused")
        return None
    return SystemPasswordChecker(use_pam, permit_empty)
