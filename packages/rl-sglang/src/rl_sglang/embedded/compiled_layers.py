"""The decoder layers through torch.compile for decode steps (SGLang's `--enable-torch-compile`, for
batches up to `--torch-compile-max-bs`): inductor fuses what HF's layer code launches as separate small
kernels (rotary embedding's slices/neg/cat, SiLU times up, residual adds, RMSNorms), which dominate a
small model's decode step. Attention and the K/V store stay the engine's kernels, behind the opaque
`rl_sglang::layer_attention` op, so the graph has no break and nothing in it depends on the layer or
on the batch size: one dynamic-shape compile (batch >= 2; a batch of one keeps the eager layers, as
dynamic shapes specialise size 1) serves every layer and every CUDA-graph bucket. The runner compiles
it before capturing the graphs, so they replay the compiled kernels.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from rl_sglang.embedded.attention import BATCH_KWARG, ForwardBatch, layer_cursor

logger = logging.getLogger(__name__)

DEFAULT_MAX_BS = 32  # SGLang's --torch-compile-max-bs default


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: the modules of its longest ModuleList whose members each hold a
    `self_attn` with an integer `layer_idx` (the pool layer it reads); [] when there is none."""
    found: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(found):
            members = list(module)
            if all(isinstance(getattr(getattr(m, "self_attn", None), "layer_idx", None), int) for m in members):
                found = members
    return found


class CompiledLayers:
    """Swaps each decoder layer's forward for one that runs the compiled body of its class when the
    step's `ForwardBatch` asks for it (`compiled_layers`), and HF's eager forward otherwise."""

    def __init__(self, model: torch.nn.Module, max_bs: int, backend: str | Callable[..., Any] = "inductor"):
        layers = decoder_layers(model)
        if not layers:
            raise ValueError(f"{type(model).__name__}: no decoder layers with a self_attn.layer_idx found to compile")
        self.max_bs = max_bs
        self.layers = len(layers)
        self._compiled: dict[type, Callable[..., Any]] = {}
        for layer in layers:
            cls = type(layer)
            if cls not in self._compiled:  # one compile per layer class, shared by all its layers
                self._compiled[cls] = torch.compile(cls.forward, backend=backend, dynamic=True, fullgraph=True)
            layer.forward = _switching_forward(layer, self._compiled[cls])  # type: ignore[method-assign]

    def applies(self, batch_size: int) -> bool:
        return 2 <= batch_size <= self.max_bs


def _switching_forward(layer: torch.nn.Module, compiled: Callable[..., Any]) -> Callable[..., Any]:
    eager = layer.forward
    attention = layer.self_attn
    index = int(attention.layer_idx)  # type: ignore[union-attr, arg-type]  # an int module attribute: checked by decoder_layers
    scaling = getattr(attention, "scaling", None)

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        batch: ForwardBatch | None = kwargs.get(BATCH_KWARG)
        if batch is None or not batch.compiled_layers:
            return eager(hidden_states, *args, **kwargs)
        with layer_cursor(batch, index, scaling):  # outside the graph: no per-layer constant inside it
            return compiled(layer, hidden_states, *args, **kwargs)

    return forward
