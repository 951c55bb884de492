"""AuthenticationMethods (sshd_config(5)): lists of methods that must all succeed, in order, for one login.

``AuthenticationMethods publickey,password publickey,keyboard-interactive`` asks for a key first, then either a
password or keyboard-interactive. Each list is kept as the methods still to do; a success removes that method
from the head of every list that starts with it, and the login is complete when one list is empty. Only a method
at the head of some list is offered or accepted at each stage. ``any`` (the default) is one success of any
enabled method.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("sshconduit.auth")

ANY = ("any",)
KNOWN_METHODS = frozenset({"publickey", "password", "keyboard-interactive", "hostbased", "gssapi-with-mic", "none"})
# what conduitd can do at all; the others may be written (sshd knows them) but never succeed here
IMPLEMENTED_METHODS = ("publickey", "password", "keyboard-interactive")


def base_method(entry: str) -> str:
    """``keyboard-interactive:pam`` -> ``keyboard-interactive`` (conduitd has one device per method)."""
    return entry.split(":", 1)[0]


def disabled_methods(method_list: str, enabled: Callable[[str], bool]) -> list[str]:
    return [entry for entry in method_list.split(",") if not enabled(base_method(entry))]


def check_satisfiable(lists: Sequence[str], enabled: Callable[[str], bool]) -> str | None:
    """sshd's start-up check: None when some list uses only enabled methods, else the fatal message. Each list
    with a disabled method is logged, as sshd does."""
    if list(lists) == list(ANY):
        return None
    usable = False
    for method_list in lists:
        disabled = disabled_methods(method_list, enabled)
        for entry in disabled:
            log.info('Disabled method "%s" in AuthenticationMethods list "%s"', entry, method_list)
        usable = usable or not disabled
    return None if usable else "AuthenticationMethods cannot be satisfied by enabled authentication methods"


class MethodLists:
    """The progress of one connection through its AuthenticationMethods lists."""

    def __init__(self, lists: Sequence[str], enabled: Callable[[str], bool]) -> None:
        self.any = list(lists) == list(ANY)
        # lists naming a method this connection cannot use are dropped, as sshd's auth2_setup_methods_lists
        self._remaining: list[list[str]] = [
            method_list.split(",") for method_list in lists if not disabled_methods(method_list, enabled)
        ]
        self.completed: list[str] = []  # methods done so far, in order (sshd's log adds them)

    def offered(self, enabled: Sequence[str]) -> list[str]:
        """The enabled methods the client may try now, in the order given."""
        if self.any:
            return list(enabled)
        heads = {base_method(remaining[0]) for remaining in self._remaining if remaining}
        return [method for method in enabled if method in heads]

    def succeeded(self, method: str) -> bool:
        """Record a successful method; True when the login is complete."""
        self.completed.append(method)
        if self.any:
            return True
        done = False
        for remaining in self._remaining:
            if remaining and base_method(remaining[0]) == method:
                del remaining[0]
                done = done or not remaining
        return done


def enabled_in_config(pubkey: bool, password: bool, kbd_interactive: bool) -> Callable[[str], bool]:
    """Which methods a configuration enables; hostbased, gssapi-with-mic and none are not implemented here."""
    flags = {"publickey": pubkey, "password": password, "keyboard-interactive": kbd_interactive}
    return lambda method: flags.get(method, False)


def config_problem(cfg: Any) -> str | None:
    """sshd's start-up (and -t) check of a ServerConfig's main section; Match blocks are checked per login."""
    enabled = enabled_in_config(
        cfg.pubkey_authentication, cfg.password_authentication, cfg.kbd_interactive_authentication
    )
    return check_satisfiable(cfg.authentication_methods, enabled)
