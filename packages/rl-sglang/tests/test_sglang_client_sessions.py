"""SGLangClient used from several event loops in turn (a trainer's asyncio.run per rollout): each loop's HTTP
session is its own and is closed when that loop ends."""

from __future__ import annotations

import asyncio
import gc
import warnings

from aiohttp import web

from rl_sglang.client import SGLangClient


async def serve_model_info() -> web.AppRunner:
    """A server on a free loopback port of the running loop, answering GET /model_info."""
    async def model_info(request: web.Request) -> web.Response:
        return web.json_response({"model_path": "tiny"})

    app = web.Application()
    app.router.add_get("/model_info", model_info)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def test_each_event_loops_session_is_closed_when_that_loop_ends_and_none_is_left_unclosed():
    client = SGLangClient("http://placeholder")  # built outside any loop
    reports: list[str] = []
    sessions = []

    async def rollout() -> dict:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: reports.append(context["message"]))
        runner = await serve_model_info()
        client.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            answer = await client.get_model_info()
            assert await client.get_model_info() == answer  # the same loop keeps its session
            sessions.append(client._sessions[asyncio.get_running_loop()])
            return answer
        finally:
            await runner.cleanup()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answers = [asyncio.run(rollout()) for _ in range(3)]
        gc.collect()
    assert answers == [{"model_path": "tiny"}] * 3
    assert len({id(s) for s in sessions}) == 3 and all(s.closed for s in sessions)
    assert client._sessions == {}  # every loop's session went with its loop
    assert [r for r in reports if "Unclosed" in r] == []
    assert [str(w.message) for w in caught if "Unclosed" in str(w.message)] == []


async def test_close_closes_the_running_loops_session_and_a_later_call_opens_a_new_one():
    runner = await serve_model_info()
    client = SGLangClient(f"http://127.0.0.1:{runner.addresses[0][1]}")
    try:
        await client.get_model_info()
        first = client._sessions[asyncio.get_running_loop()]
        await client.close()
        assert first.closed and client._sessions == {}
        assert await client.get_model_info() == {"model_path": "tiny"}
        assert not client._sessions[asyncio.get_running_loop()].closed
        await client.close()
    finally:
        await runner.cleanup()
