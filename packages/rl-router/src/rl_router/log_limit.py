"""`RateLimitedWarnings`: at most `burst` WARNING lines per `interval_s`, so a peer sending garbage cannot flood the log.

What is held back is counted (`suppressed`, in the router's metrics) and reported in one summary line when the
next window opens or the router stops.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable


class RateLimitedWarnings:
    """Logs the first `burst` warnings of each `interval_s` window and counts the rest."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 10,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if burst < 1 or interval_s <= 0:
            raise ValueError(f"need burst >= 1 and interval_s > 0, got {burst} and {interval_s}")
        self._logger = logger
        self._burst = burst
        self._interval_s = interval_s
        self._clock = clock
        self._window_start = clock()
        self._logged_in_window = 0
        self._held_back = 0
        self.suppressed = 0
        """Warnings held back since the start."""

    def warning(self, message: str, *args: Any) -> None:
        now = self._clock()
        if now - self._window_start >= self._interval_s:
            self.flush()
            self._window_start, self._logged_in_window = now, 0
        if self._logged_in_window < self._burst:
            self._logged_in_window += 1
            self._logger.warning(message, *args)
        else:
            self._held_back += 1
            self.suppressed += 1

    def flush(self) -> None:
        """Log how many warnings the current window held back, if any."""
        if self._held_back:
            self._logger.warning(
                "%d more such warning(s) held back in the last %.0fs (at most %d per window; counts in the router's metrics)",
                self._held_back, self._clock() - self._window_start, self._burst,
            )
            self._held_back = 0
