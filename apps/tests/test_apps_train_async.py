"""rl-train-async: generation of rollout k+1 overlaps training on rollout k; weights reach the engines every N rollouts."""

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from rl_apps.metrics import read_metrics
from rl_apps.train import run
from rl_apps.train_async import AsyncTrainConfig, async_train_loop


def async_config(build, out, **overrides):
    return build(out, AsyncTrainConfig, use_tensorboard=False, save_reward_curve=False, **overrides)


def test_colocate_is_refused_with_the_reason(tiny_run_config, tmp_path):
    with pytest.raises(ValidationError, match="--colocate: rl-train-async generates while it trains"):
        async_config(tiny_run_config, tmp_path / "out", colocate=True)
    with pytest.raises(ValidationError, match="update_weights_interval"):
        async_config(tiny_run_config, tmp_path / "out", update_weights_interval=0)


def test_help_lists_the_async_flag():
    out = subprocess.run([sys.executable, "-m", "rl_apps.train_async", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--update-weights-interval" in out.stdout and "--rollout-batch-size" in out.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_each_rollout_is_generated_while_the_previous_one_trains_and_weights_move_every_interval(tiny_run_config, tmp_path):
    checkpoints, eval_file = tmp_path / "ckpt", tmp_path / "eval.jsonl"
    eval_file.write_text('{"prompt": "1+2=", "label": "3"}\n{"prompt": "2+2=", "label": "4"}\n')
    evaluation = dict(eval_prompt_data=["sums", str(eval_file)], eval_interval=2)
    metrics_path = run(async_config(tiny_run_config, tmp_path / "run", num_rollout=5, update_weights_interval=2,
                                    save=checkpoints, save_interval=2, **evaluation), loop=async_train_loop)
    rows = read_metrics(metrics_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    # Rollout k+1 starts before rollout k trains, and the engines get weights after trains 2 and 4 (once
    # the rollout in flight is done): rollouts 0-2 come from the engines' first weights (SGLang's version
    # "default", which has no number), 3-4 from those after 2 steps.
    assert [r.get("rollout/weight_version_max") for r in rows] == [None, None, None, 2, 2]
    assert [r.get("rollout/weight_version_min") for r in rows] == [None, None, None, 2, 2]
    assert ["time/weight_sync" in r for r in rows] == [False, True, False, True, False]
    for row in rows:
        assert row["rollout/num_samples"] == 16 and row["train/grad_norm"] > 0
    # Trained on samples from older weights, the trainer's log-probs drift from the engine's.
    assert rows[2]["train/train_rollout_logprob_abs_diff"] > 1e-4
    # The trainer waits only for the part of a generation its training did not hide (rollout 0 it waits
    # for whole); the step is its parts: the waits, the RL step, the weight sync, evaluation, checkpoint.
    assert sum(r["perf/train_wait_time"] for r in rows[1:]) < sum(r["perf/rollout_time"] for r in rows[1:])
    for row in rows:
        assert 0.0 <= row["perf/wait_time_ratio"] < 1.0
        parts = sum(row.get(k, 0.0) for k in ("perf/train_wait_time", "perf/train_time", "perf/update_weights_time",
                                              "time/eval", "time/save"))
        assert parts <= row["perf/step_time"] <= parts + max(0.1, 0.1 * parts)

    # Checkpoints keep the data position from before the rollout in flight: after rollout 3, rollout 4 had
    # drawn its prompts (offset 20) but the checkpoint says 16, so a resumed run draws them again.
    offsets = {k: json.loads((checkpoints / f"rollout_{k:06d}" / "state.json").read_text())["data_source"]["offset"]
               for k in (1, 3, 4)}
    assert offsets == {1: 8, 3: 16, 4: 20}

    resumed = read_metrics(run(async_config(tiny_run_config, tmp_path / "run", num_rollout=6, update_weights_interval=2,
                                            load=checkpoints, save=checkpoints, **evaluation), loop=async_train_loop))
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4, 5]
    assert resumed[5]["rollout/weight_version_min"] == 5  # the engines got the trainer's loaded weights
    assert resumed[5]["train/train_rollout_logprob_abs_diff"] < 1e-3
    assert json.loads((checkpoints / "rollout_000005" / "state.json").read_text())["data_source"]["offset"] == 24
    # Evaluated before training, after the syncs at 2 and 4 steps, and before training again on resume (5).
    evals = read_metrics(tmp_path / "run" / "eval_metrics.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 4, 5]
    assert [e.get("eval/sums/weight_version_min") for e in evals] == [None, 2, 4, 5]
