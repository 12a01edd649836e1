"""torch.compile of the decoder layers (on CUDA; the backend leaves a CPU eager)."""

from __future__ import annotations

import warnings

import torch
from megatron.core.models.gpt import GPTModel

_warnings_substituted = False


def _drop_warnings_inside_compiled_code() -> None:
    """megatron-core 0.19's RowParallelLinear passes tp_group=None to its matmul on every call, which warns
    (deprecation) on rank 0; TorchDynamo cannot trace `warnings.warn` and would break each layer's graph
    at both row-parallel matmuls (attention output and MLP down projection), losing the fusion across
    them. Inside compiled code, for the rest of the process, a warning is dropped instead (eager code
    still warns)."""
    global _warnings_substituted
    if _warnings_substituted:
        return

    def _ignored(*args, **kwargs) -> None:
        return None

    torch.compiler.substitute_in_graph(warnings.warn, skip_signature_check=True)(_ignored)
    _warnings_substituted = True


def compile_layers(gpt: GPTModel) -> None:
    """Each dense decoder layer's forward through torch.compile, assigned to the instance so that module
    hooks and megatron-core's own layer call (CUDA-graph dispatch, activation recompute) stay eager around
    it. MoE layers stay eager: their token dispatch has data-dependent shapes (tokens per expert), which
    would recompile or break the graph at every micro-batch."""
    _drop_warnings_inside_compiled_code()
    for layer in gpt.decoder.layers:
        if not getattr(layer, "is_moe_layer", False):
            layer.forward = torch.compile(layer.forward)
