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
    from rl_apps.cluster import PlacementError
    from rl_core.rollout import RewardFailure

    try:
        return work()
    except (InputError, PlacementError, RewardFailure) as e:
        sys.exit(f"{prog}: error: {getattr(e, 'cause', None) or e}")


class InputError(Exception):
    """Bad input found before any work started: the message says which file, line or flag."""


def check_inputs(config: TrainConfig) -> None:
    """Fail on bad data or a bad reward function before Ray and the engines start; --num-epoch becomes
    --num-rollout here, where the number of prompts is known."""
    from rl_apps.data import (
        build_data_source,
        load_eval_rows,
        load_generation_hooks,
        load_sample_filter,
        load_sample_hooks,
        load_tokenizer,
    )
    from rl_apps.slime_api import slime_args
    from rl_core.data_source import DataError
    from rl_rewards import build_reward
    from rl_router import load_middleware
    from rl_sglang.sglang_flags import check_sglang_args

    if not (config.hf_folder / "config.json").is_file():
        raise InputError(f"--hf-checkpoint {config.hf_checkpoint}: no config.json in that folder")
    try:
        check_sglang_args(config.sglang_args)
        tokenizer = load_tokenizer(config)
        if config.prompt_data is not None:
            source = build_data_source(config, tokenizer)
            if config.num_epoch is not None:
                set_num_rollout_from_epochs(config, len(source.rows))
        load_eval_rows(config, tokenizer)
        load_sample_filter(config)
        build_reward(config.rm_type, config.custom_rm_path, slime_args=slime_args(config), **config.reward_options())
        load_generation_hooks(config)
        load_sample_hooks(config)
        if config.engine_type == "sglang":
            from rl_sglang.launcher import sglang_available

            python = str(config.engine_python) if config.engine_python is not None else None
            if not sglang_available(python):
                raise InputError(
                    f"--engine-type sglang: {python or sys.executable} cannot import sglang; install sglang==0.5.23"
                    " there or name its environment's interpreter with --engine-python (docs/sglang.md)"
                )
        if config.use_wandb:
            import importlib.util

            from rl_apps.metrics import WANDB_MISSING

            if importlib.util.find_spec("wandb") is None:
                raise InputError(WANDB_MISSING)
    except (DataError, ValueError, ImportError, FileNotFoundError, AttributeError, TypeError) as e:
        raise InputError(str(e)) from None
    if config.train_backend == "megatron":
        from rl_megatron import check_config, read_hf_config

        try:
            for role in ("policy", "critic") if config.use_critic else ("policy",):
                check_config(config.backend_config(role), read_hf_config(config.hf_checkpoint),  # type: ignore[arg-type]
                             world_size=config.actor_world_size())
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


def set_num_rollout_from_epochs(config: TrainConfig, num_prompts: int) -> None:
    """--num-epoch as slime: num_rollout = num_epoch x (prompts // rollout_batch_size)."""
    per_epoch = num_prompts // config.rollout_batch_size
    if per_epoch == 0:
        raise InputError(
            f"--num-epoch: --prompt-data has {num_prompts} prompt(s), fewer than one rollout (--rollout-batch-size"
            f" {config.rollout_batch_size})"
        )
    assert config.num_epoch is not None, "called only when --num-epoch is given"
    object.__setattr__(config, "num_rollout", config.num_epoch * per_epoch)
    if config.start_rollout_id is not None and config.start_rollout_id >= config.num_rollout:
        raise InputError(f"--start-rollout-id {config.start_rollout_id} >= the {config.num_rollout} rollouts of --num-epoch")


def run(config: TrainConfig, loop: Callable[[Any, Any, Any, Any], None] | None = None) -> Path:
    """Run the whole training with `loop(config, parts, sink, eval_sink)` (the synchronous `train_loop` by
    default); returns the metrics file (one JSON line per rollout; evaluations go to eval_metrics.jsonl)."""
    check_inputs(config)
    from rl_apps.cluster import placed_parts, placement_notice

    print(f"rl-train: {placement_notice(config)}", flush=True)
    if config.use_fault_tolerance and not config.engine_restarts():
        print(f"rl-train: --use-fault-tolerance: a failing engine leaves rotation until its health check passes, but"
              f" its process is not restarted (restarts need --update-weight-transport disk and"
              f" --rollout-max-engine-restarts > 0; now {config.update_weight_transport},"
              f" {config.rollout_max_engine_restarts})", flush=True)
    from rl_apps.metrics import open_sinks, plot_reward_curve

    output_dir = Path(config.output_dir)
    sinks = open_sinks(config)
    try:
        with placed_parts(config) as parts:
            (loop or train_loop)(config, parts, sinks.rollouts, sinks.evals)
    finally:
        sinks.close()
    metrics_path = output_dir / "metrics.jsonl"
    if config.save_reward_curve and metrics_path.exists():
        plot_reward_curve(metrics_path, output_dir / "reward_curve.png")
    print(f"rl-train: outputs in {output_dir}: " + ", ".join(written_outputs(config, sinks.wandb_run)), flush=True)
    return metrics_path


def written_outputs(config: TrainConfig, wandb_run: Any) -> list[str]:
    """What this run wrote, for the line printed at its end."""
    output_dir = Path(config.output_dir)
    written = [p.name for p in (output_dir / "metrics.jsonl", output_dir / "eval_metrics.jsonl", output_dir / "reward_curve.png")
               if p.exists() and p.stat().st_size]
    if config.use_tensorboard:
        written.append(f"TensorBoard logs {config.tensorboard_dir()} (tensorboard --logdir {config.tensorboard_dir()})")
    if wandb_run is not None and getattr(wandb_run.run, "dir", None):
        written.append(f"W&B run files {Path(wandb_run.run.dir).parent}")
    if config.save is not None:
        written.append(f"checkpoints {config.save}")
    return written


def train_loop(config: TrainConfig, parts: Any, sink: Any, eval_sink: Any) -> None:
    from rl_apps.loop import training_loop

    training_loop(config, parts, sink, eval_sink, asynchronous=False)


if __name__ == "__main__":
    main()
