import pytest
import torch

from rl_megatron import Partition, merge_tp_shards, partition_of, split_tp

# Full (TP-merged) tensors of a model with hidden 8, 4 q heads / 2 kv groups of head_dim 2, ffn 6, vocab 10.
FULL_SHAPES = {
    "embedding.word_embeddings.weight": (10, 8),
    "decoder.layers.0.self_attention.linear_qkv.weight": (16, 8),
    "decoder.layers.0.self_attention.linear_qkv.bias": (16,),
    "decoder.layers.0.self_attention.linear_proj.weight": (8, 8),
    "decoder.layers.0.input_layernorm.weight": (8,),
    "decoder.layers.0.pre_mlp_layernorm.weight": (8,),
    "decoder.layers.0.mlp.linear_fc1.weight": (12, 8),
    "decoder.layers.0.mlp.linear_fc2.weight": (8, 6),
    "decoder.final_layernorm.weight": (8,),
    "output_layer.weight": (10, 8),
}
SHARD_SHAPES_TP2 = {
    "embedding.word_embeddings.weight": (5, 8),
    "decoder.layers.0.self_attention.linear_qkv.weight": (8, 8),
    "decoder.layers.0.self_attention.linear_qkv.bias": (8,),
    "decoder.layers.0.self_attention.linear_proj.weight": (8, 4),
    "decoder.layers.0.input_layernorm.weight": (8,),
    "decoder.layers.0.pre_mlp_layernorm.weight": (8,),
    "decoder.layers.0.mlp.linear_fc1.weight": (6, 8),
    "decoder.layers.0.mlp.linear_fc2.weight": (8, 3),
    "decoder.final_layernorm.weight": (8,),
    "output_layer.weight": (5, 8),
}


@pytest.mark.parametrize("name", sorted(FULL_SHAPES))
@pytest.mark.parametrize("tp_size", [1, 2])
def test_merge_undoes_split(name, tp_size):
    full = torch.randn(FULL_SHAPES[name])
    assert torch.equal(merge_tp_shards(name, split_tp(name, full, tp_size)), full)


@pytest.mark.parametrize("name", sorted(FULL_SHAPES))
def test_tp2_shards_have_megatron_per_rank_shapes(name):
    shards = split_tp(name, torch.randn(FULL_SHAPES[name]), 2)
    assert [tuple(s.shape) for s in shards] == [SHARD_SHAPES_TP2[name]] * 2


def test_fc1_shards_each_hold_their_slice_of_gate_then_up():
    gate = torch.arange(0, 4).float().unsqueeze(1)
    up = torch.arange(100, 104).float().unsqueeze(1)
    shards = split_tp("decoder.layers.3.mlp.linear_fc1.weight", torch.cat([gate, up]), 2)
    assert [s.flatten().tolist() for s in shards] == [[0, 1, 100, 101], [2, 3, 102, 103]]


def test_row_parallel_shards_split_the_input_dimension():
    full = torch.arange(12).float().reshape(2, 6)
    shards = split_tp("decoder.layers.0.self_attention.linear_proj.weight", full, 3)
    assert [s.tolist() for s in shards] == [[[0, 1], [6, 7]], [[2, 3], [8, 9]], [[4, 5], [10, 11]]]


def test_replicated_merge_keeps_the_first_shard():
    a, b = torch.ones(4), torch.ones(4)
    assert merge_tp_shards("decoder.layers.0.input_layernorm.weight", [a, b]) is a


def test_partition_of_each_kind():
    assert partition_of("decoder.layers.0.mlp.linear_fc1.weight") is Partition.GATED_COLUMN
    assert partition_of("decoder.layers.0.self_attention.linear_qkv.bias") is Partition.COLUMN
    assert partition_of("decoder.layers.0.mlp.linear_fc2.weight") is Partition.ROW
    assert partition_of("decoder.final_layernorm.weight") is Partition.REPLICATED


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="'decoder.layers.0.mlp.shared_experts.gate_weight': unknown tensor-parallel partitioning"):
        split_tp("decoder.layers.0.mlp.shared_experts.gate_weight", torch.zeros(2, 2), 2)


def test_uneven_split_error_names_tensor_and_shape():
    with pytest.raises(ValueError, match=r"'output_layer.weight' of shape \(9, 8\): dim 0 does not split into 2"):
        split_tp("output_layer.weight", torch.zeros(9, 8), 2)


def test_mismatched_shards_error_names_tensor_and_shapes():
    name = "decoder.layers.0.mlp.linear_fc2.weight"
    with pytest.raises(ValueError, match=rf"'{name}': shards differ in shape \[\(8, 3\), \(8, 4\)\]"):
        merge_tp_shards(name, [torch.zeros(8, 3), torch.zeros(8, 4)])


def test_an_experts_fc1_splits_gate_and_up_halves_and_the_router_is_replicated():
    name = "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"
    gate, up = torch.arange(8.0).reshape(4, 2), 100 + torch.arange(8.0).reshape(4, 2)
    shards = split_tp(name, torch.cat([gate, up]), 2)
    assert torch.equal(shards[1], torch.cat([gate[2:], up[2:]]))
    assert torch.equal(merge_tp_shards(name, shards), torch.cat([gate, up]))
    router = torch.ones(4, 2)
    assert all(s is router for s in split_tp("decoder.layers.0.mlp.router.weight", router, 2))
