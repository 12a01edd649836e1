"""LoRA adapters for the embedded engine: a PEFT adapter (its adapter_config.json as a dict and its tensors
under PEFT's names) read into the weight deltas it adds to the served model.

Why merged: the engine's forward (attention kernels, CUDA graphs) runs plain Hugging Face modules, so the one
adapter it serves is folded into the weights (W = W_base + scale * B @ A, computed from a kept copy of the
base, so repeated loads never drift). SGLang batches several adapters and the base together; this engine
serves one at a time, and refuses requests for anything else while it is loaded rather than answering them
with the wrong weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass
class LoraAdapter:
    """One adapter: name, where it came from, and per served weight name its (A, B) pair and scale."""

    name: str
    source: str
    scaling: float
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    fan_in_fan_out: bool = False

    def delta(self, weight_name: str) -> torch.Tensor:
        """scale * B @ A in float32, laid out as the served weight."""
        a, b = self.pairs[weight_name]
        delta = (b.float() @ a.float()) * self.scaling
        return delta.T if self.fan_in_fan_out else delta


def adapter_from_tensors(name: str, source: str, config: dict[str, Any],
                         tensors: Iterable[tuple[str, torch.Tensor]]) -> LoraAdapter:
    """Read a PEFT LoRA adapter; ValueError names what this engine cannot merge."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"peft_type {config.get('peft_type')!r}: only LORA adapters are served")
    for key in ("use_dora", "lora_bias"):
        if config.get(key):
            raise ValueError(f"{key}: DoRA and adapter biases are not supported by the embedded engine")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "trainable_token_indices"):
        if config.get(key):
            raise ValueError(f"{key}={config[key]!r}: only plain LoRA on linear layers (one rank and alpha) is supported")
    try:
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"config_dict needs numeric r and lora_alpha: {exc}") from exc
    if rank <= 0:
        raise ValueError(f"r must be positive, got {rank}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for tensor_name, tensor in tensors:
        module, sep, half = tensor_name.removeprefix(_PREFIX).rpartition(".lora_")
        if not sep or half not in ("A.weight", "B.weight"):
            raise ValueError(f"tensor {tensor_name!r} is not a LoRA A/B weight (embedding adapters and biases are not supported)")
        halves.setdefault(f"{module}.weight", {})[half[0]] = tensor
    pairs = {}
    for weight_name, parts in halves.items():
        if set(parts) != {"A", "B"}:
            raise ValueError(f"{weight_name}: the adapter has lora_{''.join(parts)} but not both A and B")
        a, b = parts["A"], parts["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{weight_name}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not have rank r={rank}")
        pairs[weight_name] = (a, b)
    if not pairs:
        raise ValueError("the adapter has no LoRA tensors")
    return LoraAdapter(name, source, scaling, pairs, bool(config.get("fan_in_fan_out")))


def read_adapter_folder(name: str, folder: Path) -> LoraAdapter:
    """A folder as PEFT's save_pretrained writes it (adapter_config.json, adapter_model.safetensors)."""
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{folder} needs {CONFIG_FILE} and {WEIGHTS_FILE} (PEFT's save_pretrained format)")
    config = json.loads(config_path.read_text())
    return adapter_from_tensors(name, str(folder), config, load_file(str(weights_path)).items())
