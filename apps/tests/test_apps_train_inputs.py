"""Bad input to rl-train answers with the file, line or flag, before Ray or any engine starts."""

import json
import subprocess
import sys
import time

import pytest


def base_args(task, data=None):
    return ["--hf-checkpoint", str(task / "model"), "--prompt-data", str(data or task / "train.jsonl"), "--rm-type", "math",
            "--output-dir", str(task / "out")]


def test_help_answers_fast_without_importing_torch():
    code = "import sys, runpy; sys.argv=['rl-train','--help']\ntry:\n runpy.run_module('rl_apps.train', run_name='__main__')\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "--rollout-batch-size" in out.stdout and "--sglang-" in out.stdout
    assert out.stdout.strip().endswith("False")
    assert time.perf_counter() - start < 10


def test_batch_arithmetic_error_names_the_flags_as_typed_and_the_nearest_values_that_work(tiny_task, run_cli):
    code, err = run_cli(base_args(tiny_task) + ["--rollout-batch-size", "3", "--n-samples-per-prompt", "4", "--global-batch-size", "5"])
    assert code == 2
    assert "--rollout-batch-size (3) x --n-samples-per-prompt (4) = 12" in err and "--global-batch-size (5)" in err
    # 12 samples split into batches of 4 or 6 (its divisors next to 5)
    assert "nearest that work: --global-batch-size 4 or 6" in err
    assert "rollout_batch_size" not in err and "usage:" not in err


def test_malformed_jsonl_line_names_file_and_line(tiny_task, run_cli, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "label": "2"}) + "\n" + '{"prompt": "2+2=", "label": \n')
    code, err = run_cli(base_args(tiny_task, data))
    assert code == 1 and f"{data}:2: invalid JSON" in err


def test_missing_key_names_the_key_and_flag(tiny_task, run_cli, tmp_path):
    data = tmp_path / "nokey.jsonl"
    data.write_text(json.dumps({"question": "1+1=", "label": "2"}) + "\n")
    code, err = run_cli(base_args(tiny_task, data))
    assert code == 1 and f"{data}:1: no key 'prompt' (--input-key)" in err


def test_too_long_prompt_names_line_and_limit(tiny_task, run_cli, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "label": "2"}) + "\n" + json.dumps({"prompt": "1" * 50, "label": "2"}) + "\n")
    code, err = run_cli(base_args(tiny_task, data) + ["--rollout-max-prompt-len", "10"])
    assert code == 1 and f"{data}:2: prompt is 50 tokens, longer than rollout_max_prompt_len (10)" in err


def test_missing_custom_reward_file_is_named(tiny_task, run_cli, tmp_path):
    args = [a for a in base_args(tiny_task) if a not in ("--rm-type", "math")]
    code, err = run_cli(args + ["--custom-rm-path", str(tmp_path / "nope.py") + ":score"])
    assert code == 1 and "nope.py" in err


def test_both_reward_flags_are_refused(tiny_task, run_cli):
    code, err = run_cli(base_args(tiny_task) + ["--custom-rm-path", "x.py:f"])
    assert code == 2 and "--rm-type" in err and "--custom-rm-path" in err


def test_missing_model_folder_is_named(tiny_task, run_cli, tmp_path):
    args = base_args(tiny_task)
    args[1] = str(tmp_path / "no-model")
    code, err = run_cli(args)
    assert code == 1 and "no-model" in err and "config.json" in err


def test_unknown_dynamic_sampling_filter_names_the_flag(tiny_task, run_cli):
    code, err = run_cli(base_args(tiny_task) + ["--dynamic-sampling-filter-path", "no_such_module:keep"])
    assert code == 1 and "--dynamic-sampling-filter-path" in err and "no_such_module" in err


def test_bad_router_middleware_names_the_flag_and_the_file(tiny_task, run_cli, tmp_path):
    plugin = tmp_path / "plugin.py"
    plugin.write_text("class Other:\n    pass\n")
    code, err = run_cli(base_args(tiny_task) + ["--router-middleware-paths", "rl_router:MetricsMiddleware",
                                                f"{plugin}:Missing"])
    assert code == 1 and "--router-middleware-paths" in err and f"{plugin}:Missing" in err and "has no attribute" in err


def test_load_from_a_folder_without_a_checkpoint_names_the_flag(tiny_task, run_cli, tmp_path):
    code, err = run_cli(base_args(tiny_task) + ["--load", str(tmp_path)])
    assert code == 1 and f"--load {tmp_path}: no 'latest' file" in err
    (tmp_path / "latest").write_text("rollout_000003\n")
    code, err = run_cli(base_args(tiny_task) + ["--load", str(tmp_path)])
    assert code == 1 and "rollout_000003/state.json is missing or unreadable" in err


def test_save_interval_without_save_is_refused(tiny_task, run_cli):
    code, err = run_cli(base_args(tiny_task) + ["--save-interval", "2"])
    assert code == 2 and "--save-interval needs --save" in err


def test_eval_flags_are_checked_with_the_file_and_line_named(tiny_task, run_cli, tmp_path):
    code, err = run_cli(base_args(tiny_task) + ["--eval-prompt-data", "only-a-name"])
    assert code == 2 and "--eval-prompt-data takes name/path pairs" in err
    code, err = run_cli(base_args(tiny_task) + ["--eval-interval", "5"])
    assert code == 2 and "--eval-interval needs --eval-prompt-data" in err
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=", "label": "2"}) + "\n" + "{not json\n")
    code, err = run_cli(base_args(tiny_task) + ["--eval-prompt-data", "sums", str(bad)])
    assert code == 1 and f"{bad}:2: invalid JSON" in err


def test_a_bad_generate_hook_is_named_before_anything_starts(tiny_task, run_cli, tmp_path):
    hook = tmp_path / "hooks.py"
    hook.write_text("def other():\n    pass\n")
    code, err = run_cli(base_args(tiny_task) + ["--custom-generate-function-path", f"{hook}:generate"])
    assert code == 1 and "--custom-generate-function-path" in err and "has no callable 'generate'" in err
    code, err = run_cli(base_args(tiny_task) + ["--rollout-function-path", "no_such_module.generate_rollout"])
    assert code == 1 and "--rollout-function-path" in err and "no_such_module" in err


def test_colocate_without_a_gpu_is_refused_and_cpu_ranks_are_announced(tiny_task, tmp_path):
    import torch

    from rl_apps.cluster import PlacementError, placement_notice
    from rl_apps.train_config import TrainConfig

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU to share")
    common = dict(hf_checkpoint=tiny_task / "model", prompt_data=tiny_task / "train.jsonl", rm_type="math")
    with pytest.raises(PlacementError, match="--colocate shares GPUs .* torch sees no CUDA GPU.*drop --colocate"):
        placement_notice(TrainConfig(colocate=True, **common))
    notice = placement_notice(TrainConfig(actor_num_gpus_per_node=4, rollout_num_engines=2, **common))
    assert notice == ("placing 4 fsdp trainer rank(s), 2 embedded engine(s) as CPU processes (no CUDA GPU in use: gloo,"
                      " one process per rank; 4 trainer rank(s) from --actor-num-nodes x --actor-num-gpus-per-node start 4 CPU"
                      " trainer processes)")


def test_temperature_zero_reaches_the_engine_as_greedy_and_the_trainer_scores_at_temperature_one(tiny_task):
    from rl_apps.train_config import TrainConfig

    common = dict(hf_checkpoint=tiny_task / "model", prompt_data=tiny_task / "train.jsonl", rm_type="math")
    greedy = TrainConfig(rollout_temperature=0.0, **common)
    assert greedy.sampling_params()["temperature"] == 0.0  # SGLang's greedy
    # SGLang reports a greedy token's log-prob under the unscaled logits, so the trainer divides by 1.
    assert greedy.backend_config("policy").rollout_temperature == 1.0
    assert TrainConfig(rollout_temperature=0.6, **common).backend_config("policy").rollout_temperature == 0.6


def test_slimes_router_flags_are_refused_saying_what_our_router_does_instead(tiny_task, run_cli):
    code, err = run_cli(base_args(tiny_task) + ["--use-slime-router"])
    assert code == 2 and "--use-slime-router:" in err and "router" in err.split("--use-slime-router:")[1]
