"""A slime-signature custom generate function (two turns around a calculator tool) and a slime-signature
reward train through rl-train on CPU; the saved rollout shows the tool tokens masked out."""

import json
from pathlib import Path

import pytest

from rl_apps.metrics import read_metrics
from rl_apps.train import run

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tool_call_generate.py"


@pytest.mark.slow
def test_a_two_turn_tool_calling_generate_function_trains_with_the_tool_tokens_masked(tiny_run_config, tmp_path):
    debug = tmp_path / "rollouts" / "rollout_{rollout_id}.jsonl"
    config = tiny_run_config(tmp_path / "run", num_rollout=2, custom_rm_path=f"{EXAMPLE}:reward_func",
                             custom_generate_function_path=f"{EXAMPLE}:generate", save_debug_rollout_data=str(debug),
                             use_tensorboard=False, save_reward_curve=False)
    rows = read_metrics(run(config))
    assert len(rows) == 2 and all(row["train/grad_norm"] > 0 for row in rows)

    from rl_sglang.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(config.hf_checkpoint)
    for rollout_id in (0, 1):
        samples = [json.loads(line) for line in (tmp_path / "rollouts" / f"rollout_{rollout_id}.jsonl").read_text().splitlines()]
        assert len(samples) == 16
        for sample in samples:
            left, right = sample["prompt"].rstrip("=").split("+")
            tool = tokenizer(f" {int(left) + int(right)} ", add_special_tokens=False)["input_ids"]
            response = sample["tokens"][-sample["response_length"]:]
            first = sample["loss_mask"].index(0)
            # The policy's 2 tokens, the tool's (mask 0, log-prob 0), then the policy's 2 again.
            assert sample["loss_mask"] == [1] * first + [0] * len(tool) + [1] * (sample["response_length"] - first - len(tool))
            assert response[first:first + len(tool)] == tool and 1 <= first <= 2
            assert all(lp == 0.0 for lp in sample["rollout_log_probs"][first:first + len(tool)])
            assert all(lp < 0.0 for lp, m in zip(sample["rollout_log_probs"], sample["loss_mask"]) if m)
            assert sample["weight_versions"] == ["default" if rollout_id == 0 else str(rollout_id)] * 2
            assert 0.0 <= sample["reward"] <= 1.0

    # The saved rollouts replay into training with no engine at all (slime's --debug-train-only).
    replay = tiny_run_config(tmp_path / "replay", num_rollout=2, debug_train_only=True, load_debug_rollout_data=str(debug),
                             use_tensorboard=False, save_reward_curve=False)
    replayed = read_metrics(run(replay))
    assert [r["rollout/reward_mean"] for r in replayed] == [r["rollout/reward_mean"] for r in rows]
    assert all(r["train/grad_norm"] > 0 for r in replayed)
