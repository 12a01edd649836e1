"""`rl-train`: the synchronous loop. Each rollout: generate -> reward -> advantages -> train -> weight sync.

Flags are parsed before torch or Ray is imported, so `rl-train --help` and a bad flag answer at once.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from rl_apps.cli import parse_config
from rl_apps.train_config import TrainConfig


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(TrainConfig, argv, "rl-train", __doc__.splitlines()[0])
    from rl_apps.cluster import PlacementError

    try:
        run(config)
    except (InputError, PlacementError) as e:
        sys.exit(f"rl-train: error: {e}")


class InputError(Exception):
    """Bad input found before any work started: the message says which file, line or flag."""


def check_inputs(config: TrainConfig) -> None:
    """Fail on bad data or a bad reward function before Ray and the engines start."""
    from rl_core.data_source import DataError
    from rl_rewards import build_reward

    from rl_apps.data import build_data_source

    if not (Path(config.hf_checkpoint) / "config.json").is_file():
        raise InputError(f"--hf-checkpoint {config.hf_checkpoint}: no config.json in that folder")
    try:
        build_data_source(config)
        build_reward(config.rm_type, config.custom_rm_path, reward_key=config.reward_key)
    except (DataError, ValueError, ImportError, FileNotFoundError, AttributeError, TypeError) as e:
        raise InputError(str(e)) from None


def run(config: TrainConfig) -> Path:
    """Run the whole training; returns the metrics file (one JSON line per rollout)."""
    check_inputs(config)
    from rl_apps.cluster import placed_parts
    from rl_apps.metrics import FanOutSink, JsonlSink, TensorBoardSink, plot_reward_curve

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / "metrics.jsonl"
    sink = FanOutSink([JsonlSink(metrics_path)] + ([TensorBoardSink(output_dir / "tensorboard")] if config.use_tensorboard else []))
    try:
        with placed_parts(config) as parts:
            train_loop(config, parts, sink)
    finally:
        sink.close()
    if config.save_reward_curve and metrics_path.exists():
        plot_reward_curve(metrics_path, output_dir / "reward_curve.png")
    return metrics_path


def train_loop(config: TrainConfig, parts: Any, sink: Any) -> None:
    import ray
    from tqdm import tqdm

    for rollout_id in tqdm(range(config.num_rollout), desc="rollout", dynamic_ncols=True, file=sys.stdout):
        step_start = time.perf_counter()
        result = ray.get(parts.rollout.generate.remote(rollout_id))
        samples, metrics, timing = result["samples"], dict(result["metrics"]), dict(result["timing"])

        train_start = time.perf_counter()
        train_metrics = train_on_rollout(config, parts.trainers, samples)
        timing["train"] = time.perf_counter() - train_start

        sync_start = time.perf_counter()
        ray.get([t.update_weights.remote(parts.engine_urls, str(rollout_id + 1)) for t in parts.trainers])
        timing["weight_sync"] = time.perf_counter() - sync_start
        timing["step"] = time.perf_counter() - step_start

        for key in train_metrics[0]:
            metrics[f"train/{key}"] = sum(m[key] for m in train_metrics) / len(train_metrics)
        metrics.update({f"time/{k}": v for k, v in timing.items()})
        sink.log(rollout_id, metrics)
        tqdm.write(
            f"rollout {rollout_id}: reward {metrics.get('rollout/reward_mean', float('nan')):.3f}"
            f" loss {metrics.get('train/loss', float('nan')):.4f} step {timing['step']:.2f}s"
        )


def train_on_rollout(config: TrainConfig, trainers: list[Any], samples: list[Any]) -> list[dict[str, float]]:
    """Advantages over the whole rollout, then `num_steps_per_rollout` optimizer steps of `global_batch_size`."""
    import ray
    import torch
    from rl_core.algorithms.advantages import AdvantageInputs, estimate_advantages
    from rl_core.train_batch import TrainBatch

    advantages = estimate_advantages(
        config.advantage_config(),
        AdvantageInputs(
            rewards=[float(s.reward) for s in samples],
            group_size=config.n_samples_per_prompt,
            response_lengths=[s.response_length for s in samples],
            loss_masks=[torch.tensor(s.effective_loss_mask(), dtype=torch.float32) for s in samples],
        ),
    ).advantages
    whole = TrainBatch.from_samples(samples, [a.tolist() for a in advantages])
    if config.num_steps_per_rollout > 1 and not config.use_rollout_logprobs:
        # Every step's PPO ratio is taken against the policy that existed before the rollout's first step.
        old = ray.get([t.compute_log_probs.remote(whole) for t in trainers])[0]
        whole = dataclasses.replace(whole, old_log_probs=old)
    step = config.global_batch_size
    return [
        ray.get([t.train_step.remote(whole.select(range(start, start + step))) for t in trainers])[0]
        for start in range(0, len(samples), step)
    ]


if __name__ == "__main__":
    main()
