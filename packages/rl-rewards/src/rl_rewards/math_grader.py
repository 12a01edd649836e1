"""The `math` reward: extract the final answer, then compare it to the label exactly, numerically, and
symbolically through math-verify.

math-verify's own timeouts use `signal.alarm`, which only works on the main thread; the hub runs graders in
worker threads, so they are switched off here (`parsing_timeout=None`, `timeout_seconds=None`) and the hub's
per-item timeout bounds the time instead. Inputs that make sympy blow up in memory (power towers, deep
nesting) are refused before they reach it, and so are parsed expressions that would multiply out into
thousands of terms (`(1+x)^{999}`), because a timeout cannot take memory back; for what the filters miss, `--rm-type math` with `isolate=True` runs this grader in memory-limited worker processes
(`rl_rewards.isolated_grader`).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rl_rewards.answer_extraction import extract_math_answer, last_boxed
from rl_rewards.labels import label_alternatives
from rl_rewards.math_normalization import NormalizedAnswer, as_number, normalize_math_answer

MAX_SYMBOLIC_CHARS = 400
MAX_SYMBOLIC_NESTING = 6
"""math-verify's LaTeX parser is exponential in bracket depth (15 nested parentheses take seconds)."""
_RELATIVE_TOLERANCE = Fraction(1, 10**6)
_EXTRACTION_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
_EXPENSIVE = re.compile(
    r"\^[-+\s]*\d{6,}"  # huge literal exponent: 9^{99999999}
    r"|\^[-+\s]*\d+\s*\^"  # numeric power tower: 9^9^9, 10^{10^{10}}, 2^{(2^{100})}
    r"|\d{4,}\s*!"  # large factorial
    r"|\d[eE][-+]?\d{4,}"  # huge scientific exponent
)
"""Checked on the text with brackets removed, so grouping cannot hide a tower from it."""
MAX_EXPANDED_TERMS = 200
"""sympy's simplification multiplies powers of sums out: `(1+x)^{99}` (100 terms) takes ~0.7 s, `(1+x)^{999}`
minutes. Expressions whose expansion would exceed this are refused (no real final answer comes near it)."""
_CONSTANTS = {"i": sympy.I, "e": sympy.E}
"""math-verify leaves `i` (and `\\mathrm{e}`) as plain symbols; as in competition maths they are the imaginary
unit and Euler's number, so `e^{i\\pi}` is -1 and `i^2 = -1`."""


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
    return abs(predicted - gold) <= _RELATIVE_TOLERANCE * max(1, abs(gold))


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


def _expanded_terms(expression: sympy.Basic, limit: int) -> int:
    """An upper bound on the terms of `expression` multiplied out, capped at `limit + 1`."""
    if not expression.args:
        return 1
    if isinstance(expression, sympy.Pow) and expression.exp.is_Integer:
        base_terms = _expanded_terms(expression.base, limit)
        power = abs(int(expression.exp)) if abs(expression.exp) <= 10 * limit else 10 * limit
        return min(math.comb(power + base_terms - 1, base_terms - 1), limit + 1)
    parts = [_expanded_terms(arg, limit) for arg in expression.args]
    if isinstance(expression, sympy.Mul):
        return min(math.prod(min(part, limit + 1) for part in parts), limit + 1)
    return min(sum(parts), limit + 1)


def _with_constants(expression: Any) -> Any:
    """`expression` with the symbols `i` and `e` read as the imaginary unit and Euler's number."""
    if not isinstance(expression, sympy.Basic):
        return expression  # math-verify's parse also returns the answer's text
    mapping = {symbol: _CONSTANTS[symbol.name] for symbol in expression.free_symbols if symbol.name in _CONSTANTS}
    return expression.xreplace(mapping) if mapping else expression


def _parse_for_sympy(latex: str) -> list[Any] | None:
    """math-verify's parse with constants read as such; None when it fails or would be too costly to compare."""
    parsed = [_with_constants(item) for item in parse(f"${latex}$", extraction_config=_EXTRACTION_CONFIG, parsing_timeout=None)]
    if not parsed or any(
        isinstance(item, sympy.Basic) and _expanded_terms(item, MAX_EXPANDED_TERMS) > MAX_EXPANDED_TERMS for item in parsed
    ):
        return None
    return parsed


def _symbolic_equal(predicted: str, gold: str) -> bool:
    if _too_expensive_for_sympy(predicted) or _too_expensive_for_sympy(gold):
        return False
    gold_parsed = _parse_for_sympy(gold)
    predicted_parsed = _parse_for_sympy(predicted) if gold_parsed else None
    if not gold_parsed or not predicted_parsed:
        return False
    return verify(gold_parsed, predicted_parsed, timeout_seconds=None)


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
