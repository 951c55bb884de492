"""keyboard-interactive through PAM (sshd's ``UsePAM yes``): PAM's own questions go to the client.

pam_authenticate and pam_acct_mgmt run in a thread of their own. Each time a module asks something, the
conversation callback hands the questions (RFC 4256 prompts with their echo flags; PAM_TEXT_INFO and
PAM_ERROR_MSG text as the instruction) to the event loop and waits, bounded, for the client's answers, so one
PAM transaction spans several SSH round trips. Answers go to PAM in memory PAM frees; nothing here logs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import queue
import threading
from typing import Protocol

from . import limits, pam
from .auth import KbdFinished, KbdPrompts, KbdRound

log = logging.getLogger("sshconduit.pam")

_ABORT = None  # queued instead of answers: the conversation fails and the thread ends


class KbdExchange(Protocol):
    """One keyboard-interactive attempt, as the server drives it."""

    async def start(self) -> KbdRound: ...

    async def answer(self, responses: tuple[str, ...]) -> KbdRound: ...

    def abort(self) -> None: ...


class RefusedExchange:
    """A user who may not log in this way: the same one question PAM would ask first, then failure (no hint)."""

    async def start(self) -> KbdRound:
        return KbdPrompts("", (("Password: ", False),))

    async def answer(self, responses: tuple[str, ...]) -> KbdRound:
        return KbdFinished(False)

    def abort(self) -> None:
        pass


class PamExchange:
    """pam_authenticate + pam_acct_mgmt for ``user`` in a thread whose conversation waits for the client."""

    def __init__(self, user: str, rhost: str, permit_empty: bool) -> None:
        self.user = user
        self.rhost = rhost
        self.permit_empty = permit_empty
        self._loop = asyncio.get_running_loop()
        self._answers: queue.Queue[tuple[str, ...] | None] = queue.Queue(maxsize=1)
        self._next: asyncio.Future[KbdRound] | None = None
        self._asked = 0  # prompts outstanding in the round the client is answering
        self._thread: threading.Thread | None = None
        self._aborted = False

    async def start(self) -> KbdRound:
        self._next = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name=f"pam-kbdint-{self.user}", daemon=True)
        self._thread.start()
        return await self._next

    async def answer(self, responses: tuple[str, ...]) -> KbdRound:
        if self._aborted or self._thread is None:
            return KbdFinished(False)
        if len(responses) != self._asked:  # RFC 4256 3.4: one response per prompt
            self.abort()
            return KbdFinished(False)
        self._next = self._loop.create_future()
        self._answers.put_nowait(responses)
        return await self._next

    def abort(self) -> None:
        """The client gave up or the connection went: PAM's conversation fails at once and the thread ends."""
        if not self._aborted:
            self._aborted = True
            with contextlib.suppress(queue.Full):  # answers not yet taken: the thread sees _aborted after them
                self._answers.put_nowait(_ABORT)

    # --- in the PAM thread ---

    def _post(self, round_: KbdRound) -> None:
        def deliver() -> None:
            if self._next is not None and not self._next.done():
                self._next.set_result(round_)

        try:
            self._loop.call_soon_threadsafe(deliver)
        except RuntimeError:
            self._aborted = True  # the loop is closed: nobody is waiting

    def _run(self) -> None:
        info: list[str] = []
        ok = False
        try:
            ok = self._transaction(info)
        except Exception as exc:  # a broken libpam refuses; the message names no secret
            log.error("PAM: keyboard-interactive for %s failed: %s", self.user, type(exc).__name__)
        self._post(KbdFinished(ok, "\n".join(info) if not self._aborted else ""))

    def _transaction(self, info: list[str]) -> bool:
        libpam, libc = pam.libraries()
        rounds = [0]

        def conv(n: int, msgs, resp, _appdata) -> int:  # type: ignore[no-untyped-def]
            return self._converse(libc, n, msgs, resp, info, rounds)

        started = pam.start(self.user, pam.ConvFunc(conv), self.rhost)
        if started is None:
            return False
        handle, _kept = started
        status = pam.PAM_ABORT
        try:
            flags = 0 if self.permit_empty else pam.PAM_DISALLOW_NULL_AUTHTOK  # not silent: sshd shows PAM's text
            status = libpam.pam_authenticate(handle, flags)
            if status == pam.PAM_SUCCESS:
                status = pam.account(libpam, handle, self.user, flags)
            else:
                log.debug("PAM: authentication for %s: %s", self.user, pam.strerror(libpam, handle, status))
            return status == pam.PAM_SUCCESS and not self._aborted
        finally:
            libpam.pam_end(handle, status)

    def _converse(self, libc: ctypes.CDLL, n: int, msgs, resp, info: list[str], rounds: list[int]) -> int:  # type: ignore[no-untyped-def]
        if n <= 0 or n > pam.MAX_MESSAGES or self._aborted:
            return pam.PAM_CONV_ERR
        styles: list[int] = []
        prompts: list[tuple[str, bool]] = []
        for i in range(n):
            style = msgs[i].contents.msg_style
            text = (msgs[i].contents.msg or b"").decode(errors="replace")
            if style in (pam.PAM_PROMPT_ECHO_OFF, pam.PAM_PROMPT_ECHO_ON):
                prompts.append((text, style == pam.PAM_PROMPT_ECHO_ON))
            elif style in (pam.PAM_ERROR_MSG, pam.PAM_TEXT_INFO):
                if len(info) < pam.MAX_MESSAGES:
                    info.append(text)
            else:
                return pam.PAM_CONV_ERR
            styles.append(style)
        answers: tuple[str, ...] = ()
        if prompts:
            rounds[0] += 1
            if rounds[0] > limits.MAX_PAM_ROUNDS:
                log.info("PAM: more than %d keyboard-interactive rounds for %s", limits.MAX_PAM_ROUNDS, self.user)
                return pam.PAM_CONV_ERR
            self._asked = len(prompts)
            self._post(KbdPrompts("\n".join(info), tuple(prompts)))
            info.clear()
            try:
                got = self._answers.get(timeout=limits.PAM_ANSWER_TIMEOUT)
            except queue.Empty:
                got = _ABORT
            if got is _ABORT or self._aborted:
                self._aborted = True
                return pam.PAM_CONV_ERR
            answers = got
        replies = libc.calloc(n, ctypes.sizeof(pam.PamResponse))  # PAM frees the array and each answer
        if not replies:
            return pam.PAM_BUF_ERR
        array = ctypes.cast(replies, ctypes.POINTER(pam.PamResponse))
        next_answer = iter(answers)
        for i, style in enumerate(styles):
            if style in (pam.PAM_PROMPT_ECHO_OFF, pam.PAM_PROMPT_ECHO_ON):
                array[i].resp = libc.strdup(next(next_answer).encode())
        resp[0] = array
        return pam.PAM_SUCCESS
