"""Hostile responses finish fast; importing the package leaves torch out; bad labels are errors."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl_rewards import RewardHub, default_registry, extract_math_answer, math_answers_equal

SRC = Path(__file__).resolve().parents[1] / "src"
HOSTILE_RESPONSES = {
    "2 MB of digits": "1234567890 " * 190_000 + r"\boxed{7}",
    "10k nested braces": r"\boxed{" + "{" * 10_000 + "7" + "}" * 10_000 + "}",
    "10k unclosed braces": r"\boxed{" + "{" * 10_000,
    "1.5k nested braces inside the read tail": r"\boxed{" + "{" * 1500 + "7" + "}" * 1500 + "}",
    "deep parentheses": r"\boxed{" + "(" * 40 + "7" + ")" * 40 + "}",
    "box spam": r"\boxed{" * 300_000,
    "power tower": r"\boxed{2^{2^{2^{2^{10}}}}}",
    "chained powers": r"\boxed{10^{10^{10}}}",
    "tower hidden by brackets": r"\boxed{2^{{2}^{(100)}}}",
    "python power chain": "The answer is 9**9**9",
    "huge exponent": r"\boxed{9^{99999999}}",
    "huge scientific number": r"\boxed{1e999999999}",
    "big factorial": r"\boxed{100000!}",
    "300k unclosed boxes before a number": r"\boxed{" * 300_000 + "7",
    "unclosed braces before a number": r"\boxed{" + "{" * 10_000 + "7",
    "power of a sum": r"\boxed{(1+x)^{99999}}",
    "power of a trinomial": r"\boxed{(x+y+z)^{99}}",
    "product of powers of sums": r"\boxed{(1+x)^{20}(1+y)^{20}(1+z)^{20}}",
    "complex power": r"\boxed{(1+i)^{99999}}",
}


@pytest.mark.parametrize("grader_name", ["math", "multiple_choice", "f1", "exact_match"])
@pytest.mark.parametrize("name", list(HOSTILE_RESPONSES))
def test_rewards_hostile_response_is_graded_in_a_few_seconds(grader_name: str, name: str) -> None:
    grader = default_registry.create(grader_name)
    started = time.monotonic()
    label = "B" if grader_name == "multiple_choice" else "7"
    reward = grader(prompt="", response=HOSTILE_RESPONSES[name], label=label, metadata={})
    assert time.monotonic() - started < 3.0
    assert reward in (0.0, 1.0)


@pytest.mark.parametrize("grader_name", ["math", "deepscaler"])
@pytest.mark.parametrize("spam", [r"\boxed{", r"\fbox{", r"\boxed{{", r"\boxed{\frac{"])
def test_rewards_unclosed_box_runs_score_zero_whatever_follows(grader_name: str, spam: str) -> None:
    """However many unclosed boxes a response opens, the number or phrase after them earns nothing."""
    grader = default_registry.create(grader_name)
    for tail in ("7", " The answer is 7", " 7 apples", "\n7"):
        for count in (1, 17, 5_000):
            response = spam * count + tail
            assert grader(prompt="", response=response, label="7", metadata={}) == 0.0, (spam, count, tail)
            assert extract_math_answer(response) is None


def test_rewards_two_megabyte_response_still_finds_its_final_answer() -> None:
    response = HOSTILE_RESPONSES["2 MB of digits"]
    assert len(response) > 2_000_000
    assert extract_math_answer(response) == "7"


def test_rewards_hub_scores_a_hostile_batch_within_its_timeout() -> None:
    items = [{"prompt": "", "response": text, "label": "7", "metadata": {}} for text in HOSTILE_RESPONSES.values()]
    hub = RewardHub(default_registry.create("math"), timeout_s=5.0)
    started = time.monotonic()
    rewards = hub.score_batch_sync(items)
    assert time.monotonic() - started < 6.0
    assert len(rewards) == len(items)
    assert hub.stats["errors"] == 0


def test_rewards_answer_refused_by_sympy_still_matches_an_identical_label() -> None:
    grader = default_registry.create("math")
    assert grader(prompt="", response=r"\boxed{9^{99999999}}", label="9^{99999999}", metadata={}) == 1.0
    assert grader(prompt="", response=r"\boxed{9^{99999999}}", label="9^{99999998}", metadata={}) == 0.0


def test_rewards_extracts_nested_boxed_content_whole() -> None:
    assert extract_math_answer(r"so \boxed{\frac{a^{2}}{\sqrt{b}}} done") == r"\frac{a^{2}}{\sqrt{b}}"


def test_rewards_math_equality_is_decided_numerically_for_plain_numbers() -> None:
    assert math_answers_equal("0.3333333", r"\frac{1}{3}")
    assert not math_answers_equal("0.333", r"\frac{1}{3}")


@pytest.mark.parametrize("grader_name", ["math", "exact_match", "f1", "multiple_choice"])
@pytest.mark.parametrize("label", [None, "", "   ", []])
def test_rewards_missing_label_is_an_error_not_a_zero(grader_name: str, label) -> None:
    grader = default_registry.create(grader_name)
    with pytest.raises(ValueError, match=f"{grader_name} reward: label"):
        grader(prompt="", response="A", label=label, metadata={})


def test_rewards_multiple_choice_label_without_a_letter_is_an_error() -> None:
    with pytest.raises(ValueError, match="choice letter"):
        default_registry.create("multiple_choice")(prompt="", response="A", label="42", metadata={})


def test_rewards_import_leaves_torch_and_sympy_out() -> None:
    """The apps import the registry to parse flags; sympy loads only when an answer needs it."""
    code = (
        "import sys, rl_rewards; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'sympy' not in sys.modules, 'sympy imported'; print(rl_rewards.default_registry.names()[0]); "
        "assert rl_rewards.math_answers_equal('e^{i\\pi}', '-1'); assert 'sympy' in sys.modules; print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["code", "ok"]
