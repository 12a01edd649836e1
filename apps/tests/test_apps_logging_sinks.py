"""slime's logging flags: W&B (offline here) and TensorBoard get the same rows as metrics.jsonl."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest


def read_wandb_file(path: Path) -> tuple[dict, list[dict]]:
    """The run record and the history rows of a `.wandb` file, parsed independently of the writer: a LevelDB-style
    log (7-byte file header, 32 KiB blocks of records with a 7-byte crc/length/type header) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    chunks, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        piece, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(piece)
        elif kind in (2, 3):
            pending += piece
        elif kind == 4:
            chunks.append(pending + piece)
            pending = b""
    run, rows = {}, []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        if record.WhichOneof("record_type") == "run":
            r = record.run
            run = {"project": r.project, "group": r.run_group, "name": r.display_name, "id": r.run_id,
                   "config": {item.key: json.loads(item.value_json) for item in r.config.update}}
        elif record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return run, rows


@pytest.mark.slow
def test_an_offline_wandb_run_and_tensorboard_hold_the_same_rows_as_metrics_jsonl(tiny_run_config, tiny_task, tmp_path):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rl_apps.metrics import read_metrics
    from rl_apps.train import run

    out = tmp_path / "run"
    config = tiny_run_config(
        out, num_rollout=2, use_wandb=True, wandb_mode="offline", wandb_dir=tmp_path / "wb", wandb_project="proj",
        wandb_group="grp", disable_wandb_random_suffix=True, wandb_run_id="abc123", wandb_key="secret",
        tb_project_name="tbp", tb_experiment_name="exp1",
        eval_prompt_data=["sums", str(tiny_task / "train.jsonl")], eval_interval=1,
    )
    metrics_path = run(config)
    rows, evals = read_metrics(metrics_path), read_metrics(out / "eval_metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1] and [r["step"] for r in evals] == [0, 1, 2]

    (wandb_file,) = (tmp_path / "wb").glob("wandb/offline-run-*/run-abc123.wandb")
    meta, history = read_wandb_file(wandb_file)
    assert (meta["project"], meta["group"], meta["name"], meta["id"]) == ("proj", "grp", "grp", "abc123")
    assert meta["config"]["rollout_batch_size"] == 4 and "wandb_key" not in meta["config"]
    logged_rollouts = [h for h in history if "rollout_step" in h]
    logged_evals = [h for h in history if "eval_step" in h]
    assert [h["rollout_step"] for h in logged_rollouts] == [0, 1]
    assert [h["eval_step"] for h in logged_evals] == [0, 1, 2]
    for mine, theirs, step_key in [(rows, logged_rollouts, "rollout_step"), (evals, logged_evals, "eval_step")]:
        for row, logged in zip(mine, theirs):
            assert {k: v for k, v in logged.items() if not k.startswith("_") and k != step_key} == \
                {k: v for k, v in row.items() if k != "step"}

    tb_dir = out / "tensorboard" / "tbp" / "exp1"
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("rollout/reward_mean", "train/loss", "perf/step_time", "perf/actor_train_tflops", "eval/sums/reward_mean"):
        source = rows if not key.startswith("eval/") else evals
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(key)] == \
            [(r["step"], r[key]) for r in source]


def test_use_wandb_without_the_extra_installed_names_the_extra(monkeypatch, tiny_task, run_cli):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an install without rl-apps[wandb] looks like
    code, err = run_cli(["--hf-checkpoint", str(tiny_task / "model"), "--prompt-data", str(tiny_task / "train.jsonl"),
                         "--rm-type", "math", "--use-wandb", "--wandb-mode", "offline"])
    assert code == 1 and "pip install 'rl-apps[wandb]'" in err


@pytest.mark.parametrize(("flags", "message"), [
    (["--wandb-project", "p"], "--wandb-project is set but W&B is off: add --use-wandb"),
    (["--tb-experiment-name", "e"], "--tb-experiment-name needs --tb-project-name"),
    (["--no-use-tensorboard", "--tb-project-name", "p"], "--no-use-tensorboard turns TensorBoard off"),
])
def test_logging_flags_without_their_sink_are_refused(tiny_task, run_cli, flags, message):
    code, err = run_cli(["--hf-checkpoint", str(tiny_task / "model"), "--prompt-data", str(tiny_task / "train.jsonl"),
                         "--rm-type", "math", *flags])
    assert code == 2 and message in err


def test_the_wandb_group_gets_a_fresh_random_suffix_unless_it_is_disabled(tmp_path):
    from types import SimpleNamespace

    from rl_apps.metrics import wandb_group

    def group(**flags):
        fields = dict(wandb_group=None, output_dir=tmp_path / "run7", disable_wandb_random_suffix=False) | flags
        return wandb_group(SimpleNamespace(**fields))

    first, second = group(wandb_group="grp"), group(wandb_group="grp")
    assert first != second
    for name in (first, second):
        prefix, suffix = name.rsplit("_", 1)
        assert prefix == "grp" and len(suffix) == 8 and int(suffix, 16) >= 0
    assert group(wandb_group="grp", disable_wandb_random_suffix=True) == "grp"
    assert group(disable_wandb_random_suffix=True) == "run7"
