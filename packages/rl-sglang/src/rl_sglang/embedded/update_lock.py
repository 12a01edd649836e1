"""`UpdateLock`: SGLang's model-update lock. Each /generate request holds a shared hold for its whole
life; a weight update takes it alone, so it waits for the requests in flight to finish (on the old
weights) and holds new ones until the new weights are in. Writers go first: once an update waits,
new requests queue behind it. An engine paused on purpose skips the lock (SGLang: whoever paused
it already keeps generation out)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class UpdateLock:
    def __init__(self) -> None:
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._changed = asyncio.Condition()

    @property
    def updating(self) -> bool:
        """An update holds the lock or waits for it."""
        return self._writing or self._writers_waiting > 0

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            async with self._changed:
                self._readers -= 1
                self._changed.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._changed:
            self._writers_waiting += 1
            try:
                await self._changed.wait_for(lambda: not self._writing and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            async with self._changed:
                self._writing = False
                self._changed.notify_all()
