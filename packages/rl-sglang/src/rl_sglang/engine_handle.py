"""`EngineHandle`: one engine server for a trainer of one's own (no Ray): the process, a `GenerateFn` for
rl-core's rollout, and the weight transports that reach it."""

from __future__ import annotations

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
        self._client = SGLangClient(self.url)
        self._generate = SGLangGenerate(self._client)

    async def generate(self, request: GenerateRequest) -> GenerateAnswer:
        """rl-core's GenerateFn on this engine (its HTTP client keeps one session per event loop that calls
        it, closed when that loop shuts down: a trainer may call asyncio.run once per rollout)."""
        return await self._generate(request)

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
        """Close the HTTP session of the running event loop, then stop the engine."""
        await self._client.close()
        self.close()

    def __enter__(self) -> EngineHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> EngineHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
