"""rl-train's command line (grouped help, one-line errors with suggestions) and slime's data/sampling flags."""

from __future__ import annotations

import json

import pytest


def base_args(task):
    return ["--hf-checkpoint", str(task / "model"), "--prompt-data", str(task / "train.jsonl"), "--rm-type", "math"]


def test_an_unknown_flag_gets_one_line_with_the_closest_known_flag_and_a_pointer_to_help(tiny_task, run_cli):
    code, err = run_cli(base_args(tiny_task) + ["--rollout-batch-sz", "4"])
    assert code == 2
    assert err.splitlines() == [
        "rl-train: error: unknown flag --rollout-batch-sz (did you mean --rollout-batch-size?); see rl-train --help"]
    code, err = run_cli(base_args(tiny_task) + ["--lr", "abc"])
    assert code == 2 and "usage:" not in err and len(err.splitlines()) == 1


def test_help_is_grouped_by_section_marks_required_flags_and_explains_every_flag():
    from rl_apps.cli import SECTIONS, build_parser
    from rl_apps.train_config import TrainConfig
    from rl_rewards import default_registry

    parser = build_parser(TrainConfig, "rl-train", "")
    titles = [g.title for g in parser._action_groups if g.title not in ("positional arguments", "options")]
    assert titles == [s for s in SECTIONS if s != "other"]
    where = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    assert (where["prompt_data"], where["rollout_batch_size"], where["eps_clip"], where["lr"], where["engine_type"],
            where["rm_type"], where["eval_interval"], where["save"], where["use_wandb"]) == \
        ("data", "rollout", "algorithm", "trainer", "engines", "rewards", "eval", "checkpoints", "logging")
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    assert [d for d, h in helps.items() if not h or h.startswith("(default")] == []
    assert helps["prompt_data"].endswith("(required)") and helps["hf_checkpoint"].endswith("(required)")
    assert all(name in helps["rm_type"] for name in default_registry.names())


def test_validation_errors_name_flags_as_typed(tiny_task, run_cli):
    code, err = run_cli(base_args(tiny_task) + ["--use-kl-loss"])
    assert code == 2 and "--use-kl-loss is set but --kl-loss-coef is 0" in err and "use_kl_loss" not in err


def test_stop_strings_and_special_tokens_reach_sglang_as_slime_sends_them_and_the_embedded_engine_refuses_stop(
        config, tiny_task, run_cli):
    params = config(engine_type="sglang", rollout_stop=["</answer>", "\n\n"], rollout_skip_special_tokens=True,
                    rollout_stop_token_ids=[7]).sampling_params()
    assert (params["stop"], params["no_stop_trim"], params["skip_special_tokens"], params["stop_token_ids"]) == \
        (["</answer>", "\n\n"], True, True, [7])
    assert "skip_special_tokens" not in config().sampling_params()  # the engine's default: drop them
    assert config(rollout_skip_special_tokens=False).sampling_params()["skip_special_tokens"] is False
    code, err = run_cli(base_args(tiny_task) + ["--rollout-stop", "</answer>"])
    assert code == 2 and "not supported by the embedded engine: use --rollout-stop-token-ids" in err


def test_tools_and_chat_template_kwargs_reach_the_chat_template_and_tools_the_metadata(config, tmp_path):
    from rl_apps.data import build_data_source, load_tokenizer

    data = tmp_path / "tools.jsonl"
    tools = [{"name": "calc", "parameters": {}}]
    data.write_text(json.dumps({"prompt": "1+1=", "label": "2", "tools": tools}) + "\n"
                    + json.dumps({"prompt": "2+2=", "label": "4", "tools": json.dumps(tools * 2)}) + "\n"
                    + json.dumps({"prompt": "3+3=", "label": "6"}) + "\n")
    cfg = config(prompt_data=data, apply_chat_template=True, apply_chat_template_kwargs={"enable_thinking": False})
    tokenizer = load_tokenizer(cfg)
    tokenizer.chat_template = (
        "{% if tools %}T{{ tools|length }}{{ tools[0].name }}|{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}=N{% endif %}"
    )
    rows = build_data_source(cfg, tokenizer).rows
    assert [r.text for r in rows] == ["T1calc|1+1==N", "T2calc|2+2==N", "3+3==N"]
    assert [r.metadata.get("tools") for r in rows] == [tools, tools * 2, None]
    # --tool-key names another column; a value that is no list is refused with its line
    data.write_text(json.dumps({"prompt": "1+1=", "label": "2", "fns": {"name": "calc"}}) + "\n")
    with pytest.raises(Exception, match=r"tools.jsonl:1: 'fns' \(--tool-key\) must be a list"):
        build_data_source(config(prompt_data=data, tool_key="fns"), tokenizer)


def test_num_epoch_sets_num_rollout_from_the_number_of_prompts(config, tiny_task, run_cli):
    from rl_apps.train import check_inputs

    prompts = len((tiny_task / "train.jsonl").read_text().splitlines())
    cfg = config(num_epoch=3, rollout_batch_size=4, n_samples_per_prompt=2)
    check_inputs(cfg)
    assert cfg.num_rollout == 3 * (prompts // 4)
    code, err = run_cli(base_args(tiny_task) + ["--num-epoch", "2", "--num-rollout", "5"])
    assert code == 2 and "--num-epoch (2) and --num-rollout (5) are both set" in err


def test_start_rollout_id_is_where_the_loop_starts_with_or_without_a_checkpoint(config, tiny_task, run_cli):
    from rl_apps.checkpoints import resume

    assert resume(config(start_rollout_id=7, num_rollout=10), parts=None) == 7
    assert resume(config(num_rollout=10), parts=None) == 0
    code, err = run_cli(base_args(tiny_task) + ["--start-rollout-id", "10", "--num-rollout", "10"])
    assert code == 2 and "--start-rollout-id (10) >= --num-rollout (10): nothing to run" in err


def test_every_path_flag_takes_a_module_or_a_file_and_relative_files_are_made_absolute(config, tmp_path, monkeypatch):
    from rl_apps.data import build_data_source, load_sample_filter

    hooks = tmp_path / "my_hooks.py"
    hooks.write_text("def newest_first(buffer, n):\n    return list(range(len(buffer)))[::-1][:n]\n\n"
                     "def keep(group):\n    return True\n")
    monkeypatch.chdir(tmp_path)
    cfg = config(buffer_filter_path="my_hooks.py:newest_first", dynamic_sampling_filter_path="./my_hooks.py:keep")
    assert cfg.buffer_filter_path == f"{hooks}:newest_first"
    source = build_data_source(cfg)
    assert source.buffer_filter.__name__ == "newest_first" and source.buffer_filter([[1], [2], [3]], 2) == [2, 1]
    assert load_sample_filter(cfg)([]) is True
    from rl_core.dynamic_sampling import check_reward_nonzero_std

    module_form = config(dynamic_sampling_filter_path="rl_core.dynamic_sampling:check_reward_nonzero_std")
    assert load_sample_filter(module_form) is check_reward_nonzero_std
    with pytest.raises(ValueError, match=r"--buffer-filter-path .*nope.py.*: no file"):
        build_data_source(config(buffer_filter_path="nope.py:f"))


def test_engine_type_sglang_where_sglang_cannot_be_imported_stops_before_ray_naming_the_interpreter(tiny_task, run_cli, tmp_path):
    missing = tmp_path / "no-env" / "python"
    code, err = run_cli(base_args(tiny_task) + ["--engine-type", "sglang", "--engine-python", str(missing)])
    assert code == 1 and f"{missing} cannot import sglang" in err and "--engine-python" in err
