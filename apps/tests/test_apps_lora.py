"""`rl-train --lora-*`: the flags reach the policy's backend config, are refused where they cannot apply
before Ray starts, and the backend's adapter-only weights make a /load_lora_adapter_from_tensors call
that SGLang's API accepts."""

import pytest
import torch

from rl_fsdp import FSDPBackend
from rl_sglang import conformance
from rl_sglang.client import SGLangClient
from rl_sglang.tensor_handoff import flattened_bucket, load_entry, named_tensors_of, serialize_entry


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
def test_a_lora_run_trains_the_engine_serves_the_merged_weights_and_save_hf_writes_both(tiny_run_config, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rl_apps.metrics import read_metrics
    from rl_apps.train import run

    config = tiny_run_config(tmp_path / "run", lora_rank=4, lr=5e-2, num_rollout=2, use_kl_loss=True, kl_loss_coef=0.1,
                             use_tensorboard=False, save_reward_curve=False, save_hf=str(tmp_path / "hf"))
    rows = read_metrics(run(config))
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:
        # The engine's log-probs equal the trainer's before each update: it serves base + adapter, merged.
        assert row["train/train_rollout_logprob_abs_diff"] < 1e-3
        assert row["train/grad_norm"] > 0
    assert rows[1]["train/kl_loss"] != 0.0  # the policy left the base (the adapters-off reference)
    assert rows[1]["rollout/weight_version_min"] == rows[1]["rollout/weight_version_max"] == 1
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(config.hf_checkpoint, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").merge_and_unload().state_dict()
    assert merged.keys() == adapted.keys()
    for name, tensor in adapted.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0)
