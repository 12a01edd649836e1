import pytest
import torch

from rl_megatron import TransformerShape, fuse_qkv, hf_to_megatron, megatron_to_hf, unfuse_qkv


def _assert_same_state(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_shape_read_from_qwen2_config_has_qkv_bias_gqa_and_untied_head(qwen2_model):
    shape = TransformerShape.from_hf_config(qwen2_model.config)
    assert shape == TransformerShape(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        ffn_hidden_size=96, vocab_size=96, tie_word_embeddings=False, qkv_bias=True,
    )


def test_shape_read_from_llama_config_has_no_bias_and_tied_head(llama_model):
    shape = TransformerShape.from_hf_config(llama_model.config)
    assert (shape.qkv_bias, shape.tie_word_embeddings, shape.num_key_value_heads) == (False, True, 4)


def test_shape_rejects_heads_that_do_not_group_evenly():
    with pytest.raises(ValueError, match="num_attention_heads=6 is not a multiple of num_key_value_heads=4"):
        TransformerShape(
            num_layers=1, hidden_size=96, num_attention_heads=6, num_key_value_heads=4, head_dim=16,
            ffn_hidden_size=8, vocab_size=8,
        )


@pytest.mark.parametrize("model_fixture", ["qwen2_model", "llama_model"])
def test_hf_to_megatron_to_hf_round_trip_is_exact(model_fixture, request):
    model = request.getfixturevalue(model_fixture)
    shape = TransformerShape.from_hf_config(model.config)
    hf_state = model.state_dict()
    expected = {k: v for k, v in hf_state.items() if not (shape.tie_word_embeddings and k == "lm_head.weight")}
    _assert_same_state(megatron_to_hf(hf_to_megatron(hf_state, shape), shape), expected)


def test_megatron_names_and_shapes_for_qwen2(qwen2_model):
    shape = TransformerShape.from_hf_config(qwen2_model.config)
    mcore = hf_to_megatron(qwen2_model.state_dict(), shape)
    layer = "decoder.layers.1."
    # (4 q heads + 2 k + 2 v) * head_dim 16 = 128 rows; fc1 is gate and up stacked: 2 * 96.
    assert mcore[layer + "self_attention.linear_qkv.weight"].shape == (128, 64)
    assert mcore[layer + "self_attention.linear_qkv.bias"].shape == (128,)
    assert mcore[layer + "self_attention.linear_proj.weight"].shape == (64, 64)
    assert mcore[layer + "mlp.linear_fc1.weight"].shape == (192, 64)
    assert mcore[layer + "mlp.linear_fc2.weight"].shape == (64, 96)
    assert {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"} <= set(mcore)
    assert len(mcore) == 3 + 2 * 7


def test_tied_model_maps_to_no_output_layer(llama_model):
    shape = TransformerShape.from_hf_config(llama_model.config)
    mcore = hf_to_megatron(llama_model.state_dict(), shape)
    assert "output_layer.weight" not in mcore
    assert "decoder.layers.0.self_attention.linear_qkv.bias" not in mcore


def test_qkv_rows_interleave_per_query_group():
    # 4 q heads, 2 kv groups, head_dim 1: each row holds its head's label.
    shape = TransformerShape(
        num_layers=1, hidden_size=1, num_attention_heads=4, num_key_value_heads=2, head_dim=1,
        ffn_hidden_size=1, vocab_size=1,
    )
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    k = torch.tensor([[10.0], [11.0]])
    v = torch.tensor([[20.0], [21.0]])
    fused = fuse_qkv(q, k, v, shape)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(unfuse_qkv(fused, shape), (q, k, v)))


def test_vocab_padding_is_added_on_the_way_in_and_dropped_on_the_way_out(qwen2_model):
    shape = TransformerShape.from_hf_config(qwen2_model.config)
    hf_state = qwen2_model.state_dict()
    mcore = hf_to_megatron(hf_state, shape, padded_vocab_size=128)
    assert mcore["embedding.word_embeddings.weight"].shape == (128, 64)
    assert mcore["output_layer.weight"].shape == (128, 64)
    assert not mcore["output_layer.weight"][96:].any()
    back = megatron_to_hf(mcore, shape)
    assert torch.equal(back["lm_head.weight"], hf_state["lm_head.weight"])
    assert torch.equal(back["model.embed_tokens.weight"], hf_state["model.embed_tokens.weight"])


def test_wrong_shape_error_names_the_tensor_and_both_shapes(qwen2_model):
    shape = TransformerShape.from_hf_config(qwen2_model.config)
    hf_state = dict(qwen2_model.state_dict())
    hf_state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    expected = r"'model.layers.1.self_attn.k_proj.weight' has shape \(16, 64\), expected \(32, 64\)"
    with pytest.raises(ValueError, match=expected):
        hf_to_megatron(hf_state, shape)


def test_missing_tensor_error_names_it(llama_model):
    shape = TransformerShape.from_hf_config(llama_model.config)
    mcore = hf_to_megatron(llama_model.state_dict(), shape)
    del mcore["decoder.layers.0.mlp.linear_fc2.weight"]
    with pytest.raises(KeyError, match="decoder.layers.0.mlp.linear_fc2.weight"):
        megatron_to_hf(mcore, shape)


def test_unmapped_tensor_is_reported_rather_than_dropped(qwen2_model):
    shape = TransformerShape.from_hf_config(qwen2_model.config)
    hf_state = dict(qwen2_model.state_dict())
    hf_state["model.layers.2.input_layernorm.weight"] = torch.ones(64)
    with pytest.raises(ValueError, match=r"1 unmapped tensor\(s\): model.layers.2.input_layernorm.weight \(64,\)"):
        hf_to_megatron(hf_state, shape)


def _tiny_qwen3_moe(tmp_path):
    from safetensors.torch import load_file
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1],
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM._from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    model.save_pretrained(tmp_path)
    return model, load_file(tmp_path / "model.safetensors")


def test_moe_checkpoint_round_trips_through_megatron_names_split_over_expert_tp_ranks(tmp_path):
    from rl_megatron import merge_tp_shards, split_tp

    model, checkpoint = _tiny_qwen3_moe(tmp_path)  # one tensor per expert, as the hub and SGLang name them
    shape = TransformerShape.from_hf_config(model.config)
    assert (shape.num_experts, shape.moe_router_topk, shape.moe_layers) == (4, 2, (True, False))
    mcore = hf_to_megatron(checkpoint, shape)
    # Expert 3 of layer 0 against transformers' own in-memory layout (experts stacked, [gate; up] each).
    fused = model.state_dict()
    assert torch.equal(mcore["decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"], fused["model.layers.0.mlp.experts.gate_up_proj"][3])
    assert torch.equal(mcore["decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight"], fused["model.layers.0.mlp.experts.down_proj"][3])
    assert torch.equal(mcore["decoder.layers.0.mlp.router.weight"], fused["model.layers.0.mlp.gate.weight"])
    assert "decoder.layers.1.mlp.linear_fc1.weight" in mcore  # the dense layer
    merged = {name: merge_tp_shards(name, split_tp(name, t, 2)) for name, t in mcore.items()}
    _assert_same_state(megatron_to_hf(merged, shape), checkpoint)
