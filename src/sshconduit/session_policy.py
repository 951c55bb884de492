"""What a session runs and with which environment, by sshd's rules (sshd_config(5) ForceCommand, AcceptEnv,
PermitUserEnvironment; sshd(8) "AUTHORIZED_KEYS FILE FORMAT" command= and environment=)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .config.authorized_keys import KeyOptions
from .config.patterns import match_pattern, match_pattern_list

log = logging.getLogger("sshconduit.session")

ACCEPTED_ENV = ("LANG", "LC_*")  # AcceptEnv as Debian ships it: the library's default and conduitd's embedded one


def forced_command(force_command: str | None, key_options: KeyOptions | None) -> tuple[str | None, str]:
    """The command every exec/shell/subsystem runs instead, and where it came from (sshd's do_exec order:
    ForceCommand first, then the key's command=)."""
    if force_command is not None:
        return force_command, "(config)"
    if key_options is not None and key_options.command is not None:
        return key_options.command, "(key-option)"
    return None, ""


def env_accepted(patterns: Sequence[str], name: str) -> bool:
    """AcceptEnv: a client's variable is taken when some pattern (``*``, ``?``) matches its name."""
    return any(match_pattern(name, pattern) for pattern in patterns)


def key_environment(permit: str, key_options: KeyOptions | None, user: str) -> dict[str, str]:
    """authorized_keys environment="NAME=value" the session gets under PermitUserEnvironment (yes, no, or a
    pattern list of names); refused ones are logged, as sshd does for its allow list."""
    if key_options is None or not key_options.environment:
        return {}
    if permit == "no":
        log.info("%s: ignoring authorized_keys environment= (PermitUserEnvironment no)", user)
        return {}
    env: dict[str, str] = {}
    for entry in key_options.environment:
        name, _, value = entry.partition("=")
        if permit != "yes" and match_pattern_list(name, permit) is not True:
            log.info("%s: ignoring authorized_keys environment %s: not in PermitUserEnvironment", user, name)
            continue
        env.setdefault(name, value)  # the first of repeated names wins, as in sshd's auth_opts
    return env
