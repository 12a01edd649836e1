"""`rl-train`: the synchronous loop. Each rollout: generate -> reward -> advantages -> train -> weight sync.

Flags are parsed before torch or Ray is imported, so `rl-train --help` and a bad flag answer at once.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

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
    from rl_router import load_middleware
    from rl_sglang.sglang_flags import check_sglang_args

    from rl_apps.data import build_data_source, load_eval_rows, load_sample_filter, load_tokenizer

    if not (Path(config.hf_checkpoint) / "config.json").is_file():
        raise InputError(f"--hf-checkpoint {config.hf_checkpoint}: no config.json in that folder")
    try:
        check_sglang_args(config.sglang_args)
        tokenizer = load_tokenizer(config)
        if config.prompt_data is not None:
            build_data_source(config, tokenizer)
        load_eval_rows(config, tokenizer)
        load_sample_filter(config)
        build_reward(config.rm_type, config.custom_rm_path, reward_key=config.reward_key)
    except (DataError, ValueError, ImportError, FileNotFoundError, AttributeError, TypeError) as e:
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
    from rl_apps.cluster import placed_parts
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
    import ray
    from tqdm import tqdm

    from rl_apps.checkpoints import resume, save_if_due
    from rl_apps.evaluation import evaluate_if_due

    start = resume(config, parts)
    evaluate_if_due(config, parts, eval_sink, start, before_training=True)
    for rollout_id in tqdm(range(start, config.num_rollout), desc="rollout", dynamic_ncols=True, file=sys.stdout):
        step_start = time.perf_counter()
        result = ray.get(parts.rollout.generate.remote(rollout_id))
        samples, metrics, timing = result["samples"], dict(result["metrics"]), dict(result["timing"])

        train_start = time.perf_counter()
        train_metrics = train_on_rollout(config, parts.trainers, samples, critics=parts.critics, rollout_id=rollout_id)
        timing["train"] = time.perf_counter() - train_start

        push_weights(config, parts, eval_sink, rollout_id + 1, timing)
        save_if_due(config, parts, rollout_id, timing)
        timing["step"] = time.perf_counter() - step_start
        log_rollout(sink, rollout_id, metrics, train_metrics, timing)


def push_weights(config: TrainConfig, parts: Any, eval_sink: Any, version: int, timing: dict[str, float]) -> None:
    """Send the trainer's weights to the engines as `version` (train steps so far), then evaluate them if due."""
    import ray

    from rl_apps.evaluation import evaluate_if_due

    start = time.perf_counter()
    ray.get([t.update_weights.remote(parts.engine_urls, str(version)) for t in parts.trainers])
    timing["weight_sync"] = time.perf_counter() - start
    if (seconds := evaluate_if_due(config, parts, eval_sink, version)) is not None:
        timing["eval"] = seconds


def log_rollout(
    sink: Any, rollout_id: int, metrics: dict[str, float], train_metrics: list[dict[str, float]], timing: dict[str, float]
) -> None:
    """Average the train steps' metrics key by key, add `time/...`, log the row and print a one-line summary."""
    from tqdm import tqdm

    for key in sorted({key for step in train_metrics for key in step}):
        values = [step[key] for step in train_metrics if key in step]
        metrics[key] = sum(values) / len(values)
    metrics.update({f"time/{k}": v for k, v in timing.items()})
    sink.log(rollout_id, metrics)
    critic = f" value_loss {metrics['critic/value_loss']:.4f}" if "critic/value_loss" in metrics else ""
    tqdm.write(
        f"rollout {rollout_id}: reward {metrics.get('rollout/reward_mean', float('nan')):.3f}"
        f" loss {metrics.get('train/loss', float('nan')):.4f}{critic} step {timing['step']:.2f}s"
    )


def rollout_advantages(
    config: TrainConfig,
    samples: Sequence[Any],
    *,
    log_probs: Sequence[Sequence[float]] | None = None,
    ref_log_probs: Sequence[Sequence[float]] | None = None,
    values: Sequence[Sequence[float]] | None = None,
) -> Any:
    """The configured estimator (and whitening) over the whole rollout. `log_probs` and `ref_log_probs`
    (per sample, response tokens) carry the reward KL of --kl-coef; `values` are the critic's (ppo)."""
    import torch
    from rl_core.algorithms.advantages import AdvantageInputs, estimate_advantages

    as_tensors = lambda rows: None if rows is None else [torch.tensor(r, dtype=torch.float32) for r in rows]  # noqa: E731
    return estimate_advantages(
        config.advantage_config(),
        AdvantageInputs(
            rewards=[float(s.reward) for s in samples],
            group_size=config.n_samples_per_prompt,
            response_lengths=[s.response_length for s in samples],
            loss_masks=[torch.tensor(s.effective_loss_mask(), dtype=torch.float32) for s in samples],
            log_probs=as_tensors(log_probs),
            ref_log_probs=as_tensors(ref_log_probs),
            values=as_tensors(values),
        ),
    )


def mean_reward_kl(
    config: TrainConfig, samples: Sequence[Any], log_probs: Sequence[Sequence[float]], ref_log_probs: Sequence[Sequence[float]]
) -> float:
    """Mean over loss-mask tokens of the KL estimate that --kl-coef weighs into the token rewards."""
    import torch
    from rl_core.algorithms.kl import approx_kl

    total, tokens = 0.0, 0.0
    for sample, lp, ref in zip(samples, log_probs, ref_log_probs):
        mask = torch.tensor(sample.effective_loss_mask(), dtype=torch.float32)
        total += float((approx_kl(torch.tensor(lp), torch.tensor(ref), config.kl_loss_type) * mask).sum())
        tokens += float(mask.sum())
    return total / max(tokens, 1.0)


def train_on_rollout(
    config: TrainConfig, trainers: list[Any], samples: list[Any], *, critics: Sequence[Any] = (), rollout_id: int = 0
) -> list[dict[str, float]]:
    """Forward passes over the whole rollout (policy and reference log-probs for --kl-coef and the old
    policy, the critic's values for ppo), advantages, then `num_steps_per_rollout` optimizer steps of
    `global_batch_size` for the policy and the critic side by side; the policy sits out the first
    --num-critic-only-steps rollouts. Returns metric dicts that the loop averages key by key: one per step
    (`train/...` for the policy, `critic/...`), and one with `train/reward_kl` under --kl-coef."""
    import ray
    from rl_core.train_batch import TrainBatch

    # The forward passes read tokens and lengths only; the advantages are filled in once they are known.
    whole = TrainBatch.from_samples(samples, [[0.0] * s.response_length for s in samples])
    recompute_old = config.num_steps_per_rollout > 1 and not config.use_rollout_logprobs
    if config.kl_coef > 0.0 and config.use_rollout_logprobs and whole.rollout_log_probs is None:
        raise ValueError("--kl-coef with --use-rollout-logprobs takes the policy's log-probs from the engine, which sent none")
    # Calls to one actor run in submission order, so every trainer rank meets the collectives in the same order.
    pending = {}
    if recompute_old or (config.kl_coef > 0.0 and not config.use_rollout_logprobs):
        pending["log_probs"] = [t.compute_log_probs.remote(whole) for t in trainers]
    if config.kl_coef > 0.0:
        pending["ref_log_probs"] = [t.compute_ref_log_probs.remote(whole) for t in trainers]
    if critics:
        pending["values"] = [c.compute_values.remote(whole) for c in critics]
    forward = {name: ray.get(refs)[0] for name, refs in pending.items()}
    # As slime: the reward KL is taken from the engine's log-probs when they are the old policy.
    log_probs = whole.rollout_log_probs if config.use_rollout_logprobs else forward.get("log_probs")

    result = rollout_advantages(
        config,
        samples,
        log_probs=log_probs if config.kl_coef > 0.0 else None,
        ref_log_probs=forward.get("ref_log_probs"),
        values=forward.get("values"),
    )
    whole = dataclasses.replace(
        whole,
        advantages=[a.tolist() for a in result.advantages],
        # Every step's PPO ratio is taken against the policy that existed before the rollout's first step.
        old_log_probs=forward["log_probs"] if recompute_old else None,
        returns=[r.tolist() for r in result.returns] if critics else None,
        values=forward.get("values"),
    )
    train_policy = rollout_id >= config.num_critic_only_steps
    step = config.global_batch_size
    steps = []
    if config.kl_coef > 0.0:
        steps.append({"train/reward_kl": mean_reward_kl(config, samples, log_probs, forward["ref_log_probs"])})
    for start in range(0, len(samples), step):
        part = whole.select(range(start, start + step))
        policy = [t.train_step.remote(part) for t in trainers] if train_policy else []
        critic = [c.train_step.remote(part) for c in critics]
        metrics = {f"train/{k}": v for k, v in ray.get(policy)[0].items()} if policy else {}
        if critic:
            metrics.update({f"critic/{k}": v for k, v in ray.get(critic)[0].items()})
        steps.append(metrics)
    return steps


if __name__ == "__main__":
    main()
