"""Evaluation during training: the engines answer every --eval-prompt-data set, graded by the reward hub.

Rows go to `eval_metrics.jsonl` (and TensorBoard) with `step` = the evaluated policy's version, the number
of rollouts it was trained on, so they line up with the rollout rows that policy generated.
"""

from __future__ import annotations

import time
from typing import Any

from rl_apps.train_config import TrainConfig


def evaluate_if_due(config: TrainConfig, parts: Any, eval_sink: Any, version: int, *, before_training: bool = False) -> float | None:
    """Evaluate the engines' current policy (`version`: rollouts trained on) when the config says so: before
    training unless --skip-eval-before-train, then at every multiple of --eval-interval. Call it only
    while no rollout is in flight. Returns the seconds spent, or None when nothing was due."""
    import ray
    from tqdm import tqdm

    if not config.eval_prompt_data:
        return None
    if before_training:
        due = not config.skip_eval_before_train
    else:
        due = config.eval_interval is not None and version % config.eval_interval == 0
    if not due:
        return None
    start = time.perf_counter()
    metrics = ray.get(parts.rollout.evaluate.remote())
    eval_sink.log(version, metrics)
    rewards = " ".join(f"{name} {metrics[f'eval/{name}/reward_mean']:.3f}" for name, _ in config.eval_datasets()
                       if f"eval/{name}/reward_mean" in metrics)
    tqdm.write(f"eval of policy version {version} ({version} rollout(s) trained on): {rewards}")
    return time.perf_counter() - start
