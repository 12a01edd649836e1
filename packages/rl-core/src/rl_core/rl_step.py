"""The RL step: a rollout's scored samples in, optimizer steps out, over the `StepBackend` Protocol.

Forward passes over the whole rollout give what the configuration needs (the old policy when a rollout is
split into several optimizer steps, policy and reference log-probs for --kl-coef, the critic's values for
ppo); the configured estimator turns rewards into advantages; then `num_steps_per_rollout` optimizer steps
of `global_batch_size` samples each, the critic's beside the policy's.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from rl_core.algorithms.advantages import AdvantageInputs, Advantages, estimate_advantages
from rl_core.algorithms.kl import approx_kl
from rl_core.config import RLStepConfig
from rl_core.protocols import StepBackend
from rl_core.sample import Sample
from rl_core.train_batch import TrainBatch


def rollout_advantages(
    config: RLStepConfig,
    samples: Sequence[Sample],
    *,
    log_probs: Sequence[torch.Tensor] | None = None,
    ref_log_probs: Sequence[torch.Tensor] | None = None,
    values: Sequence[torch.Tensor] | None = None,
    trained: Sequence[bool] | None = None,
    normalized_rewards: Sequence[float] | None = None,
) -> Advantages:
    """The configured estimator (and whitening) over the whole rollout. `log_probs` and `ref_log_probs`
    (per sample, response tokens) carry the reward KL of --kl-coef; `values` are the critic's (ppo).
    Samples with `trained` False count in their group's reward statistics only (their response is seen
    as empty). `normalized_rewards`, from --custom-reward-post-process-path, replace the rewards and the
    estimator's own group normalisation."""
    trained = [True] * len(samples) if trained is None else trained
    config_ = config.advantage_config()
    if normalized_rewards is not None:
        config_ = dataclasses.replace(config_, rewards_normalization=False)
    rewards = normalized_rewards if normalized_rewards is not None else [float(s.reward) for s in samples]  # type: ignore[arg-type]
    return estimate_advantages(
        config_,
        AdvantageInputs(
            rewards=list(rewards),
            group_size=config.n_samples_per_prompt,
            response_lengths=[s.response_length if t else 0 for s, t in zip(samples, trained)],
            loss_masks=[torch.tensor(s.effective_loss_mask() if t else [], dtype=torch.float32)
                        for s, t in zip(samples, trained)],
            log_probs=log_probs,
            ref_log_probs=ref_log_probs,
            values=values,
        ),
    )


def mean_reward_kl(
    config: RLStepConfig, samples: Sequence[Sample], log_probs: Sequence[torch.Tensor], ref_log_probs: Sequence[torch.Tensor]
) -> float:
    """Mean over loss-mask tokens of the KL estimate that --kl-coef weighs into the token rewards."""
    total, tokens = 0.0, 0.0
    for sample, lp, ref in zip(samples, log_probs, ref_log_probs):
        mask = torch.tensor(sample.effective_loss_mask(), dtype=torch.float32)
        total += float((approx_kl(lp, ref, config.kl_loss_type) * mask).sum())
        tokens += float(mask.sum())
    return total / max(tokens, 1.0)


def _as_tensors(rows: Sequence[Sequence[float]] | None) -> list[torch.Tensor] | None:
    return None if rows is None else [torch.as_tensor(r, dtype=torch.float32) for r in rows]


def _spread(per_kept: list[torch.Tensor] | None, keep: list[int], total: int) -> list[torch.Tensor] | None:
    """Per-sample tensors of the kept samples placed back among all `total`, empty for the others."""
    if per_kept is None:
        return None
    out = [torch.zeros(0)] * total
    for i, tensor in zip(keep, per_kept):
        out[i] = tensor
    return out


def _step_bounds(count: int, steps: int) -> list[tuple[int, int]]:
    """`steps` contiguous, near-equal slices of `count` samples (exactly global_batch_size each when none
    was dropped)."""
    edges = [round(k * count / steps) for k in range(steps + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def sft_step(
    config: RLStepConfig, samples: Sequence[Sample], policy: StepBackend, rollout_level: dict[str, float] | None = None
) -> list[dict[str, float]]:
    """--loss-type sft_loss: `num_steps_per_rollout` optimizer steps of the negative log-likelihood of the
    samples' loss-mask tokens; no forward pass, no reward, no advantage (they would multiply nothing)."""
    whole = TrainBatch.from_samples(samples, [[0.0] * s.response_length for s in samples])
    loss = config.sft_loss()
    steps = []
    for start, end in _step_bounds(len(samples), config.num_steps_per_rollout):  # type: ignore[arg-type]
        metrics = dict(rollout_level or {})
        metrics.update({f"train/{k}": v for k, v in policy.train_step(whole.select(range(start, end)), loss).items()})
        steps.append(metrics)
    return steps


def rl_step(
    config: RLStepConfig,
    samples: Sequence[Sample],
    policy: StepBackend,
    *,
    critic: StepBackend | None = None,
    rollout_id: int = 0,
    normalized_rewards: Sequence[float] | None = None,
) -> list[dict[str, float]]:
    """Train `policy` (and `critic`, for ppo) on one rollout's scored samples, in group order.

    Samples with an empty response (aborted before their first token), nothing in their loss mask, or
    slime's `remove_sample` set keep their place in their group's reward statistics but are not trained on
    (`rollout/untrained_samples` counts them). `normalized_rewards` (--custom-reward-post-process-path)
    replace the estimator's reward normalisation. The policy sits out
    the first --num-critic-only-steps rollouts. With --loss-type sft_loss the samples' rewards are not read:
    the policy takes `sft_step`'s likelihood steps instead. Returns one metric dict per optimizer step (`train/...` for
    the policy, `critic/...`), each also holding the rollout's `train/reward_kl` under --kl-coef, for the
    caller to average key by key.
    """
    if config.loss_type == "sft_loss" and critic is not None:
        raise ValueError("--loss-type sft_loss trains the policy only, but a critic was given")
    if config.use_critic and critic is None:
        raise ValueError(f"advantage_estimator {config.advantage_estimator!r} trains a critic, but none was given")
    keep = [i for i, s in enumerate(samples)
            if s.response_length > 0 and any(s.effective_loss_mask()) and not s.remove_sample]
    trained = [samples[i] for i in keep]
    # Rollout-level figures go into every step's metrics, so that averaging over steps keeps them.
    rollout_level = {"rollout/untrained_samples": float(len(samples) - len(keep))}
    if not trained:
        return [rollout_level]
    if config.loss_type == "sft_loss":
        return sft_step(config, trained, policy, rollout_level)
    # The forward passes read tokens and lengths only; the advantages are filled in once they are known.
    whole = TrainBatch.from_samples(trained, [[0.0] * s.response_length for s in trained])
    recompute_old = config.num_steps_per_rollout > 1 and not config.use_rollout_logprobs  # type: ignore[operator]
    reward_kl = config.kl_coef > 0.0
    if config.use_rollout_logprobs and whole.rollout_log_probs is None:
        raise ValueError("--use-rollout-logprobs takes the old policy from the engine, which sent no log-probs")
    if config.use_tis and whole.rollout_log_probs is None:
        raise ValueError("--use-tis weights by the engine's log-probs, which the engine did not send")

    with ThreadPoolExecutor(max_workers=2) as pool:
        # The critic's forward runs beside the policy's; each backend's own calls stay in order.
        values_future = pool.submit(critic.forward, whole) if critic is not None else None
        own_log_probs = policy.forward(whole) if recompute_old or (reward_kl and not config.use_rollout_logprobs) else None
        ref_log_probs = policy.forward(whole, "reference") if reward_kl else None
        values = values_future.result() if values_future is not None else None

        # As slime: the reward KL is taken from the engine's log-probs when they are the old policy.
        kl_log_probs = _as_tensors(whole.rollout_log_probs) if config.use_rollout_logprobs else own_log_probs
        kept = set(keep)
        result = rollout_advantages(
            config,
            samples,
            log_probs=_spread(kl_log_probs, keep, len(samples)) if reward_kl else None,
            ref_log_probs=_spread(ref_log_probs, keep, len(samples)),
            values=_spread(values, keep, len(samples)),
            trained=[i in kept for i in range(len(samples))],
            normalized_rewards=normalized_rewards,
        )
        whole = dataclasses.replace(
            whole,
            advantages=[result.advantages[i].tolist() for i in keep],
            # Every step's PPO ratio is taken against the policy that existed before the rollout's first step.
            old_log_probs=[lp.tolist() for lp in own_log_probs] if recompute_old and own_log_probs is not None else None,
            returns=[result.returns[i].tolist() for i in keep] if critic is not None else None,
            values=[v.tolist() for v in values] if values is not None else None,
        )
        if reward_kl:
            assert kl_log_probs is not None and ref_log_probs is not None
            rollout_level["train/reward_kl"] = mean_reward_kl(config, trained, kl_log_probs, ref_log_probs)
        steps: list[dict[str, float]] = []
        train_policy = rollout_id >= config.num_critic_only_steps
        policy_loss, value_loss = config.policy_loss(), config.value_loss()
        for start, end in _step_bounds(len(trained), config.num_steps_per_rollout):  # type: ignore[arg-type]
            part = whole.select(range(start, end))
            critic_future = pool.submit(critic.train_step, part, value_loss) if critic is not None else None
            metrics = dict(rollout_level)
            if train_policy:
                metrics.update({f"train/{k}": v for k, v in policy.train_step(part, policy_loss).items()})
            if critic_future is not None:
                metrics.update({f"critic/{k}": v for k, v in critic_future.result().items()})
            steps.append(metrics)
    return steps
