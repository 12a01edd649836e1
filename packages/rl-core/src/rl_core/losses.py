"""The losses a training backend's `train_step` takes as a parameter: one backend trains a policy, a
critic or an SFT model depending on the loss it is handed.

A backend runs the forward pass the loss `needs`, pads this rank's micro-batch into [B, T] tensors over
response tokens (`LossInputs`), calls the loss, and back-propagates what it returns. The loss returns this
micro-batch's share of the global-batch loss (`LossDenominators`), so the backend's gradient is the same
however the batch is split over micro-batches and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

from rl_core.algorithms.policy_loss import LossAggregation, LossDenominators, PolicyLossConfig, aggregate, policy_loss
from rl_core.algorithms.value_loss import value_loss

Output = Literal["log_probs", "entropy", "ref_log_probs", "values"]
"""What a loss can ask of the forward pass: the policy's log-probs of the response tokens (with gradient),
their entropy, the reference model's log-probs (no gradient), or a value head's values (with gradient)."""


@dataclass
class LossInputs:
    """One micro-batch on one rank. Every tensor is [B, T]: B samples, T the longest response among them;
    padding and tokens outside the loss mask hold 0 in every field."""

    loss_mask: torch.Tensor
    """1.0 on tokens that are trained on (what the policy sampled), 0.0 on tool output and padding."""
    denominators: LossDenominators
    """Sizes of the whole global batch, for split-invariant aggregation."""
    advantages: torch.Tensor | None = None
    old_log_probs: torch.Tensor | None = None
    """The batch's old policy (TrainBatch.old_log_probs), when the RL step computed one."""
    rollout_log_probs: torch.Tensor | None = None
    """The engine's log-probs of the sampled tokens."""
    returns: torch.Tensor | None = None
    """The critic's regression targets (ppo)."""
    old_values: torch.Tensor | None = None
    """The critic's values at rollout time (TrainBatch.values), the clip centre of the value loss."""
    log_probs: torch.Tensor | None = None
    """This forward's log-probs under softmax(logits / rollout temperature), differentiable."""
    entropy: torch.Tensor | None = None
    """Entropy of the same distribution; differentiable only when the loss sets `entropy_grad`."""
    ref_log_probs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    """This forward's value-head outputs, differentiable."""


@runtime_checkable
class TrainLoss(Protocol):
    """A loss over one micro-batch; `needs` tells the backend which forward outputs to compute."""

    @property
    def needs(self) -> frozenset[Output]:
        """The forward outputs the loss reads."""
        ...

    @property
    def entropy_grad(self) -> bool:
        """Keep the entropy's graph (an entropy bonus is in the loss); else entropy is a metric only."""
        ...

    def __call__(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's share of the loss, and detached metrics aggregated the same way (so that
        summing them over micro-batches and ranks gives the global-batch value)."""
        ...


def _require(inputs: LossInputs, loss: str, *names: str) -> None:
    missing = [name for name in names if getattr(inputs, name) is None]
    if missing:
        raise ValueError(f"{loss} needs {', '.join(missing)} in its inputs; the backend or batch gave none")


@dataclass(frozen=True)
class PolicyLoss:
    """The policy-gradient loss of `rl_core.algorithms.policy_loss` (PPO, GSPO or CISPO surrogate, TIS,
    OPSM, KL loss, entropy bonus).

    The ratio's old policy is the batch's `old_log_probs` when the RL step computed them (a rollout split
    into several optimizer steps), else the engine's log-probs with `use_rollout_logprobs`, else this
    forward's own detached log-probs: the weights do not change inside one train_step, so those are the
    pre-update policy.
    """

    config: PolicyLossConfig = PolicyLossConfig()
    use_rollout_logprobs: bool = False

    @property
    def needs(self) -> frozenset[Output]:
        return frozenset({"log_probs", "entropy", *(("ref_log_probs",) if self.config.use_kl_loss else ())})

    @property
    def entropy_grad(self) -> bool:
        return self.config.entropy_coef != 0.0

    def __call__(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _require(inputs, "PolicyLoss", "log_probs", "advantages")
        assert inputs.log_probs is not None and inputs.advantages is not None
        old: torch.Tensor
        if inputs.old_log_probs is not None:
            old = inputs.old_log_probs
        elif self.use_rollout_logprobs:
            _require(inputs, "PolicyLoss with use_rollout_logprobs", "rollout_log_probs")
            assert inputs.rollout_log_probs is not None
            old = inputs.rollout_log_probs
        else:
            old = inputs.log_probs.detach()
        # Tokens outside the loss mask carry 0 in every log-prob, so no exp() there can overflow into NaN.
        on = inputs.loss_mask > 0
        zero = lambda t: torch.where(on, t, torch.zeros_like(t))  # noqa: E731
        maybe_zero = lambda t: None if t is None else zero(t)  # noqa: E731
        return policy_loss(
            self.config,
            log_probs=zero(inputs.log_probs),
            old_log_probs=zero(old),
            advantages=inputs.advantages,
            mask=inputs.loss_mask,
            denominators=inputs.denominators,
            ref_log_probs=maybe_zero(inputs.ref_log_probs) if self.config.use_kl_loss else None,
            entropy=inputs.entropy,
            rollout_log_probs=maybe_zero(inputs.rollout_log_probs),
        )


@dataclass(frozen=True)
class ValueLoss:
    """PPO's clipped value loss towards the returns (`--value-clip`), for a backend with a value head."""

    value_clip: float = 0.2
    aggregation: LossAggregation = "token_mean"
    aggregation_constant: float = 1.0
    needs: frozenset[Output] = frozenset({"values"})
    entropy_grad: bool = False

    def __call__(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _require(inputs, "ValueLoss", "values", "old_values", "returns")
        assert inputs.values is not None and inputs.old_values is not None and inputs.returns is not None
        return value_loss(
            values=inputs.values,
            old_values=inputs.old_values,
            returns=inputs.returns,
            mask=inputs.loss_mask,
            denominators=inputs.denominators,
            value_clip=self.value_clip,
            aggregation=self.aggregation,
            aggregation_constant=self.aggregation_constant,
        )


@dataclass(frozen=True)
class SFTLoss:
    """Negative log-likelihood of the loss-mask tokens (slime's `--loss-type sft_loss`)."""

    aggregation: LossAggregation = "token_mean"
    aggregation_constant: float = 1.0
    needs: frozenset[Output] = frozenset({"log_probs"})
    entropy_grad: bool = False

    def __call__(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _require(inputs, "SFTLoss", "log_probs")
        assert inputs.log_probs is not None
        loss = aggregate(-inputs.log_probs, inputs.loss_mask, self.aggregation, inputs.denominators, self.aggregation_constant)
        return loss, {"loss": loss.detach(), "sft_loss": loss.detach()}
