"""`rl-eval`: a model's scores on --eval-prompt-data sets, from the engines and the reward hub, no trainer.

Takes rl-train's flags (the engines, sampling, reward and --eval-* ones); --prompt-data is not needed.
Writes one row to `<output-dir>/eval_metrics.jsonl` (step --eval-step) and prints each set's scores.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

from pydantic import Field

from rl_apps.cli import parse_config
from rl_apps.train_config import TrainConfig


class EvalAppConfig(TrainConfig):
    help_section: ClassVar[str] = "eval"
    required_flags: ClassVar[tuple[str, ...]] = ("hf_checkpoint", "eval_prompt_data")
    eval_step: int = Field(0, ge=0)
    """The `step` of the row written (e.g. the policy version of the checkpoint evaluated: the rollouts it was trained on)."""


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(EvalAppConfig, argv, "rl-eval", __doc__.splitlines()[0])
    from rl_apps.train import exit_on_failure

    metrics = exit_on_failure("rl-eval", lambda: evaluate_model(config))
    for name, _ in config.eval_datasets():
        scores = {k.removeprefix(f"eval/{name}/"): v for k, v in metrics.items() if k.startswith(f"eval/{name}/")}
        print(f"{name}: " + " ".join(f"{k} {v:.4g}" for k, v in sorted(scores.items())))


def evaluate_model(config: EvalAppConfig) -> dict[str, float]:
    """Start the engines and the rollout manager, evaluate every set once, log the row, stop; returns the metrics."""
    import ray

    from rl_apps.cluster import placed_parts, placement_notice
    from rl_apps.metrics import open_sinks
    from rl_apps.train import check_inputs

    check_inputs(config)
    print(f"rl-eval: {placement_notice(config, trainers=False)}", flush=True)
    with placed_parts(config, trainers=False) as parts:
        metrics = ray.get(parts.rollout.evaluate.remote())
    sinks = open_sinks(config, rollouts_file=False)  # eval_metrics.jsonl, and TensorBoard / W&B as their flags ask
    try:
        sinks.evals.log(config.eval_step, metrics)
    finally:
        sinks.close()
    return metrics


if __name__ == "__main__":
    main()
