import dataclasses
from pathlib import Path

import pytest
import torch

from rl_core.algorithms.policy_loss import PolicyLossConfig
from rl_core.losses import PolicyLoss
from rl_fsdp import FSDPBackend, FSDPConfig

WORKER = Path(__file__).with_name("_fsdp_worker.py")
def one_rank(config: dict, loss: PolicyLoss, batch):
    backend = FSDPBackend(FSDPConfig(**config))
    try:
        log_probs = backend.forward(batch)
        metrics = backend.train_step(batch, loss)
        weights = {name: t.cpu().clone() for name, t in backend.weights()}
    finally:
        backend.close()
    return metrics, log_probs, weights


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_samples, old_policy",
    [(5, "rollout"), (1, "batch")],
    ids=["uneven-split-rollout-as-old", "fewer-samples-than-ranks-tis-with-batch-old"],
)
def test_two_ranks_give_the_same_update_as_one(run_two_ranks, tied_dir, make_batch, num_samples, old_policy):
    loss = PolicyLossConfig(use_kl_loss=True, kl_loss_coef=0.1, entropy_coef=0.01, use_tis=old_policy == "batch")
    config = dict(
        model_path=str(tied_dir), lr=0.5, adam_eps=1.0, param_dtype="float32", micro_batch_size=2, ref_model=True,
    )
    policy = PolicyLoss(loss, use_rollout_logprobs=old_policy == "rollout")
    batch = make_batch(num_samples, seed=7, rollout_log_probs=True)
    if old_policy == "batch":
        # The filler micro-batch of the rank without a sample must carry old and rollout log-probs too.
        batch = dataclasses.replace(batch, old_log_probs=[[lp + 1.5 for lp in row] for row in batch.rollout_log_probs])
    result, weights = run_two_ranks(WORKER, config | {"loss": dataclasses.asdict(loss), "use_rollout_logprobs": policy.use_rollout_logprobs}, batch)
    metrics, log_probs, expected = one_rank(config, policy, batch)

    for got, want in zip(result["log_probs"], log_probs):
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-6, rtol=0)
    assert sorted(weights) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], atol=1e-5, rtol=0)
    assert sorted(result["metrics"]) == sorted(metrics)
    for key in ("loss", "pg_loss", "pg_clipfrac", "ppo_kl", "entropy", "kl_loss", "grad_norm", "train_rollout_logprob_abs_diff", "tis", "ois"):
        assert result["metrics"][key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), key
