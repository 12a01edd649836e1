"""`rl-train-async`: the engines generate rollout k+1 while the trainer learns from rollout k.

Like slime's train_async.py: generation and training overlap, so a step costs about max(generate,
train) instead of their sum. The price is staleness: the engines get new weights only every
--update-weights-interval rollouts, once the generation in flight has finished, so a rollout can be
up to that many policy versions (plus the one in flight) behind the trainer. The off-policy corrections
(--use-tis, --use-rollout-logprobs, ...) apply as in rl-train. Engines and trainer need devices of
their own, so --colocate is refused.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

from pydantic import Field, model_validator

from rl_apps.cli import parse_config
from rl_apps.train_config import TrainConfig


class AsyncTrainConfig(TrainConfig):
    update_weights_interval: int = Field(1, ge=1)
    """Send the trainer's weights to the engines every N rollouts (slime's name)."""

    @model_validator(mode="after")
    def _engines_apart(self) -> AsyncTrainConfig:
        if self.colocate:
            raise ValueError(
                "--colocate: rl-train-async generates while it trains, so engines and trainer need devices of their own"
            )
        return self


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(AsyncTrainConfig, argv, "rl-train-async", __doc__.splitlines()[0])
    from rl_apps.cluster import PlacementError
    from rl_apps.train import InputError, run

    try:
        run(config, loop=async_train_loop)
    except (InputError, PlacementError) as e:
        sys.exit(f"rl-train-async: error: {e}")


def async_train_loop(config: AsyncTrainConfig, parts: Any, sink: Any, eval_sink: Any) -> None:
    """One rollout always in flight: fetch rollout k, start k+1, train on k, and every
    `update_weights_interval` rollouts let the generation in flight finish before syncing weights.
    Evaluation (--eval-interval) runs right after a sync, the only time nothing is in flight."""
    import ray
    from tqdm import tqdm

    from rl_apps.checkpoints import resume, save_if_due
    from rl_apps.evaluation import evaluate_if_due
    from rl_apps.train import log_rollout, push_weights, train_on_rollout

    start = resume(config, parts)
    evaluate_if_due(config, parts, eval_sink, start, before_training=True)
    in_flight = parts.rollout.generate.remote(start) if start < config.num_rollout else None
    for rollout_id in tqdm(range(start, config.num_rollout), desc="rollout", dynamic_ncols=True, file=sys.stdout):
        step_start = time.perf_counter()
        result = ray.get(in_flight)
        samples, metrics, timing = result["samples"], dict(result["metrics"]), dict(result["timing"])
        timing["wait_rollout"] = time.perf_counter() - step_start
        last = rollout_id + 1 == config.num_rollout
        in_flight = None if last else parts.rollout.generate.remote(rollout_id + 1)

        train_start = time.perf_counter()
        train_metrics = train_on_rollout(config, parts.trainers, samples, critics=parts.critics, rollout_id=rollout_id)
        timing["train"] = time.perf_counter() - train_start

        if (rollout_id + 1) % config.update_weights_interval == 0 and not last:
            wait_start = time.perf_counter()
            ray.wait([in_flight], num_returns=1, timeout=None)  # its samples came from the weights it started with
            timing["wait_in_flight"] = time.perf_counter() - wait_start
            push_weights(config, parts, eval_sink, rollout_id + 1, timing)
        # The rollout in flight has drawn its prompts already: a checkpoint keeps the data position from
        # before it, so a resumed run generates that rollout again (with the saved weights).
        save_if_due(config, parts, rollout_id, timing)
        timing["step"] = time.perf_counter() - step_start
        log_rollout(sink, rollout_id, metrics, train_metrics, timing)


if __name__ == "__main__":
    main()
