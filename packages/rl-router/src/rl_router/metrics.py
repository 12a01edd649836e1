"""`MetricsMiddleware`: request counts, errors, latency percentiles and per-engine load for the trainer's logger."""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from typing import Any, Callable, Sequence

from rl_router.protocols import CallNext, RouterRequest


def nearest_rank_percentile(sorted_values: Sequence[float], percent: float) -> float:
    """The smallest value with at least `percent`% of the values at or below it (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(percent / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


class MetricsMiddleware:
    """Counts what passes through the chain; latencies are kept for the last `window` requests.

    Keys of `snapshot()` (all floats, under `prefix`): `requests`, `errors`, `retries` (engine faults
    the router recovered from by retrying), `in_flight`, `latency_p50_s`, `latency_p99_s`, and per engine
    `engine/<name>/requests|errors|in_flight`.
    """

    def __init__(
        self, *, window: int = 10_000, prefix: str = "router/", clock: Callable[[], float] = time.perf_counter
    ):
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._latencies: deque[float] = deque(maxlen=window)
        self._prefix = prefix
        self._clock = clock
        self._requests = 0
        self._errors = 0
        self._retries = 0
        self._engine_requests: Counter[str] = Counter()
        self._engine_errors: Counter[str] = Counter()
        self._engine_in_flight: Counter[str] = Counter()

    async def __call__(self, request: RouterRequest, call_next: CallNext) -> dict[str, Any]:
        engine = request.engine or "unrouted"
        self._engine_in_flight[engine] += 1
        started = self._clock()
        failed = True
        try:
            response = await call_next(request)
            failed = False
            return response
        finally:
            self._latencies.append(self._clock() - started)
            self._engine_in_flight[engine] -= 1
            final_engine = request.engine or engine
            self._requests += 1
            self._retries += request.metadata.get("retries", 0)
            self._engine_requests[final_engine] += 1
            if failed:
                self._errors += 1
                self._engine_errors[final_engine] += 1

    def snapshot(self) -> dict[str, float]:
        latencies = sorted(self._latencies)
        p = self._prefix
        out = {
            f"{p}requests": float(self._requests),
            f"{p}errors": float(self._errors),
            f"{p}retries": float(self._retries),
            f"{p}in_flight": float(sum(self._engine_in_flight.values())),
            f"{p}latency_p50_s": nearest_rank_percentile(latencies, 50),
            f"{p}latency_p99_s": nearest_rank_percentile(latencies, 99),
        }
        for name in sorted(set(self._engine_requests) | set(self._engine_in_flight)):
            out[f"{p}engine/{name}/requests"] = float(self._engine_requests[name])
            out[f"{p}engine/{name}/errors"] = float(self._engine_errors[name])
            out[f"{p}engine/{name}/in_flight"] = float(self._engine_in_flight[name])
        return out
