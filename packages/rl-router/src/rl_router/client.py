"""`RouterClient`: the rollout side's asyncio handle on a `Router` (and itself an engine adapter).

One DEALER socket carries every request; replies are drained from the socket's reader callback (see
`transport.LoopSocket`), which resolves each caller's future by message id, so any number of
`generate` calls may be in flight at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Sequence

import zmq

from rl_router import wire
from rl_router.errors import RouterError
from rl_router.transport import LoopSocket

logger = logging.getLogger(__name__)


class RouterClient:
    """Talks to the router at `address`; use from one event loop, and `close()` when done.

    `auth_token` must match the router's when it has one (it is sent with every request).
    """

    def __init__(self, address: str, *, health_timeout_s: float = 5.0, auth_token: str | None = None):
        self.address = address
        self._auth_token = auth_token
        self._health_timeout_s = health_timeout_s
        self._context: zmq.Context | None = None
        self._socket: LoopSocket | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._closed = False

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Send one SGLang `/generate` payload; returns the engine's response dict."""
        return await self._request("generate", payload)

    async def abort(self, rid: str | Sequence[str] | None = None) -> None:
        """Abort one request id, several, or everything (None) on every engine behind the router; the
        callers of those requests get ABORTED answers with what was generated so far."""
        await self._request("abort", {"rid": rid if rid is None or isinstance(rid, str) else list(rid)})

    async def health(self) -> dict[str, bool]:
        """Engine name -> healthy, as the router sees it."""
        return await self._request("health", None)

    async def metrics(self) -> dict[str, float]:
        return await self._request("metrics", None)

    async def is_healthy(self) -> bool:
        """True when the router answers within the health timeout and at least one engine is healthy."""
        try:
            return any((await asyncio.wait_for(self.health(), self._health_timeout_s)).values())
        except (RouterError, zmq.ZMQError, TimeoutError):
            return False

    def close(self) -> None:
        """Close the socket; requests still waiting fail with `RouterError`."""
        if self._closed:
            return
        self._closed = True
        self._fail_pending(RouterError("router client closed"))
        if self._socket is not None:
            self._socket.close()
        if self._context is not None:
            self._context.term()

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def _connect(self, loop: asyncio.AbstractEventLoop) -> LoopSocket:
        if self._closed:
            raise RouterError("router client is closed")
        if self._socket is None:
            self._context = zmq.Context()
            socket = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(self.address)
            self._socket = LoopSocket(socket, self._on_reply, self._on_error)
        self._socket.attach(loop)
        return self._socket

    async def _request(self, op: str, body: Any) -> Any:
        loop = asyncio.get_running_loop()
        socket = self._connect(loop)
        msg_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending[msg_id] = future
        try:
            socket.send((wire.encode_request(msg_id, op, body, self._auth_token),))
            reply = await future
        finally:
            self._pending.pop(msg_id, None)
        if not reply.get("ok"):
            raise RouterError(str(reply.get("error", "router replied with an error and no message")))
        return reply.get("body")

    def _on_reply(self, frames: list[bytes]) -> None:
        data = frames[-1]
        try:
            reply = wire.decode(data)
            future = self._pending.get(reply["id"])
        except Exception:
            logger.warning("dropped an unreadable reply of %d bytes from the router", len(data))
            return
        if future is not None and not future.done():
            future.set_result(reply)

    def _on_error(self, exc: zmq.ZMQError) -> None:
        self._fail_pending(RouterError(f"router connection failed: {exc}"))

    def _fail_pending(self, error: RouterError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
