"""`rl-train`: the synchronous loop. Each rollout: generate -> reward -> advantages -> train -> weight sync.

Flags are parsed before torch or Ray is imported, so `rl-train --help` and a bad flag answer at once.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Sequence

from rl_apps.cli import parse_config
from rl_apps.train_config import TrainConfig


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(TrainConfig, argv, "rl-train", __doc__.splitlines()[0])
    try:
        run(config)
    except InputError as e:
        sys.exit(f"rl-train: error: {e}")


class InputError(Exception):
    """Bad input found before any work started: the message says which file, line or flag."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _resources(config: TrainConfig) -> tuple[dict, dict]:
    """Ray resources of one trainer rank and one engine."""
    import torch

    on_gpu = torch.cuda.is_available() and "cpu" not in (config.train_device, config.rollout_device)
    if not on_gpu:
        return {"num_cpus": 1}, {"num_cpus": 1}
    share = 0.5 if config.colocate else 1.0
    return {"num_cpus": 1, "num_gpus": share}, {"num_cpus": 1, "num_gpus": share}


def run(config: TrainConfig) -> Path:
    """Run the whole training; returns the metrics file."""
    check_inputs(config)
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from rl_core.algorithms.advantages import compute_advantages
    from rl_core.train_batch import TrainBatch
    from tqdm import tqdm

    from rl_apps.actors import EngineActor, RolloutManager, TrainerActor
    from rl_apps.metrics import FanOutSink, JsonlSink, TensorBoardSink, plot_reward_curve

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / "metrics.jsonl"
    sinks = [JsonlSink(metrics_path)]
    if config.use_tensorboard:
        sinks.append(TensorBoardSink(output_dir / "tensorboard"))
    sink = FanOutSink(sinks)

    world = config.actor_num_gpus_per_node
    trainer_res, engine_res = _resources(config)
    if not ray.is_initialized():
        ray.init(num_cpus=max(os.cpu_count() or 1, world + config.rollout_num_engines + 1), include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
    group = placement_group([dict(_bundle(trainer_res)) for _ in range(world)]
                            + [dict(_bundle(engine_res)) for _ in range(config.rollout_num_engines)], strategy="PACK")
    ray.get(group.ready())
    placed = lambda i: PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=i)  # noqa: E731

    engines, trainers, rollout = [], [], None
    try:
        engines = [
            EngineActor.options(scheduling_strategy=placed(world + i), **engine_res).remote(config, i)
            for i in range(config.rollout_num_engines)
        ]
        engine_urls = ray.get([e.start.remote() for e in engines])
        master_port = _free_port()
        trainers = [
            TrainerActor.options(scheduling_strategy=placed(rank), **trainer_res).remote(config, rank, world, "127.0.0.1", master_port)
            for rank in range(world)
        ]
        rollout = RolloutManager.options(num_cpus=0).remote(config, engine_urls)
        ray.get([t.__ray_ready__.remote() for t in trainers] + [rollout.__ray_ready__.remote()])

        for rollout_id in tqdm(range(config.num_rollout), desc="rollout", dynamic_ncols=True, file=sys.stdout):
            step_start = time.perf_counter()
            result = ray.get(rollout.generate.remote(rollout_id))
            samples = result["samples"]
            metrics = dict(result["metrics"])
            timing = dict(result["timing"])

            train_start = time.perf_counter()
            advantages = compute_advantages(
                config.advantage_estimator,
                [float(s.reward) for s in samples],
                config.n_samples_per_prompt,
                [s.response_length for s in samples],
                std_normalize=not config.disable_grpo_std_normalization,
            )
            step = config.global_batch_size
            train_metrics: list[dict[str, float]] = []
            for start in range(0, len(samples), step):
                batch = TrainBatch.from_samples(samples[start : start + step], [a.tolist() for a in advantages[start : start + step]])
                train_metrics.append(ray.get([t.train_step.remote(batch) for t in trainers])[0])
            timing["train"] = time.perf_counter() - train_start

            sync_start = time.perf_counter()
            ray.get([t.update_weights.remote(engine_urls, str(rollout_id + 1)) for t in trainers])
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
    finally:
        sink.close()
        for actor in [rollout, *trainers, *engines]:
            if actor is not None:
                try:
                    ray.get(actor.shutdown.remote(), timeout=60)
                except Exception:  # noqa: BLE001 - best effort: the process may already be gone
                    pass
        ray.util.remove_placement_group(group)
    if config.save_reward_curve and metrics_path.exists():
        plot_reward_curve(metrics_path, output_dir / "reward_curve.png")
    return metrics_path


def _bundle(resources: dict) -> dict:
    names = {"num_cpus": "CPU", "num_gpus": "GPU"}
    return {names[k]: v for k, v in resources.items()}


if __name__ == "__main__":
    main()
