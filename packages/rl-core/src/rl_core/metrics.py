"""Rollout statistics, returned as plain floats for whatever sink the app configured."""

from __future__ import annotations

import statistics
from typing import Sequence

from rl_core.sample import Sample, SampleStatus


def rollout_metrics(samples: Sequence[Sample]) -> dict[str, float]:
    rewards = [float(s.reward) for s in samples if isinstance(s.reward, (int, float))]
    lengths = [s.response_length for s in samples]
    metrics = {
        "rollout/num_samples": float(len(samples)),
        "rollout/response_len_mean": statistics.fmean(lengths) if lengths else 0.0,
        "rollout/response_len_max": float(max(lengths, default=0)),
        "rollout/truncated_ratio": sum(s.status is SampleStatus.TRUNCATED for s in samples) / max(len(samples), 1),
        "rollout/aborted_ratio": sum(s.status is SampleStatus.ABORTED for s in samples) / max(len(samples), 1),
    }
    versions = [s.weight_version for s in samples]
    if versions and all(v is not None and v.isdigit() for v in versions):
        metrics["rollout/weight_version_min"] = float(min(int(v) for v in versions))
        metrics["rollout/weight_version_max"] = float(max(int(v) for v in versions))
    if rewards:
        metrics["rollout/reward_mean"] = statistics.fmean(rewards)
        metrics["rollout/reward_std"] = statistics.pstdev(rewards)
    return metrics
