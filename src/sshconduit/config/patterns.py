"""OpenSSH pattern lists (ssh_config(5) "PATTERNS"): wildcards, negation, CIDR address lists.

List matchers answer in three states, like match_pattern_list() in OpenSSH's match.c (1 / -1 / 0):
True when some entry matches, False when a negated entry matches (negation wins whatever its position),
None when nothing matches. Both "no" answers are falsy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator


def match_pattern(name: str, pattern: str) -> bool:
    """Whole-string match where ``*`` is any run of characters and ``?`` exactly one; case-sensitive."""
    # Greedy scan remembering only the last star: linear in practice, O(len(name) * len(pattern)) worst case,
    # so a hostile pattern such as "*a*a*a*b" cannot blow up the way a backtracking regex can.
    n_pos = p_pos = 0
    star_p = -1
    star_n = 0
    while n_pos < len(name):
        if p_pos < len(pattern) and pattern[p_pos] == "*":
            star_p, star_n = p_pos, n_pos
            p_pos += 1
        elif p_pos < len(pattern) and pattern[p_pos] in ("?", name[n_pos]):
            n_pos += 1
            p_pos += 1
        elif star_p >= 0:
            star_n += 1  # let the last star swallow one more character
            n_pos, p_pos = star_n, star_p + 1
        else:
            return False
    return all(c == "*" for c in pattern[p_pos:])


def _entries(pattern_list: str) -> Iterator[tuple[str, bool]]:
    """The non-empty entries of ``"a,!b,*.c"``, each with whether it was negated."""
    for entry in pattern_list.split(","):
        entry = entry.strip()
        negated = entry.startswith("!")
        if negated:
            entry = entry[1:]
        if entry:
            yield entry, negated


def match_pattern_list(name: str, pattern_list: str, ignore_case: bool = False) -> bool | None:
    """Match `name` against ``"a,!b,*.c"``: True, False for a negated match, None for no match."""
    if ignore_case:
        name = name.lower()
        pattern_list = pattern_list.lower()
    matched: bool | None = None
    for entry, negated in _entries(pattern_list):
        if match_pattern(name, entry):
            if negated:
                return False
            matched = True
    return matched


def match_hostname(host: str, pattern_list: str) -> bool | None:
    """Host names compare case-insensitively, as OpenSSH's match_hostname()."""
    return match_pattern_list(host, pattern_list, ignore_case=True)


def match_address(addr: str, pattern_list: str) -> bool | None:
    """Match an IP address against entries that are CIDR blocks (``10.0.0.0/8``) or wildcard patterns.

    A malformed CIDR entry (or one with host bits set) answers False: it denies, as OpenSSH's
    addr_match_list() makes an error of it.
    """
    try:
        address = ipaddress.ip_address(addr)
    except ValueError:
        address = None
    matched: bool | None = None
    for entry, negated in _entries(pattern_list):
        if "/" in entry:
            try:
                network = ipaddress.ip_network(entry, strict=True)
            except ValueError:
                return False
            hit = address is not None and address.version == network.version and address in network
        else:
            hit = match_pattern(addr.lower(), entry.lower())
        if hit:
            if negated:
                return False
            matched = True
    return matched


def match_host_and_address(host: str | None, addr: str | None, pattern_list: str) -> bool:
    """The ``from=`` check of authorized_keys: the address or the host name must match, and no negation may.

    Without a resolved host name the address stands in for it (sshd with UseDNS no).
    """
    address_match = match_address(addr, pattern_list) if addr else None
    if address_match is False:
        return False
    host_match = match_hostname(host or addr or "", pattern_list) if (host or addr) else None
    if host_match is False:
        return False
    return bool(address_match or host_match)
