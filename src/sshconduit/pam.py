"""Password checks through PAM (libpam.so.0 via ctypes): pam_start("sshd") / authenticate / acct_mgmt / end.

Every call blocks (PAM modules sleep on failure, may ask a network service): run it in a thread, never on the
event loop. The conversation answers the modules' hidden prompts with the one password the client sent; the
password is never logged and is handed to PAM in memory PAM frees (it overwrites its own copy).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import cache

log = logging.getLogger("sshconduit.pam")

SERVICE = "sshd"  # /etc/pam.d/sshd, as OpenSSH uses

PAM_SUCCESS = 0
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
MAX_MESSAGES = 32  # PAM_MAX_NUM_MSG: more in one conversation call is a module bug


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
def _libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
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
        _libraries()
    except PamUnavailable:
        return False
    return True


def _conversation(password: bytes, libc: ctypes.CDLL) -> ConvFunc:
    def conv(n: int, msgs, resp, _appdata) -> int:  # type: ignore[no-untyped-def]
        if n <= 0 or n > MAX_MESSAGES:
            return PAM_CONV_ERR
        replies = libc.calloc(n, ctypes.sizeof(PamResponse))  # PAM frees the array and each answer
        if not replies:
            return PAM_BUF_ERR
        array = ctypes.cast(replies, ctypes.POINTER(PamResponse))
        for i in range(n):
            style = msgs[i].contents.msg_style
            if style == PAM_PROMPT_ECHO_OFF:
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


def check_password(user: str, password: str, rhost: str = "", permit_empty: bool = False) -> bool:
    """pam_authenticate then pam_acct_mgmt for ``user`` with service sshd; blocks; raises PamUnavailable."""
    libpam, libc = _libraries()
    conv = _conversation(password.encode(), libc)
    conversation = PamConv(conv, None)
    handle = ctypes.c_void_p()
    status = libpam.pam_start(SERVICE.encode(), user.encode(), ctypes.byref(conversation), ctypes.byref(handle))
    if status != PAM_SUCCESS:
        log.error("PAM: initialisation failed: %s", status)
        return False
    try:
        libpam.pam_set_item(handle, PAM_FAIL_DELAY, ctypes.cast(_NO_DELAY, ctypes.c_void_p))
        libpam.pam_set_item(handle, PAM_TTY, ctypes.c_char_p(b"ssh"))  # as sshd: some modules want a tty name
        if rhost:
            libpam.pam_set_item(handle, PAM_RHOST, ctypes.c_char_p(rhost.encode()))
        flags = PAM_SILENT | (0 if permit_empty else PAM_DISALLOW_NULL_AUTHTOK)
        status = libpam.pam_authenticate(handle, flags)
        if status == PAM_SUCCESS:
            status = libpam.pam_acct_mgmt(handle, flags)
            if status == PAM_NEW_AUTHTOK_REQD:
                log.info("PAM: password for %s has expired; conduitd cannot change it", user)
            elif status != PAM_SUCCESS:
                log.info("PAM: account check for %s: %s", user, _strerror(libpam, handle, status))
        else:
            log.debug("PAM: authentication for %s: %s", user, _strerror(libpam, handle, status))
        return status == PAM_SUCCESS
    finally:
        libpam.pam_end(handle, status)


def _strerror(libpam: ctypes.CDLL, handle: ctypes.c_void_p, status: int) -> str:
    text = libpam.pam_strerror(handle, status)
    return text.decode(errors="replace") if text else str(status)
