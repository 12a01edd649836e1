"""--max-turns and --tool-call-parser: accepted where they change what runs, refused before Ray otherwise."""

from rl_apps.slime_api import slime_args


def base_args(task):
    return ["--hf-checkpoint", str(task / "model"), "--prompt-data", str(task / "train.jsonl"), "--rm-type", "math",
            "--output-dir", str(task / "out")]


def test_an_unknown_tool_call_parser_is_refused_with_the_parsers_there_are(tiny_task, run_cli):
    from rl_sglang.tool_parsers import TOOL_CALL_PARSERS

    code, err = run_cli(base_args(tiny_task) + ["--tool-call-parser", "llama3"])
    assert code == 2 and "--tool-call-parser 'llama3'" in err
    assert f"choose one of {', '.join(sorted(TOOL_CALL_PARSERS))}" in err


def test_max_turns_without_a_multi_turn_hook_is_refused_with_the_reason(tiny_task, run_cli):
    code, err = run_cli(base_args(tiny_task) + ["--max-turns", "3"])
    assert code == 2 and "--max-turns" in err and "one engine call per sample" in err
    code, err = run_cli(base_args(tiny_task) + ["--max-turns", "0", "--custom-generate-function-path", "x.py:f"])
    assert code == 2 and "--max-turns" in err


def test_max_turns_and_the_parser_reach_a_generate_functions_args(tiny_run_config, tmp_path):
    config = tiny_run_config(tmp_path / "run", custom_generate_function_path="examples/tool_call_generate.py:generate",
                             max_turns=5, tool_call_parser="none")
    args = slime_args(config)
    assert args.max_turns == 5 and args.tool_call_parser == "none"
