"""A blocking wrapper for scripts: ``with Tunnel("gateway", 0, "db", 5432) as t: use("127.0.0.1", t.port)``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from .client import SSHClient, connect
from .forward.local import LocalForward


class Tunnel:
    """One SSH connection with one local forward, run by an event loop in a background thread."""

    def __init__(
        self,
        host: str,
        local_port: int,
        remote_host: str,
        remote_port: int,
        *,
        port: int = 22,
        username: str | None = None,
        client_keys: Sequence[Any] | None = None,
        known_hosts: Sequence[str] | None = None,
        strict_host_key_checking: str = "yes",
        timeout: float = 30.0,
    ) -> None:
        self._connect_args = dict(
            port=port,
            username=username,
            client_keys=client_keys,
            known_hosts=known_hosts,
            strict_host_key_checking=strict_host_key_checking,
        )
        self.host = host
        self.local_port = local_port
        self.remote = (remote_host, remote_port)
        self.timeout = timeout
        self.port: int | None = None
        self.forward: LocalForward | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sshconduit-tunnel", daemon=True)
        self._client: SSHClient | None = None

    def _run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(self.timeout)

    async def _open(self) -> None:
        self._client = await connect(self.host, **self._connect_args)  # type: ignore[arg-type]
        self.forward = await self._client.forward_local(self.local_port, *self.remote).start()
        self.port = self.forward.port

    async def _close(self) -> None:
        if self.forward is not None:
            await self.forward.close()
        if self._client is not None:
            await self._client.close()

    def __enter__(self) -> Tunnel:
        self._thread.start()
        try:
            self._run(self._open())
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._run(self._close())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(self.timeout)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
