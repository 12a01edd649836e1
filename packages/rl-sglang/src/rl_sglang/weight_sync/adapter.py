"""Adapter-only sync: a LoRA policy sends its adapter (PEFT names, a few MB) instead of merged weights.

Each update replaces the engines' adapter of that name (SGLang refuses loading a name twice, so an adapter
loaded before is unloaded first) and then sets the weight version, which the LoRA routes do not carry.
Requests must name the adapter in /generate's `lora_path` (SGLang serves the base to those that do not).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rl_sglang.client import SGLangClient

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def write_adapter_folder(folder: Path, config: dict[str, Any], named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Path:
    """PEFT's save_pretrained layout, which /load_lora_adapter reads."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in named_tensors}
    if not tensors:
        raise ValueError("update_adapter got no tensors to send")
    save_file(tensors, str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


async def replace_adapter(
    client: SGLangClient, lora_name: str, load: Callable[[], Awaitable[Any]], weight_version: str, *, loaded_before: bool
) -> None:
    """Unload the engine's previous version of `lora_name` (when this sender loaded one), load the new one,
    then stamp the weight version."""
    if loaded_before:
        await client.unload_lora_adapter(lora_name)
    await load()
    await client.update_weight_version(weight_version, abort_all_requests=False)
