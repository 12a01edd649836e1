"""HF <-> Megatron-Core weight mapping and tensor-parallel merge/split for Llama/Qwen2-family models."""

from rl_megatron.tensor_parallel import Partition, merge_tp_shards, partition_of, split_tp
from rl_megatron.transformer_shape import TransformerShape
from rl_megatron.weight_mapping import fuse_qkv, hf_to_megatron, megatron_to_hf, unfuse_qkv

__all__ = [
    "Partition",
    "TransformerShape",
    "fuse_qkv",
    "hf_to_megatron",
    "megatron_to_hf",
    "merge_tp_shards",
    "partition_of",
    "split_tp",
    "unfuse_qkv",
]
