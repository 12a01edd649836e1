"""Which engine failures mean "this engine is gone" (retry elsewhere) rather than "this request is bad".

An engine fault takes the engine out of rotation and sends the request to another engine; any other
exception from an engine (a 400 for a bad payload, a 500 from a request that crashed it, an
out-of-memory message) reaches the caller as it is, because retrying it elsewhere would only fail
again and take healthy engines out with it.
"""

from __future__ import annotations

import asyncio

# aiohttp's connection failures (refused, reset, server disconnected, socket timeouts) all derive from
# this class; matched by name so the router needs no HTTP library.
_FAULT_CLASS_NAMES = frozenset({"ClientConnectionError", "ServerTimeoutError"})

# HTTP statuses that say the server, not the request, is the problem: bad gateway, unavailable (an
# engine starting, draining or overloaded), gateway timeout. Read from an exception's `status`
# (rl-sglang's EngineError, aiohttp's ClientResponseError), again without importing either.
_FAULT_HTTP_STATUSES = frozenset({502, 503, 504})


class EngineFault(ConnectionError):
    """The router gave up on an engine for one request (it hung past the timeout or was taken out)."""


class EngineTimeout(EngineFault):
    """A request to an engine exceeded the router's per-request engine timeout."""


class EngineEjected(EngineFault):
    """The engine was taken out of rotation while this request was in flight on it."""


def is_engine_fault(exc: BaseException) -> bool:
    """True for connection-level failures (refused, reset, broken pipe, closed mid-reply, timed out) and
    for HTTP 502/503/504 answers."""
    if isinstance(exc, (OSError, asyncio.IncompleteReadError)):  # OSError covers ConnectionError, TimeoutError
        return True
    if getattr(exc, "status", None) in _FAULT_HTTP_STATUSES:
        return True
    return any(cls.__name__ in _FAULT_CLASS_NAMES for cls in type(exc).__mro__)
