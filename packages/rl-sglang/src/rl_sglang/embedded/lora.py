"""LoRA adapters for the embedded engine: a PEFT adapter (its adapter_config.json as a dict and its tensors
under PEFT's names) read, and applied beside the served weights.

Why not merged into the weights: the trainer (peft) and SGLang both compute W x + scale * B (A x), the
adapter's path apart from the base's. In bf16 a merged W + scale * B @ A is rounded once more, to the
base weight's precision (an update smaller than half a bf16 step of W is lost), so a merged engine's
log-probs drift from the trainer's by about the whole bf16 error of the model, where full fine-tuning's
engine holds the trainer's exact bf16 weights. `ServedLora` hooks each adapted linear layer instead, in the
served dtype, with the same operations as peft's Linear. This engine serves one adapter at a time (SGLang
batches several and the base) and refuses requests for anything else while it is loaded rather than
answering them with the wrong weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.hooks import RemovableHandle

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


def adapter_from_tensors(name: str, source: str, config: dict[str, Any],
                         tensors: Iterable[tuple[str, torch.Tensor]]) -> LoraAdapter:
    """Read a PEFT LoRA adapter; ValueError names what this engine cannot serve."""
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


class ServedLora:
    """An adapter applied beside the weights of a served model: a forward hook on each adapted module adds
    scale * B (A x) to its output, in the module's dtype, as peft's LoRA Linear does (x through lora_A, then
    lora_B, times the scale, added to the base output).

    The factors live in buffers of this object, so a CUDA graph captured with the hooks replays whatever
    `fill` copied in last: replacing an adapter by one of the same targets, shapes and scale (what each
    adapter-only weight sync does) needs no new capture. `clear` zeroes B, so the hooks add exact zeros and
    the model serves its base weights."""

    def __init__(self, model: nn.Module, adapter: LoraAdapter) -> None:
        self.scaling = adapter.scaling
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[RemovableHandle] = []
        for weight_name, (a, b) in adapter.pairs.items():
            module = model.get_submodule(weight_name.removesuffix(".weight"))
            weight = module.get_parameter("weight")
            self.pairs[weight_name] = (torch.empty(a.shape, dtype=weight.dtype, device=weight.device),
                                       torch.empty(b.shape, dtype=weight.dtype, device=weight.device))
            self._handles.append(module.register_forward_hook(self._hook(weight_name)))
        self.fill(adapter)

    def _hook(self, weight_name: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]:
        def add_lora(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            a, b = self.pairs[weight_name]  # looked up at call time: `to` may have moved them
            x = args[0].to(a.dtype)
            return output + F.linear(F.linear(x, a), b) * self.scaling
        return add_lora

    def fits(self, adapter: LoraAdapter) -> bool:
        """Whether `fill` can take `adapter`: the same adapted weights, factor shapes and scale."""
        return adapter.scaling == self.scaling and adapter.pairs.keys() == self.pairs.keys() and all(
            adapter.pairs[name][0].shape == a.shape and adapter.pairs[name][1].shape == b.shape
            for name, (a, b) in self.pairs.items())

    @torch.inference_mode()
    def fill(self, adapter: LoraAdapter) -> None:
        """Copy the adapter's factors in (copies: a tensor handed over by handle is the sender's memory,
        valid only until the load call answers)."""
        for name, (a, b) in self.pairs.items():
            new_a, new_b = adapter.pairs[name]
            a.copy_(new_a)
            b.copy_(new_b)

    @torch.inference_mode()
    def clear(self) -> None:
        for _, b in self.pairs.values():
            b.zero_()

    def to(self, device: torch.device) -> None:
        self.pairs = {name: (a.to(device), b.to(device)) for name, (a, b) in self.pairs.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
