"""Where a weight sent under its checkpoint name lands in the served Hugging Face model.

Transformers 5 keeps the routed experts of an MoE layer (Qwen3-MoE, Mixtral, ...) stacked in memory:
`<layer>.mlp.experts.gate_up_proj` [E, 2I, H] (each expert's gate rows, then its up rows) and
`<layer>.mlp.experts.down_proj` [E, H, I]. Checkpoints, and trainers that export checkpoint names
(the Megatron backend, like real SGLang's loader), name each expert's matrix apart:
`<layer>.mlp.experts.<e>.gate_proj.weight` (Mixtral: `<layer>.block_sparse_moe.experts.<e>.w1.weight`).
`WeightTargets` answers either spelling with the live tensor, or the slice of it, that the name fills.
The stacked modules are found in the model itself, so a layout other than this one is never guessed at."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_EXPERT_MATRIX = re.compile(r"(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<part>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_MIXTRAL_BLOCK = ".block_sparse_moe."  # Mixtral checkpoints' name of the MoE block the model calls `mlp`


@dataclass(frozen=True)
class WeightTarget:
    """The live tensor a sent weight is copied into: the whole of `tensor`, or `tensor[index]`."""

    name: str  # the model's in-memory name of `tensor`
    tensor: torch.Tensor
    index: tuple[int | slice, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.view().shape)

    def view(self) -> torch.Tensor:
        return self.tensor if self.index is None else self.tensor[self.index]

    def describe(self) -> str:
        """The model's tensor, with the slice this weight fills: 'model.layers.0.mlp.experts.gate_up_proj'[3, 0:16]."""
        if self.index is None:
            return repr(self.name)
        parts = [str(i) if isinstance(i, int) else f"{i.start}:{i.stop}" for i in self.index]
        return f"{self.name!r}[{', '.join(parts)}]"


class WeightTargets:
    """The served model's weights by in-memory name, and the stacked experts by checkpoint name."""

    def __init__(self, model: torch.nn.Module, named: dict[str, torch.Tensor]):
        self.named = named
        self._stacked = {path: module for path, module in model.named_modules() if _stacks_experts(module)}

    def get(self, name: str) -> WeightTarget | None:
        """Where weight `name` goes, or None when the model has no such weight."""
        tensor = self.named.get(name)
        if tensor is not None:
            return WeightTarget(name, tensor)
        if _MIXTRAL_BLOCK in name:
            renamed = self.named.get(name.replace(_MIXTRAL_BLOCK, ".mlp."))
            if renamed is not None:
                return WeightTarget(name.replace(_MIXTRAL_BLOCK, ".mlp."), renamed)
        return self._expert_slice(name)

    def _expert_slice(self, name: str) -> WeightTarget | None:
        match = _EXPERT_MATRIX.fullmatch(name)
        if match is None:
            return None
        path = match["experts"].replace(_MIXTRAL_BLOCK, ".mlp.")
        module = self._stacked.get(path)
        expert, part = int(match["expert"]), _PART[match["part"]]
        if module is None or expert >= module.gate_up_proj.shape[0]:
            return None
        if part == "down":
            return WeightTarget(f"{path}.down_proj", module.down_proj, (expert,))
        inner = module.gate_up_proj.shape[1] // 2
        rows = slice(0, inner) if part == "gate" else slice(inner, 2 * inner)
        return WeightTarget(f"{path}.gate_up_proj", module.gate_up_proj, (expert, rows))


def _stacks_experts(module: torch.nn.Module) -> bool:
    """A transformers 5 experts module in the [E, 2I, H] / [E, H, I] layout: gated, not transposed
    (gpt-oss-style [E, H, 2I] stacks and ungated experts are left to their in-memory names)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.nn.Parameter)
        and isinstance(down, torch.nn.Parameter)
        and gate_up.dim() == 3
        and down.dim() == 3
        and gate_up.shape[0] == down.shape[0]
        and gate_up.shape[1] == 2 * down.shape[2]
        and gate_up.shape[2] == down.shape[1]
        and getattr(module, "has_gate", True)
        and not getattr(module, "is_transposed", False)
    )
