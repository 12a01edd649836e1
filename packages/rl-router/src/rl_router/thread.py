"""`RouterThread`: runs a `Router` on its own event loop in a daemon thread, for synchronous drivers."""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, TypeVar

from rl_router.busy_poll import busy_poll_loop
from rl_router.protocols import EngineAdapter
from rl_router.router import Router

T = TypeVar("T")


class RouterThread:
    """Start with `start()` (returns the bound address), stop with `stop()`, or use as a context manager.

    Engine adapters are used on the thread's loop; `add_engine`/`remove_engine`/`metrics` here are
    safe to call from any other thread. `busy_poll_s` > 0 runs the loop on a `BusyPollSelector`
    (lower latency for a core's worth of CPU while requests come and go; see `rl_router.busy_poll`).
    """

    def __init__(self, router: Router, *, timeout_s: float = 10.0, busy_poll_s: float = 0.0):
        if busy_poll_s < 0:
            raise ValueError(f"busy_poll_s must be at least 0, got {busy_poll_s}")
        self.router = router
        self._busy_poll_s = busy_poll_s
        self._timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rl-router", daemon=True)

    @property
    def address(self) -> str:
        return self.router.address

    def start(self) -> str:
        self._thread.start()
        if not self._ready.wait(self._timeout_s):
            raise TimeoutError(f"router thread did not start within {self._timeout_s}s")
        if self._error is not None:
            raise self._error
        return self.address

    def stop(self) -> None:
        if self._loop is not None and self._stop_event is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join(self._timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"router thread did not stop within {self._timeout_s}s")

    def __enter__(self) -> RouterThread:
        if not self._thread.is_alive():  # `Router.run_in_thread()` hands it over already started
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def add_engine(self, name: str, adapter: EngineAdapter) -> None:
        self._call(lambda: self.router.add_engine(name, adapter))

    def remove_engine(self, name: str) -> EngineAdapter:
        return self._call(lambda: self.router.remove_engine(name))

    def metrics(self) -> dict[str, float]:
        return self._call(self.router.metrics)

    def _call(self, fn: Callable[[], T]) -> T:
        if self._loop is None or not self._thread.is_alive():
            raise RuntimeError("router thread is not running")

        async def on_loop() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result(self._timeout_s)

    def _run(self) -> None:
        loop_factory = (lambda: busy_poll_loop(self._busy_poll_s)) if self._busy_poll_s else None
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        try:
            await self.router.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await self.router.stop()
