"""The embedded engine's LoRA routes (/load_lora_adapter, /load_lora_adapter_from_tensors, /unload_lora_adapter,
lora_path on /generate) and the adapter-only transports, each against a model merged by hand and saved."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rl_sglang.errors import EngineError
from rl_sglang.tensor_handoff import flattened_bucket, serialize_entry
from rl_sglang.weight_sync import DiskWeightTransport, TensorWeightTransport
from rl_sglang.weight_sync.adapter import write_adapter_folder

PROMPT = [5, 9, 14, 3]
TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def random_adapter(model_dir: Path, seed: int) -> list[tuple[str, torch.Tensor]]:
    """A rank-4 adapter under PEFT's names with A and B both random (peft starts B at zero)."""
    weights = load_file(str(model_dir / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for layer in range(2):
        for target in TARGETS:
            out_features, in_features = weights[f"model.layers.{layer}.{target}.weight"].shape
            prefix = f"base_model.model.model.layers.{layer}.{target}"
            tensors.append((f"{prefix}.lora_A.weight", torch.randn(4, in_features, generator=generator) * 0.3))
            tensors.append((f"{prefix}.lora_B.weight", torch.randn(out_features, 4, generator=generator) * 0.3))
    return tensors


def merged_by_hand(model_dir: Path, adapter: list[tuple[str, torch.Tensor]], out: Path) -> Path:
    """The base with W + (alpha / r) * B @ A in float64, saved: what the engine must serve."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state, factors = model.state_dict(), dict(adapter)
    for name in list(state):
        a = factors.get(f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight")
        if a is not None:
            b = factors[f"base_model.model.{name.removesuffix('.weight')}.lora_B.weight"]
            state[name] = (state[name].double() + 2.0 * b.double() @ a.double()).float()
    model.load_state_dict(state)
    model.save_pretrained(out)
    return out


def payload(lora_path: str | None = None) -> dict:
    body = {"input_ids": PROMPT, "sampling_params": {"temperature": 1.0, "max_new_tokens": 6, "ignore_eos": True},
            "return_logprob": True}
    return body if lora_path is None else {**body, "lora_path": lora_path}


async def assert_serves(client, model_dir: Path, ref, lora_path: str | None = None, tolerance: float = 1e-4) -> None:
    answer = await asyncio.wait_for(client.generate(payload(lora_path)), 60)
    got = [entry[0] for entry in answer["meta_info"]["output_token_logprobs"]]
    assert got == pytest.approx(ref.teacher_forced_logprobs(model_dir, PROMPT, answer["output_ids"]), abs=tolerance)


async def refused(call) -> str:
    with pytest.raises(EngineError) as caught:
        await asyncio.wait_for(call, 60)
    assert caught.value.status == 400
    return str(caught.value)


async def test_an_adapter_from_tensors_is_served_under_its_name_as_the_merged_model_and_unloading_it_serves_the_base(
    client, model_dir, other_weights_dir, ref, tmp_path
):
    adapter = random_adapter(model_dir, seed=3)
    merged = merged_by_hand(model_dir, adapter, tmp_path / "merged")
    entry = serialize_entry(flattened_bucket(adapter))
    answer = await client.load_lora_adapter_from_tensors("policy", CONFIG, [entry], load_format="flattened_bucket")
    assert answer["loaded_adapters"] == {"policy": "<tensors>"}
    await assert_serves(client, merged, ref, lora_path="policy")
    # What it cannot serve beside the loaded adapter is refused, never answered with the wrong weights.
    assert "name it in lora_path" in await refused(client.generate(payload()))
    assert "'other' is not loaded" in await refused(client.generate(payload("other")))
    again = serialize_entry(flattened_bucket(adapter))  # a CPU handle opens once
    assert "already loaded" in await refused(
        client.load_lora_adapter_from_tensors("policy", CONFIG, [again], load_format="flattened_bucket"))
    # A full weight update beneath the adapter replaces the base; the adapter stays on top of it.
    await client.update_weights_from_disk(str(other_weights_dir), weight_version="v2")
    await assert_serves(client, merged_by_hand(other_weights_dir, adapter, tmp_path / "merged2"), ref, lora_path="policy")
    await client.unload_lora_adapter("policy")
    await assert_serves(client, other_weights_dir, ref)
    assert "not loaded" in await refused(client.unload_lora_adapter("policy"))


async def test_load_lora_adapter_reads_a_peft_folder_and_refuses_what_it_cannot_serve(client, model_dir, ref, tmp_path):
    adapter = random_adapter(model_dir, seed=4)
    folder = write_adapter_folder(tmp_path / "adapter", CONFIG, adapter)
    await client.load_lora_adapter("a", str(folder))
    await assert_serves(client, merged_by_hand(model_dir, adapter, tmp_path / "merged"), ref, lora_path="a")
    assert "serves one adapter at a time" in await refused(client.load_lora_adapter("b", str(folder)))
    await client.unload_lora_adapter("a")
    wrong_rank = [(n, t[:2] if ".lora_A." in n else t) for n, t in adapter]
    embedding = [("base_model.model.model.embed_tokens.lora_embedding_A", torch.zeros(4, 64))]
    wide = [(n, torch.zeros(t.shape[0], t.shape[1] + 1) if ".lora_A." in n else t) for n, t in adapter]
    for config, tensors, message in (
        ({**CONFIG, "use_dora": True}, adapter, "DoRA"),
        ({**CONFIG, "modules_to_save": ["lm_head"]}, adapter, "modules_to_save"),
        (CONFIG, wrong_rank, "do not have rank r=4"),
        (CONFIG, embedding, "not a LoRA A/B weight"),
        (CONFIG, wide, "is \\[32, 33\\], the model's weight is \\[32, 32\\]"),
    ):
        entry = serialize_entry(flattened_bucket(tensors))
        with pytest.raises(EngineError, match=message):
            await client.load_lora_adapter_from_tensors("c", config, [entry], load_format="flattened_bucket")
    await assert_serves(client, model_dir, ref)  # nothing half-loaded
    # An adapter on other layers than the one before: the old layers' hooks are gone, the new ones serve it.
    q_only = [(n, t) for n, t in random_adapter(model_dir, seed=5) if ".q_proj." in n]
    await client.load_lora_adapter("q", str(write_adapter_folder(tmp_path / "q", {**CONFIG, "target_modules": ["q_proj"]}, q_only)))
    await assert_serves(client, merged_by_hand(model_dir, q_only, tmp_path / "merged_q"), ref, lora_path="q")


@pytest.mark.parametrize("transport_kind", ["disk", "tensor"])
async def test_adapter_only_transports_replace_the_served_adapter_and_stamp_the_version(
    engine, client, model_dir, ref, tmp_path, transport_kind
):
    make = {"disk": lambda: DiskWeightTransport([engine.url], tmp_path / "sync"),
            "tensor": lambda: TensorWeightTransport([engine.url])}[transport_kind]
    transport = make()
    try:
        for step in (1, 2):  # the second replaces the first (SGLang refuses a name loaded twice)
            adapter = random_adapter(model_dir, seed=10 + step)
            await asyncio.to_thread(transport.update_adapter, "policy", CONFIG, adapter, f"v{step}")
            await assert_serves(client, merged_by_hand(model_dir, adapter, tmp_path / f"m{step}"), ref, lora_path="policy")
            answer = await client.generate(payload("policy"))
            assert answer["meta_info"]["weight_version"] == f"v{step}"
    finally:
        await asyncio.to_thread(transport.close)
    if transport_kind == "disk":
        (folder,) = (tmp_path / "sync").iterdir()  # older versions removed
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        assert json.loads((folder / "adapter_config.json").read_text()) == CONFIG


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
async def test_on_cuda_decode_graphs_replay_each_adapter_loaded_and_the_base_after_unloading(model_dir, ref, tmp_path):
    """The first adapter hooks the model and the decode graphs are captured again; the next one, of the same
    shapes, is copied into the captured buffers; unloading zeroes them."""
    from rl_sglang.client import SGLangClient
    from rl_sglang.embedded import EmbeddedEngine

    engine = EmbeddedEngine(str(model_dir), device="cuda", dtype="float32", seed=0)
    await asyncio.wait_for(engine.start(), 120)
    client = SGLangClient(engine.url, timeout_s=60)
    try:
        assert engine.runner.graphs is not None
        for seed in (21, 22):
            adapter = random_adapter(model_dir, seed)
            await client.load_lora_adapter("policy", str(write_adapter_folder(tmp_path / f"a{seed}", CONFIG, adapter)))
            assert engine.runner.graphs is not None
            merged = merged_by_hand(model_dir, adapter, tmp_path / f"m{seed}")
            await assert_serves(client, merged, ref, lora_path="policy", tolerance=1e-3)  # the other GPU tests' tolerance
            await client.unload_lora_adapter("policy")
        await assert_serves(client, model_dir, ref, tolerance=1e-3)
    finally:
        await client.close()
        await asyncio.wait_for(engine.stop(), 60)
