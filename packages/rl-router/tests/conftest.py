"""Test doubles for rl-router: an in-process fake engine, engine processes over HTTP, a router+client fixture."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
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


class HttpEngine:
    """Engine adapter for `router_http_engine.py` (or anything SGLang-shaped) over plain asyncio streams.

    Keeps idle keep-alive connections for reuse; a connection that fails or is cancelled mid-request is
    closed, and connection errors surface as `ConnectionError`/`IncompleteReadError` (engine faults).
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _post(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        reader, writer = self._idle.pop() if self._idle else await asyncio.open_connection(self.host, self.port)
        try:
            data = json.dumps(body).encode() if body is not None else b""
            method = "POST" if body is not None else "GET"
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
            await writer.drain()
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionResetError(f"engine at {self.port} closed the connection")
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode().partition(":")
                if key.strip().lower() == "content-length":
                    length = int(value)
            answer = json.loads(await reader.readexactly(length))
        except BaseException:
            writer.close()
            raise
        self._idle.append((reader, writer))
        status = int(status_line.split()[1])
        if status != 200:
            raise RuntimeError(f"engine answered {path} with HTTP {status}: {answer}")
        return answer

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._post("/generate", payload)

    async def abort(self, rid: str | None = None) -> None:
        await self._post("/abort_request", {"rid": rid} if rid is not None else {"abort_all": True})

    async def is_healthy(self) -> bool:
        try:
            await self._post("/health_generate", None)
            return True
        except (OSError, asyncio.IncompleteReadError, RuntimeError):
            return False

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


ENGINE_SCRIPT = Path(__file__).with_name("router_http_engine.py")


@pytest.fixture
def engine_processes():
    """`spawn(name, *args) -> (process, HttpEngine)`: engine processes on loopback, killed after the test."""
    procs: list[subprocess.Popen[str]] = []
    adapters: list[HttpEngine] = []

    def spawn(name: str, *args: str) -> tuple[subprocess.Popen[str], HttpEngine]:
        proc = subprocess.Popen(
            [sys.executable, str(ENGINE_SCRIPT), "--name", name, *args], stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        line = proc.stdout.readline()  # the engine prints its port first; a dead one gives ""
        if not line.startswith("PORT "):
            raise RuntimeError(f"engine {name} failed to start: {line!r}")
        adapter = HttpEngine("127.0.0.1", int(line.split()[1]))
        adapters.append(adapter)
        return proc, adapter

    yield spawn
    for adapter in adapters:
        with contextlib.suppress(RuntimeError):  # its event loop may be closed already
            adapter.close()
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
