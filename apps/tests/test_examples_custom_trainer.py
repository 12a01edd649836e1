"""examples/custom_trainer.py: a GRPO loop of the public API alone (no Ray, no rl_apps) runs and trains."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_trainer.py"


def test_the_custom_trainer_example_runs_three_rollouts(tiny_task):
    done = subprocess.run([sys.executable, str(EXAMPLE), str(tiny_task), "3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rewards = [float(m) for m in re.findall(r"rollout \d+: mean reward ([0-9.]+)", done.stdout)]
    assert len(rewards) == 3 and all(0.0 <= r <= 1.0 for r in rewards)
    assert len(EXAMPLE.read_text().splitlines()) <= 40
