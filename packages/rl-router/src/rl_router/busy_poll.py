"""An asyncio event loop that keeps polling its sockets for a while before it goes to sleep.

Why: on loopback, a round trip through the router is mostly thread wake-ups (each side's event loop
and ZeroMQ I/O thread wake the next), and on a virtual machine waking a sleeping core costs tens of
microseconds. A loop that polls for `spin_s` after it runs out of work sees the next message without
being woken: the trade SGLang's scheduler makes by polling its ZeroMQ sockets in a loop. The price is
up to `spin_s` of CPU per idle gap, so use it for a router with a core to itself; in a process shared
with other Python threads the spinning thread also competes for the GIL.
"""

from __future__ import annotations

import asyncio
import selectors
import time


class BusyPollSelector(selectors.DefaultSelector):
    """`select(timeout)` polls without blocking for up to `spin_s` (never past `timeout`), then blocks."""

    def __init__(self, spin_s: float):
        if spin_s < 0:
            raise ValueError(f"spin_s must be at least 0, got {spin_s}")
        super().__init__()
        self.spin_s = spin_s

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        poll = super().select
        if timeout == 0 or self.spin_s == 0:
            return poll(timeout)
        start = time.perf_counter()
        deadline = start + (self.spin_s if timeout is None else min(self.spin_s, timeout))
        while True:
            ready = poll(0)
            if ready:
                return ready
            now = time.perf_counter()
            if now >= deadline:
                break
        return poll(None if timeout is None else max(0.0, timeout - (now - start)))


def busy_poll_loop(spin_s: float) -> asyncio.AbstractEventLoop:
    """A new event loop on a `BusyPollSelector` (for `asyncio.Runner(loop_factory=...)`)."""
    return asyncio.SelectorEventLoop(BusyPollSelector(spin_s))
