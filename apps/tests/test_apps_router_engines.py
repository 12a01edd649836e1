"""rl-router drives rl-sglang's client by shape: stopping the router closes each client's HTTP session."""

import asyncio
import gc

from rl_router import Router, RouterClient
from rl_sglang.client import SGLangClient


def _unclosed_session_reports(engine_count: int) -> list[str]:
    """Messages the event loop got about unclosed aiohttp sessions after a router over `engine_count` clients
    (each with a live session: a failed health check opens one) was stopped and the clients dropped."""
    reports: list[str] = []

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reports.append(context["message"]))
        clients = {f"e{i}": SGLangClient("http://127.0.0.1:9", health_timeout_s=1) for i in range(engine_count)}
        router = Router(clients, health_interval_s=None)
        await router.start()
        async with RouterClient(router.address) as client:
            assert await client.health() == {name: False for name in clients}
        await router.stop()
        clients.clear()
        del router
        gc.collect()

    asyncio.run(run())
    return reports


def test_stopping_the_router_leaves_no_client_session_open():
    assert [r for r in _unclosed_session_reports(3) if "Unclosed client session" in r] == []
