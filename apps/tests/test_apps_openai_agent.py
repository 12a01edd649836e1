"""examples/openai_agent.py, an OpenAI-client agent, trains through rl-train's chat endpoint: each saved
sample is, token for token, what the router sent the engines and they sampled, recorded at the router
(conftest's `recorded_run`)."""

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
def test_an_openai_client_agent_trains_on_exactly_the_tokens_the_engines_sampled(recorded_run):
    recorded = recorded_run(custom_generate_function_path=f"{EXAMPLES / 'openai_agent.py'}:generate")
    assert len(recorded.rows) == 2 and all(row["train/grad_norm"] > 0 for row in recorded.rows)

    from rl_sglang.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(recorded.config.hf_checkpoint)
    retry = tokenizer("<|user|>wrong, try again.<|assistant|>", add_special_tokens=False)["input_ids"]
    turns_seen = 0
    for rollout_id, samples in enumerate(recorded.rollouts):
        assert len(samples) == 16
        for sample in samples:
            tokens = sample["tokens"]
            start = len(tokens) - sample["response_length"]
            prompt = tokenizer(f"<|user|>{sample['prompt']}<|assistant|>", add_special_tokens=False)["input_ids"]
            assert tokens[:start] == prompt
            # Call by call: each call's whole answer (1-3 tokens, mask 1, the engine's log-probs, sent exactly
            # the tokens before it), then the agent's retry message (mask 0, log-prob 0) before the next.
            runs = recorded.turns(sample, whole=True)
            answers = [tokens[start + b:start + e] for b, e, mask in runs if mask == 1]
            assert all(1 <= len(a) <= 3 for a in answers)
            assert all(tokens[start + b:start + e] == retry for b, e, mask in runs if mask == 0)
            answer = tokenizer.decode(answers[-1], skip_special_tokens=True).strip()
            assert len(answers) == 3 or answer == sample["label"]  # the agent stops early only when right
            assert sample["weight_versions"] == ["default" if rollout_id == 0 else str(rollout_id)] * len(answers)
            turns_seen += len(answers)
    assert turns_seen > 32  # multi-turn conversations, not one call per sample
