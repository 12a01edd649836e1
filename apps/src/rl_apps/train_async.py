"""`rl-train-async`: the engines generate rollout k+1 while the trainer learns from rollout k.

Like slime's train_async.py: generation and training overlap, so a step costs about max(generate,
train) instead of their sum. The price is staleness: the engines get new weights only every
--update-weights-interval rollouts, once the generation in flight has finished, so a rollout can be
up to that many policy versions (plus the one in flight) behind the trainer. The off-policy corrections
(--use-tis, --use-rollout-logprobs, ...) apply as in rl-train. Engines and trainer need devices of
their own, so --colocate is refused.
"""

from __future__ import annotations

from typing import Any, Sequence

from pydantic import model_validator

from rl_apps.cli import parse_config
from rl_apps.train_config import TrainConfig


class AsyncTrainConfig(TrainConfig):
    @model_validator(mode="after")
    def _engines_apart(self) -> AsyncTrainConfig:
        if self.colocate:
            raise ValueError(
                "--colocate: rl-train-async generates while it trains, so engines and trainer need devices of their own"
            )
        if self.offload_train or self.offload_rollout:
            raise ValueError(
                "--offload/--offload-train/--offload-rollout: rl-train-async generates while it trains, so neither"
                " side can give the GPU to the other"
            )
        return self


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(AsyncTrainConfig, argv, "rl-train-async", __doc__.splitlines()[0])
    from rl_apps.train import exit_on_failure, run

    exit_on_failure("rl-train-async", lambda: run(config, loop=async_train_loop))


def async_train_loop(config: AsyncTrainConfig, parts: Any, sink: Any, eval_sink: Any) -> None:
    from rl_apps.loop import training_loop

    training_loop(config, parts, sink, eval_sink, asynchronous=True)


if __name__ == "__main__":
    main()
