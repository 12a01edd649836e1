"""examples/openai_agent.py, an OpenAI-client agent, trains through rl-train's chat endpoint: each saved
sample is, token for token, what the router sent the engines and they sampled, recorded at the router."""

import json
from pathlib import Path

import pytest

from rl_apps.metrics import read_metrics
from rl_apps.train import run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

RECORDER = '''
import json

class Recorder:
    """Router middleware: every engine call's input and sampled tokens, one JSON line each."""

    async def __call__(self, request, call_next):
        answer = await call_next(request)
        with open({path!r}, "a") as f:
            f.write(json.dumps({{"input_ids": request.payload.get("input_ids"), "output_ids": answer.get("output_ids"),
                                "log_probs": [e[0] for e in answer["meta_info"].get("output_token_logprobs") or []]}}) + "\\n")
        return answer
'''


def follows(tokens, position, call, retry):
    """`call`'s sampled tokens are next at `position`, and then the end or the agent's retry message."""
    end = position + len(call["output_ids"])
    return tokens[position:end] == call["output_ids"] and (end == len(tokens) or tokens[end:end + len(retry)] == retry)


@pytest.mark.slow
def test_an_openai_client_agent_trains_on_exactly_the_tokens_the_engines_sampled(tiny_run_config, tmp_path):
    calls_file = tmp_path / "engine_calls.jsonl"
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER.format(path=str(calls_file)))
    debug = tmp_path / "rollouts" / "rollout_{rollout_id}.jsonl"
    config = tiny_run_config(tmp_path / "run", num_rollout=2, custom_generate_function_path=f"{EXAMPLES / 'openai_agent.py'}:generate",
                             save_debug_rollout_data=str(debug), router_middleware_paths=[f"{recorder}:Recorder"],
                             use_tensorboard=False, save_reward_curve=False)
    rows = read_metrics(run(config))
    assert len(rows) == 2 and all(row["train/grad_norm"] > 0 for row in rows)

    from rl_sglang.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(config.hf_checkpoint)
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()]
    by_context = {}  # the samples of a group share their first context
    for c in calls:
        by_context.setdefault(tuple(c["input_ids"]), []).append(c)
    retry = tokenizer("<|user|>wrong, try again.<|assistant|>", add_special_tokens=False)["input_ids"]
    turns_seen = 0
    for rollout_id in (0, 1):
        samples = [json.loads(line) for line in (tmp_path / "rollouts" / f"rollout_{rollout_id}.jsonl").read_text().splitlines()]
        assert len(samples) == 16
        for sample in samples:
            tokens, mask, log_probs = sample["tokens"], sample["loss_mask"], sample["rollout_log_probs"]
            start = len(tokens) - sample["response_length"]
            prompt = tokenizer(f"<|user|>{sample['prompt']}<|assistant|>", add_special_tokens=False)["input_ids"]
            assert tokens[:start] == prompt
            # Walk the trajectory call by call: each call's context is recorded at the router, its sampled
            # tokens follow with mask 1 and the engine's log-probs, then a retry message with mask 0.
            position, turns = start, 0
            while True:
                (call,) = {json.dumps(c): c for c in by_context[tuple(tokens[:position])] if follows(tokens, position, c, retry)}.values()
                n = len(call["output_ids"])
                assert 1 <= n <= 3
                assert mask[position - start:position - start + n] == [1] * n
                assert log_probs[position - start:position - start + n] == call["log_probs"]
                position, turns = position + n, turns + 1
                if position == len(tokens):
                    break
                assert tokens[position:position + len(retry)] == retry
                assert mask[position - start:position - start + len(retry)] == [0] * len(retry)
                assert all(lp == 0.0 for lp in log_probs[position - start:position - start + len(retry)])
                position += len(retry)
            answer = tokenizer.decode(call["output_ids"], skip_special_tokens=True).strip()
            assert turns == 3 or answer == sample["label"]  # the agent stops early only when right
            assert sample["weight_versions"] == ["default" if rollout_id == 0 else str(rollout_id)] * turns
            turns_seen += turns
    assert turns_seen > 32  # multi-turn conversations, not one call per sample
