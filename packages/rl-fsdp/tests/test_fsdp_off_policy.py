"""Old-policy choice, truncated importance sampling, GSPO/CISPO surrogates and reference log-probs in training."""

import dataclasses
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from rl_core.algorithms.policy_loss import PolicyLossConfig
from rl_core.losses import PolicyLoss
from rl_core.train_batch import TrainBatch
from rl_fsdp import FSDPBackend, FSDPConfig

# Adam's first step is lr * g / (|g| + eps) element-wise (bias corrections cancel), so with gradient
# clipping off the update can be predicted exactly from an independently computed gradient.
EXACT_ADAM = dict(lr=0.5, adam_eps=1.0, param_dtype="float32", clip_grad=0.0)


def tiny_batch(**fields) -> TrainBatch:
    return TrainBatch(
        tokens=[[5, 9, 17, 3, 40, 22], [7, 1, 30, 12, 60]],
        response_lengths=[3, 2],
        loss_masks=[[1, 0, 1], [1, 1]],
        advantages=[[1.0] * 3, [-0.7] * 2],
        **fields,
    )


def plain_response_log_probs(model, batch):
    """Each sample alone through the unsharded HF model: log_softmax(logits), gathered at the response."""
    out = []
    for tokens, n in zip(batch.tokens, batch.response_lengths):
        logits = model(torch.tensor([tokens])).logits[0]
        log_probs = torch.log_softmax(logits[:-1].double(), dim=-1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
        out.append(log_probs[-n:])
    return out


def expected_update(model_dir, batch, token_weights, lr, eps):
    """Adam's first update for the recomputed-old-policy PPO loss with each token's loss scaled by its weight.

    At ratio 1 the token loss -w A exp(lp - sg(lp)) has gradient -w A grad(lp); token_mean divides by the
    batch's trained tokens.
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    num_tokens = sum(sum(m) for m in batch.loss_masks)
    loss = sum(
        -(torch.tensor(w, dtype=torch.float64) * torch.tensor(m, dtype=torch.float64) * torch.tensor(a) * lp).sum()
        for lp, w, m, a in zip(plain_response_log_probs(model, batch), token_weights, batch.loss_masks, batch.advantages)
    ) / num_tokens
    loss.backward()
    return {name: (-lr * p.grad / (p.grad.abs() + eps)).float() for name, p in model.named_parameters()}


def step_delta(model_dir, batch, loss=PolicyLossConfig(), **overrides):
    backend = FSDPBackend(FSDPConfig(model_path=model_dir, **(EXACT_ADAM | overrides)))
    try:
        before = {name: t.cpu().clone() for name, t in backend.weights()}
        metrics = backend.train_step(batch, PolicyLoss(loss))
        delta = {name: t.cpu() - before[name] for name, t in backend.weights()}
    finally:
        backend.close()
    return delta, metrics


def test_tis_weights_each_token_loss_by_the_truncated_old_over_rollout_ratio(llama_dir):
    ratios = [[0.5, 1.5, 3.0], [1.25, 0.8]]  # pi_old / pi_rollout; 3.0 lies above tis_clip = 2
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64)
    with torch.no_grad():
        current = plain_response_log_probs(model, tiny_batch())
    rollout = [[lp - math.log(r) for lp, r in zip(row.tolist(), rs)] for row, rs in zip(current, ratios)]
    batch = tiny_batch(rollout_log_probs=rollout)

    with_tis, metrics = step_delta(llama_dir, batch, loss=PolicyLossConfig(use_tis=True, tis_clip=2.0))
    without_tis, plain_metrics = step_delta(llama_dir, batch)

    weighted = expected_update(llama_dir, batch, [[min(r, 2.0) for r in rs] for rs in ratios], 0.5, 1.0)
    unweighted = expected_update(llama_dir, batch, [[1.0] * len(rs) for rs in ratios], 0.5, 1.0)
    for name, want in weighted.items():
        torch.testing.assert_close(with_tis[name], want, atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(without_tis[name], unweighted[name], atol=2e-6, rtol=1e-4)
    assert max((with_tis[n] - without_tis[n]).abs().max().item() for n in weighted) > 1e-3
    # Mismatch metrics: means over the 4 trained tokens (0.5, 3.0, 1.25, 0.8), one of them truncated.
    for m in (metrics, plain_metrics):
        assert m["tis"] == pytest.approx((0.5 + 3.0 + 1.25 + 0.8) / 4, rel=1e-4)
        assert m["tis_clipfrac"] == pytest.approx(1 / 4)
        assert m["ois"] == pytest.approx(1.0, abs=1e-6)


def test_tis_without_rollout_log_probs_is_refused_naming_the_flag(llama_dir):
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, param_dtype="float32"))
    try:
        with pytest.raises(ValueError, match="use_tis is set but no rollout_log_probs"):
            backend.train_step(tiny_batch(), PolicyLoss(PolicyLossConfig(use_tis=True)))
    finally:
        backend.close()


def test_old_log_probs_of_the_batch_are_the_ratios_old_policy_even_over_rollout_log_probs(llama_dir, make_batch):
    batch = make_batch(4, seed=9, rollout_log_probs=True)
    config = FSDPConfig(model_path=llama_dir, param_dtype="float32", micro_batch_size=3)
    backend = FSDPBackend(config)
    try:
        current = backend.forward(batch)
        rng = random.Random(9)
        old = [[lp + rng.uniform(-0.1, 0.1) for lp in row.tolist()] for row in current]
        metrics = backend.train_step(dataclasses.replace(batch, old_log_probs=old), PolicyLoss(use_rollout_logprobs=True))
    finally:
        backend.close()
    masks = [torch.tensor(m, dtype=torch.float64) for m in batch.loss_masks]
    tokens = sum(float(m.sum()) for m in masks)
    mean = lambda rows: sum(float((r * m).sum()) for r, m in zip(rows, masks)) / tokens  # noqa: E731
    old_t = [torch.tensor(row, dtype=torch.float64) for row in old]
    assert metrics["ppo_kl"] == pytest.approx(mean([o - c.double() for o, c in zip(old_t, current)]), rel=1e-4, abs=1e-7)
    # |old - current| < 0.1 keeps every ratio inside [0.8, 1.2]; the engine's far lower log-probs would not.
    assert metrics["pg_clipfrac"] == 0.0
    rollout_t = [torch.tensor(row, dtype=torch.float64) for row in batch.rollout_log_probs]
    assert metrics["tis"] == pytest.approx(mean([(o - r).exp() for o, r in zip(old_t, rollout_t)]), rel=1e-5)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("pg_loss_type", ["gspo", "cispo"])
def test_gspo_and_cispo_steps_move_the_log_probs_the_advantages_way(llama_dir, pg_loss_type, sign):
    batch = TrainBatch(tokens=[[5, 9, 17, 3, 40, 22, 8]], response_lengths=[4], loss_masks=[[1] * 4], advantages=[[sign] * 4])
    loss = PolicyLossConfig(pg_loss_type=pg_loss_type, eps_clip=1.0 if pg_loss_type == "cispo" else 0.2)
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, lr=1e-3, param_dtype="float32"))
    try:
        before = backend.forward(batch)[0]
        metrics = backend.train_step(batch, PolicyLoss(loss))
        after = backend.forward(batch)[0]
    finally:
        backend.close()
    assert sign * (after.sum() - before.sum()) > 0.01
    # At ratio 1: gspo's loss is ppo's, -A; cispo's is -A log pi, so its value carries the log-probs.
    expected = -sign if pg_loss_type == "gspo" else -sign * float(before.mean())
    assert metrics["pg_loss"] == pytest.approx(expected, rel=1e-5)


def test_gspo_clips_on_the_sequence_ratio_not_the_token_ratios(llama_dir):
    batch = TrainBatch(tokens=[[5, 9, 17, 3, 40, 22]], response_lengths=[3], loss_masks=[[1] * 3], advantages=[[1.0] * 3])
    metrics = {}
    for pg_loss_type in ("ppo", "gspo"):
        backend = FSDPBackend(FSDPConfig(model_path=llama_dir, param_dtype="float32"))
        try:
            current = backend.forward(batch)[0].tolist()
            # Token ratios e^0.5, e^0.5 (above 1 + eps_clip_high: clipped for A > 0) and e^-1; their
            # geometric mean is 1.
            old = [[current[0] - 0.5, current[1] - 0.5, current[2] + 1.0]]
            loss = PolicyLoss(PolicyLossConfig(pg_loss_type=pg_loss_type))
            metrics[pg_loss_type] = backend.train_step(dataclasses.replace(batch, old_log_probs=old), loss)
        finally:
            backend.close()
    assert metrics["ppo"]["pg_clipfrac"] == pytest.approx(2 / 3)
    assert metrics["gspo"]["pg_clipfrac"] == 0.0
    assert metrics["gspo"]["ppo_kl"] == pytest.approx(0.0, abs=1e-6)


def test_reference_log_probs_equal_the_policys_before_any_step_and_stay_after_one(llama_dir, make_batch):
    batch = make_batch(3, seed=10)
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, lr=1e-2, param_dtype="float32", ref_model=True, micro_batch_size=2))
    try:
        policy = backend.forward(batch)
        reference = backend.forward(batch, "reference")
        backend.train_step(batch, PolicyLoss())
        policy_after = backend.forward(batch)
        reference_after = backend.forward(batch, "reference")
    finally:
        backend.close()
    for p, r, r_after in zip(policy, reference, reference_after):
        torch.testing.assert_close(r, p, atol=0, rtol=0)
        torch.testing.assert_close(r_after, r, atol=0, rtol=0)
    assert max((a - p).abs().max().item() for a, p in zip(policy_after, policy)) > 1e-4


def test_reference_log_probs_without_a_reference_are_refused_naming_the_setting(llama_dir, make_batch):
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, param_dtype="float32"))
    try:
        with pytest.raises(ValueError, match="needs the reference model.*ref_model=True"):
            backend.forward(make_batch(2), "reference")
    finally:
        backend.close()
