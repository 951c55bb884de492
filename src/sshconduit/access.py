"""AllowUsers / DenyUsers / AllowGroups / DenyGroups as sshd applies them (sshd_config(5)), in sshd's order."""

from __future__ import annotations

import contextlib
import grp
import pwd
from collections.abc import Sequence

from .config.patterns import match_host_and_address, match_pattern, match_pattern_list


def user_groups(user: str) -> list[str]:
    """The user's primary and supplementary group names; empty for an unknown user."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return []
    names = []
    with contextlib.suppress(KeyError):
        names.append(grp.getgrgid(entry.pw_gid).gr_name)
    names.extend(g.gr_name for g in grp.getgrall() if user in g.gr_mem and g.gr_name not in names)
    return names


def _user_pattern_matches(pattern: str, user: str, address: str | None) -> bool:
    """``alice``, ``a*`` or ``alice@10.0.0.0/8``: the host part is matched against the client address."""
    if "@" in pattern:
        user_part, _, host_part = pattern.partition("@")
        return match_pattern(user, user_part) and match_host_and_address(None, address, host_part)
    return match_pattern(user, pattern)


def access_denial(
    user: str,
    address: str | None,
    allow_users: Sequence[str] = (),
    deny_users: Sequence[str] = (),
    allow_groups: Sequence[str] = (),
    deny_groups: Sequence[str] = (),
) -> str | None:
    """None when the user may log in from address, else sshd's reason (``listed in DenyUsers`` ...)."""
    if any(_user_pattern_matches(p, user, address) for p in deny_users):
        return "listed in DenyUsers"
    if allow_users and not any(_user_pattern_matches(p, user, address) for p in allow_users):
        return "not listed in AllowUsers"
    if deny_groups or allow_groups:
        groups = user_groups(user)
        if deny_groups and any(match_pattern_list(g, ",".join(deny_groups)) for g in groups):
            return "a group is listed in DenyGroups"
        if allow_groups and not any(match_pattern_list(g, ",".join(allow_groups)) for g in groups):
            return "none of user's groups are listed in AllowGroups"
    return None
