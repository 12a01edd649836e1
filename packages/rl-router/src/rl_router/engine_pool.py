"""`EnginePool`: the engines, which of them are in rotation, and one bounded attempt on one of them.

An engine leaves rotation on a fault (see `faults.is_engine_fault`), a request outliving the engine
timeout or a failed health check; its other in-flight attempts are then cancelled so their requests
can be retried elsewhere at once. A passing health check puts it back.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import Counter
from typing import Any, Collection

from rl_router.faults import EngineEjected, EngineTimeout
from rl_router.policies import RoutingPolicy
from rl_router.protocols import EngineAdapter

logger = logging.getLogger(__name__)


class _Attempt:
    """One request's call into an engine: the task awaiting it, and why the router cancelled it (if it did)."""

    __slots__ = ("task", "cancelled_for")

    def __init__(self, task: asyncio.Task[Any]):
        self.task = task
        self.cancelled_for: str | None = None  # "timeout" or "ejected"

    def cancel(self, reason: str) -> None:
        if self.cancelled_for is None:
            self.cancelled_for = reason
            self.task.cancel()


class EngineSlot:
    """An engine and its in-flight count; requests hold the slot, so removal and re-adding stay exact."""

    def __init__(self, name: str, adapter: EngineAdapter):
        self.name = name
        self.adapter = adapter
        self.outstanding = 0
        self.in_rotation = True
        self.attempts: set[_Attempt] = set()


class EnginePool:
    def __init__(self, policy: RoutingPolicy, *, engine_timeout_s: float | None, health_timeout_s: float):
        if engine_timeout_s is not None and engine_timeout_s <= 0:
            raise ValueError(f"engine_timeout_s must be positive or None, got {engine_timeout_s}")
        if health_timeout_s <= 0:
            raise ValueError(f"health_timeout_s must be positive, got {health_timeout_s}")
        self.slots: dict[str, EngineSlot] = {}
        self.policy = policy
        self._choose_for = getattr(policy, "choose_for", None)
        self._observe = getattr(policy, "observe", None)
        self.engine_timeout_s = engine_timeout_s
        self.health_timeout_s = health_timeout_s
        self.faults: Counter[str] = Counter()
        self.ejections = 0
        self.readmissions = 0
        self._background: set[asyncio.Task[Any]] = set()

    # --- membership ----------------------------------------------------------------------------

    def add(self, name: str, adapter: EngineAdapter) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"engine name must be a non-empty string, got {name!r}")
        if name in self.slots:
            raise ValueError(f"engine {name!r} is already registered")
        if not isinstance(adapter, EngineAdapter):
            raise TypeError(f"engine {name!r} lacks generate/abort/is_healthy: {adapter!r}")
        self.slots[name] = EngineSlot(name, adapter)

    def remove(self, name: str) -> EngineAdapter:
        try:
            return self.slots.pop(name).adapter
        except KeyError:
            raise KeyError(f"no engine named {name!r}; engines: {sorted(self.slots)}") from None

    @property
    def out_of_rotation(self) -> list[str]:
        return [name for name, slot in self.slots.items() if not slot.in_rotation]

    # --- routing -------------------------------------------------------------------------------

    def route(self, payload: dict[str, Any] | None = None, exclude: Collection[str] = ()) -> EngineSlot:
        """Pick an engine in rotation, avoiding `exclude` (engines this request already failed on) if possible."""
        if not self.slots:
            raise LookupError("no engines registered with the router")
        live = {name: slot.outstanding for name, slot in self.slots.items() if slot.in_rotation}
        candidates = ({name: n for name, n in live.items() if name not in exclude} or live) if exclude else live
        if not candidates:
            raise LookupError(f"no healthy engines: all {len(self.slots)} are out of rotation {sorted(self.slots)}")
        if self._choose_for is not None and payload is not None:
            name = self._choose_for(payload, candidates)
        else:
            name = self.policy.choose(candidates)
        if name not in candidates:
            raise LookupError(f"routing policy chose unknown engine {name!r}")
        return self.slots[name]

    def observe(self, payload: dict[str, Any], response: dict[str, Any], engine: str) -> None:
        """Tell a policy that learns from answers (cache-aware routing) where a request was served."""
        if self._observe is not None:
            self._observe(payload, response, engine)

    # --- one attempt ---------------------------------------------------------------------------

    async def attempt(self, slot: EngineSlot, payload: dict[str, Any]) -> dict[str, Any]:
        """`slot.adapter.generate(payload)`, bounded by the engine timeout and cancelled if the slot is ejected.

        The call runs in the caller's task (no task of its own, and a bare timer rather than
        `asyncio.timeout`): the timeout or an ejection cancels that task, and the cancellation is
        turned back into `EngineTimeout` / `EngineEjected` here, unless someone else cancelled it too.
        """
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("EnginePool.attempt must run inside an asyncio task")
        attempt = _Attempt(task)
        slot.attempts.add(attempt)
        timer = None
        if self.engine_timeout_s is not None:
            timer = asyncio.get_running_loop().call_later(self.engine_timeout_s, attempt.cancel, "timeout")
        try:
            response = await slot.adapter.generate(payload)
        except asyncio.CancelledError:
            if attempt.cancelled_for is not None and task.uncancel() == 0:
                self._abort_in_background(slot, payload.get("rid"))
                if attempt.cancelled_for == "timeout":
                    raise EngineTimeout(
                        f"engine {slot.name!r} did not answer within {self.engine_timeout_s}s"
                    ) from None
                raise EngineEjected(f"engine {slot.name!r} was taken out of rotation mid-request") from None
            raise
        finally:
            slot.attempts.discard(attempt)
            if timer is not None:
                timer.cancel()
        if attempt.cancelled_for is not None:  # the adapter swallowed the cancellation and answered anyway
            task.uncancel()
        if not isinstance(response, dict):
            raise TypeError(f"engine {slot.name!r} returned {type(response).__name__}, expected a dict")
        return response

    # --- rotation ------------------------------------------------------------------------------

    def eject(self, slot: EngineSlot, reason: str) -> None:
        """Take `slot` out of rotation and cancel its in-flight attempts (their requests get retried)."""
        if not slot.in_rotation:
            return
        slot.in_rotation = False
        self.ejections += 1
        logger.warning("engine %r out of rotation (%s); retrying its %d request(s) in flight",
                       slot.name, reason, len(slot.attempts))
        for attempt in list(slot.attempts):
            attempt.cancel("ejected")

    def record_fault(self, slot: EngineSlot, exc: BaseException) -> None:
        self.faults[slot.name] += 1
        self.eject(slot, f"{type(exc).__name__}: {exc}")

    async def check_health(self) -> dict[str, bool]:
        """`is_healthy()` on every engine (bounded by the health timeout); ejects failures, readmits passes."""
        slots = list(self.slots.values())
        results = await asyncio.gather(*(self._check_one(slot) for slot in slots))
        for slot, healthy in zip(slots, results):
            if healthy and not slot.in_rotation and self.slots.get(slot.name) is slot:
                slot.in_rotation = True
                self.readmissions += 1
                logger.info("engine %r passed its health check: back in rotation", slot.name)
            elif not healthy:
                self.eject(slot, "health check failed")
        return {slot.name: healthy for slot, healthy in zip(slots, results)}

    async def _check_one(self, slot: EngineSlot) -> bool:
        try:
            async with asyncio.timeout(self.health_timeout_s):
                return (await slot.adapter.is_healthy()) is True
        except asyncio.CancelledError:
            raise
        except Exception:
            return False

    async def abort(self, rids: list[str] | None) -> dict[str, str]:
        """Forward aborts of `rids` (all requests when None) to every engine, each engine's bounded by the
        health timeout; says which engines failed."""
        names = list(self.slots)

        async def one(adapter: EngineAdapter) -> None:
            async with asyncio.timeout(self.health_timeout_s):
                if rids is None:
                    await adapter.abort(None)
                else:
                    await asyncio.gather(*(adapter.abort(rid) for rid in rids))

        results = await asyncio.gather(*(one(self.slots[n].adapter) for n in names), return_exceptions=True)
        return {
            name: "ok" if not isinstance(result, BaseException) else f"{type(result).__name__}: {result}"
            for name, result in zip(names, results)
        }

    def _abort_in_background(self, slot: EngineSlot, rid: Any) -> None:
        """Tell an engine we gave up on `rid`, so a merely slow engine stops generating it."""
        if not isinstance(rid, str):
            return

        async def send() -> None:
            try:
                async with asyncio.timeout(self.health_timeout_s):
                    await slot.adapter.abort(rid)
            except Exception as exc:
                logger.debug("abort of %s on engine %r failed: %s", rid, slot.name, exc)

        task = asyncio.ensure_future(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Cancel background aborts, then close every engine that can be closed (by shape: `aclose()` or
        `close()`, awaited when it is a coroutine), each bounded by the health timeout."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(self._close_engine(slot) for slot in self.slots.values()))

    async def _close_engine(self, slot: EngineSlot) -> None:
        close = getattr(slot.adapter, "aclose", None) or getattr(slot.adapter, "close", None)
        if not callable(close):
            return
        try:
            async with asyncio.timeout(self.health_timeout_s):
                result = close()
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:  # one engine failing to close must not keep the others open
            logger.warning("closing engine %r failed: %s: %s", slot.name, type(exc).__name__, exc)

    # --- metrics -------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        out = {
            "router/engines_out": float(len(self.out_of_rotation)),
            "router/engine_faults": float(sum(self.faults.values())),
            "router/ejections": float(self.ejections),
            "router/readmissions": float(self.readmissions),
        }
        for name, slot in self.slots.items():
            out[f"router/engine/{name}/outstanding"] = float(slot.outstanding)
            out[f"router/engine/{name}/in_rotation"] = float(slot.in_rotation)
            out[f"router/engine/{name}/faults"] = float(self.faults[name])
        snapshot = getattr(self.policy, "snapshot", None)
        if callable(snapshot):
            out.update(snapshot())
        return out
