"""ifeval per-constraint results and label errors; dapo/deepscaler details; custom dict and async rewards."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from rl_rewards import (
    DapoGrader,
    IfEvalGrader,
    build_reward,
    dapo_final_answer,
    deepscaler_solution,
    default_registry,
)

ESSAY_LABEL = {
    "constraints": [
        {"type": "word_count", "min": 5, "max": 50, "name": "length"},
        {"type": "keywords", "keywords": ["river", "bridge"]},
        {"type": "forbidden_words", "words": ["very"]},
        {"type": "ends_with", "phrase": "The end."},
        {"type": "keywords", "keywords": ["boat"]},
    ]
}
ESSAY = "The river ran under the old bridge for a very long time. The end."


def test_rewards_ifeval_reports_each_constraint_by_name() -> None:
    results = IfEvalGrader().check(ESSAY, ESSAY_LABEL)
    assert results == {
        "length": True,
        "keywords": True,
        "forbidden_words": False,
        "ends_with": True,
        "keywords#2": False,
    }


def test_rewards_ifeval_components_pick_the_reward_through_the_hub() -> None:
    hub = build_reward("ifeval", None, grader_options={"components": True}, reward_key="reward")
    assert hub.score_batch_sync([{"prompt": "", "response": ESSAY, "label": ESSAY_LABEL, "metadata": {}}]) == [0.6]
    assert hub.last_components[0] == {
        "reward": 0.6,
        "length": 1.0,
        "keywords": 1.0,
        "forbidden_words": 0.0,
        "ends_with": 1.0,
        "keywords#2": 0.0,
    }


def test_rewards_ifeval_reads_google_ifeval_labels() -> None:
    label = {
        "instruction_id_list": ["keywords:forbidden_words", "length_constraints:number_sentences", "startend:end_checker"],
        "kwargs": [{"forbidden_words": ["cat"]}, {"relation": "less than", "num_sentences": 3}, {"end_phrase": "Bye."}],
    }
    results = IfEvalGrader().check("Dogs bark. Cats purr. Bye.", label)
    assert results == {
        "keywords:forbidden_words": True,
        "length_constraints:number_sentences": False,
        "startend:end_checker": True,
    }


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ({"constraints": []}, "non-empty list"),
        ([{"type": "rhymes"}], r"constraints\[0\].type 'rhymes' is not one of"),
        ([{"type": "word_count"}], r"constraints\[0\] needs 'min' and/or 'max'"),
        ([{"type": "word_count", "min": 5, "max": 2}], "min 5 above max 2"),
        ([{"type": "word_count", "min": -1}], r"constraints\[0\].min must be a non-negative integer"),
        ([{"type": "keywords", "keywords": []}], r"constraints\[0\].keywords must be a non-empty list"),
        ([{"type": "word_count", "min": 1}, {"type": "ends_with"}], r"constraints\[1\].phrase"),
        ("{not json", "not JSON"),
        ({"instruction_id_list": ["detectable_format:title"], "kwargs": [{}]}, "not supported"),
        ({"instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"num_words": 3}]}, "relation"),
    ],
)
def test_rewards_ifeval_malformed_labels_are_errors_naming_the_field(label, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IfEvalGrader().check("text", label)


def test_rewards_dapo_reads_only_a_strict_final_answer_line() -> None:
    assert dapo_final_answer("reasoning\nAnswer: 12\n") == "12"
    assert dapo_final_answer("Answer: 12\nmore text") is None
    assert dapo_final_answer("The Answer: 12") is None


def test_rewards_dapo_format_error_value_and_components_are_configurable() -> None:
    grader = DapoGrader(format_error_reward=-2.0, components=True)
    assert grader(prompt="", response="no answer line", label="3", metadata={}) == {
        "score": -2.0,
        "acc": 0.0,
        "format_ok": 0.0,
    }
    assert grader(prompt="", response="Answer: 4", label="3", metadata={}) == {"score": -1.0, "acc": 0.0, "format_ok": 1.0}
    assert default_registry.create("dapo", format_error_reward=0.0)(
        prompt="", response="nothing", label="3", metadata={}
    ) == 0.0


def test_rewards_dapo_and_deepscaler_can_run_isolated() -> None:
    for name, response, expected in (("dapo", "Answer: 5", 1.0), ("deepscaler", r"</think>\boxed{5}", 1.0)):
        grader = default_registry.create(name, isolate=True, workers=1)
        try:
            assert grader(prompt="", response=response, label="5", metadata={}) == expected
        finally:
            grader.close()


def test_rewards_deepscaler_reads_after_the_last_think_end() -> None:
    assert deepscaler_solution("a</think>b</think>c") == "c"
    assert deepscaler_solution("no tags") == "no tags"


@pytest.mark.parametrize("grader_name", ["dapo", "deepscaler", "ifeval", "code"])
def test_rewards_new_graders_treat_a_missing_label_as_an_error(grader_name: str) -> None:
    with pytest.raises(ValueError, match=f"{grader_name} reward: label"):
        default_registry.create(grader_name)(prompt="", response="x", label=None, metadata={})


CUSTOM_SOURCE = textwrap.dedent(
    """
    import asyncio

    def components(*, prompt, response, label, metadata):
        return {"accuracy": float(response == label), "length_penalty": -len(response) / 100}

    async def async_components(*, prompt, response, label, metadata):
        await asyncio.sleep(0.01)
        return {"accuracy": float(response == label), "format": 1.0}
    """
)


@pytest.mark.parametrize("function", ["components", "async_components"])
def test_rewards_custom_function_components_pick_the_reward_key(tmp_path: Path, function: str) -> None:
    path = tmp_path / "custom_components.py"
    path.write_text(CUSTOM_SOURCE)
    hub = build_reward(None, f"{path}:{function}", reward_key="accuracy", timeout_s=5.0)
    items = [{"prompt": "", "response": r, "label": "yes", "metadata": {}} for r in ("yes", "no")]
    assert hub.score_batch_sync(items) == [1.0, 0.0]
    assert hub.stats == {"scored": 2, "errors": 0, "timeouts": 0}
    assert set(hub.last_components[0]) >= {"accuracy"} and len(hub.last_components[0]) == 2


def test_rewards_async_custom_function_runs_isolated_too(tmp_path: Path) -> None:
    path = tmp_path / "custom_async.py"
    path.write_text(CUSTOM_SOURCE)
    hub = build_reward(
        None, f"{path}:async_components", grader_options={"isolate": True, "workers": 1}, reward_key="format"
    )
    try:
        assert hub.score_batch_sync([{"prompt": "", "response": "a", "label": "b", "metadata": {}}]) == [1.0]
    finally:
        hub.grader.close()
