"""`RequestLogMiddleware`: one log line per request (rid, engine, latency, finish reason) via `logging`."""

from __future__ import annotations

import logging
import time
from typing import Any

from rl_router.protocols import CallNext, RouterRequest


def finish_reason(response: dict[str, Any]) -> str | None:
    """`meta_info.finish_reason.type` of an SGLang response, if present."""
    meta = response.get("meta_info")
    reason = meta.get("finish_reason") if isinstance(meta, dict) else None
    if isinstance(reason, dict):
        return reason.get("type")
    return reason if isinstance(reason, str) else None


class RequestLogMiddleware:
    """Logs finished requests at `level` and failed ones at WARNING."""

    def __init__(self, *, logger: logging.Logger | None = None, level: int = logging.INFO):
        self._logger = logger or logging.getLogger("rl_router.requests")
        self._level = level

    async def __call__(self, request: RouterRequest, call_next: CallNext) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:
            self._logger.warning(
                "rid=%s engine=%s latency=%.3fs failed: %s",
                request.rid, request.engine, time.perf_counter() - started, exc,
            )
            raise
        if self._logger.isEnabledFor(self._level):  # skip building the arguments when nobody listens
            self._logger.log(
                self._level,
                "rid=%s engine=%s latency=%.3fs finish_reason=%s",
                request.rid, request.engine, time.perf_counter() - started, finish_reason(response),
            )
        return response
