"""The perf/* figures: the FLOP formula against torch's own FLOP counter, and what the loop logs."""

import pytest
import torch

from rl_apps.perf import PhaseClock, forward_flops, memory_perf, rollout_perf, step_perf, train_perf

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=50)
MOE = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)


def _configs():
    from transformers import LlamaConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

    return {
        "qwen2": Qwen2Config(**TINY),
        "llama (one kv head, wide heads)": LlamaConfig(**{**TINY, "num_key_value_heads": 1}, head_dim=32),
        "qwen3 (head_dim apart from hidden)": Qwen3Config(**TINY, head_dim=24),
        "qwen3-moe": Qwen3MoeConfig(**TINY, **MOE),
        "qwen2-moe (shared expert)": Qwen2MoeConfig(**TINY, **MOE, shared_expert_intermediate_size=48),
    }


def _counted(model, length, backward=False):
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(0, TINY["vocab_size"], (1, length))
    with FlopCounterMode(display=False) as counter:
        logits = model(ids).logits
        if backward:
            logits.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("family", list(_configs()))
def test_the_flop_formula_equals_torchs_flop_counter_over_the_hf_forward(family):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _configs()[family]
    # The experts' plain loop, whose matrix products the counter sees (the default grouped kernel it does not).
    extra = {"experts_implementation": "eager"} if "moe" in family else {}
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", **extra)
    lengths = [5, 17]
    counted = sum(_counted(model, s) for s in lengths)
    assert forward_flops(config.to_dict(), lengths) == counted
    # A train step (forward + backward) costs about 3 forwards, the factor perf/actor_train_tflops uses.
    assert sum(_counted(model, s, backward=True) for s in lengths) == pytest.approx(3 * counted, rel=0.06)


def test_a_config_without_the_fields_the_formula_reads_gives_no_flops():
    assert forward_flops({"hidden_size": 64, "vocab_size": 50}, [3]) is None


def test_phase_figures_are_tokens_and_flops_over_the_phases_own_time():
    class Batch:
        tokens = [[1] * 7, [2] * 9]

    clock = PhaseClock()
    clock.record("actor_train", 0.0, Batch())  # started at perf_counter 0: some seconds ago
    clock.record("log_probs", 0.0, Batch())
    taken = clock.take()
    assert clock.seconds == {} and taken.seq_lens == {"actor_train": [7, 9], "log_probs": [7, 9]}
    taken.seconds = {"actor_train": 2.0, "log_probs": 0.5}
    out = train_perf(taken, TINY, world_size=2)
    flops = forward_flops(TINY, [7, 9])
    assert out["perf/actor_train_time"] == 2.0 and out["perf/actor_train_tok_per_s"] == 16 / 2.0
    assert out["perf/actor_train_tflops"] == pytest.approx(3 * flops / 2.0 / 2 / 1e12)
    assert out["perf/log_probs_tflops"] == pytest.approx(flops / 0.5 / 2 / 1e12)
    # A critic (a value head, not the LM head the formula counts): its times and tokens only.
    critic = PhaseClock({"critic_train": 1.0, "critic_values": 0.25}, {"critic_train": [7, 9], "critic_values": [7, 9]})
    assert train_perf(critic, None, 1) == {
        "perf/critic_train_time": 1.0, "perf/critic_train_tok_per_s": 16.0, "perf/critic_values_time": 0.25}


def test_what_cannot_be_measured_is_left_out_not_zero():
    class Sample:
        def __init__(self, mask):
            self.mask = mask

        def effective_loss_mask(self):
            return self.mask

    samples = [Sample([1, 1, 0, 0, 1]), Sample([1])]
    cpu = rollout_perf(samples, 2.0, num_gpus=None)
    assert cpu == {"perf/rollout_time": 2.0, "perf/rollout_tokens_per_sec": 2.0, "perf/longest_sample_tokens_per_sec": 1.5}
    assert rollout_perf(samples, 2.0, num_gpus=2)["perf/tokens_per_gpu_per_sec"] == 1.0
    assert memory_perf({"rollout": None, "train": 3 << 30}) == {"perf/train_max_memory_allocated_gb": 3.0}
    assert step_perf(4.0, 1.0, None, None) == {"perf/step_time": 4.0, "perf/train_wait_time": 1.0, "perf/wait_time_ratio": 0.25}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_on_a_gpu_each_phase_logs_its_peak_memory_and_the_engine_its_per_gpu_rate(tiny_run_config, tmp_path):
    from transformers import AutoModelForCausalLM

    from rl_apps.metrics import read_metrics
    from rl_apps.train import run

    config = tiny_run_config(tmp_path / "run", num_rollout=2, train_device="cuda", rollout_device="cuda", colocate=True,
                             use_tensorboard=False, save_reward_curve=False)
    rows = read_metrics(run(config))
    fp32_bytes = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(config.hf_checkpoint).parameters())
    for row in rows:
        # Training holds at least the fp32 weights; each phase that ran has its own peak.
        assert row["perf/train_max_memory_allocated_gb"] * (1 << 30) >= fp32_bytes
        assert row["perf/rollout_max_memory_allocated_gb"] > 0 and row["perf/update_weights_max_memory_allocated_gb"] > 0
        # One engine on one GPU: its per-GPU rate is the whole rate.
        assert row["perf/tokens_per_gpu_per_sec"] == pytest.approx(row["perf/rollout_tokens_per_sec"])
        assert row["perf/actor_train_tflops"] > 0
