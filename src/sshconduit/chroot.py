"""ChrootDirectory (sshd_config(5), sshd(8)): after authentication the user's sessions and forwarded sockets live
inside a directory that only root may change.

The root process that is about to become the user enters the jail, so the ids drop inside it (privsep.py calls
``enter`` from ``drop_privileges``): the preexec of a session started by a root server, and the user's helper
process, which makes the user's sockets (a unix socket path is then resolved inside the jail, as in sshd) and, with
UsePrivilegeSeparation, starts the user's sessions. ``check`` is sshd's rule, also run before the helper is forked
so that an unsafe directory ends the connection right after authentication, as sshd's post-auth process does.
"""

from __future__ import annotations

import os
import pwd
import stat


class ChrootError(OSError):
    """The jail cannot be entered; the message is sshd's (administrators search for it)."""


def chroot_path(pattern: str | None, entry: pwd.struct_passwd) -> str | None:
    """The directory ChrootDirectory names for this user (``~``, %h, %u, %U, %% expanded); None when unset/none."""
    if pattern is None or pattern.lower() == "none":
        return None
    if pattern == "~" or pattern.startswith("~/"):
        pattern = entry.pw_dir + pattern[1:]
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "%":
            token = pattern[i + 1 : i + 2]
            expansion = {"%": "%", "h": entry.pw_dir, "u": entry.pw_name, "U": str(entry.pw_uid)}.get(token)
            if expansion is None:
                raise ChrootError(f"percent_expand: unknown key %{token}" if token else "percent_expand: bad format")
            out.append(expansion)
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def check(path: str) -> None:
    """sshd's rule: an absolute path whose every component, from / down, is a directory owned by root and
    writable by nobody else (stat follows links, as sshd's does)."""
    if not path.startswith("/"):
        raise ChrootError("chroot path does not begin at root")
    components = ["/"]
    for i, char in enumerate(path):
        if char == "/" and i > 0:
            components.append(path[: i + 1])
    if not path.endswith("/"):
        components.append(path)
    for component in components:
        last = component == components[-1]
        kind = "" if last else "component "
        try:
            st = os.stat(component)
        except OSError as exc:
            raise ChrootError(f'safely_chroot: stat("{component}"): {os.strerror(exc.errno or 0)}') from None
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ChrootError(f'bad ownership or modes for chroot directory {kind}"{component}"')
        if not stat.S_ISDIR(st.st_mode):
            raise ChrootError(f'chroot path {kind}"{component}" is not a directory')


def enter(path: str) -> None:
    """As root, in the process about to drop to the user: check again (a fork later than the first check), then
    chroot and stand at the new /. Runs in a preexec too: no imports, no logging here."""
    check(path)
    os.chdir(path)
    os.chroot(".")
    os.chdir("/")


def enter_home(home: str) -> None:
    """After the drop, as the user: the home directory inside the jail when it can be entered, else stay at /
    (sshd says nothing about a missing home in a chroot)."""
    try:
        os.chdir(home)
    except OSError:
        os.chdir("/")


def session_cwd(home: str) -> str:
    """Where a session started inside the jail begins (the helper asks as the user, inside the jail)."""
    return home if os.path.isdir(home) else "/"
