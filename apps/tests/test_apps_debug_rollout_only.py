"""slime's --debug-rollout-only through rl-train: rollouts are generated, graded and saved; the trainer never
steps and the engines keep the weights they started with."""

import json

from rl_apps.metrics import read_metrics
from rl_apps.train import run


def test_debug_rollout_only_generates_grades_and_saves_rollouts_while_the_trainer_never_steps(tiny_run_config, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    debug = tmp_path / "rollouts" / "rollout_{rollout_id}.jsonl"
    config = tiny_run_config(tmp_path / "run", num_rollout=2, debug_rollout_only=True, save_debug_rollout_data=str(debug),
                             use_tensorboard=False, save_reward_curve=False)
    rows = read_metrics(run(config))
    assert len(rows) == 2
    assert not any(key.startswith("train/") or key in ("time/train", "time/weight_sync") for row in rows for key in row)

    model = AutoModelForCausalLM.from_pretrained(str(config.hf_checkpoint)).eval()
    for rollout_id, row in enumerate(rows):
        samples = [json.loads(line) for line in (tmp_path / "rollouts" / f"rollout_{rollout_id}.jsonl").read_text().splitlines()]
        assert len(samples) == 16 and all(s["weight_versions"] == ["default"] for s in samples)
        # Graded by the run's reward (the fixture's: digits in the response / 3), and logged as such.
        assert all(s["reward"] == sum(c.isdigit() for c in s["response"]) / 3 for s in samples)
        assert abs(row["rollout/reward_mean"] - sum(s["reward"] for s in samples) / 16) < 1e-9
        # Rollout 1 was sampled by the starting weights too: no step, no sync.
        for s in samples:
            tokens, n = torch.tensor([s["tokens"]]), s["response_length"]
            with torch.no_grad():
                log_probs = torch.log_softmax(model(tokens).logits[0, :-1].double(), dim=-1)
            expected = log_probs[-n:].gather(1, tokens[0, -n:, None])[:, 0]
            assert torch.allclose(torch.tensor(s["rollout_log_probs"], dtype=torch.float64), expected, atol=1e-4)
