"""The two seams of the router: what it calls on an engine, and what a middleware looks like.

Both are Protocols met by shape, so the SGLang HTTP client (another package) and `RouterClient`
plug in without importing this package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, runtime_checkable


@runtime_checkable
class EngineAdapter(Protocol):
    """One rollout engine as the router sees it (SGLang-shaped `/generate` in, response dict out)."""

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]: ...

    async def abort(self, rid: str | None = None) -> None:
        """Stop one request, or every request when `rid` is None."""
        ...

    async def is_healthy(self) -> bool: ...


@dataclass
class RouterRequest:
    """One `/generate` request travelling through the middleware chain.

    `engine` is filled in by the routing step before the chain runs; a middleware may overwrite it
    to pin the request elsewhere (or set it to None to have it routed again at the engine call).
    """

    rid: str
    payload: dict[str, Any]
    engine: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


CallNext = Callable[[RouterRequest], Awaitable[dict[str, Any]]]


@runtime_checkable
class Middleware(Protocol):
    """Wraps the rest of the chain: may change the request, change the response, or answer itself."""

    async def __call__(self, request: RouterRequest, call_next: CallNext) -> dict[str, Any]: ...
