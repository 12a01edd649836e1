"""--max-turns and --tool-call-parser: accepted where they change what runs, refused before Ray otherwise."""

from pathlib import Path

from rl_apps.slime_api import slime_args

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


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


async def test_max_turns_from_rl_trains_flags_caps_each_session_of_the_rollouts_chat_endpoint(tiny_task):
    """rl-train's flags -> TrainConfig -> the rollout manager's gateway (what a custom generate function's
    `args.sglang_router_*` names), in front of its router and a real embedded engine: a session's third
    chat call is refused under --max-turns 2, another session still has its two."""
    import aiohttp

    from rl_apps.actors import RolloutManager
    from rl_apps.cli import parse_config
    from rl_apps.train_config import TrainConfig
    from rl_sglang.chat import SESSION_HEADER
    from rl_sglang.embedded import EmbeddedEngine

    config = parse_config(TrainConfig, base_args(tiny_task) + [
        "--custom-generate-function-path", f"{EXAMPLES / 'openai_agent.py'}:generate", "--max-turns", "2"], "rl-train", "")
    engine = EmbeddedEngine(str(tiny_task / "model"), device="cpu", dtype="float32", max_running_requests=4)
    await engine.start()
    manager = RolloutManager.__ray_actor_class__(config, [engine.url])  # the actor's class, in this process
    try:
        args = await manager._slime_args()
        url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "1+2="}], "max_tokens": 2}

        async def call(session_id: str) -> tuple[int, dict]:
            async with aiohttp.ClientSession() as http:
                async with http.post(url, json=body, headers={SESSION_HEADER: session_id}) as response:
                    return response.status, await response.json()

        answers = [await call("a") for _ in range(3)] + [await call("b")]
        assert [status for status, _ in answers] == [200, 200, 400, 200]
        assert answers[2][1]["error"]["type"] == "max_turns_exceeded" and "--max-turns" in answers[2][1]["error"]["message"]
    finally:
        await manager.shutdown()
        await engine.stop()
