"""Full tensors out of the TP shards, expert-parallel ranks and PP stages, one at a time, in one order every
rank follows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from rl_megatron.gpt_model import stage_layers
from rl_megatron.tensor_parallel import merge_tp_shards
from rl_megatron.transformer_shape import TransformerShape
from rl_megatron.weight_mapping import megatron_layer_suffixes

_EXPERTS = "mlp.experts.local_experts."


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
    expert_owner: int | None = None
    """For an expert's tensor: the expert-parallel rank that holds it (its shards split over expert-TP)."""


def _layer_item(shape: TransformerShape, ep_size: int, stage: int, layer: int, local: int, suffix: str) -> ExportedTensor:
    name, local_name = f"decoder.layers.{layer}.{suffix}", f"decoder.layers.{local}.{suffix}"
    if not suffix.startswith(_EXPERTS):
        return ExportedTensor(name, stage, local_name)
    expert, rest = suffix.removeprefix(_EXPERTS).split(".", 1)
    per_rank = shape.num_experts // ep_size
    owner, local_expert = divmod(int(expert), per_rank)
    return ExportedTensor(name, stage, f"decoder.layers.{local}.{_EXPERTS}{local_expert}.{rest}", expert_owner=owner)


def export_plan(shape: TransformerShape, pp_size: int, value_head: bool = False, ep_size: int = 1) -> list[ExportedTensor]:
    """Every Megatron tensor of the model (a tied model's output layer is the embedding, listed once; a
    critic's value head as `value_head.weight`/`.bias`; experts numbered globally)."""
    plan = [ExportedTensor("embedding.word_embeddings.weight", 0, "embedding.word_embeddings.weight")]
    for stage in range(pp_size):
        for local, layer in enumerate(stage_layers(shape, pp_size, stage)):
            plan += [_layer_item(shape, ep_size, stage, layer, local, suffix) for suffix in megatron_layer_suffixes(shape, layer)]
    last = pp_size - 1
    plan.append(ExportedTensor("decoder.final_layernorm.weight", last, "decoder.final_layernorm.weight"))
    if value_head:
        plan += [ExportedTensor(f"value_head.{p}", last, f"output_layer.{p}", replicated=True) for p in ("weight", "bias")]
    elif not shape.tie_word_embeddings:
        plan.append(ExportedTensor("output_layer.weight", last, "output_layer.weight"))
    return plan


def gather_full(model: nn.Module, item: ExportedTensor, pp_rank: int, device: torch.device) -> torch.Tensor:
    """The full tensor `item` on every rank (collective): all-gathered over TP (an expert's over expert-TP on
    the expert-parallel rank that holds it, then broadcast over expert parallelism) on its stage, then
    broadcast over the pipeline."""
    full = None
    if pp_rank == item.stage:
        full = _stage_full(model, item, device)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        assert full is not None
        return full
    return _broadcast(full, item.stage, parallel_state.get_pipeline_model_parallel_group(), device)


def _stage_full(model: nn.Module, item: ExportedTensor, device: torch.device) -> torch.Tensor:
    expert = item.expert_owner is not None
    if expert and parallel_state.get_expert_model_parallel_rank() != item.expert_owner:
        shard = None
    else:
        shard = model.get_parameter(item.local_name).detach()
        if expert:
            tp_size, group = parallel_state.get_expert_tensor_parallel_world_size(), parallel_state.get_expert_tensor_parallel_group()
        else:
            tp_size, group = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_group()
        if tp_size > 1 and not item.replicated:
            shards = [torch.empty_like(shard) for _ in range(tp_size)]
            dist.all_gather(shards, shard.contiguous(), group=group)
            shard = merge_tp_shards(item.name, shards)
    if not expert or parallel_state.get_expert_model_parallel_world_size() == 1:
        assert shard is not None
        return shard
    assert item.expert_owner is not None, "an expert tensor names the expert-parallel rank that owns it"
    return _broadcast(shard, item.expert_owner, parallel_state.get_expert_model_parallel_group(), device)


def _broadcast(tensor: torch.Tensor | None, src_index: int, group, device: torch.device) -> torch.Tensor:
    """`tensor` from group member `src_index` on every member (the others pass None)."""
    src = dist.get_global_rank(group, src_index)
    meta = [(tuple(tensor.shape), tensor.dtype) if tensor is not None else None]
    dist.broadcast_object_list(meta, src=src, group=group)
    if tensor is not None:
        out = tensor.contiguous()
    else:
        shape_dtype = meta[0]
        assert shape_dtype is not None, "broadcast_object_list gave every member the source's shape and dtype"
        out = torch.empty(shape_dtype[0], dtype=shape_dtype[1], device=device)
    dist.broadcast(out, src=src, group=group)
    return out
