"""`EngineHandle`: one engine server for a trainer of one's own (no Ray): the process, a `GenerateFn` for
rl-core's rollout, and the weight transports that reach it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, Literal

from rl_core.generation import GenerateAnswer, GenerateRequest
from rl_sglang.client import SGLangClient
from rl_sglang.generation import SGLangGenerate
from rl_sglang.launcher import EngineProcess, launch_engine


class EngineHandle:
    """Starts an engine (the embedded one, or SGLang) on `model_path` and stops it on exit.

        async with EngineHandle(model_dir, device="cpu") as engine:
            generator = default_generator(engine.generate, sampling_params)
            transport = engine.transport("broadcast")
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        engine_type: Literal["embedded", "sglang"] = "embedded",
        device: Literal["auto", "cpu", "cuda"] = "auto",
        sglang_args: dict[str, Any] | None = None,
        startup_timeout_s: float = 600.0,
    ) -> None:
        args = dict(sglang_args or {})
        if engine_type == "embedded":
            args.setdefault("device", device)
        self.process: EngineProcess = launch_engine(engine_type, str(model_path), sglang_args=args)
        self.process.wait_until_healthy(startup_timeout_s)
        self.url = self.process.url
        self._generators: dict[asyncio.AbstractEventLoop, SGLangGenerate] = {}
        self._lifetimes: dict[asyncio.AbstractEventLoop, AsyncGenerator[None, None]] = {}

    async def generate(self, request: GenerateRequest) -> GenerateAnswer:
        """rl-core's GenerateFn on this engine (one HTTP client per event loop that calls it, closed when
        that loop shuts down: a trainer may call asyncio.run once per rollout)."""
        loop = asyncio.get_running_loop()
        generate = self._generators.get(loop)
        if generate is None:
            lifetime = self._lifetimes[loop] = self._client_lifetime(loop, SGLangClient(self.url))
            await anext(lifetime)
            generate = self._generators[loop]
        return await generate(request)

    async def _client_lifetime(self, loop: asyncio.AbstractEventLoop, client: SGLangClient) -> AsyncGenerator[None, None]:
        """Holds `loop`'s client until the generator is closed: by `aclose`, or by the loop's shutdown
        (asyncio.run closes every async generator begun on its loop while the loop still runs, which is
        when an HTTP session can still be closed)."""
        self._generators[loop] = SGLangGenerate(client)
        try:
            yield
        finally:
            self._generators.pop(loop, None)
            self._lifetimes.pop(loop, None)
            await client.close()

    def transport(self, kind: Literal["disk", "broadcast", "tensor"] = "broadcast", **options: Any) -> Any:
        """A WeightTransport to this engine: safetensors in `options['folder']`, a process-group broadcast,
        or tensor handles (same GPU or CPU shared memory)."""
        from rl_sglang.weight_sync import BroadcastWeightTransport, DiskWeightTransport, TensorWeightTransport

        if kind == "disk":
            return DiskWeightTransport([self.url], options.pop("folder"), **options)
        if kind == "tensor":
            return TensorWeightTransport([self.url], **options)
        return BroadcastWeightTransport([self.url], **options)

    def close(self) -> None:
        self.process.terminate()

    async def aclose(self) -> None:
        """Close the HTTP client of the running event loop, then stop the engine."""
        lifetime = self._lifetimes.get(asyncio.get_running_loop())
        if lifetime is not None:
            await lifetime.aclose()
        self.close()

    def __enter__(self) -> EngineHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> EngineHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
