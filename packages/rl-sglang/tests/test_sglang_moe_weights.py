"""MoE weight updates under checkpoint names: one tensor per expert matrix (what the Megatron backend and
`save_pretrained` write) lands in its slice of the served model's stacked `gate_up_proj` / `down_proj`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, MixtralConfig, PretrainedConfig, Qwen3MoeConfig

from rl_sglang.client import SGLangClient
from rl_sglang.embedded import EmbeddedEngine
from rl_sglang.errors import EngineError
from rl_sglang.weight_sync import BroadcastWeightTransport, TensorWeightTransport

PROMPT = [5, 9, 14, 3, 22]
NEW_TOKENS = 8
PAYLOAD = {
    "input_ids": PROMPT,
    "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True},
    "return_logprob": True,
}
EXPERTS, INNER, HIDDEN = 4, 16, 32
COMMON = dict(
    vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    num_experts_per_tok=2, max_position_embeddings=128, initializer_range=0.5, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1, pad_token_id=0,
)


def qwen3_moe() -> PretrainedConfig:
    return Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=64, moe_intermediate_size=INNER, num_experts=EXPERTS)


def mixtral() -> PretrainedConfig:
    return MixtralConfig(**COMMON, intermediate_size=INNER, num_local_experts=EXPERTS)


def make_model(config: PretrainedConfig, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def per_expert_tensors(model: torch.nn.Module, expert_block: str, parts: tuple[str, str, str]) -> list[tuple[str, torch.Tensor]]:
    """`model`'s weights in checkpoint form, split here by hand: each stacked [E, 2I, H] gate_up_proj into
    E gate and E up matrices (first and second halves of the rows), each [E, H, I] down_proj into E matrices;
    `expert_block` renames the MoE block (Mixtral checkpoints call `mlp` `block_sparse_moe`)."""
    out = []
    for name, tensor in model.state_dict().items():
        layer, _, leaf = name.rpartition(".mlp.")
        if not layer:
            out.append((name, tensor))
            continue
        base = f"{layer}.{expert_block}."
        if leaf == "experts.gate_up_proj":
            for e in range(tensor.shape[0]):
                out.append((f"{base}experts.{e}.{parts[0]}.weight", tensor[e, :INNER].clone()))
                out.append((f"{base}experts.{e}.{parts[1]}.weight", tensor[e, INNER:].clone()))
        elif leaf == "experts.down_proj":
            out.extend((f"{base}experts.{e}.{parts[2]}.weight", tensor[e].clone()) for e in range(tensor.shape[0]))
        else:
            out.append((base + leaf, tensor))
    return out


ARCHS = {
    "qwen3_moe": (qwen3_moe, "mlp", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": (mixtral, "block_sparse_moe", ("w1", "w3", "w2")),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request, tmp_path_factory: pytest.TempPathFactory):
    """(config, the served model's folder, the second model's folder: save_pretrained's checkpoint names)."""
    make_config = ARCHS[request.param][0]
    served, other = tmp_path_factory.mktemp(f"{request.param}-0"), tmp_path_factory.mktemp(f"{request.param}-1")
    make_model(make_config(), seed=0).save_pretrained(served)
    make_model(make_config(), seed=1).save_pretrained(other)
    return request.param, served, other


@pytest.fixture
async def served(arch, ref) -> AsyncIterator[tuple[EmbeddedEngine, SGLangClient]]:
    async with ref.serving(arch[1], max_running_requests=4) as pair:
        yield pair


async def _assert_serves(client: SGLangClient, model_dir: Path, ref) -> list[float]:
    """Greedy tokens and their log-probs are those of a plain HF forward of the model saved at `model_dir`."""
    answer = await asyncio.wait_for(client.generate(PAYLOAD), 60)
    assert answer["output_ids"] == ref.greedy(model_dir, PROMPT, NEW_TOKENS)
    logprobs = [entry[0] for entry in answer["meta_info"]["output_token_logprobs"]]
    assert logprobs == pytest.approx(ref.teacher_forced_logprobs(model_dir, PROMPT, answer["output_ids"]), abs=1e-4)
    return logprobs


def test_save_pretrained_writes_one_tensor_per_expert_matrix(arch):
    from safetensors import safe_open

    name, _, other = arch
    block, parts = ARCHS[name][1], ARCHS[name][2]
    with safe_open(str(next(other.glob("*.safetensors"))), framework="pt") as handle:
        keys = set(handle.keys())
    assert {f"model.layers.0.{block}.experts.{e}.{p}.weight" for e in range(EXPERTS) for p in parts} <= keys
    assert not any(k.endswith("gate_up_proj") for k in keys)  # the disk test below really sends checkpoint names


async def test_update_from_disk_with_checkpoint_names_serves_the_saved_moe_model(arch, served, ref):
    _, model_dir, other = arch
    engine, client = served
    before = await _assert_serves(client, model_dir, ref)
    answer = await asyncio.wait_for(client.update_weights_from_disk(str(other), weight_version="d1"), 60)
    assert answer["success"] is True
    assert await _assert_serves(client, other, ref) != pytest.approx(before, abs=1e-3)  # the two models do differ


@pytest.mark.parametrize(("transport_kind", "names"), [("tensor", "checkpoint"), ("broadcast", "checkpoint"), ("tensor", "in-memory")])
async def test_tensors_from_a_trainer_under_either_naming_serve_the_trainers_moe_model(arch, served, ref, transport_kind, names):
    """Checkpoint names (the Megatron backend's export) and the stacked in-memory names (the FSDP backend's)."""
    name, model_dir, other = arch
    engine, client = served
    make_config, block, parts = ARCHS[name]
    if transport_kind == "tensor":
        transport = TensorWeightTransport([engine.url], bucket_bytes=16 << 10, load_format="flattened_bucket", timeout_s=60)
    else:
        transport = BroadcastWeightTransport([engine.url], backend="gloo", bucket_bytes=16 << 10, timeout_s=60)
    try:
        trained = make_model(make_config(), seed=1)
        tensors = per_expert_tensors(trained, block, parts) if names == "checkpoint" else list(trained.named_parameters())
        await asyncio.wait_for(asyncio.to_thread(transport.update, tensors, "t1"), 120)
        await _assert_serves(client, other, ref)
    finally:
        await asyncio.wait_for(asyncio.to_thread(transport.close), 60)


async def test_an_expert_tensor_of_the_wrong_shape_is_refused_naming_it_and_nothing_is_loaded(arch, served, ref, tmp_path):
    name, model_dir, _ = arch
    engine, client = served
    block, parts = ARCHS[name][1], ARCHS[name][2]
    good = f"model.layers.0.{block}.experts.0.{parts[0]}.weight"
    bad = f"model.layers.1.{block}.experts.2.{parts[1]}.weight"
    save_file({good: torch.zeros(INNER, HIDDEN), bad: torch.zeros(INNER + 1, HIDDEN)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(EngineError) as caught:
        await asyncio.wait_for(client.update_weights_from_disk(str(tmp_path)), 60)
    message = caught.value.body["message"]
    assert bad in message and f"[{INNER + 1}, {HIDDEN}]" in message and "model.layers.1.mlp.experts.gate_up_proj" in message
    await _assert_serves(client, model_dir, ref)  # the good tensor before it was not applied either


async def test_an_expert_index_past_the_layers_experts_is_an_unknown_name(arch, served, tmp_path):
    name = arch[0]
    engine, client = served
    block, parts = ARCHS[name][1], ARCHS[name][2]
    missing = f"model.layers.0.{block}.experts.{EXPERTS}.{parts[2]}.weight"
    save_file({missing: torch.zeros(HIDDEN, INNER)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(EngineError, match=f"unknown weight name '{missing}'"):
        await asyncio.wait_for(client.update_weights_from_disk(str(tmp_path)), 60)
