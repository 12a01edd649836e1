"""slime's sample hooks between the rollout and training, each named by a `--*-path` flag:

- `--rollout-sample-filter-path`: `filter(args, groups) -> None` sets `sample.remove_sample` on samples
  that must not be trained on (they stay in their group's reward statistics);
- `--rollout-all-samples-process-path`: `process(args, all_groups, data_source) -> None` sees every
  generated group, those a dynamic-sampling filter dropped too;
- `--custom-reward-post-process-path`: `post_process(args, samples) -> (raw_rewards, rewards)`, the
  rewards the advantages come from instead of the estimator's group normalisation;
- `--custom-convert-samples-to-train-data-path`: `convert(args, samples) -> dict` with slime's keys
  (`tokens`, `response_lengths`, `loss_masks`, `rewards`, optionally `rollout_log_probs`), what training reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rl_core.sample import Sample


@dataclass(frozen=True)
class SampleHooks:
    sample_filter: Callable[..., Any] | None = None
    all_samples_process: Callable[..., Any] | None = None
    reward_post_process: Callable[..., Any] | None = None
    convert_to_train_data: Callable[..., Any] | None = None


def apply_sample_hooks(
    hooks: SampleHooks, args: Any, groups: list[list[Sample]], dropped: Sequence[list[Sample]], data_source: Any
) -> tuple[list[Sample], list[float] | None]:
    """Run the hooks as slime does; returns the samples to train on (flat, in group order) and the
    rewards that replace the estimator's normalisation (None when no hook gives them)."""
    if hooks.sample_filter is not None:
        hooks.sample_filter(args, groups)
    if hooks.all_samples_process is not None:
        hooks.all_samples_process(args, [*groups, *dropped], data_source)
    samples = [s for g in groups for s in g]
    rewards: list[float] | None = None
    if hooks.convert_to_train_data is not None:
        rewards = _apply_train_data(samples, hooks.convert_to_train_data(args, samples))
    elif hooks.reward_post_process is not None:
        _, processed = hooks.reward_post_process(args, samples)
        rewards = _per_sample(processed, len(samples), "--custom-reward-post-process-path")
    return samples, rewards


def _per_sample(values: Any, count: int, flag: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) != count:
        raise ValueError(f"{flag}: returned {len(values)} rewards for {count} samples")
    return values


def _apply_train_data(samples: list[Sample], data: dict[str, Any]) -> list[float] | None:
    flag = "--custom-convert-samples-to-train-data-path"
    if not isinstance(data, dict):
        raise TypeError(f"{flag}: returned {type(data).__name__}, not slime's train-data dict")
    fields = {"tokens": "tokens", "response_lengths": "response_length", "loss_masks": "loss_mask",
              "rollout_log_probs": "rollout_log_probs"}
    for key, attribute in fields.items():
        if key not in data:
            continue
        if len(data[key]) != len(samples):
            raise ValueError(f"{flag}: {key!r} has {len(data[key])} entries for {len(samples)} samples")
        for sample, value in zip(samples, data[key]):
            setattr(sample, attribute, list(value) if isinstance(value, (list, tuple)) else value)
    return _per_sample(data["rewards"], len(samples), flag) if "rewards" in data else None
