"""`rl-train`: the synchronous loop. Each rollout: generate -> reward -> advantages -> train -> weight sync.

Flags are parsed before torch or Ray is imported, so `rl-train --help` and a bad flag answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from rl_apps.cli import parse_config
from rl_apps.train_config import TrainConfig


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(TrainConfig, argv, "rl-train", __doc__.splitlines()[0])
    exit_on_failure("rl-train", lambda: run(config))


T = TypeVar("T")


def exit_on_failure(prog: str, work: Callable[[], T]) -> T:
    """Run `work`; bad input, a placement Ray cannot make, or rewards that fail to grade end the program
    with one line naming the cause (not Ray's traceback around it). Rows already logged stay written."""
    from rl_core.rollout import RewardFailure

    from rl_apps.cluster import PlacementError

    try:
        return work()
    except (InputError, PlacementError, RewardFailure) as e:
        sys.exit(f"{prog}: error: {getattr(e, 'cause', None) or e}")


class InputError(Exception):
    """Bad input found before any work started: the message says which file, line or flag."""


def check_inputs(config: TrainConfig) -> None:
    """Fail on bad data or a bad reward function before Ray and the engines start."""
    from rl_core.data_source import DataError
    from rl_rewards import build_reward
    from rl_router import load_middleware
    from rl_sglang.sglang_flags import check_sglang_args

    from rl_apps.data import (
        build_data_source, load_eval_rows, load_generation_hooks, load_sample_filter, load_sample_hooks, load_tokenizer,
    )
    from rl_apps.slime_api import slime_args

    if not (Path(config.hf_checkpoint) / "config.json").is_file():
        raise InputError(f"--hf-checkpoint {config.hf_checkpoint}: no config.json in that folder")
    try:
        check_sglang_args(config.sglang_args)
        tokenizer = load_tokenizer(config)
        if config.prompt_data is not None:
            build_data_source(config, tokenizer)
        load_eval_rows(config, tokenizer)
        load_sample_filter(config)
        build_reward(config.rm_type, config.custom_rm_path, slime_args=slime_args(config), **config.reward_options())
        load_generation_hooks(config)
        load_sample_hooks(config)
    except (DataError, ValueError, ImportError, FileNotFoundError, AttributeError, TypeError) as e:
        raise InputError(str(e)) from None
    if config.train_backend == "megatron":
        from rl_megatron import check_config, read_hf_config

        try:
            for role in ("policy", "critic") if config.use_critic else ("policy",):
                check_config(config.backend_config(role), read_hf_config(config.hf_checkpoint),  # type: ignore[arg-type]
                             world_size=config.actor_num_gpus_per_node)
        except ValueError as e:
            raise InputError(str(e)) from None
    if config.load is not None:
        from rl_apps.checkpoints import CheckpointError, find_checkpoint

        try:
            find_checkpoint(config)
        except CheckpointError as e:
            raise InputError(str(e)) from None
    for spec in config.router_middleware_paths:
        try:
            load_middleware(spec)
        except (ValueError, ImportError, TypeError) as e:
            raise InputError(f"--router-middleware-paths: {e}") from None


def run(config: TrainConfig, loop: Callable[[Any, Any, Any, Any], None] | None = None) -> Path:
    """Run the whole training with `loop(config, parts, sink, eval_sink)` (the synchronous `train_loop` by
    default); returns the metrics file (one JSON line per rollout; evaluations go to eval_metrics.jsonl)."""
    check_inputs(config)
    from rl_apps.cluster import placed_parts, placement_notice

    print(f"rl-train: {placement_notice(config)}", flush=True)
    from rl_apps.metrics import FanOutSink, JsonlSink, TensorBoardSink, plot_reward_curve

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / "metrics.jsonl"
    files = [JsonlSink(metrics_path), JsonlSink(output_dir / "eval_metrics.jsonl")]
    tensorboard = [TensorBoardSink(output_dir / "tensorboard")] if config.use_tensorboard else []
    try:
        with placed_parts(config) as parts:
            (loop or train_loop)(config, parts, FanOutSink([files[0], *tensorboard]), FanOutSink([files[1], *tensorboard]))
    finally:
        for sink in files + tensorboard:
            sink.close()
    if config.save_reward_curve and metrics_path.exists():
        plot_reward_curve(metrics_path, output_dir / "reward_curve.png")
    return metrics_path


def train_loop(config: TrainConfig, parts: Any, sink: Any, eval_sink: Any) -> None:
    from rl_apps.loop import training_loop

    training_loop(config, parts, sink, eval_sink, asynchronous=False)


if __name__ == "__main__":
    main()
