"""Merge and split Megatron-Core tensor-parallel shards, for gathering a full model to sync to engines.

How a tensor is partitioned follows from its name (Megatron-Core GPTModel, local layer spec):
column-parallel layers (`linear_qkv`, `linear_fc1`, the vocab-parallel embedding and `output_layer`)
split dim 0, row-parallel ones (`linear_proj`, `linear_fc2`) split dim 1, and layernorms and
row-parallel biases are replicated. An MoE layer's experts split the same way (over the expert-TP group),
and its router is replicated. `linear_fc1` is the exception to plain concatenation: every
shard holds [gate shard; up shard], so the full [gate; up] is rebuilt halves first.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

__all__ = ["Partition", "partition_of", "merge_tp_shards", "split_tp"]


class Partition(Enum):
    COLUMN = "column"  # concatenated along dim 0
    GATED_COLUMN = "gated_column"  # dim 0, each shard [gate_i; up_i]
    ROW = "row"  # concatenated along dim 1
    REPLICATED = "replicated"  # identical on every rank


_COLUMN_SUFFIXES = (
    "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias",
    "embedding.word_embeddings.weight",
    "output_layer.weight",
)
_ROW_SUFFIXES = ("self_attention.linear_proj.weight", ".linear_fc2.weight")
_REPLICATED_SUFFIXES = (
    "layernorm.weight",
    "layernorm.bias",
    "self_attention.linear_proj.bias",
    "mlp.linear_fc2.bias",
    "mlp.router.weight",
)


def partition_of(name: str) -> Partition:
    """How Megatron-Core partitions the tensor called `name` across tensor-parallel ranks."""
    if name.endswith((".linear_fc1.weight", ".linear_fc1.bias")):
        return Partition.GATED_COLUMN
    if name.endswith(_COLUMN_SUFFIXES):
        return Partition.COLUMN
    if name.endswith(_ROW_SUFFIXES):
        return Partition.ROW
    if name.endswith(_REPLICATED_SUFFIXES):
        return Partition.REPLICATED
    raise ValueError(f"tensor {name!r}: unknown tensor-parallel partitioning for this name")


def _shapes(tensors: list[Tensor]) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tensors]


def merge_tp_shards(name: str, shards: list[Tensor]) -> Tensor:
    """Rebuild the full tensor `name` from its shards, ordered by tensor-parallel rank."""
    if not shards:
        raise ValueError(f"tensor {name!r}: no shards to merge")
    if len({tuple(s.shape) for s in shards}) != 1:
        raise ValueError(f"tensor {name!r}: shards differ in shape {_shapes(shards)}")
    partition = partition_of(name)
    if partition is Partition.REPLICATED or len(shards) == 1:
        return shards[0]
    if partition is Partition.ROW:
        if shards[0].ndim != 2:
            raise ValueError(f"tensor {name!r}: row-parallel shards must be 2-D, got {_shapes(shards)}")
        return torch.cat(shards, dim=1)
    if partition is Partition.GATED_COLUMN:
        if shards[0].shape[0] % 2:
            raise ValueError(f"tensor {name!r}: shard rows {shards[0].shape[0]} do not split into gate and up halves")
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)


def split_tp(name: str, tensor: Tensor, tp_size: int) -> list[Tensor]:
    """Cut the full tensor `name` into the `tp_size` shards that each tensor-parallel rank holds."""
    if tp_size < 1:
        raise ValueError(f"tensor {name!r}: tp_size must be >= 1, got {tp_size}")
    partition = partition_of(name)
    if partition is Partition.REPLICATED:
        return [tensor] * tp_size
    dim = 1 if partition is Partition.ROW else 0
    if tensor.ndim <= dim:
        raise ValueError(f"tensor {name!r} of shape {tuple(tensor.shape)} has no dim {dim} to split")
    parts = 2 * tp_size if partition is Partition.GATED_COLUMN else tp_size
    if tensor.shape[dim] % parts:
        raise ValueError(
            f"tensor {name!r} of shape {tuple(tensor.shape)}: dim {dim} does not split into {parts} equal parts"
        )
    if partition is Partition.GATED_COLUMN:
        gate, up = tensor.chunk(2, dim=0)
        return [torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp_size), up.chunk(tp_size))]
    return list(tensor.chunk(tp_size, dim=dim))
