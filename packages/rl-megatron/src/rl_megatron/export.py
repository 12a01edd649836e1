"""Full tensors out of the TP shards and PP stages, one at a time, in one order every rank follows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from rl_megatron.gpt_model import stage_layers
from rl_megatron.tensor_parallel import merge_tp_shards
from rl_megatron.transformer_shape import TransformerShape

_LAYER_SUFFIXES = (
    "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias",
    "self_attention.q_layernorm.weight",
    "self_attention.k_layernorm.weight",
    "self_attention.linear_proj.weight",
    "input_layernorm.weight",
    "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
)


@dataclass(frozen=True)
class ExportedTensor:
    name: str
    """Megatron name with the global layer number."""
    stage: int
    """The pipeline stage that holds it."""
    local_name: str
    """Its name in that stage's GPTModel."""
    replicated: bool = False
    """The same on every TP rank (no gathering)."""


def export_plan(shape: TransformerShape, pp_size: int, value_head: bool = False) -> list[ExportedTensor]:
    """Every Megatron tensor of the model (a tied model's output layer is the embedding, listed once; a
    critic's value head as `value_head.weight`/`.bias`)."""
    plan = [ExportedTensor("embedding.word_embeddings.weight", 0, "embedding.word_embeddings.weight")]
    for stage in range(pp_size):
        for local, layer in enumerate(stage_layers(shape, pp_size, stage)):
            for suffix in _LAYER_SUFFIXES:
                if suffix.endswith("qkv.bias") and not shape.qkv_bias:
                    continue
                if suffix.startswith(("self_attention.q_layernorm", "self_attention.k_layernorm")) and not shape.qk_norm:
                    continue
                plan.append(ExportedTensor(f"decoder.layers.{layer}.{suffix}", stage, f"decoder.layers.{local}.{suffix}"))
    last = pp_size - 1
    plan.append(ExportedTensor("decoder.final_layernorm.weight", last, "decoder.final_layernorm.weight"))
    if value_head:
        plan += [ExportedTensor(f"value_head.{p}", last, f"output_layer.{p}", replicated=True) for p in ("weight", "bias")]
    elif not shape.tie_word_embeddings:
        plan.append(ExportedTensor("output_layer.weight", last, "output_layer.weight"))
    return plan


def gather_full(model: nn.Module, item: ExportedTensor, pp_rank: int, device: torch.device) -> torch.Tensor:
    """The full tensor `item` on every rank (collective): all-gathered over TP on its stage, then broadcast
    over the pipeline."""
    full = None
    if pp_rank == item.stage:
        shard = model.get_parameter(item.local_name).detach()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        if tp_size > 1 and not item.replicated:
            shards = [torch.empty_like(shard) for _ in range(tp_size)]
            dist.all_gather(shards, shard.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            full = merge_tp_shards(item.name, shards)
        else:
            full = shard
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        assert full is not None
        return full
    group = parallel_state.get_pipeline_model_parallel_group()
    src = dist.get_global_rank(group, item.stage)
    meta = [(tuple(full.shape), full.dtype) if full is not None else None]
    dist.broadcast_object_list(meta, src=src, group=group)
    if full is None:
        full = torch.empty(meta[0][0], dtype=meta[0][1], device=device)
    else:
        full = full.contiguous()
    dist.broadcast(full, src=src, group=group)
    return full
