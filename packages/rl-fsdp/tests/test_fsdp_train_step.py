import pytest
import torch

from rl_core.algorithms.policy_loss import PolicyLossConfig
from rl_core.losses import PolicyLoss
from rl_core.train_batch import TrainBatch
from rl_fsdp import FSDPBackend, FSDPConfig

# Adam's first step is g / (|g| + eps): with a large eps the update is proportional to the gradient,
# so any mis-scaled gradient (a wrong denominator, averaging instead of summing) shows in the weights.
LINEAR_ADAM = dict(lr=0.5, adam_eps=1.0, param_dtype="float32")


def one_step(model_dir, batch, loss=PolicyLossConfig(), **overrides):
    backend = FSDPBackend(FSDPConfig(model_path=model_dir, **(LINEAR_ADAM | overrides)))
    try:
        before = {name: t.cpu().clone() for name, t in backend.weights()}
        metrics = backend.train_step(batch, PolicyLoss(loss))
        after = {name: t.cpu().clone() for name, t in backend.weights()}
    finally:
        backend.close()
    return before, after, metrics


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_positive_advantage_raises_the_sequence_log_prob_and_negative_lowers_it(llama_dir, sign):
    tokens = [5, 9, 17, 3, 40, 22, 8]
    batch = TrainBatch(tokens=[tokens], response_lengths=[4], loss_masks=[[1] * 4], advantages=[[sign] * 4])
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, lr=1e-3, param_dtype="float32"))
    try:
        before = backend.forward(batch)[0].sum()
        metrics = backend.train_step(batch, PolicyLoss())
        after = backend.forward(batch)[0].sum()
    finally:
        backend.close()
    assert sign * (after - before) > 0.01
    # Recomputed old policy: ratio 1, nothing clipped, no policy drift before the update.
    assert metrics["pg_clipfrac"] == 0.0 and abs(metrics["ppo_kl"]) < 1e-7
    assert metrics["loss"] == pytest.approx(-sign, rel=1e-6)


@pytest.mark.parametrize("model_fixture", ["llama_dir", "tied_dir"])
def test_micro_batch_size_one_and_four_give_the_same_update(request, make_batch, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    batch = make_batch(6, seed=2)
    before, small, small_metrics = one_step(model_dir, batch, micro_batch_size=1)
    _, large, large_metrics = one_step(model_dir, batch, micro_batch_size=4)
    assert max((small[n] - before[n]).abs().max().item() for n in before) > 1e-3
    for name in before:
        torch.testing.assert_close(small[name], large[name], atol=1e-5, rtol=0)
    for key in ("loss", "pg_loss", "entropy", "grad_norm"):
        assert small_metrics[key] == pytest.approx(large_metrics[key], rel=1e-5)


def test_sample_mean_aggregation_is_split_invariant_too(llama_dir, make_batch):
    batch = make_batch(5, seed=3)
    loss = PolicyLossConfig(aggregation="sample_mean", entropy_coef=0.01)
    _, small, small_metrics = one_step(llama_dir, batch, micro_batch_size=1, loss=loss)
    _, large, large_metrics = one_step(llama_dir, batch, micro_batch_size=2, loss=loss)
    for name in small:
        torch.testing.assert_close(small[name], large[name], atol=1e-5, rtol=0)
    assert small_metrics["grad_norm"] == pytest.approx(large_metrics["grad_norm"], rel=1e-5)


def test_kl_loss_is_zero_against_the_reference_at_start_and_positive_after_a_step(llama_dir, make_batch):
    batch = make_batch(4, seed=4)
    loss = PolicyLossConfig(use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="low_var_kl")
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, lr=1e-2, param_dtype="float32", ref_model=True, micro_batch_size=2))
    try:
        first = backend.train_step(batch, PolicyLoss(loss))
        second = backend.train_step(batch, PolicyLoss(loss))
    finally:
        backend.close()
    assert first["kl_loss"] == pytest.approx(0.0, abs=1e-7)
    assert second["kl_loss"] > 1e-5


def test_rollout_logprob_diff_is_the_mean_gap_over_trained_tokens(llama_dir, make_batch):
    batch = make_batch(4, seed=5, rollout_log_probs=True)
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, param_dtype="float32", micro_batch_size=3))
    try:
        current = backend.forward(batch)
        metrics = backend.train_step(batch, PolicyLoss(use_rollout_logprobs=True))
    finally:
        backend.close()
    gap = sum(
        ((lp - torch.tensor(rollout)).abs() * torch.tensor(mask, dtype=torch.float32)).sum()
        for lp, rollout, mask in zip(current, batch.rollout_log_probs, batch.loss_masks)
    )
    tokens = sum(sum(mask) for mask in batch.loss_masks)
    assert metrics["train_rollout_logprob_abs_diff"] == pytest.approx(float(gap) / tokens, rel=1e-5)
    # Rollout log-probs (-5.5..-7) sit well below the policy's (about -ln 64): every ratio exceeds
    # 1 + eps_clip_high, which clips exactly the positive-advantage tokens.
    positive = sum(sum(m for m, a in zip(mask, adv) if a > 0) for mask, adv in zip(batch.loss_masks, batch.advantages))
    assert 0 < positive < tokens
    assert metrics["pg_clipfrac"] == pytest.approx(positive / tokens, rel=1e-6)
    assert set(metrics) >= {"loss", "pg_loss", "pg_clipfrac", "ppo_kl", "entropy", "grad_norm", "lr"}


def test_use_rollout_logprobs_without_them_is_refused(llama_dir, make_batch):
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, param_dtype="float32"))
    try:
        with pytest.raises(ValueError, match="use_rollout_logprobs needs rollout_log_probs"):
            backend.train_step(make_batch(2), PolicyLoss(use_rollout_logprobs=True))
    finally:
        backend.close()


def test_kl_loss_without_a_reference_model_is_refused_before_any_step(llama_dir, make_batch):
    loss = PolicyLoss(PolicyLossConfig(use_kl_loss=True, kl_loss_coef=0.1))
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, param_dtype="float32"))
    try:
        before = {name: t.clone() for name, t in backend.weights()}
        with pytest.raises(ValueError, match="needs the reference model.*ref_model=True"):
            backend.train_step(make_batch(2), loss)
        assert all(torch.equal(before[name], t) for name, t in backend.weights())
    finally:
        backend.close()


def test_a_value_loss_on_an_lm_head_is_refused(llama_dir, make_batch):
    from rl_core.losses import ValueLoss

    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, param_dtype="float32"))
    try:
        with pytest.raises(ValueError, match="head='value'"):
            backend.train_step(make_batch(2), ValueLoss())
    finally:
        backend.close()


def test_gradient_checkpointing_gives_the_same_update(llama_dir, make_batch):
    batch = make_batch(4, seed=6)
    _, plain, plain_metrics = one_step(llama_dir, batch, micro_batch_size=2)
    _, checkpointed, checkpointed_metrics = one_step(llama_dir, batch, micro_batch_size=2, gradient_checkpointing=True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=0)
    assert checkpointed_metrics["grad_norm"] == pytest.approx(plain_metrics["grad_norm"], rel=1e-5)


def test_bfloat16_compute_keeps_float32_master_weights_and_close_log_probs(llama_dir, make_batch):
    batch = make_batch(3, seed=8)
    exact = FSDPBackend(FSDPConfig(model_path=llama_dir, param_dtype="float32"))
    try:
        expected = exact.forward(batch)
    finally:
        exact.close()
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, param_dtype="bfloat16", lr=1e-3))
    try:
        got = backend.forward(batch)
        metrics = backend.train_step(batch, PolicyLoss())
        dtypes = {t.dtype for _, t in backend.weights()}
    finally:
        backend.close()
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, atol=5e-2, rtol=0)
    assert dtypes == {torch.float32}
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
