"""slime's `--save-debug-rollout-data` / `--load-debug-rollout-data`: a rollout's samples as they went to
training, one JSON line per sample and one file per rollout, readable without this project installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from rl_core.sample import Sample


def rollout_file(template: str | Path, rollout_id: int) -> Path:
    """The file of rollout `rollout_id`: `{rollout_id}` in the template is replaced (slime's convention)."""
    return Path(str(template).replace("{rollout_id}", str(rollout_id)))


def save_rollout(template: str | Path, rollout_id: int, samples: Sequence[Sample]) -> Path:
    """Write every sample (tokens, loss mask, rewards, log-probs, status, weight versions, metadata)."""
    path = rollout_file(template, rollout_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for sample in samples:
            f.write(json.dumps(sample.model_dump(mode="json")) + "\n")
    tmp.replace(path)
    return path


def load_rollout(template: str | Path, rollout_id: int) -> list[Sample]:
    """The samples `save_rollout` wrote for `rollout_id`; a missing or malformed file names the path and line."""
    path = rollout_file(template, rollout_id)
    if not path.is_file():
        raise FileNotFoundError(f"--load-debug-rollout-data: no file {path} for rollout {rollout_id}")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            samples.append(Sample.model_validate(json.loads(line)))
        except ValueError as e:
            raise ValueError(f"{path}:{number}: not a saved sample ({e})") from None
    return samples
