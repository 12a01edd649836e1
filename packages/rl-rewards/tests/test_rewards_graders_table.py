"""Table of (grader, response, label, expected reward) cases over the tricky parts of answer grading."""

from __future__ import annotations

import pytest

from rl_rewards import default_registry

CASES = [
    # math: boxed extraction, nested braces
    ("math", r"so the result is \boxed{\frac{1}{2}}", "1/2", 1.0),
    ("math", r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", 1.0),
    ("math", r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{2}}{2}", 0.0),
    ("math", r"First \boxed{3}, then correcting: \boxed{4}", "4", 1.0),
    ("math", r"First \boxed{3}, then correcting: \boxed{4}", "3", 0.0),
    ("math", r"\boxed{{{7}}}", "7", 1.0),
    ("math", r"\fbox{12}", "12", 1.0),
    ("math", r"$\boxed 9$", "9", 1.0),
    ("math", r"the final \boxed{5} and an unclosed \boxed{6", "5", 1.0),
    ("math", r"\boxed{x^{2}+1}", "x^2+1", 1.0),
    # fractions vs decimals
    ("math", r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    ("math", r"\boxed{\dfrac{3}{4}}", "0.75", 1.0),
    ("math", r"\boxed{\tfrac{3}{4}}", r"\frac{3}{4}", 1.0),
    ("math", r"\boxed{0.75}", r"\dfrac{3}{4}", 1.0),
    ("math", r"\boxed{3/4}", "0.75", 1.0),
    ("math", r"\boxed{-\frac{2}{3}}", "-2/3", 1.0),
    ("math", r"\boxed{0.67}", r"\frac{2}{3}", 0.0),
    ("math", r"\boxed{\frac{1}{3}}", r"\frac{2}{6}", 1.0),
    ("math", r"\boxed{.5}", "0.5", 1.0),
    # thousands separators
    ("math", r"\boxed{1,000}", "1000", 1.0),
    ("math", "The answer is 1,000.", "1000", 1.0),
    ("math", r"\boxed{1{,}234{,}567}", "1234567", 1.0),
    ("math", r"\boxed{1000}", "1,000", 1.0),
    ("math", r"\boxed{1,001}", "1000", 0.0),
    ("math", "I count 12,345 in total", "12345", 1.0),
    # percent
    ("math", r"\boxed{50\%}", "50", 1.0),
    ("math", r"\boxed{50\%}", "0.5", 1.0),
    ("math", r"\boxed{0.5}", r"50\%", 1.0),
    ("math", "so it is 50%", "50", 1.0),
    ("math", r"\boxed{40\%}", "0.5", 0.0),
    # degrees, dollars, units, trailing text
    ("math", r"\boxed{90^\circ}", "90", 1.0),
    ("math", r"\boxed{90^{\circ}}", "90", 1.0),
    ("math", r"\boxed{45°}", "45", 1.0),
    ("math", r"\boxed{\$18.50}", "18.5", 1.0),
    ("math", r"\boxed{5\text{ cm}}", "5", 1.0),
    ("math", r"\boxed{12 \mbox{ inches}}", "12", 1.0),
    ("math", "The answer is 12 apples.", "12", 1.0),
    ("math", r"\boxed{18 \text{ dollars}}", r"18", 1.0),
    ("math", r"\boxed{20 meters}", "20", 1.0),
    ("math", r"\boxed{2x}", "2", 0.0),
    # \left \right and spacing
    ("math", r"\boxed{\left(1, 2\right)}", "(1,2)", 1.0),
    ("math", r"\boxed{\left[ 0, 1 \right]}", "[0,1]", 1.0),
    ("math", r"\boxed{\left(\frac{1}{2}, 3\right)}", r"(\frac{1}{2}, 3)", 1.0),
    ("math", r"\boxed{(1,3)}", "(1,2)", 0.0),
    ("math", r"\boxed{3\,000}", "3000", 1.0),
    ("math", r"\boxed{1\!000}", "1000", 1.0),
    # symbolic equivalence via math-verify
    ("math", r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
    ("math", r"\boxed{\sqrt{8}}", r"2\sqrt{2}", 1.0),
    ("math", r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("math", r"\boxed{\frac{\pi}{2}}", r"\pi/2", 1.0),
    ("math", r"\boxed{2\pi}", r"\pi", 0.0),
    ("math", r"\boxed{\sqrt{3}}", r"\sqrt{2}", 0.0),
    ("math", r"\boxed{x = 5}", "5", 1.0),
    ("math", r"\boxed{y=\frac{1}{2}}", "0.5", 1.0),
    ("math", r"\boxed{2^{10}}", "1024", 1.0),
    ("math", r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", 1.0),
    # answer phrases and last-number fallback
    ("math", "The answer is 42", "42", 1.0),
    ("math", "The final answer is $\\frac{1}{2}$.", "0.5", 1.0),
    ("math", "Final answer: 7", "7", 1.0),
    ("math", "**Answer:** -3", "-3", 1.0),
    ("math", "3 + 4 = 7, so we get 7", "7", 1.0),
    ("math", "3 + 4 = 7, so we get 8", "7", 0.0),
    ("math", "It costs 3.50 each", "3.5", 1.0),
    # wrong and empty
    ("math", "", "5", 0.0),
    ("math", "I do not know", "5", 0.0),
    ("math", r"\boxed{}", "5", 0.0),
    ("math", r"\boxed{6}", "5", 0.0),
    ("math", r"\boxed{-5}", "5", 0.0),
    # label forms
    ("math", r"\boxed{5}", 5, 1.0),
    ("math", r"\boxed{0.25}", 0.25, 1.0),
    ("math", r"\boxed{5}", r"The solution gives \boxed{5}", 1.0),
    ("math", r"\boxed{6}", ["5", "6"], 1.0),
    ("math", r"\boxed{5}", "$5$", 1.0),
    # exact_match
    ("exact_match", "Paris", "Paris", 1.0),
    ("exact_match", "  Paris \n", "Paris", 1.0),
    ("exact_match", "New   York", "New York", 1.0),
    ("exact_match", "paris", "Paris", 0.0),
    ("exact_match", "", "Paris", 0.0),
    ("exact_match", "42", 42, 1.0),
    ("exact_match", "Lyon", ["Paris", "Lyon"], 1.0),
    # f1 (SQuAD normalisation)
    ("f1", "The Eiffel Tower!", "eiffel tower", 1.0),
    ("f1", "an apple", "the apple", 1.0),
    ("f1", "red car", "red truck", 0.5),
    ("f1", "completely different", "nothing shared", 0.0),
    ("f1", "", "answer", 0.0),
    ("f1", "blue whale", ["whale", "blue whale"], 1.0),
    ("f1", "the big red dog", "red dog", 0.8),
    # multiple_choice
    ("multiple_choice", "Answer: B", "B", 1.0),
    ("multiple_choice", "The answer is (C).", "C", 1.0),
    ("multiple_choice", "the answer is b", "B", 0.0),
    ("multiple_choice", "I think the correct answer is D because...", "D", 1.0),
    ("multiple_choice", "**Answer:** **A**", "A", 1.0),
    ("multiple_choice", "Looking at (A) and (B), I pick (B)", "B", 1.0),
    ("multiple_choice", "(A) is wrong. The answer is C", "C", 1.0),
    ("multiple_choice", "B", "B", 1.0),
    ("multiple_choice", "B.", "(B)", 1.0),
    ("multiple_choice", r"\boxed{\text{E}}", "E. 42", 1.0),
    ("multiple_choice", r"\boxed{D}", "d", 1.0),
    ("multiple_choice", "I would choose option A.", "A", 1.0),
    ("multiple_choice", "Answer: B", "C", 0.0),
    ("multiple_choice", "", "A", 0.0),
    ("multiple_choice", "I am not sure", "A", 0.0),
    ("multiple_choice", "The answer is Bob's choice", "B", 0.0),
]


def _case_id(case: tuple) -> str:
    grader, response, label, expected = case
    return f"{grader}:{response[:30]!r}->{label!r}={expected}"


def test_rewards_table_has_at_least_eighty_cases() -> None:
    assert len(CASES) >= 80


@pytest.mark.parametrize("case", CASES, ids=[_case_id(case) for case in CASES])
def test_rewards_grader_gives_expected_reward(case: tuple) -> None:
    grader_name, response, label, expected = case
    grader = default_registry.create(grader_name)
    reward = grader(prompt="question", response=response, label=label, metadata={})
    assert reward == pytest.approx(expected)
