"""Metric sinks (log, close): JSON lines, TensorBoard, and a fan-out; plus the reward-curve plot."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per step, flushed at once so a crash loses nothing already logged."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


WANDB_MISSING = (
    "--use-wandb needs the wandb package, an optional extra of rl-apps: pip install 'rl-apps[wandb]'"
    " (in this repository: uv sync --extra wandb, or uv pip install wandb)"
)


def wandb_group(config: Any) -> str:
    """--wandb-group (else the output folder's name) with slime's random suffix unless
    --disable-wandb-random-suffix; the suffix is ours, as wandb no longer exports its id generator."""
    group = config.wandb_group or Path(config.output_dir).name
    if config.disable_wandb_random_suffix:
        return group
    return f"{group}_{secrets.token_hex(4)}"


class WandbRun:
    """One W&B run of `rl-train` (slime's --wandb-* flags); `sink(step_key)` gives a MetricSink logging into it.

    Rollout rows and evaluation rows have their own step axes (`rollout_step`, `eval_step`): W&B drops a row
    whose `step=` goes backwards, and an evaluation of policy version k+1 is logged before rollout k+1 is."""

    def __init__(self, config: Any) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError(WANDB_MISSING) from None
        mode = config.wandb_mode
        if config.wandb_key is not None and mode not in ("offline", "disabled"):
            wandb.login(key=config.wandb_key)
        group = wandb_group(config)
        folder = Path(config.wandb_dir or config.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=config.wandb_project, entity=config.wandb_team, group=group, name=group, dir=str(folder),
            id=config.wandb_run_id, resume="allow" if config.wandb_run_id else None, mode=mode,
            config=config.model_dump(mode="json", exclude={"wandb_key"}),
        )
        self._bound: set[str] = set()
        self._open = 0

    def log(self, step_key: str, step: int, metrics: dict[str, float]) -> None:
        for key in metrics.keys() - self._bound:
            self.run.define_metric(key, step_metric=step_key)
        self._bound.update(metrics)
        self.run.log({**metrics, step_key: step})

    def sink(self, step_key: str) -> "WandbSink":
        """A sink whose rows are plotted against `step_key` (each of its metrics is bound to that axis)."""
        self._open += 1
        return WandbSink(self, step_key)

    def release(self) -> None:
        self._open -= 1
        if self._open == 0:
            self.run.finish()


class WandbSink:
    def __init__(self, run: WandbRun, step_key: str) -> None:
        self._run = run
        self.step_key = step_key

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(self.step_key, step, metrics)

    def close(self) -> None:
        self._run.release()


class FanOutSink:
    def __init__(self, sinks: Sequence[MetricSink]) -> None:
        self.sinks = list(sinks)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


@dataclass
class RunSinks:
    """The sinks of one run: every row goes to all of them (JSON lines, TensorBoard, W&B)."""

    rollouts: FanOutSink
    """Rollout rows: metrics.jsonl, TensorBoard, W&B (axis rollout_step)."""
    evals: FanOutSink
    """Evaluation rows: eval_metrics.jsonl, TensorBoard, W&B (axis eval_step)."""
    wandb_run: WandbRun | None = None

    def close(self) -> None:
        for sink in {id(s): s for s in self.rollouts.sinks + self.evals.sinks}.values():
            sink.close()


def open_sinks(config: Any, *, rollouts_file: bool = True) -> RunSinks:
    """metrics.jsonl (unless `rollouts_file` is off: rl-eval logs no rollouts) and eval_metrics.jsonl in
    --output-dir, plus TensorBoard and W&B when their flags ask."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rollouts: list[MetricSink] = [JsonlSink(output_dir / "metrics.jsonl")] if rollouts_file else []
    evals: list[MetricSink] = [JsonlSink(output_dir / "eval_metrics.jsonl")]
    if config.use_tensorboard:
        tensorboard = TensorBoardSink(config.tensorboard_dir())
        rollouts.append(tensorboard)
        evals.append(tensorboard)
    wandb_run = WandbRun(config) if config.use_wandb else None
    if wandb_run is not None:
        rollouts.append(wandb_run.sink("rollout_step"))
        evals.append(wandb_run.sink("eval_step"))
    return RunSinks(FanOutSink(rollouts), FanOutSink(evals), wandb_run)


def read_metrics(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_reward_curve(metrics_path: Path, png_path: Path, key: str = "rollout/reward_mean") -> None:
    """Reward per step with a moving average, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if key in r]
    steps = [r["step"] for r in rows]
    values = [r[key] for r in rows]
    window = max(1, len(values) // 20)
    smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, values, alpha=0.35, label=key)
    ax.plot(steps, smooth, label=f"moving average ({window})")
    ax.set_xlabel("rollout")
    ax.set_ylabel("mean reward")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
