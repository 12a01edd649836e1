"""How a LoRA policy reaches the engines: adapter-only sync and the name every request serves it under."""

from __future__ import annotations

from typing import Any

LORA_NAME = "policy"
"""The adapter's name on the engines (SGLang's lora_name) and in each /generate's lora_path."""


def adapter_sync(config: Any) -> bool:
    """Whether the policy's weight syncs send its LoRA adapter alone (SGLang's LoRA routes): with the disk and
    tensor transports. The broadcast transport has no LoRA route (SGLang's adapters load from a folder or
    from tensor handles), and a restarted engine (--use-fault-tolerance) reloads full weights from disk, so
    those get the merged weights."""
    lora = config.lora_rank > 0 or config.lora_adapter_path is not None
    return lora and config.update_weight_transport in ("disk", "tensor") and not config.engine_restarts()


def engine_lora_args(config: Any) -> dict[str, Any]:
    """What SGLang needs at launch to load adapters later (the embedded engine needs nothing)."""
    targets = ["all" if name == "all-linear" else name for name in config.lora_target_modules]
    rank = config.lora_rank
    if config.lora_adapter_path is not None:
        import json

        rank = int(json.loads((config.lora_adapter_path / "adapter_config.json").read_text())["r"])
    return {"enable_lora": True, "max_lora_rank": rank, "lora_target_modules": targets, "max_loras_per_batch": 1}


class LoraPathMiddleware:
    """Router middleware: names the policy's adapter in every /generate that names none, since SGLang
    serves the base model to those (and the embedded engine refuses them while an adapter is loaded)."""

    def __init__(self, lora_name: str = LORA_NAME) -> None:
        self.lora_name = lora_name

    async def __call__(self, request: Any, call_next: Any) -> dict[str, Any]:
        if request.payload.get("lora_path") is None:
            request.payload["lora_path"] = self.lora_name
        return await call_next(request)
