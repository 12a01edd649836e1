"""rl-eval: a model's scores on held-out sets, with engines and the reward hub only."""

import json

import pytest

from rl_apps.eval import EvalAppConfig, main
from rl_apps.metrics import read_metrics


def test_eval_needs_eval_sets_but_not_training_data(tiny_task, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--hf-checkpoint", str(tiny_task / "model"), "--rm-type", "math"])
    assert exit_info.value.code == 2 and "missing required flag(s): --eval-prompt-data" in capsys.readouterr().err
    config = EvalAppConfig(hf_checkpoint=tiny_task / "model", rm_type="math", eval_prompt_data=["a", str(tmp_path / "x")])
    assert config.prompt_data is None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_model_is_scored_on_each_set_and_the_row_is_written(tiny_task, tmp_path, capsys):
    sums, copies = tmp_path / "sums.jsonl", tmp_path / "copies.jsonl"
    sums.write_text("".join((tiny_task / "train.jsonl").read_text().splitlines(keepends=True)[:4]))
    copies.write_text("".join(json.dumps({"prompt": f"{d}=", "label": str(d)}) + "\n" for d in range(3)))
    main(["--hf-checkpoint", str(tiny_task / "model"), "--rm-type", "math", "--rollout-device", "cpu",
          "--eval-prompt-data", "sums", str(sums), "copies", str(copies), "--n-samples-per-eval-prompt", "4",
          "--eval-max-response-len", "3", "--eval-step", "7", "--output-dir", str(tmp_path / "out")])
    [row] = read_metrics(tmp_path / "out" / "eval_metrics.jsonl")
    assert row["step"] == 7
    assert row["eval/sums/num_samples"] == 16 and row["eval/copies/num_samples"] == 12
    assert row["eval/sums/response_len_max"] <= 3
    for name in ("sums", "copies"):
        assert 0.0 <= row[f"eval/{name}/pass@1"] <= row[f"eval/{name}/pass@4"] <= 1.0
    printed = capsys.readouterr().out
    assert "sums: " in printed and "copies: " in printed and "reward_mean" in printed
