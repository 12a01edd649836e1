"""What the loop hands a training backend: per-sample token lists, no tensors, no padding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from rl_core.sample import Sample


@dataclass
class TrainBatch:
    """One global batch of rollout data, ready for a backend to pad and split into micro-batches.

    Lists are per sample. Token-level lists cover the response only (length `response_lengths[i]`).
    """

    tokens: list[list[int]]
    """Prompt + response token ids of each sample."""
    response_lengths: list[int]
    loss_masks: list[list[int]]
    """1 where the token is trained on; 0 for tool output and padding-like tokens."""
    advantages: list[list[float]]
    """Per-token advantage, already broadcast over the response."""
    rollout_log_probs: list[list[float]] | None = None
    """Engine log-probs of the response tokens; used as the old policy when the trainer does not recompute."""
    old_log_probs: list[list[float]] | None = None
    """Trainer log-probs from before the rollout's first optimizer step, the PPO ratio's old policy when
    a rollout is split into several steps; None: the backend takes the old policy from this step's weights."""
    rewards: list[float] = field(default_factory=list)
    """Scalar reward per sample, for metrics."""
    returns: list[list[float]] | None = None
    """Per-token returns, the critic's regression targets (ppo); None without a critic."""
    values: list[list[float]] | None = None
    """Per-token critic values at rollout time, the old values of the clipped value loss (ppo)."""

    def __post_init__(self) -> None:
        n = len(self.tokens)
        for name in ("response_lengths", "loss_masks", "advantages", "rollout_log_probs", "old_log_probs", "returns", "values"):
            if getattr(self, name) is not None and len(getattr(self, name)) != n:
                raise ValueError(f"TrainBatch.{name} has {len(getattr(self, name))} entries, tokens has {n}")
        for i, length in enumerate(self.response_lengths):
            if not 0 < length <= len(self.tokens[i]):
                raise ValueError(f"TrainBatch sample {i}: response_length {length} outside 1..{len(self.tokens[i])}")
            if len(self.loss_masks[i]) != length or len(self.advantages[i]) != length:
                raise ValueError(f"TrainBatch sample {i}: loss_mask/advantages length differs from response_length {length}")
            for name in ("rollout_log_probs", "old_log_probs", "returns", "values"):
                per_token = getattr(self, name)
                if per_token is not None and len(per_token[i]) != length:
                    raise ValueError(f"TrainBatch sample {i}: {name} length differs from response_length {length}")

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, indices: Sequence[int]) -> TrainBatch:
        """The sub-batch of the given samples (a data-parallel shard or a mini-batch)."""
        pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
        return TrainBatch(
            tokens=pick(self.tokens),
            response_lengths=pick(self.response_lengths),
            loss_masks=pick(self.loss_masks),
            advantages=pick(self.advantages),
            rollout_log_probs=None if self.rollout_log_probs is None else pick(self.rollout_log_probs),
            old_log_probs=None if self.old_log_probs is None else pick(self.old_log_probs),
            rewards=pick(self.rewards) if self.rewards else [],
            returns=None if self.returns is None else pick(self.returns),
            values=None if self.values is None else pick(self.values),
        )

    @classmethod
    def from_samples(
        cls,
        samples: Sequence[Sample],
        advantages: Sequence[Sequence[float]],
        *,
        returns: Sequence[Sequence[float]] | None = None,
        values: Sequence[Sequence[float]] | None = None,
    ) -> TrainBatch:
        have_log_probs = all(s.rollout_log_probs is not None for s in samples)
        return cls(
            tokens=[list(s.tokens) for s in samples],
            response_lengths=[s.response_length for s in samples],
            loss_masks=[s.effective_loss_mask() for s in samples],
            advantages=[list(a) for a in advantages],
            rollout_log_probs=[list(s.rollout_log_probs) for s in samples] if have_log_probs else None,  # type: ignore[arg-type]
            rewards=[float(s.reward) if isinstance(s.reward, (int, float)) else 0.0 for s in samples],
            returns=None if returns is None else [list(r) for r in returns],
            values=None if values is None else [list(v) for v in values],
        )
