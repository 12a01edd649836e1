"""megatron-core training backend (`build_backend`) and the HF <-> Megatron-Core weight mapping for
Llama/Qwen2/Qwen3-family models."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rl_megatron.config import MegatronConfig
from rl_megatron.hf_config import check_config, read_hf_config
from rl_megatron.tensor_parallel import Partition, merge_tp_shards, partition_of, split_tp
from rl_megatron.transformer_shape import TransformerShape
from rl_megatron.weight_mapping import fuse_qkv, hf_to_megatron, megatron_to_hf, unfuse_qkv

if TYPE_CHECKING:
    from rl_megatron.backend import MegatronBackend


def build_backend(config: MegatronConfig) -> MegatronBackend:
    """The `MegatronBackend` of `config` (rl_core.protocols.TrainingBackend); imports megatron-core's
    training stack only when called."""
    from rl_megatron.backend import MegatronBackend

    return MegatronBackend(config)


__all__ = [
    "MegatronConfig",
    "Partition",
    "TransformerShape",
    "build_backend",
    "check_config",
    "fuse_qkv",
    "hf_to_megatron",
    "megatron_to_hf",
    "merge_tp_shards",
    "partition_of",
    "read_hf_config",
    "split_tp",
    "unfuse_qkv",
]
