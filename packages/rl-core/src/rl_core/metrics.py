"""Rollout statistics, returned as plain floats for whatever sink the app configured."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Sequence

from rl_core.sample import Sample, SampleStatus


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one prompt (Chen et al. 2021, arXiv:2107.03374): 1 - C(n - c, k) / C(n, k),
    the chance that k of the n samples drawn without replacement contain a correct one."""
    if not 0 < k <= num_samples:
        raise ValueError(f"pass@{k} needs 1 <= k <= n, with n = {num_samples} samples")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def pass_at_k_metrics(groups: Sequence[Sequence[float]], *, threshold: float = 1.0) -> dict[str, float]:
    """Mean pass@k over prompt groups for k = 1, 2, 4, ... up to the largest group, a reward >= `threshold`
    counting as correct; each k is averaged over the groups with at least k samples (as slime)."""
    largest = max((len(g) for g in groups), default=0)
    metrics = {}
    k = 1
    while k <= largest:
        eligible = [g for g in groups if len(g) >= k]
        values = [pass_at_k(len(g), sum(r >= threshold for r in g), k) for g in eligible]
        metrics[f"rollout/pass@{k}"] = statistics.fmean(values)
        k *= 2
    return metrics


def _length_stats(lengths: Sequence[int]) -> dict[str, float]:
    if not lengths:
        return {"rollout/response_len_mean": 0.0, "rollout/response_len_max": 0.0}
    return {
        "rollout/response_len_mean": statistics.fmean(lengths),
        "rollout/response_len_max": float(max(lengths)),
        "rollout/response_len_min": float(min(lengths)),
        "rollout/response_len_median": float(statistics.median(lengths)),
        "rollout/response_len_std": statistics.pstdev(lengths),
    }


def rollout_metrics(samples: Sequence[Sample], *, log_passrate: bool = True, pass_threshold: float = 1.0) -> dict[str, float]:
    """Counts, response lengths, rewards, weight versions and (`log_passrate`) pass@k of one rollout's samples.

    pass@k groups samples by `group_index` and counts a reward >= `pass_threshold` as a pass.
    """
    rewards = [float(s.reward) for s in samples if isinstance(s.reward, (int, float))]
    lengths = [s.response_length for s in samples]
    metrics = {
        "rollout/num_samples": float(len(samples)),
        **_length_stats(lengths),
        "rollout/truncated_ratio": sum(s.status is SampleStatus.TRUNCATED for s in samples) / max(len(samples), 1),
        "rollout/aborted_ratio": sum(s.status is SampleStatus.ABORTED for s in samples) / max(len(samples), 1),
    }
    versions = [s.weight_version or "" for s in samples]
    if versions and all(v.isdigit() for v in versions):
        metrics["rollout/weight_version_min"] = float(min(int(v) for v in versions))
        metrics["rollout/weight_version_max"] = float(max(int(v) for v in versions))
    if rewards:
        metrics["rollout/reward_mean"] = statistics.fmean(rewards)
        metrics["rollout/reward_std"] = statistics.pstdev(rewards)
    if log_passrate and rewards and len(rewards) == len(samples):
        groups: dict[int | None, list[float]] = defaultdict(list)
        for s in samples:
            groups[s.group_index].append(float(s.reward))  # type: ignore[arg-type]
        metrics.update(pass_at_k_metrics(list(groups.values()), threshold=pass_threshold))
    return metrics
