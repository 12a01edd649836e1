"""Which engine failures mean "this engine is gone" (retry elsewhere) rather than "this request is bad".

An engine fault takes the engine out of rotation and sends the request to another engine; any other
exception from an engine (a 400 for a bad payload, an out-of-memory message) reaches the caller as it is,
because retrying it elsewhere would only fail again.
"""

from __future__ import annotations

import asyncio

# aiohttp's connection failures (refused, reset, server disconnected, socket timeouts) all derive from
# this class; matched by name so the router needs no HTTP library.
_FAULT_CLASS_NAMES = frozenset({"ClientConnectionError", "ServerTimeoutError"})


class EngineFault(ConnectionError):
    """The router gave up on an engine for one request (it hung past the timeout or was taken out)."""


class EngineTimeout(EngineFault):
    """A request to an engine exceeded the router's per-request engine timeout."""


class EngineEjected(EngineFault):
    """The engine was taken out of rotation while this request was in flight on it."""


def is_engine_fault(exc: BaseException) -> bool:
    """True for connection-level failures: refused, reset, broken pipe, closed mid-reply, timed out."""
    if isinstance(exc, (OSError, asyncio.IncompleteReadError)):  # OSError covers ConnectionError, TimeoutError
        return True
    return any(cls.__name__ in _FAULT_CLASS_NAMES for cls in type(exc).__mro__)
