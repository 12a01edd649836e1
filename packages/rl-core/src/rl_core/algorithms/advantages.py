"""Advantage estimators, named in a registry that `--advantage-estimator` selects.

Each estimator turns per-sample rewards (and, for some, per-token KL to the reference policy and critic
values) into per-token advantages and returns; `estimate_advantages` then whitens the advantages when
`--normalize-advantages` asks for it. Formulas and their sources: docs/algorithms.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch

from rl_core.algorithms.kl import KLType, approx_kl
from rl_core.algorithms.returns import discounted_returns, generalized_advantage_estimation, pad_right, unpad
from rl_core.algorithms.whitening import whiten_advantages

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

# Estimators whose rewards are normalised within each prompt group before broadcasting (slime's
# reward post-processing); CISPO uses GRPO's advantage, as MiniMax-M1 does.
GROUP_RELATIVE = ("grpo", "gspo", "cispo")
# Estimators that shape token rewards with --kl-coef; the others ignore the reward KL in slime.
KL_SHAPED = ("ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")


@dataclass(frozen=True)
class AdvantageConfig:
    """The flags an estimator reads; `AlgorithmConfig.advantage_config()` builds it from slime's flags."""

    estimator: str = "grpo"
    std_normalize: bool = True
    """Divide group-relative advantages by the group std; False is --disable-grpo-std-normalization."""
    rewards_normalization: bool = True
    """Subtract the group mean (grpo, gspo, cispo, reinforce_plus_plus_baseline); False is
    --disable-rewards-normalization, which also skips the std division."""
    normalize_advantages: bool = False
    """Whiten the advantages over the global batch (--normalize-advantages)."""
    gamma: float = 1.0
    lambd: float = 1.0
    kl_coef: float = 0.0
    """Weight of the per-token KL penalty folded into the token rewards (--kl-coef)."""
    kl_type: KLType = "k1"
    """KL estimator of the reward penalty (slime uses --kl-loss-type for it too)."""


@dataclass
class AdvantageInputs:
    """One global batch of finished samples, in group order (the group_size samples of a prompt adjacent).

    Token-level lists are per sample, 1-D, over response tokens.
    """

    rewards: Sequence[float] | torch.Tensor
    group_size: int
    response_lengths: Sequence[int]
    loss_masks: Sequence[torch.Tensor] | None = None
    """1 on tokens the policy produced; None means every response token."""
    log_probs: Sequence[torch.Tensor] | None = None
    """Log-probs of the response tokens under the policy that is trained (for the reward KL)."""
    ref_log_probs: Sequence[torch.Tensor] | None = None
    """Log-probs under the reference model (for the reward KL)."""
    values: Sequence[torch.Tensor] | None = None
    """Critic values per response token (ppo)."""

    def __post_init__(self) -> None:
        n = len(self.rewards)
        if len(self.response_lengths) != n:
            raise ValueError(f"{n} rewards but {len(self.response_lengths)} response lengths")
        for name in ("loss_masks", "log_probs", "ref_log_probs", "values"):
            tensors = getattr(self, name)
            if tensors is None:
                continue
            if len(tensors) != n:
                raise ValueError(f"{n} rewards but {len(tensors)} entries in {name}")
            for i, (t, length) in enumerate(zip(tensors, self.response_lengths)):
                if t.numel() != length:
                    raise ValueError(f"sample {i}: {name} has {t.numel()} entries, response_length is {length}")

    def reward_tensor(self) -> torch.Tensor:
        """float64, so that group statistics see the rewards as given (0.7 is not rounded to float32 first)."""
        return torch.as_tensor(self.rewards, dtype=torch.float64).reshape(-1)

    def masks(self) -> list[torch.Tensor]:
        if self.loss_masks is None:
            return [torch.ones(length) for length in self.response_lengths]
        return [m.to(torch.float32) for m in self.loss_masks]

    def token_kl(self, kl_type: KLType) -> list[torch.Tensor]:
        """Per-token KL(policy || reference) on loss-mask tokens, 0 elsewhere."""
        if self.log_probs is None or self.ref_log_probs is None:
            raise ValueError("kl_coef > 0 folds KL into the rewards, so it needs log_probs and ref_log_probs")
        return [approx_kl(lp, ref, kl_type) * m for lp, ref, m in zip(self.log_probs, self.ref_log_probs, self.masks())]


@dataclass
class Advantages:
    advantages: list[torch.Tensor]
    """Per-token advantages, one 1-D float32 tensor per sample."""
    returns: list[torch.Tensor]
    """Per-token returns: the critic's targets for ppo, equal to the unwhitened advantages otherwise."""


class AdvantageEstimator(Protocol):
    def __call__(self, inputs: AdvantageInputs, config: AdvantageConfig) -> Advantages:
        """Unwhitened per-token advantages and returns of one global batch."""
        ...


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    def wrap(fn: AdvantageEstimator) -> AdvantageEstimator:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return wrap


def group_normalized_rewards(
    rewards: torch.Tensor, group_size: int, *, std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO's reward shaping: subtract each prompt group's mean and, unless disabled, divide by the
    group's unbiased std plus `eps`. Samples of one group are contiguous.

    Statistics are taken in float64, and a group whose rewards are all equal gets exactly 0: in float32 a
    reward such as 0.7 or 1/3 leaves a rounding residue in (r - mean) that the division by a near-zero
    std + eps blows up to a spurious advantage of several hundredths.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.double().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if std_normalize and group_size > 1:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    flat = (grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)).expand_as(centered)
    return torch.where(flat, torch.zeros_like(centered), centered).to(torch.float32).flatten()


def _broadcast(per_sample: torch.Tensor, response_lengths: Sequence[int]) -> list[torch.Tensor]:
    return [torch.full((length,), float(value)) for value, length in zip(per_sample.tolist(), response_lengths)]


def _refuse_reward_kl(config: AdvantageConfig) -> None:
    if config.kl_coef:
        raise ValueError(
            f"kl_coef ({config.kl_coef}) shapes token rewards only for {', '.join(KL_SHAPED)}; "
            f"{config.estimator!r} would ignore it (use the KL loss instead)"
        )


def _last_policy_token(masks: Sequence[torch.Tensor]) -> list[int | None]:
    """Index of each sample's last loss-mask token, where the scalar reward lands; None for an empty
    response (an aborted sample), which has no token to carry it and is not trained on."""
    last: list[int | None] = []
    for i, m in enumerate(masks):
        on = m.nonzero()
        if m.numel() == 0:
            last.append(None)
        elif on.numel() == 0:
            raise ValueError(f"sample {i}: the loss mask is all zeros, so there is no token to give the reward to")
        else:
            last.append(int(on[-1]))
    return last


def _token_rewards(inputs: AdvantageInputs, config: AdvantageConfig) -> torch.Tensor:
    """[B, T] token rewards: -kl_coef * KL on every policy token, plus the scalar reward on the last one."""
    masks = inputs.masks()
    if config.kl_coef:
        penalties = [-config.kl_coef * kl for kl in inputs.token_kl(config.kl_type)]
    else:
        penalties = [torch.zeros_like(m) for m in masks]
    rewards = pad_right(penalties)
    scalar = inputs.reward_tensor()
    for row, position in enumerate(_last_policy_token(masks)):
        if position is not None:
            rewards[row, position] += scalar[row]
    return rewards


@register_advantage_estimator("grpo")
@register_advantage_estimator("gspo")
@register_advantage_estimator("cispo")
def group_relative_advantages(inputs: AdvantageInputs, config: AdvantageConfig) -> Advantages:
    """(r - mean_group) / (std_group + 1e-6), broadcast over the response; gspo and cispo differ only in
    their policy loss."""
    _refuse_reward_kl(config)
    rewards = inputs.reward_tensor()
    if config.rewards_normalization:
        rewards = group_normalized_rewards(rewards, inputs.group_size, std_normalize=config.std_normalize)
    advantages = _broadcast(rewards, inputs.response_lengths)
    return Advantages(advantages, [a.clone() for a in advantages])


@register_advantage_estimator("reinforce_plus_plus")
def reinforce_plus_plus_advantages(inputs: AdvantageInputs, config: AdvantageConfig) -> Advantages:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): discounted returns of token rewards that carry the KL
    penalty, the reward on the last policy token; no baseline (whitening centres them)."""
    returns = unpad(discounted_returns(_token_rewards(inputs, config), config.gamma), inputs.response_lengths)
    return Advantages(returns, [r.clone() for r in returns])


@register_advantage_estimator("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline_advantages(inputs: AdvantageInputs, config: AdvantageConfig) -> Advantages:
    """REINFORCE++-baseline: (r - mean_group) broadcast, minus kl_coef * KL per token; not discounted."""
    rewards = inputs.reward_tensor()
    if config.rewards_normalization:
        rewards = group_normalized_rewards(rewards, inputs.group_size, std_normalize=False)
    broadcast = _broadcast(rewards, inputs.response_lengths)
    if config.kl_coef:
        broadcast = [a - config.kl_coef * kl for a, kl in zip(broadcast, inputs.token_kl(config.kl_type))]
    return Advantages(broadcast, [a.clone() for a in broadcast])


@register_advantage_estimator("ppo")
def ppo_advantages(inputs: AdvantageInputs, config: AdvantageConfig) -> Advantages:
    """PPO: GAE(gamma, lambd) over KL-penalised token rewards and the critic's values; returns are the
    critic's targets."""
    if inputs.values is None:
        raise ValueError("advantage_estimator 'ppo' needs the critic's values for every response token")
    values = pad_right(list(inputs.values))
    advantages, returns = generalized_advantage_estimation(_token_rewards(inputs, config), values, config.gamma, config.lambd)
    return Advantages(unpad(advantages, inputs.response_lengths), unpad(returns, inputs.response_lengths))


def estimate_advantages(
    config: AdvantageConfig, inputs: AdvantageInputs, *, process_group: ProcessGroup | None = None
) -> Advantages:
    """Run the configured estimator, then whiten the advantages (not the returns) if asked.

    `process_group`: when each data-parallel rank passes only its shard, the group whose statistics the
    whitening uses; None when `inputs` is the whole global batch.
    """
    try:
        fn = ADVANTAGE_ESTIMATORS[config.estimator]
    except KeyError:
        raise ValueError(
            f"--advantage-estimator {config.estimator!r} is not one of {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None
    result = fn(inputs, config)
    if config.normalize_advantages:
        result.advantages = whiten_advantages(result.advantages, inputs.masks(), process_group=process_group)
    return result


def compute_advantages(
    estimator: str,
    rewards: Sequence[float],
    group_size: int,
    response_lengths: Sequence[int],
    *,
    std_normalize: bool = True,
    rewards_normalization: bool = True,
    normalize_advantages: bool = False,
    gamma: float = 1.0,
    lambd: float = 1.0,
    kl_coef: float = 0.0,
    kl_type: KLType = "k1",
    loss_masks: Sequence[torch.Tensor] | None = None,
    log_probs: Sequence[torch.Tensor] | None = None,
    ref_log_probs: Sequence[torch.Tensor] | None = None,
    values: Sequence[torch.Tensor] | None = None,
    process_group: ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """Per-token advantages in one call: `estimate_advantages` with its config and inputs spelled out."""
    config = AdvantageConfig(
        estimator=estimator,
        std_normalize=std_normalize,
        rewards_normalization=rewards_normalization,
        normalize_advantages=normalize_advantages,
        gamma=gamma,
        lambd=lambd,
        kl_coef=kl_coef,
        kl_type=kl_type,
    )
    inputs = AdvantageInputs(
        rewards=rewards,
        group_size=group_size,
        response_lengths=response_lengths,
        loss_masks=loss_masks,
        log_probs=log_probs,
        ref_log_probs=ref_log_probs,
        values=values,
    )
    return estimate_advantages(config, inputs, process_group=process_group).advantages
