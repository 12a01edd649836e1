"""Dynamic sampling (DAPO, arXiv:2503.14476): keep only prompt groups that carry a learning signal.

A group whose rewards are all equal has zero group-relative advantage everywhere, so it costs a training
step and teaches nothing; the rollout over-samples prompts (--over-sampling-batch-size) and drops such
groups (--dynamic-sampling-filter-path) until it has --rollout-batch-size groups that pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from rl_core.protocols import SampleFilter
from rl_core.sample import Sample


def _scalar_reward(sample: Sample) -> float:
    if not isinstance(sample.reward, (int, float)):
        raise ValueError(f"sample {sample.index}: reward {sample.reward!r} is not a number; set the reward key")
    return float(sample.reward)


def check_reward_nonzero_std(group: Sequence[Sample]) -> bool:
    """Keep the group unless all its rewards are equal (slime's filter of the same name)."""
    rewards = [_scalar_reward(s) for s in group]
    return max(rewards) > min(rewards)


@dataclass
class DynamicSamplingStats:
    """Counts of one rollout's over-sampling, as plain numbers for the metrics sink."""

    rounds: int = 0
    """Over-sampling rounds (batches of prompts sent to the engines)."""
    generated_groups: int = 0
    kept_groups: int = 0
    dropped_groups: int = 0
    """Groups the filter refused."""
    surplus_groups: int = 0
    """Groups that passed after the target was reached; handed back to the data source."""
    kept: list[list[Sample]] = field(default_factory=list, repr=False)
    dropped: list[list[Sample]] = field(default_factory=list, repr=False)
    """The groups the filter refused (slime's --rollout-all-samples-process-path sees them too)."""

    def metrics(self) -> dict[str, float]:
        prefix = "rollout/dynamic_sampling/"
        return {
            prefix + "rounds": float(self.rounds),
            prefix + "generated_groups": float(self.generated_groups),
            prefix + "kept_groups": float(self.kept_groups),
            prefix + "dropped_groups": float(self.dropped_groups),
            prefix + "surplus_groups": float(self.surplus_groups),
            prefix + "drop_ratio": self.dropped_groups / max(self.generated_groups, 1),
        }


def sort_groups(
    groups: Sequence[list[Sample]], sample_filter: SampleFilter | None, target: int, stats: DynamicSamplingStats
) -> list[list[Sample]]:
    """Add one round's finished groups to `stats.kept` until it holds `target`; returns the surplus groups
    that passed the filter after the target was reached (to hand back to the data source)."""
    stats.rounds += 1
    surplus = []
    for group in groups:
        stats.generated_groups += 1
        if sample_filter is not None and not sample_filter(group):
            stats.dropped_groups += 1
            stats.dropped.append(list(group))
        elif len(stats.kept) < target:
            stats.kept.append(list(group))
            stats.kept_groups += 1
        else:
            surplus.append(list(group))
            stats.surplus_groups += 1
    return surplus
