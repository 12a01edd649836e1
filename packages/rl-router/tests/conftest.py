"""Test doubles for rl-router: an in-process fake engine and a router+client fixture."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

import pytest

from rl_router import Router, RouterClient


class FakeEngine:
    """Echoes `input_ids` reversed in an SGLang-shaped response; records calls; optional delay/failure."""

    def __init__(self, name: str, *, delay_s: float = 0.0, fail_with: str | None = None, healthy: bool = True):
        self.name = name
        self.delay_s = delay_s
        self.fail_with = fail_with
        self.healthy = healthy
        self.calls: list[dict[str, Any]] = []
        self.aborts: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(payload)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail_with is not None:
                raise RuntimeError(self.fail_with)
            output_ids = list(reversed(payload["input_ids"]))
            return {
                "text": " ".join(map(str, output_ids)),
                "output_ids": output_ids,
                "meta_info": {
                    "id": payload.get("rid"),
                    "engine": self.name,
                    "finish_reason": {"type": "stop"},
                    "output_token_logprobs": [[-0.5, token, None] for token in output_ids],
                    "weight_version": "7",
                },
            }
        finally:
            self.in_flight -= 1

    async def abort(self, rid: str | None = None) -> None:
        self.aborts.append(rid)

    async def is_healthy(self) -> bool:
        return self.healthy


@pytest.fixture
def fake_engine() -> type[FakeEngine]:
    return FakeEngine


@pytest.fixture
def serve():
    """`async with serve(engines, **router_kwargs) as (router, client)`: a started router and a client on it."""

    @contextlib.asynccontextmanager
    async def _serve(engines: dict[str, Any], **router_kwargs: Any) -> AsyncIterator[tuple[Router, RouterClient]]:
        router = Router(engines, **router_kwargs)
        await asyncio.wait_for(router.start(), 5)
        client = RouterClient(router.address)
        try:
            yield router, client
        finally:
            client.close()
            await asyncio.wait_for(router.stop(), 5)

    return _serve
