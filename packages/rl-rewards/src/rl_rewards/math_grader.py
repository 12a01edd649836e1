"""The `math` reward: extract the final answer, then compare it to the label exactly, numerically, and
symbolically through math-verify (`rl_rewards.symbolic_equivalence`, imported on first use).

Inputs that make sympy blow up in memory (power towers, deep nesting, powers of sums) are refused before
they reach it, because a timeout cannot take memory back; for what the filters miss, `--rm-type math`
with `isolate=True` runs this grader in memory-limited worker processes (`rl_rewards.isolated_grader`).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from rl_rewards.answer_extraction import extract_math_answer, last_boxed
from rl_rewards.labels import label_alternatives
from rl_rewards.math_normalization import NormalizedAnswer, as_number, normalize_math_answer

MAX_SYMBOLIC_CHARS = 400
MAX_SYMBOLIC_NESTING = 6
"""math-verify's LaTeX parser is exponential in bracket depth (15 nested parentheses take seconds)."""
_RELATIVE_TOLERANCE = Fraction(1, 10**6)
_EXPENSIVE = re.compile(
    r"\^[-+\s]*\d{6,}"  # huge literal exponent: 9^{99999999}
    r"|\^[-+\s]*\d+\s*\^"  # numeric power tower: 9^9^9, 10^{10^{10}}, 2^{(2^{100})}
    r"|\d{4,}\s*!"  # large factorial
    r"|\d[eE][-+]?\d{4,}"  # huge scientific exponent
)
"""Checked on the text with brackets removed, so grouping cannot hide a tower from it."""


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "({[":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")}]":
            depth = max(depth - 1, 0)
    return deepest


def _too_expensive_for_sympy(latex: str) -> bool:
    return (
        len(latex) > MAX_SYMBOLIC_CHARS
        or _nesting_depth(latex) > MAX_SYMBOLIC_NESTING
        or bool(_EXPENSIVE.search(re.sub(r"[{}()\[\]]", "", latex.replace("**", "^"))))
    )


def _numbers_match(predicted: Fraction, gold: Fraction) -> bool:
    return abs(predicted - gold) <= _RELATIVE_TOLERANCE * max(Fraction(1), abs(gold))


def _numeric_equal(predicted: NormalizedAnswer, gold: NormalizedAnswer) -> bool | None:
    """Exact numeric verdict when both sides are plain numbers (a dropped `%` may scale either by 100)."""
    predicted_value, gold_value = as_number(predicted.latex), as_number(gold.latex)
    if predicted_value is None or gold_value is None:
        return None
    candidates = [(predicted_value, gold_value)]
    if predicted.percent:
        candidates.append((predicted_value / 100, gold_value))
    if gold.percent:
        candidates.append((predicted_value, gold_value / 100))
    return any(_numbers_match(p, g) for p, g in candidates)


def _symbolic_equal(predicted: str, gold: str) -> bool:
    if _too_expensive_for_sympy(predicted) or _too_expensive_for_sympy(gold):
        return False
    from rl_rewards.symbolic_equivalence import symbolically_equal  # sympy loads on the first answer that needs it

    return symbolically_equal(predicted, gold)


def math_answers_equal(predicted: str, gold: str) -> bool:
    """Whether two extracted answers denote the same value: by string, then number, then sympy."""
    predicted_normal, gold_normal = normalize_math_answer(predicted), normalize_math_answer(gold)
    if not predicted_normal.key or not gold_normal.key:
        return False
    if predicted_normal.key == gold_normal.key:
        return True
    numeric = _numeric_equal(predicted_normal, gold_normal)
    if numeric is not None:
        return numeric
    return _symbolic_equal(predicted_normal.latex, gold_normal.latex)


def _gold_answer(label: str) -> str:
    """A label may itself be a boxed solution; its boxed content is the answer."""
    return (last_boxed(label) or label) if ("\\boxed" in label or "\\fbox" in label) else label


def gold_answers(label: Any, grader_name: str) -> list[str]:
    """The label's acceptable answers, boxed solutions reduced to their boxed content."""
    return [_gold_answer(gold) for gold in label_alternatives(label, grader_name)]


def matches_any(predicted: str, golds: list[str]) -> bool:
    return any(math_answers_equal(predicted, gold) for gold in golds)


def math_reward(*, prompt: str, response: str, label: Any, metadata: dict[str, Any]) -> float:
    """1.0 when the response's final answer equals the label (or any of a list of labels), else 0.0."""
    golds = gold_answers(label, "math")
    predicted = extract_math_answer(response or "")
    if predicted is None:
        return 0.0
    return 1.0 if matches_any(predicted, golds) else 0.0
