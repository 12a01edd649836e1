"""`rl-train --lora-*`: the flags reach the policy's backend config, are refused where they cannot apply
before Ray starts, the backend's adapter-only weights make a /load_lora_adapter_from_tensors call
that SGLang's API accepts, and an adapter-only sync makes the embedded engine serve the trainer's policy."""

import asyncio
import random

import pytest
import torch
from safetensors.torch import load_file

from rl_apps.lora_serving import LORA_NAME
from rl_core.losses import PolicyLoss
from rl_core.train_batch import TrainBatch
from rl_fsdp import FSDPBackend, FSDPConfig
from rl_sglang import conformance
from rl_sglang.client import SGLangClient
from rl_sglang.embedded import EmbeddedEngine
from rl_sglang.tensor_handoff import flattened_bucket, load_entry, named_tensors_of, serialize_entry
from rl_sglang.weight_sync import DiskWeightTransport, TensorWeightTransport


def test_lora_flags_reach_the_policy_and_leave_the_critic_in_full(tiny_run_config, tmp_path):
    config = tiny_run_config(tmp_path / "run", advantage_estimator="ppo", lora_rank=4, lora_dropout=0.1,
                             lora_target_modules=["q_proj", "v_proj"], use_kl_loss=True, kl_loss_coef=0.1)
    policy, critic = config.backend_config("policy"), config.backend_config("critic")
    assert (policy.lora_rank, policy.lora_alpha, policy.lora_dropout, policy.lora_target_modules) == (4, 16.0, 0.1, ["q_proj", "v_proj"])
    assert policy.ref_model and policy.uses_lora
    assert not critic.uses_lora and critic.head == "value"


def test_lora_flags_are_refused_before_ray_starts_where_they_cannot_apply(tiny_run_config, tmp_path):
    with pytest.raises(ValueError, match="--lora-rank, --lora-alpha: LoRA is implemented on --train-backend fsdp.*not megatron"):
        tiny_run_config(tmp_path / "run", train_backend="megatron", lora_rank=4, lora_alpha=8)
    with pytest.raises(ValueError, match="lora_adapter_path .*no adapter_config.json"):
        tiny_run_config(tmp_path / "run", lora_adapter_path=tmp_path)
    with pytest.raises(ValueError, match="lora_alpha set but lora_rank is 0"):
        tiny_run_config(tmp_path / "run", lora_alpha=8)


async def test_adapter_only_weights_make_a_load_lora_adapter_from_tensors_call_sglang_accepts(tiny_run_config, tmp_path):
    config = tiny_run_config(tmp_path / "run", lora_rank=4)
    backend = FSDPBackend(config.backend_config("policy"))
    try:
        tensors = [(name, t.cpu().clone()) for name, t in backend.adapter_weights()]
        adapter_config = backend.adapter_config()
    finally:
        backend.close()
    client = SGLangClient("http://127.0.0.1:1")
    calls = []

    async def record(method, route, payload=None):
        calls.append((method, route, payload))
        return {"success": True}

    client._request = record  # the HTTP exchange itself is the client's conformance test's business
    tp_size = 2
    await client.load_lora_adapter_from_tensors(
        "policy", adapter_config, [serialize_entry(flattened_bucket(tensors)) for _ in range(tp_size)],
        load_format="flattened_bucket",
    )
    ((method, route, payload),) = calls
    assert conformance.call_problems(method, route, payload) == []
    assert payload["config_dict"]["peft_type"] == "LORA" and payload["config_dict"]["r"] == 4
    for entry in payload["serialized_named_tensors"]:
        received = named_tensors_of(load_entry(entry), "flattened_bucket")
        assert [name for name, _ in received] == [name for name, _ in tensors]
        assert all(".lora_A.weight" in name or ".lora_B.weight" in name for name, _ in received)
        for (_, got), (_, want) in zip(received, tensors):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.slow
def test_a_lora_run_syncs_only_the_adapter_the_engine_serves_it_save_hf_writes_both_and_a_resume_serves_the_loaded_adapter(
    tiny_run_config, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rl_apps.metrics import read_metrics
    from rl_apps.train import run

    flags = dict(lora_rank=4, lr=5e-2, use_kl_loss=True, kl_loss_coef=0.1, update_weight_transport="disk",
                 use_tensorboard=False, save_reward_curve=False, save=str(tmp_path / "ckpt"))
    config = tiny_run_config(tmp_path / "run", num_rollout=2, save_hf=str(tmp_path / "hf"), **flags)
    rows = read_metrics(run(config))
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:
        # The engine's log-probs equal the trainer's before each update: it serves base + adapter.
        assert row["train/train_rollout_logprob_abs_diff"] < 1e-3
        assert row["train/grad_norm"] > 0
    assert rows[1]["train/kl_loss"] != 0.0  # the policy left the base (the adapters-off reference)
    assert rows[1]["rollout/weight_version_min"] == rows[1]["rollout/weight_version_max"] == 1
    # What the last sync wrote: the adapter alone, in PEFT's format, which peft itself loads.
    (synced,) = (config.output_dir / "weights").iterdir()
    assert sorted(p.name for p in synced.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(config.hf_checkpoint, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").merge_and_unload().state_dict()
    assert merged.keys() == adapted.keys()
    for name, tensor in adapted.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0)
    synced_adapter = load_file(str(synced / "adapter_model.safetensors"))
    saved_adapter = load_file(str(tmp_path / "hf" / "adapter" / "adapter_model.safetensors"))
    assert synced_adapter.keys() == saved_adapter.keys()  # the engines got the trained adapter, nothing else

    # Resumed from the checkpoint (adapters and their Adam state), the fresh engine gets the loaded adapter
    # before rollout 2: its log-probs equal the trainer's again.
    rows = read_metrics(run(tiny_run_config(tmp_path / "run", num_rollout=3, load=str(tmp_path / "ckpt"), **flags)))
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[2]["rollout/weight_version_min"] == rows[2]["rollout/weight_version_max"] == 2
    assert rows[2]["train/train_rollout_logprob_abs_diff"] < 1e-3 and rows[2]["train/kl_loss"] != 0.0


def trained_lora_backend(model_dir, **config) -> FSDPBackend:
    """A rank-4 all-linear LoRA policy (unless `config` says otherwise) two Adam steps away from its base
    (B no longer zero)."""
    backend = FSDPBackend(FSDPConfig(model_path=model_dir, **{"lora_rank": 4, "lr": 5e-2, **config}))
    rng = random.Random(0)
    tokens = [[rng.randrange(3, 40) for _ in range(8)] for _ in range(4)]
    batch = TrainBatch(tokens=tokens, response_lengths=[4] * 4, loss_masks=[[1] * 4] * 4,
                       advantages=[[a] * 4 for a in (1.0, -1.0, 1.0, -1.0)])
    for _ in range(2):
        backend.train_step(batch, PolicyLoss())
    return backend


def base_log_probs(model_dir, tokens: list[int], n: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, -n - 1 : -1]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens[-n:])[:, None])[:, 0]


@pytest.mark.parametrize("transport_kind", ["disk", "tensor"])
async def test_an_adapter_only_sync_makes_the_engine_serve_the_trainers_policy_and_sends_only_the_adapter(
    tiny_task, tmp_path, monkeypatch, transport_kind
):
    import rl_sglang.weight_sync.tensor as tensor_module

    model_dir = tiny_task / "model"
    backend = trained_lora_backend(model_dir)
    engine = EmbeddedEngine(str(model_dir), device="cpu", dtype="float32", max_running_requests=8)
    await asyncio.wait_for(engine.start(), 60)
    routes, handed = [], []
    request, flatten = SGLangClient._request, tensor_module.flattened_bucket

    async def recorded(self, method, route, payload=None):
        routes.append(route)
        return await request(self, method, route, payload)

    monkeypatch.setattr(SGLangClient, "_request", recorded)
    monkeypatch.setattr(tensor_module, "flattened_bucket", lambda tensors: handed.extend(tensors) or flatten(tensors))
    client = SGLangClient(engine.url)
    prompts = [[5, 9, 14, 3], [7, 7, 20], [11, 4, 30, 2, 6]]
    sampling = {"temperature": 1.0, "max_new_tokens": 5, "ignore_eos": True}
    transport = (DiskWeightTransport([engine.url], tmp_path / "sync") if transport_kind == "disk"
                 else TensorWeightTransport([engine.url]))
    try:
        adapter = {name: t.clone() for name, t in backend.adapter_weights()}
        await asyncio.to_thread(transport.update_adapter, LORA_NAME, backend.adapter_config(), adapter.items(), "1")
        served = [await client.generate({"input_ids": p, "sampling_params": sampling, "return_logprob": True,
                                         "lora_path": LORA_NAME}) for p in prompts]
    finally:
        await asyncio.to_thread(transport.close)
        await client.close()
        await asyncio.wait_for(engine.stop(), 60)
    batch = TrainBatch(tokens=[p + a["output_ids"] for p, a in zip(prompts, served)], response_lengths=[5] * 3,
                       loss_masks=[[1] * 5] * 3, advantages=[[0.0] * 5] * 3)
    try:
        trainer = backend.forward(batch)
    finally:
        backend.close()
    to_trainer, to_base = 0.0, 0.0
    for answer, tokens, want in zip(served, batch.tokens, trainer):
        got = torch.tensor([entry[0] for entry in answer["meta_info"]["output_token_logprobs"]])
        to_trainer = max(to_trainer, float((got - want).abs().max()))
        to_base = max(to_base, float((got - base_log_probs(model_dir, tokens, 5)).abs().max()))
        assert answer["meta_info"]["weight_version"] == "1"
    assert to_trainer < 1e-3  # the full fine-tuning runs' tolerance (train_rollout_logprob_abs_diff)
    assert to_base > 0.05  # and the adapter changed what the engine serves

    assert not any(route.startswith("/update_weights") for route in routes)  # no full weights travelled
    if transport_kind == "disk":
        assert "/load_lora_adapter" in routes
        (folder,) = (tmp_path / "sync").iterdir()
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        sent = load_file(str(folder / "adapter_model.safetensors"))
    else:
        assert "/load_lora_adapter_from_tensors" in routes
        sent = dict(handed)
    assert sent.keys() == adapter.keys()  # lora_A / lora_B tensors only, each once
    for name, tensor in adapter.items():
        torch.testing.assert_close(sent[name], tensor, atol=0, rtol=0)


async def bf16_engine_gap(backend: FSDPBackend, model_dir, tmp_path, adapter: bool) -> float:
    """Largest |engine - trainer| log-prob over sampled answers, both in bf16, after a disk sync of the
    adapter alone (served under its name) or of every weight."""
    engine = EmbeddedEngine(str(model_dir), device="cpu", dtype="bfloat16", max_running_requests=8)
    await asyncio.wait_for(engine.start(), 60)
    client = SGLangClient(engine.url)
    transport = DiskWeightTransport([engine.url], tmp_path / ("adapter" if adapter else "full"))
    prompts = [[5, 9, 14, 3], [7, 7, 20], [11, 4, 30, 2, 6]]
    sampling = {"temperature": 1.0, "max_new_tokens": 6, "ignore_eos": True}
    try:
        if adapter:
            weights = list(backend.adapter_weights())
            await asyncio.to_thread(transport.update_adapter, LORA_NAME, backend.adapter_config(), weights, "1")
        else:
            await asyncio.to_thread(transport.update, list(backend.weights()), "1")
        served = [await client.generate({"input_ids": p, "sampling_params": sampling, "return_logprob": True,
                                         **({"lora_path": LORA_NAME} if adapter else {})}) for p in prompts]
    finally:
        await asyncio.to_thread(transport.close)
        await client.close()
        await asyncio.wait_for(engine.stop(), 60)
    batch = TrainBatch(tokens=[p + a["output_ids"] for p, a in zip(prompts, served)], response_lengths=[6] * 3,
                       loss_masks=[[1] * 6] * 3, advantages=[[0.0] * 6] * 3)
    trainer = backend.forward(batch)
    return max(float((torch.tensor([e[0] for e in a["meta_info"]["output_token_logprobs"]]) - want).abs().max())
               for a, want in zip(served, trainer))


async def test_in_bf16_the_engine_serving_the_adapter_matches_the_trainer_as_closely_as_under_full_fine_tuning(
    tiny_task, tmp_path
):
    # The engine must add the adapter's path beside W as peft does: a bf16 W + scale * B @ A, merged, is
    # rounded once more than what the trainer computes, and drifts by about the model's whole bf16 error.
    model_dir = tiny_task / "model"
    gaps = {}
    for lora in (False, True):
        backend = trained_lora_backend(model_dir, param_dtype="bfloat16", lora_rank=4 if lora else 0,
                                       lr=5e-2 if lora else 5e-3)
        try:
            gaps[lora] = await bf16_engine_gap(backend, model_dir, tmp_path, adapter=lora)
        finally:
            backend.close()
    assert gaps[False] < 1e-2  # full fine-tuning: the same bf16 weights on both sides (other kernels)
    assert gaps[True] <= gaps[False] + 1e-4, gaps
