"""`Router`: a ZeroMQ ROUTER socket that spreads `/generate` requests over engines via a middleware chain.

Every incoming message is served in its own asyncio task; the reply goes back on the caller's ZMQ
identity frame and carries the request's message id, so one client socket can have many requests
in flight. Bad messages are counted and dropped (or answered with an error when their id can be
read); they never stop the router.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import zmq
import zmq.asyncio

from rl_router import wire
from rl_router.loading import load_middleware
from rl_router.policies import RoutingPolicy, make_policy
from rl_router.protocols import CallNext, EngineAdapter, Middleware, RouterRequest

if TYPE_CHECKING:
    from rl_router.thread import RouterThread

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "tcp://127.0.0.1:0"


class _EngineSlot:
    """An engine and its in-flight count; requests hold the slot, so removal and re-adding stay exact."""

    def __init__(self, name: str, adapter: EngineAdapter):
        self.name = name
        self.adapter = adapter
        self.outstanding = 0


def _link(middleware: Middleware, call_next: CallNext) -> CallNext:
    async def step(request: RouterRequest) -> dict[str, Any]:
        return await middleware(request, call_next)

    return step


class Router:
    """Forwards SGLang `/generate` payloads from `RouterClient`s to engines.

    `middleware` items run outermost first; strings are loaded with `load_middleware`.
    Messages over `max_message_bytes` are received whole, counted and answered with an error (no ZMQ
    MAXMSGSIZE: it would drop the sender's connection and strand its other requests in flight).
    The routing step sets `RouterRequest.engine` before the chain; the engine is called at its end.
    """

    def __init__(
        self,
        engines: Mapping[str, EngineAdapter],
        *,
        policy: str | RoutingPolicy = "round_robin",
        middleware: Iterable[Middleware | str] = (),
        address: str = DEFAULT_ADDRESS,
        max_message_bytes: int = 64 * 1024 * 1024,
        health_timeout_s: float = 5.0,
    ):
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        self._slots: dict[str, _EngineSlot] = {}
        for name, adapter in engines.items():
            self.add_engine(name, adapter)
        self._policy = make_policy(policy)
        self._middleware: list[Middleware] = [
            load_middleware(item) if isinstance(item, str) else item for item in middleware
        ]
        self.address = address
        self._max_message_bytes = max_message_bytes
        self._health_timeout_s = health_timeout_s
        self._malformed: Counter[str] = Counter()
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- engines -------------------------------------------------------------------------------

    @property
    def engines(self) -> list[str]:
        return list(self._slots)

    def add_engine(self, name: str, adapter: EngineAdapter) -> None:
        """Start routing to `adapter` (call on the router's event loop)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"engine name must be a non-empty string, got {name!r}")
        if name in self._slots:
            raise ValueError(f"engine {name!r} is already registered")
        if not isinstance(adapter, EngineAdapter):
            raise TypeError(f"engine {name!r} lacks generate/abort/is_healthy: {adapter!r}")
        self._slots[name] = _EngineSlot(name, adapter)

    def remove_engine(self, name: str) -> EngineAdapter:
        """Stop routing new requests to `name`; requests already sent to it finish normally."""
        try:
            return self._slots.pop(name).adapter
        except KeyError:
            raise KeyError(f"no engine named {name!r}; engines: {sorted(self._slots)}") from None

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket (then `address` is the resolved endpoint) and start serving."""
        if self._socket is not None:
            raise RuntimeError("router is already started")
        self._context = zmq.asyncio.Context()
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.bind(self.address)
        except zmq.ZMQError as exc:
            socket.close()
            self._context.term()
            self._context = None
            raise OSError(f"router cannot bind {self.address!r}: {exc}") from exc
        self._socket = socket
        self.address = socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._receiver = asyncio.create_task(self._receive_loop(), name="rl-router-receive")
        logger.info("router serving %d engine(s) at %s", len(self._slots), self.address)

    async def stop(self) -> None:
        """Stop receiving, cancel requests in flight and close the socket."""
        if self._socket is None:
            return
        tasks = [t for t in (self._receiver, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._socket.close(linger=0)
        self._context.term()
        self._socket = self._context = self._receiver = None

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def run_in_thread(self) -> RouterThread:
        """Serve from a background thread with its own event loop (for synchronous drivers)."""
        from rl_router.thread import RouterThread

        thread = RouterThread(self)
        thread.start()
        return thread

    # --- metrics -------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Router counters plus the `snapshot()` of every middleware that has one."""
        out: dict[str, float] = {
            "router/engines": float(len(self._slots)),
            "router/malformed_messages": float(sum(self._malformed.values())),
        }
        for reason, count in sorted(self._malformed.items()):
            out[f"router/malformed/{reason}"] = float(count)
        for name, slot in self._slots.items():
            out[f"router/engine/{name}/outstanding"] = float(slot.outstanding)
        for mw in self._middleware:
            snapshot = getattr(mw, "snapshot", None)
            if callable(snapshot):
                out.update(snapshot())
        return out

    # --- serving -------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            # A DEALER sends [identity, message]; a REQ-style peer adds an empty delimiter.
            if len(frames) == 2 or (len(frames) == 3 and frames[1] == b""):
                task = asyncio.create_task(self._serve(frames[:-1], frames[-1]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                self._malformed["bad_frames"] += 1
                logger.warning("dropped a message of %d frames (expected identity + message)", len(frames))

    async def _serve(self, envelope: list[bytes], data: bytes) -> None:
        try:
            request = wire.parse_request(data, self._max_message_bytes)
        except wire.MalformedMessage as exc:
            self._malformed[exc.reason] += 1
            logger.warning("malformed message (%s): %s", exc.reason, exc)
            if exc.msg_id is not None:
                await self._send(envelope, wire.encode_error(exc.msg_id, f"malformed request: {exc}"))
            return
        try:
            body = await self._dispatch(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reply = wire.encode_error(request.id, f"{type(exc).__name__}: {exc}")
        else:
            try:
                reply = wire.encode_ok(request.id, body)
            except Exception as exc:
                reply = wire.encode_error(request.id, f"reply is not msgpack-serialisable: {exc}")
        await self._send(envelope, reply)

    async def _send(self, envelope: list[bytes], reply: bytes) -> None:
        assert self._socket is not None
        await self._socket.send_multipart([*envelope, reply])

    async def _dispatch(self, request: wire.WireRequest) -> Any:
        if request.op == "generate":
            return await self._generate(request.body)
        if request.op == "abort":
            rid = request.body.get("rid") if isinstance(request.body, dict) else None
            return await self._abort(rid)
        if request.op == "health":
            return await self._health()
        return self.metrics()

    def _route(self) -> _EngineSlot:
        if not self._slots:
            raise LookupError("no engines registered with the router")
        outstanding = {name: slot.outstanding for name, slot in self._slots.items()}
        name = self._policy.choose(outstanding)
        if name not in self._slots:
            raise LookupError(f"routing policy chose unknown engine {name!r}")
        return self._slots[name]

    async def _generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        rid = payload.get("rid")
        if rid is None:
            rid = uuid.uuid4().hex
            payload = {**payload, "rid": rid}
        elif not isinstance(rid, str):
            raise ValueError(f"field 'rid' must be a string, got {type(rid).__name__}")
        request = RouterRequest(rid=rid, payload=payload)
        held = self._route()
        held.outstanding += 1
        request.engine = held.name

        async def call_engine(req: RouterRequest) -> dict[str, Any]:
            nonlocal held
            if req.engine is None:
                slot = self._route()
                req.engine = slot.name
            elif req.engine in self._slots:
                slot = self._slots[req.engine]
            else:
                raise LookupError(f"unknown engine {req.engine!r}; engines: {sorted(self._slots)}")
            if slot is not held:
                held.outstanding -= 1
                slot.outstanding += 1
                held = slot
            response = await slot.adapter.generate(req.payload)
            if not isinstance(response, dict):
                raise TypeError(f"engine {req.engine!r} returned {type(response).__name__}, expected a dict")
            return response

        chain: CallNext = call_engine
        for mw in reversed(self._middleware):
            chain = _link(mw, chain)
        try:
            return await chain(request)
        finally:
            held.outstanding -= 1

    async def _abort(self, rid: str | None) -> dict[str, str]:
        """Forward to every engine; the reply says which ones failed (all are tried)."""
        names = list(self._slots)
        results = await asyncio.gather(
            *(self._slots[name].adapter.abort(rid) for name in names), return_exceptions=True
        )
        return {
            name: "ok" if not isinstance(result, BaseException) else f"{type(result).__name__}: {result}"
            for name, result in zip(names, results)
        }

    async def _health(self) -> dict[str, bool]:
        names = list(self._slots)

        async def check(adapter: EngineAdapter) -> bool:
            return bool(await asyncio.wait_for(adapter.is_healthy(), self._health_timeout_s))

        results = await asyncio.gather(*(check(self._slots[n].adapter) for n in names), return_exceptions=True)
        return {name: result is True for name, result in zip(names, results)}
