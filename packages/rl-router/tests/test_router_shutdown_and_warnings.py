"""Stopping the router closes its engines' connections; warnings about bad peers are rate-limited and counted."""

from __future__ import annotations

import asyncio
import logging

import msgpack
import zmq
import zmq.asyncio

from rl_router import Router
from rl_router.log_limit import RateLimitedWarnings
from rl_router.wire import encode_request


class _Closable:
    """A fake engine that records how it was closed."""

    def __init__(self, fake_engine, name: str) -> None:
        self.engine = fake_engine(name)
        self.closed: list[str] = []

    async def generate(self, payload):
        return await self.engine.generate(payload)

    async def abort(self, rid=None):
        await self.engine.abort(rid)

    async def is_healthy(self):
        return True


class _AsyncClose(_Closable):
    async def close(self) -> None:
        await asyncio.sleep(0)
        self.closed.append("close")


class _AsyncAcloseAndClose(_Closable):
    async def aclose(self) -> None:
        self.closed.append("aclose")

    def close(self) -> None:
        self.closed.append("close")


class _SyncClose(_Closable):
    def close(self) -> None:
        self.closed.append("close")


class _FailingClose(_Closable):
    async def close(self) -> None:
        raise RuntimeError("socket already gone")


async def test_stopping_the_router_closes_every_registered_engine_once_by_its_shape(fake_engine):
    engines = {
        "async": _AsyncClose(fake_engine, "a"),
        "aclose": _AsyncAcloseAndClose(fake_engine, "b"),
        "sync": _SyncClose(fake_engine, "c"),
        "failing": _FailingClose(fake_engine, "d"),
        "plain": fake_engine("e"),
        "removed": _AsyncClose(fake_engine, "f"),
    }
    router = Router(engines, health_interval_s=None)
    await router.start()
    removed = router.remove_engine("removed")
    await asyncio.wait_for(router.stop(), 5)
    assert engines["async"].closed == ["close"]
    assert engines["aclose"].closed == ["aclose"]  # aclose is preferred to close
    assert engines["sync"].closed == ["close"]
    assert removed.closed == []  # handed back to the caller, who owns it now
    await router.stop()  # a second stop is a no-op
    assert engines["async"].closed == ["close"]


async def test_a_flood_of_malformed_messages_logs_a_few_lines_and_counts_the_rest(fake_engine, serve, caplog):
    flood = 200
    context = zmq.asyncio.Context()
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    caplog.set_level(logging.WARNING, logger="rl_router.router")
    try:
        async with asyncio.timeout(15), serve({"e0": fake_engine("e0")}, warnings_per_minute=3) as (router, client):
            raw.connect(router.address)
            for index in range(flood):
                await raw.send(msgpack.packb([index]) if index % 2 else b"\xc1garbage")
            await raw.send(encode_request(1, "metrics", None))
            async with asyncio.timeout(5):
                metrics = msgpack.unpackb(await raw.recv(), raw=False)["body"]
            assert (await client.generate({"input_ids": [1, 2], "sampling_params": {}}))["output_ids"] == [2, 1]
    finally:
        raw.close()
        context.term()
    assert metrics["router/malformed_messages"] == flood
    assert metrics["router/warnings_suppressed"] == flood - 3
    lines = [record.getMessage() for record in caplog.records if record.name == "rl_router.router"]
    malformed_lines = [line for line in lines if line.startswith("malformed message")]
    summaries = [line for line in lines if "held back" in line]
    assert len(malformed_lines) == 3
    assert summaries == [summaries[0]] and summaries[0].startswith(f"{flood - 3} more such warning(s) held back")


def test_rate_limited_warnings_open_a_new_window_after_the_interval_and_summarise_the_old_one(caplog):
    now = [0.0]
    log = logging.getLogger("test_rate_limited_warnings")
    limited = RateLimitedWarnings(log, burst=2, interval_s=10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger=log.name)
    for second in range(25):  # one warning a second for 25 s: windows [0, 10), [10, 20), [20, 25)
        now[0] = float(second)
        limited.warning("bad %d", second)
    limited.flush()
    lines = [record.getMessage() for record in caplog.records]
    held = lambda n: f"{n} more such warning(s) held back"  # noqa: E731
    assert [line.split(" in the last")[0] for line in lines] == [
        "bad 0", "bad 1", held(8), "bad 10", "bad 11", held(8), "bad 20", "bad 21", held(3),
    ]
    assert limited.suppressed == 25 - 6
