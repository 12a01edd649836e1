"""torch.compile of the decoder layers (on CUDA; the backend leaves a CPU eager)."""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel


def compile_layers(gpt: GPTModel) -> None:
    """Each dense decoder layer's forward through torch.compile, assigned to the instance so that module
    hooks and megatron-core's own layer call (CUDA-graph dispatch, activation recompute) stay eager around
    it. MoE layers stay eager: their token dispatch has data-dependent shapes (tokens per expert), which
    would recompile or break the graph at every micro-batch."""
    for layer in gpt.decoder.layers:
        if not getattr(layer, "is_moe_layer", False):
            layer.forward = torch.compile(layer.forward)
