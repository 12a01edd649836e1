"""`Router`: a ZeroMQ ROUTER socket that spreads `/generate` requests over engines via a middleware chain.

Each wakeup of the socket drains every message that is ready (see `transport.LoopSocket`) and serves
each in its own asyncio task; the reply goes back on the caller's ZMQ identity frame and carries the
request's message id, so one client socket can have many requests in flight. Bad messages are
counted and dropped (or answered with an error when their id can be read); they never stop the router,
and their warnings are rate-limited (`log_limit`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Mapping

import zmq

from rl_router import wire
from rl_router.engine_pool import EnginePool
from rl_router.faults import is_engine_fault
from rl_router.loading import load_middleware
from rl_router.log_limit import RateLimitedWarnings
from rl_router.policies import RoutingPolicy, make_policy
from rl_router.protocols import CallNext, EngineAdapter, Middleware, RouterRequest
from rl_router.security import check_bind_allowed, token_matches
from rl_router.transport import LoopSocket

if TYPE_CHECKING:
    from rl_router.thread import RouterThread

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "tcp://127.0.0.1:0"


class _Flight:
    """One caller's request while it is being served; `aborted` stops it from being retried."""

    __slots__ = ("aborted",)

    def __init__(self) -> None:
        self.aborted = False


def aborted_response(rid: str, message: str) -> dict[str, Any]:
    """An SGLang-shaped ABORTED answer, for a request aborted while no engine was holding it."""
    return {
        "text": "",
        "output_ids": [],
        "meta_info": {"id": rid, "finish_reason": {"type": "abort", "message": message}, "completion_tokens": 0},
    }


class _Link:
    """`call_next` for one middleware: hands back the next step's coroutine (no extra coroutine frame)."""

    __slots__ = ("_middleware", "_call_next")

    def __init__(self, middleware: Middleware, call_next: CallNext):
        self._middleware = middleware
        self._call_next = call_next

    def __call__(self, request: RouterRequest) -> Awaitable[dict[str, Any]]:
        return self._middleware(request, self._call_next)


class Router:
    """Forwards SGLang `/generate` payloads from `RouterClient`s to engines.

    `middleware` items run outermost first; strings are loaded with `load_middleware`.
    Messages over `max_message_bytes` are received whole, counted and answered with an error (no ZMQ
    MAXMSGSIZE: it would drop the sender's connection and strand its other requests in flight).
    The routing step sets `RouterRequest.engine` before the chain; the engine is called at its end.

    Faults: an engine failing at the connection level (`retry_on`, default `is_engine_fault`) or not
    answering within `engine_timeout_s` leaves rotation, and the request is retried on another engine
    up to `max_retries` times (inside the chain, so middleware sees one request and one answer).
    Every `health_interval_s` each engine's `is_healthy()` (bounded by `health_timeout_s`) takes it
    out or puts it back. Aborted requests are never retried.

    Security: with `auth_token` every request must carry it (`RouterClient(auth_token=...)`); binding
    an address other than loopback without a token is refused. Warnings about bad or unauthorized
    messages are limited to `warnings_per_minute` (the rest are counted in `router/warnings_suppressed`).

    `stop()` closes the engines still registered that have an `aclose()` or `close()` (the HTTP clients'
    sessions); an engine taken out with `remove_engine` is the caller's to close.
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
        health_interval_s: float | None = 5.0,
        engine_timeout_s: float | None = None,
        max_retries: int = 2,
        retry_on: Callable[[BaseException], bool] = is_engine_fault,
        auth_token: str | None = None,
        warnings_per_minute: int = 10,
    ):
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        if health_interval_s is not None and health_interval_s <= 0:
            raise ValueError(f"health_interval_s must be positive or None, got {health_interval_s}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be at least 0, got {max_retries}")
        check_bind_allowed(address, auth_token)
        self._pool = EnginePool(
            make_policy(policy), engine_timeout_s=engine_timeout_s, health_timeout_s=health_timeout_s
        )
        for name, adapter in engines.items():
            self.add_engine(name, adapter)
        self._middleware: list[Middleware] = [
            load_middleware(item) if isinstance(item, str) else item for item in middleware
        ]
        self.address = address
        self._max_message_bytes = max_message_bytes
        self._health_interval_s = health_interval_s
        self._max_retries = max_retries
        self._retry_on = retry_on
        self._auth_token = auth_token
        self._malformed: Counter[str] = Counter()
        self._peer_warnings = RateLimitedWarnings(logger, burst=warnings_per_minute, interval_s=60.0)
        self._unauthorized = 0
        self._retries = 0
        self._aborted_not_retried = 0
        self._flights: dict[str, list[_Flight]] = {}
        self._context: zmq.Context | None = None
        self._socket: LoopSocket | None = None
        self._health_loop: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- engines -------------------------------------------------------------------------------

    @property
    def engines(self) -> list[str]:
        return list(self._pool.slots)

    @property
    def engines_out(self) -> list[str]:
        """Engines currently out of rotation (failed, hung or failing their health check)."""
        return self._pool.out_of_rotation

    def add_engine(self, name: str, adapter: EngineAdapter) -> None:
        """Start routing to `adapter` (call on the router's event loop)."""
        self._pool.add(name, adapter)

    def remove_engine(self, name: str) -> EngineAdapter:
        """Stop routing new requests to `name`; requests already sent to it finish normally."""
        return self._pool.remove(name)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket (then `address` is the resolved endpoint) and start serving."""
        if self._socket is not None:
            raise RuntimeError("router is already started")
        self._context = zmq.Context()
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.bind(self.address)
        except zmq.ZMQError as exc:
            socket.close()
            self._context.term()
            self._context = None
            raise OSError(f"router cannot bind {self.address!r}: {exc}") from exc
        endpoint = socket.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(endpoint, bytes), "LAST_ENDPOINT is a bytes option"
        self.address = endpoint.decode()
        self._socket = LoopSocket(socket, self._on_message)
        self._socket.attach(asyncio.get_running_loop())
        if self._health_interval_s is not None:
            self._health_loop = asyncio.create_task(self._check_health_forever(), name="rl-router-health")
        logger.info("router serving %d engine(s) at %s", len(self._pool.slots), self.address)

    async def stop(self) -> None:
        """Stop receiving, cancel requests in flight and close the socket."""
        if self._socket is None:
            return
        self._socket.close()
        tasks = [t for t in (self._health_loop, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()  # tasks cancelled before their first step never reach their own cleanup
        await self._pool.close()
        self._peer_warnings.flush()
        if self._context is not None:
            self._context.term()
        self._socket = self._context = self._health_loop = None

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def run_in_thread(self, *, busy_poll_s: float = 0.0) -> RouterThread:
        """Serve from a background thread with its own event loop (for synchronous drivers)."""
        from rl_router.thread import RouterThread

        thread = RouterThread(self, busy_poll_s=busy_poll_s)
        thread.start()
        return thread

    # --- metrics -------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Router counters plus the `snapshot()` of every middleware that has one."""
        out: dict[str, float] = {
            "router/engines": float(len(self._pool.slots)),
            "router/malformed_messages": float(sum(self._malformed.values())),
            "router/unauthorized": float(self._unauthorized),
            "router/retries": float(self._retries),
            "router/aborted_not_retried": float(self._aborted_not_retried),
            "router/warnings_suppressed": float(self._peer_warnings.suppressed),
        }
        for reason, count in sorted(self._malformed.items()):
            out[f"router/malformed/{reason}"] = float(count)
        out.update(self._pool.metrics())
        for mw in self._middleware:
            snapshot = getattr(mw, "snapshot", None)
            if callable(snapshot):
                out.update(snapshot())
        return out

    # --- serving -------------------------------------------------------------------------------

    def _on_message(self, frames: list[bytes]) -> None:
        # A DEALER sends [identity, message]; a REQ-style peer adds an empty delimiter.
        if len(frames) == 2 or (len(frames) == 3 and frames[1] == b""):
            self._tasks.add(asyncio.create_task(self._serve(frames[:-1], frames[-1])))
        else:
            self._malformed["bad_frames"] += 1
            self._peer_warnings.warning("dropped a message of %d frames (expected identity + message)", len(frames))

    async def _serve(self, envelope: list[bytes], data: bytes) -> None:
        try:
            await self._serve_one(envelope, data)
        finally:  # cheaper than a done callback, which costs a loop turn per request
            self._tasks.discard(asyncio.current_task())

    async def _serve_one(self, envelope: list[bytes], data: bytes) -> None:
        try:
            request = wire.parse_request(data, self._max_message_bytes)
        except wire.MalformedMessage as exc:
            self._malformed[exc.reason] += 1
            self._peer_warnings.warning("malformed message (%s): %s", exc.reason, exc)
            if exc.msg_id is not None:
                self._send(envelope, wire.encode_error(exc.msg_id, f"malformed request: {exc}"))
            return
        if not token_matches(self._auth_token, request.token):
            self._unauthorized += 1
            self._peer_warnings.warning("refused a %s request without the right auth token", request.op)
            self._send(envelope, wire.encode_error(request.id, "unauthorized: missing or wrong auth token"))
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
        self._send(envelope, reply)

    def _send(self, envelope: list[bytes], reply: bytes) -> None:
        if self._socket is not None:  # None once stopped: the caller is gone with the socket
            envelope.append(reply)
            self._socket.send(envelope)

    async def _dispatch(self, request: wire.WireRequest) -> Any:
        if request.op == "generate":
            return await self._generate(request.body)
        if request.op == "abort":
            rid = request.body.get("rid") if isinstance(request.body, dict) else None
            return await self._abort(rid)
        if request.op == "health":
            return await self._health()
        return self.metrics()

    async def _check_health_forever(self) -> None:
        assert self._health_interval_s is not None
        while True:
            await self._pool.check_health()
            await asyncio.sleep(self._health_interval_s)

    async def _generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        rid = payload.get("rid")
        if rid is None:
            rid = uuid.uuid4().hex
            payload = {**payload, "rid": rid}
        elif not isinstance(rid, str):
            raise ValueError(f"field 'rid' must be a string, got {type(rid).__name__}")
        request = RouterRequest(rid=rid, payload=payload)
        pool = self._pool
        held = pool.route(payload)
        held.outstanding += 1
        request.engine = held.name
        flight = _Flight()
        self._flights.setdefault(rid, []).append(flight)

        async def call_engine(req: RouterRequest) -> dict[str, Any]:
            nonlocal held
            failed_on: list[str] = []
            while True:
                if flight.aborted:
                    return aborted_response(req.rid, "aborted before an engine answered")
                if req.engine is None:
                    slot = pool.route(req.payload, exclude=failed_on)
                    req.engine = slot.name
                elif req.engine in pool.slots:
                    slot = pool.slots[req.engine]
                else:
                    raise LookupError(f"unknown engine {req.engine!r}; engines: {sorted(pool.slots)}")
                if slot is not held:
                    held.outstanding -= 1
                    slot.outstanding += 1
                    held = slot
                try:
                    response = await pool.attempt(slot, req.payload)
                except Exception as exc:
                    if not self._retry_on(exc):
                        raise
                    pool.record_fault(slot, exc)
                    if flight.aborted:
                        self._aborted_not_retried += 1
                        return aborted_response(req.rid, f"aborted; engine {slot.name!r} then failed: {exc}")
                    failed_on.append(slot.name)
                    if len(failed_on) > self._max_retries:
                        raise RuntimeError(
                            f"engine {slot.name!r} failed ({type(exc).__name__}: {exc}); "
                            f"gave up after {len(failed_on)} attempt(s) on {failed_on}"
                        ) from exc
                    self._retries += 1
                    req.metadata["retries"] = len(failed_on)
                    req.engine = None
                    continue
                pool.observe(req.payload, response, slot.name)
                return response

        chain: CallNext = call_engine
        for mw in reversed(self._middleware):
            chain = _Link(mw, chain)
        try:
            return await chain(request)
        finally:
            held.outstanding -= 1
            flights = self._flights[rid]
            flights.remove(flight)
            if not flights:
                del self._flights[rid]

    async def _abort(self, rid: str | list[str] | None) -> dict[str, str]:
        """Mark the matching requests aborted (so a fault does not retry them), then tell every engine."""
        rids = None if rid is None else [rid] if isinstance(rid, str) else list(dict.fromkeys(rid))
        if rids is None:
            matching = [f for fs in self._flights.values() for f in fs]
        else:
            matching = [f for r in rids for f in self._flights.get(r, ())]
        for flight in matching:
            flight.aborted = True
        return await self._pool.abort(rids)

    async def _health(self) -> dict[str, bool]:
        return await self._pool.check_health()
