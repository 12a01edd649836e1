"""The agent examples (examples/search_r1, examples/retool, examples/multi_agent) train through rl-train on
CPU for 2 rollouts: each saved sample is the engines' sampled tokens (mask 1, their log-probs, as recorded
at the router: conftest's `recorded_run`) interleaved with tool or environment tokens (mask 0, log-prob 0)
that the test recomputes."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONTEXT = 110  # the search agent's --rollout-max-context-len: prompts take 57-77 tokens, an observation 37-157

def load_example(relative: str):
    spec = importlib.util.spec_from_file_location(f"example_{Path(relative).stem}", EXAMPLES / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tagged_model(tiny_task, tmp_path_factory):
    """`tagged_model({tag: weight})`: the tiny random model, its tokenizer given the tags as single tokens
    (as real tokenizers have tool-call tokens) and their embeddings pointed along its mean hidden state
    (longer for a larger weight), so that an untrained policy writes them often and the examples' every
    branch runs. Weights 2.5 for the tool's tags and 2.0 for the answer's: about one turn in four calls
    the tool and one in ten answers."""
    import torch
    from transformers import AutoModelForCausalLM

    from rl_sglang.tokenizer import load_tokenizer

    def build(weights: dict[str, float]) -> Path:
        out = tmp_path_factory.mktemp("tagged") / "model"
        tokenizer = load_tokenizer(str(tiny_task / "model"))
        tokenizer.add_tokens(list(weights))
        model = AutoModelForCausalLM.from_pretrained(str(tiny_task / "model"))
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        ids = torch.tensor([tokenizer("question: where is the tower? 1+2 = 3", add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            direction = model.model(input_ids=ids).last_hidden_state[0].mean(0)
            direction /= direction.norm() ** 2
            embeddings = model.get_input_embeddings().weight
            for tag, weight in weights.items():
                embeddings[tokenizer.convert_tokens_to_ids(tag)] = weight * direction
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        return out

    return build


def test_the_search_r1_example_trains_on_the_policys_tokens_with_the_retrieved_passages_masked(
        recorded_run, tagged_model):
    example = load_example("search_r1/generate_with_search.py")
    path = EXAMPLES / "search_r1" / "generate_with_search.py"
    model = tagged_model({"<search>": 2.5, "</search>": 2.5, "<answer>": 2.0, "</answer>": 2.0})
    recorded = recorded_run(hf_checkpoint=model, prompt_data=EXAMPLES / "search_r1" / "questions.jsonl",
                            custom_generate_function_path=f"{path}:generate", custom_rm_path=f"{path}:reward_func",
                            rollout_max_response_len=12, max_turns=3, rollout_max_context_len=CONTEXT)
    # Trained: a group whose rewards all agree (an untrained policy rarely answers) has no gradient.
    assert len(recorded.rows) == 2 and any(row["train/grad_norm"] > 0 for row in recorded.rows)

    from rl_sglang.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(model))
    corpus = [json.loads(line)["text"] for line in (EXAMPLES / "search_r1" / "corpus.jsonl").read_text().splitlines()]
    invalid = tokenizer(example.INVALID, add_special_tokens=False)["input_ids"]
    searches = filled = 0
    for rollout in recorded.rollouts:
        assert len(rollout) == 16
        for sample in rollout:
            prompt = tokenizer(example.PROMPT.format(question=sample["prompt"]), add_special_tokens=False)["input_ids"]
            response = sample["tokens"][len(prompt):]
            assert sample["tokens"][:len(prompt)] == prompt and len(response) == sample["response_length"]
            assert len(sample["tokens"]) <= CONTEXT
            runs = recorded.turns(sample)
            assert len([r for r in runs if r[2] == 1]) <= 3  # --max-turns 3
            for start, end, mask in runs:
                if mask == 1:
                    turn = tokenizer.decode(response[start:end])
                    # A turn stops at its first closing tag (the engine sampled on; the rest is not kept).
                    assert all(tag not in tokenizer.decode(response[start:end - 1]) for tag in ("</search>", "</answer>"))
                    continue
                action = re.search(r"<(search|answer)>(.*?)</\1>", turn, re.DOTALL)
                if action is not None:
                    assert action.group(1) == "search"
                    observation = example.information(action.group(2))
                shown = tokenizer(observation, add_special_tokens=False)["input_ids"] if action is not None else invalid
                if end == len(response):  # only an observation that reached --rollout-max-context-len ends a response
                    assert len(sample["tokens"]) == CONTEXT and sample["status"] == "truncated"
                    shown, filled = shown[:end - start], filled + 1  # its head, as much as fitted
                assert response[start:end] == shown
                if action is None:
                    continue
                searches += 1
                passages = re.fullmatch(r" <information>(.*)</information> ", observation, re.DOTALL).group(1)
                words = set(re.findall(r"[a-z0-9]+", action.group(2).lower()))
                found = [p for p in re.split(r" ?doc \d: ", passages) if p]
                if found == ["no results."]:
                    assert not any(words & set(re.findall(r"[a-z0-9]+", text)) for text in corpus)
                else:  # passages of the corpus, each sharing a word with the query
                    assert 1 <= len(found) <= 2 and all(p in corpus for p in found)
                    assert all(words & set(re.findall(r"[a-z0-9]+", p)) for p in found)
            last = re.search(r"<(search|answer)>(.*?)</\1>", turn, re.DOTALL)  # the final turn's action
            answered = last is not None and last.group(1) == "answer"
            golden = {example.normalize(a) for a in sample["label"]}
            expected = 0.0 if not answered else 1.0 if example.normalize(last.group(2)) in golden else 0.2
            assert sample["reward"] == expected
            assert sample["status"] == ("completed" if answered else "truncated")
    assert searches >= 2  # the retrieval branch ran (about 10 expected), not only invalid actions
    assert filled >= 1  # and observations reached --rollout-max-context-len


def test_the_search_r1_example_ranks_passages_by_bm25_and_grades_by_exact_match():
    example = load_example("search_r1/generate_with_search.py")
    assert [d["id"] for d in example.retriever().search("eiffel tower", 2)] == ["d1", "d3"]  # "tower" is in big ben's too
    assert example.retriever().search("who wrote linux", 1)[0]["id"] == "d12"
    assert example.retriever().search("zzz qqq", 2) == []
    assert example.information("zzz") == " <information>no results.</information> "
    assert example.exact_match_score("The  Paris.", ["paris"]) == 1.0
    assert example.exact_match_score("rome", ["paris"]) == example.FORMAT_SCORE
    assert example.exact_match_score(None, ["paris"]) == 0.0


def test_the_retool_example_runs_code_in_rl_rewards_sandbox_as_a_notebook_cell():
    from rl_rewards.sandbox import network_isolation

    example = load_example("retool/generate_with_retool.py")
    assert example.run_code("x = 6\nx * 7") == "42"
    assert example.run_code("1/0") == "ZeroDivisionError: division by zero"
    assert example.run_code("while True: pass").startswith("timeout")
    if network_isolation() != "audit-hook":  # a network namespace: no route anywhere
        assert "unreachable" in example.run_code("import socket\nsocket.create_connection(('192.0.2.1', 80), timeout=1)")
    assert example.answer_score("1,591", "1591") == 1.0 and example.answer_score("12", "1591") == example.FORMAT_SCORE


def test_the_retool_example_trains_with_the_interpreter_output_masked(recorded_run, tagged_model):
    import subprocess
    import sys

    example = load_example("retool/generate_with_retool.py")
    path = EXAMPLES / "retool" / "generate_with_retool.py"
    model = tagged_model({"<code>": 2.5, "</code>": 2.5, "<answer>": 2.0, "</answer>": 2.0})
    recorded = recorded_run(hf_checkpoint=model, prompt_data=EXAMPLES / "retool" / "problems.jsonl",
                            custom_generate_function_path=f"{path}:generate", custom_rm_path=f"{path}:reward_func",
                            rollout_max_response_len=12, max_turns=3)
    # Trained: a group whose rewards all agree (an untrained policy rarely answers) has no gradient.
    assert len(recorded.rows) == 2 and any(row["train/grad_norm"] > 0 for row in recorded.rows)

    from rl_sglang.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(model))
    invalid = tokenizer(example.INVALID, add_special_tokens=False)["input_ids"]
    runs_of_code = 0
    for rollout in recorded.rollouts:
        assert len(rollout) == 16
        for sample in rollout:
            prompt = tokenizer(example.PROMPT.format(problem=sample["prompt"]), add_special_tokens=False)["input_ids"]
            response = sample["tokens"][len(prompt):]
            assert sample["tokens"][:len(prompt)] == prompt
            runs = recorded.turns(sample)
            assert sum(m for _, _, m in runs) <= 3  # --max-turns 3
            for start, end, mask in runs:
                if mask == 1:
                    turn = tokenizer.decode(response[start:end])
                    continue
                action = re.search(r"<(code|answer)>(.*?)</\1>", turn, re.DOTALL)
                if action is None:
                    assert response[start:end] == invalid
                    continue
                assert action.group(1) == "code"
                runs_of_code += 1
                # The same cell run by a plain interpreter, outside the sandbox, prints the same.
                try:
                    plain = subprocess.run([sys.executable, "-I", "-c", example.NOTEBOOK_CELL], input=action.group(2),
                                           capture_output=True, text=True, timeout=3).stdout.strip()[:200] or "no output"
                except subprocess.TimeoutExpired:
                    plain = "timeout: the code ran over 3 s"
                expected = tokenizer(f" <interpreter>{plain}</interpreter> ", add_special_tokens=False)["input_ids"]
                assert response[start:end] == expected
    assert runs_of_code >= 2  # the sandbox ran (about 10 expected) the policy's code, not only invalid actions


def test_the_multi_agent_example_trains_a_solver_and_a_reviser_on_one_policy(recorded_run, tiny_task):
    path = EXAMPLES / "multi_agent" / "rollout_with_two_roles.py"
    recorded = recorded_run(rollout_function_path=f"{path}:generate_rollout", custom_rm_path=f"{path}:reward_func")
    assert len(recorded.rows) == 2 and all(row["train/grad_norm"] > 0 for row in recorded.rows)

    from rl_sglang.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_task / "model"))
    for rollout in recorded.rollouts:
        # 4 solver groups then 4 reviser groups of 4, as they went to training.
        assert [s["metadata"]["role"] for s in rollout] == ["solver"] * 16 + ["reviser"] * 16
        drafts = {s["index"]: s for s in rollout[:16]}
        for sample in rollout:
            assert recorded.turns(sample) == [(0, sample["response_length"], 1)] and not sample["remove_sample"]
            response = tokenizer.decode(sample["tokens"][-sample["response_length"]:], skip_special_tokens=True)
            if sample["metadata"]["role"] == "solver":
                text = f"solve: {sample['prompt']} answer: "
            else:  # the reviser was shown the question and its own draft
                draft = drafts[sample["metadata"]["draft_index"]]
                assert draft["group_index"] == sample["group_index"]
                text = f"question: {sample['prompt']} draft: {draft['response'].strip()} better answer: "
            assert sample["tokens"][:-sample["response_length"]] == tokenizer(text, add_special_tokens=False)["input_ids"]
            digits = sum(c.isdigit() for c in response.strip())
            right = re.search(r"-?\d+", response) is not None and re.search(r"-?\d+", response).group() == sample["label"]
            assert sample["reward"] == (1.0 if right else 0.5 * digits / len(response.strip()) if response.strip() else 0.0)
