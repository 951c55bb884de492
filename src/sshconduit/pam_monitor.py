"""``UsePAM yes`` with privilege separation: the monitor (root) runs PAM for the unprivileged connection process.

The monitor drives the keyboard-interactive conversation (kbdint_start, kbdint_answer: each reply is the next
round of PAM's questions or its verdict), runs the account check a key login needs before the user's helper may
start (check_account), and holds the connection's PAM session (pam_session). ``PamMonitorOps`` is the monitor's
half (privsep_child.Monitor inherits it); ``MonitorExchange`` and the ``monitor_*`` functions the child's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from . import pam
from .aio import failure_floor
from .auth import KbdFinished, KbdPrompts, KbdRound
from .pam_kbdint import KbdExchange
from .pam_session import PamSession

log = logging.getLogger("sshconduit.privsep")

PAM_OPS = ("kbdint_start", "kbdint_answer", "check_account", "pam_session")


def encode_round(round_: KbdRound) -> dict[str, Any]:
    if isinstance(round_, KbdPrompts):
        return {"ok": True, "instruction": round_.instruction, "prompts": [list(p) for p in round_.prompts]}
    return {"ok": True, "done": round_.ok, "instruction": round_.instruction}


def decode_round(reply: dict[str, Any]) -> KbdRound:
    if not reply.get("ok"):
        return KbdFinished(False)
    instruction = str(reply.get("instruction", ""))
    if "done" in reply:
        return KbdFinished(bool(reply["done"]), instruction)
    prompts = tuple((str(text), bool(echo)) for text, echo in list(reply["prompts"])[: pam.MAX_MESSAGES])
    return KbdPrompts(instruction, prompts)


class PamMonitorOps:
    """The monitor's PAM requests; each is answered from a task (PAM blocks), one at a time."""

    sock: Any
    policy: Any
    user: str | None

    def _pam_init(self) -> None:
        self.pam_task: asyncio.Task[None] | None = None
        self.kbd_exchange: KbdExchange | None = None
        self.kbd_user: str | None = None
        self.account_pending: str | None = None  # a key login waiting for pam_acct_mgmt before it counts
        self.pam_session: PamSession | None = None

    def _method_succeeded(self, user: str, method: str) -> None: ...  # Monitor's

    def _authenticated(self, user: str) -> None: ...  # Monitor's

    def pam_request(self, request: dict[str, Any]) -> bool:
        """Start answering a PAM request; False when one is still being answered (the child waits for replies)."""
        if self.pam_task is not None and not self.pam_task.done():
            return False
        self.pam_task = asyncio.get_running_loop().create_task(self._pam_answer(request))
        return True

    async def _pam_answer(self, request: dict[str, Any]) -> None:
        try:
            reply = await self._pam_reply(request)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            log.info("monitor: bad PAM request from the connection process: %s", type(exc).__name__)
            reply = {"ok": False}
        if self.sock.fileno() >= 0:
            with contextlib.suppress(OSError):  # the connection process is gone: its monitor closes too
                self.sock.send(json.dumps(reply).encode())

    async def _pam_reply(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        loop = asyncio.get_running_loop()
        if op == "kbdint_start" and self.user is None:
            if self.kbd_exchange is not None:
                self.kbd_exchange.abort()
            self.kbd_user = str(request["user"])
            self.kbd_exchange = self.policy.kbd_interactive_exchange(self.kbd_user)
            return encode_round(await self.kbd_exchange.start())
        if op == "kbdint_answer" and self.kbd_exchange is not None and self.kbd_user is not None:
            started = time.monotonic()
            responses = tuple(str(r) for r in list(request["responses"]))
            round_ = await self.kbd_exchange.answer(responses)
            if isinstance(round_, KbdFinished):
                self.kbd_exchange = None
                if round_.ok:
                    self._method_succeeded(self.kbd_user, "keyboard-interactive")
                else:  # here too: a subverted child must not guess faster than an honest one
                    await failure_floor(started)
            return encode_round(round_)
        if op == "check_account" and self.account_pending is not None:
            user, self.account_pending = self.account_pending, None
            ok = bool(await loop.run_in_executor(None, self.policy.check_account, user))
            if ok:
                self._authenticated(user)
            return {"ok": ok}
        if op == "pam_session" and self.user is not None and self.pam_session is None:
            self.pam_session = PamSession(self.user, self.policy.client_address or "")
            return {"ok": True, "env": await self.pam_session.open()}
        return {"ok": False}

    def pam_close(self) -> None:
        if self.kbd_exchange is not None:
            self.kbd_exchange.abort()
            self.kbd_exchange = None
        if self.pam_session is not None:
            self.pam_session.close()
        if self.pam_task is not None:
            self.pam_task.cancel()


# --- the connection process's side ---


class MonitorExchange:
    """keyboard-interactive in the connection process: each round comes from the monitor's PAM conversation."""

    def __init__(self, call: Any, user: str) -> None:
        self._call = call  # MonitorClient.call: blocking, so it runs in a thread
        self.user = user

    async def _ask(self, op: str, **fields: Any) -> KbdRound:
        loop = asyncio.get_running_loop()
        reply, _ = await loop.run_in_executor(None, lambda: self._call(op, **fields))
        return decode_round(reply)

    async def start(self) -> KbdRound:
        return await self._ask("kbdint_start", user=self.user)

    async def answer(self, responses: tuple[str, ...]) -> KbdRound:
        return await self._ask("kbdint_answer", responses=list(responses))

    def abort(self) -> None:
        pass  # the monitor ends the conversation at the next start, or with the connection


def monitor_pam_session(call: Any) -> dict[str, str]:
    """The monitor opens the connection's PAM session (blocking; run in a thread); PAM's environment."""
    reply, _ = call("pam_session")
    if not reply.get("ok") or not isinstance(reply.get("env"), dict):
        raise OSError("the monitor refused a PAM session")
    return {str(k): str(v) for k, v in reply["env"].items()}
