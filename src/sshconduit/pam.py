"""Password checks through PAM (libpam.so.0 via ctypes): pam_start("sshd") / authenticate / acct_mgmt / end,
and the pieces pam_kbdint.py (keyboard-interactive conversations) and pam_session.py (accounts, sessions) share.

Every call blocks (PAM modules sleep on failure, may ask a network service): run it in a thread, never on the
event loop. The conversation answers the modules' hidden prompts with the one password the client sent; the
password is never logged and is handed to PAM in memory PAM frees (it overwrites its own copy).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from functools import cache

log = logging.getLogger("sshconduit.pam")

DEFAULT_SERVICE = "sshd"  # /etc/pam.d/sshd, as OpenSSH uses
# conduitd-only, for tests: a PAM stack the test writes itself, never the system's sshd stack
SERVICE_ENV = "SSHCONDUIT_PAM_SERVICE"

PAM_SUCCESS = 0
PAM_ABORT = 26
PAM_BUF_ERR = 5
PAM_CONV_ERR = 19
PAM_NEW_AUTHTOK_REQD = 12
PAM_PROMPT_ECHO_OFF = 1
PAM_PROMPT_ECHO_ON = 2
PAM_ERROR_MSG = 3
PAM_TEXT_INFO = 4
PAM_SILENT = 0x8000
PAM_DISALLOW_NULL_AUTHTOK = 0x0001
PAM_TTY = 3
PAM_RHOST = 4
PAM_FAIL_DELAY = 10
PAM_ESTABLISH_CRED = 0x0002
PAM_DELETE_CRED = 0x0004
MAX_MESSAGES = 32  # PAM_MAX_NUM_MSG: more in one conversation call is a module bug
MAX_ENVIRONMENT = 1024  # variables taken from pam_getenvlist


class PamMessage(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class PamResponse(ctypes.Structure):
    _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]


ConvFunc = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(ctypes.POINTER(PamMessage)),
    ctypes.POINTER(ctypes.POINTER(PamResponse)),
    ctypes.c_void_p,
)


class PamConv(ctypes.Structure):
    _fields_ = [("conv", ConvFunc), ("appdata_ptr", ctypes.c_void_p)]


# libpam sleeps (pam_unix asks 2 s) in the calling thread after a failure; we take that delay ourselves, on the
# event loop, so a thread is not held asleep by each failed guess
DelayFunc = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)
_NO_DELAY = DelayFunc(lambda _status, _usec, _appdata: None)


class PamUnavailable(Exception):
    """libpam could not be loaded."""


@cache
def libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    try:
        libpam = ctypes.CDLL("libpam.so.0")
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError as exc:
        raise PamUnavailable(str(exc)) from None
    handle = ctypes.c_void_p
    libpam.pam_start.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(PamConv), ctypes.POINTER(handle)]
    libpam.pam_start.restype = ctypes.c_int
    for name in ("pam_authenticate", "pam_acct_mgmt", "pam_end"):
        getattr(libpam, name).argtypes = [handle, ctypes.c_int]
        getattr(libpam, name).restype = ctypes.c_int
    for name in ("pam_setcred", "pam_open_session", "pam_close_session"):
        getattr(libpam, name).argtypes = [handle, ctypes.c_int]
        getattr(libpam, name).restype = ctypes.c_int
    libpam.pam_getenvlist.argtypes = [handle]
    libpam.pam_getenvlist.restype = ctypes.POINTER(ctypes.c_void_p)
    libpam.pam_set_item.argtypes = [handle, ctypes.c_int, ctypes.c_void_p]
    libpam.pam_set_item.restype = ctypes.c_int
    libpam.pam_strerror.argtypes = [handle, ctypes.c_int]
    libpam.pam_strerror.restype = ctypes.c_char_p
    libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    libc.calloc.restype = ctypes.c_void_p
    libc.strdup.argtypes = [ctypes.c_char_p]
    libc.strdup.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    return libpam, libc


def available() -> bool:
    try:
        libraries()
    except PamUnavailable:
        return False
    return True


def service() -> str:
    return os.environ.get(SERVICE_ENV) or DEFAULT_SERVICE


def start(user: str, conv: ConvFunc, rhost: str) -> tuple[ctypes.c_void_p, PamConv] | None:
    """pam_start for ``user`` with sshd's items set; the conversation must outlive the handle (keep both)."""
    libpam, _ = libraries()
    conversation = PamConv(conv, None)
    handle = ctypes.c_void_p()
    status = libpam.pam_start(service().encode(), user.encode(), ctypes.byref(conversation), ctypes.byref(handle))
    if status != PAM_SUCCESS:
        log.error("PAM: initialisation failed: %s", status)
        return None
    libpam.pam_set_item(handle, PAM_FAIL_DELAY, ctypes.cast(_NO_DELAY, ctypes.c_void_p))
    libpam.pam_set_item(handle, PAM_TTY, ctypes.c_char_p(b"ssh"))  # as sshd: some modules want a tty name
    if rhost:
        libpam.pam_set_item(handle, PAM_RHOST, ctypes.c_char_p(rhost.encode()))
    return handle, conversation


def account(libpam: ctypes.CDLL, handle: ctypes.c_void_p, user: str, flags: int) -> int:
    """pam_acct_mgmt, logging why an account is refused (sshd cannot change an expired password either)."""
    status = libpam.pam_acct_mgmt(handle, flags)
    if status == PAM_NEW_AUTHTOK_REQD:
        log.info("PAM: password for %s has expired; conduitd cannot change it", user)
    elif status != PAM_SUCCESS:
        log.info("PAM: account check for %s: %s", user, strerror(libpam, handle, status))
    return status


def environment(libpam: ctypes.CDLL, libc: ctypes.CDLL, handle: ctypes.c_void_p) -> dict[str, str]:
    """pam_getenvlist as a dict (the list and its strings are ours to free)."""
    found: dict[str, str] = {}
    array = libpam.pam_getenvlist(handle)
    if not array:
        return found
    for i in range(MAX_ENVIRONMENT):
        item = array[i]
        if not item:
            break
        name, sep, value = ctypes.string_at(item).decode(errors="replace").partition("=")
        if sep and name:
            found[name] = value
        libc.free(item)
    libc.free(ctypes.cast(array, ctypes.c_void_p))
    return found


def _conversation(password: bytes | None, libc: ctypes.CDLL) -> ConvFunc:
    """Answers hidden prompts with ``password``; with None (account and session calls) every prompt fails."""

    def conv(n: int, msgs, resp, _appdata) -> int:  # type: ignore[no-untyped-def]
        if n <= 0 or n > MAX_MESSAGES:
            return PAM_CONV_ERR
        replies = libc.calloc(n, ctypes.sizeof(PamResponse))  # PAM frees the array and each answer
        if not replies:
            return PAM_BUF_ERR
        array = ctypes.cast(replies, ctypes.POINTER(PamResponse))
        for i in range(n):
            style = msgs[i].contents.msg_style
            if style == PAM_PROMPT_ECHO_OFF and password is not None:
                array[i].resp = libc.strdup(password)
            elif style in (PAM_ERROR_MSG, PAM_TEXT_INFO):
                text = (msgs[i].contents.msg or b"").decode(errors="replace")
                log.debug("PAM: %s", text)
            else:  # a visible prompt (a second factor, a user name): one password cannot answer it
                for j in range(i):
                    libc.free(array[j].resp)
                libc.free(replies)
                return PAM_CONV_ERR
        resp[0] = array
        return PAM_SUCCESS

    return ConvFunc(conv)


def quiet_conversation() -> ConvFunc:
    return _conversation(None, libraries()[1])


def check_password(user: str, password: str, rhost: str = "", permit_empty: bool = False) -> bool:
    """pam_authenticate then pam_acct_mgmt for ``user`` with service sshd; blocks; raises PamUnavailable."""
    libpam, libc = libraries()
    started = start(user, _conversation(password.encode(), libc), rhost)
    if started is None:
        return False
    handle, _conversation_kept = started
    status = PAM_ABORT
    try:
        flags = PAM_SILENT | (0 if permit_empty else PAM_DISALLOW_NULL_AUTHTOK)
        status = libpam.pam_authenticate(handle, flags)
        if status == PAM_SUCCESS:
            status = account(libpam, handle, user, flags)
        else:
            log.debug("PAM: authentication for %s: %s", user, strerror(libpam, handle, status))
        return status == PAM_SUCCESS
    finally:
        libpam.pam_end(handle, status)


def strerror(libpam: ctypes.CDLL, handle: ctypes.c_void_p, status: int) -> str:
    text = libpam.pam_strerror(handle, status)
    return text.decode(errors="replace") if text else str(status)
