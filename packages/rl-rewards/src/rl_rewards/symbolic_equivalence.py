"""Equality of two LaTeX answers through math-verify and sympy, for what strings and numbers cannot decide.

Imported on the first answer that needs it, so `import rl_rewards` (and flag parsing in the apps) stays
free of sympy. The callers refuse text that would blow up the parser (`math_grader`); here the parsed
expressions are checked too, because sympy's simplification multiplies powers of sums out.

math-verify's own timeouts use `signal.alarm`, which only works on the main thread; the hub runs graders in
worker threads, so they are switched off (`parsing_timeout=None`, `timeout_seconds=None`) and the hub's
per-item timeout bounds the time instead.
"""

from __future__ import annotations

import math
from typing import Any

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

MAX_EXPANDED_TERMS = 200
"""`(1+x)^{99}` (100 terms multiplied out) takes ~0.4 s to compare, `(1+x)^{999}` minutes and `(x+y+z)^{99}`
(5,050 terms) 15 s; expressions whose expansion would exceed this are refused. No real final answer comes near it."""
_CONSTANTS = {"i": sympy.I, "e": sympy.E}
"""math-verify leaves `i` (and `\\mathrm{e}`) as plain symbols; as in competition maths they are the imaginary
unit and Euler's number, so `e^{i\\pi}` is -1 and `i^2 = -1`."""
_EXTRACTION_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())


def expanded_terms(expression: sympy.Basic, limit: int) -> int:
    """An upper bound on the terms of `expression` multiplied out, capped at `limit + 1`."""
    if not expression.args:
        return 1
    if isinstance(expression, sympy.Pow) and expression.exp.is_Integer:
        base_terms = expanded_terms(expression.base, limit)
        power = min(abs(int(expression.exp)), 10 * limit)  # the cap keeps math.comb cheap
        return min(math.comb(power + base_terms - 1, base_terms - 1), limit + 1)
    parts = [expanded_terms(arg, limit) for arg in expression.args]
    if isinstance(expression, sympy.Mul):
        return min(math.prod(parts), limit + 1)
    return min(sum(parts), limit + 1)


def _with_constants(expression: Any) -> Any:
    """`expression` with the symbols `i` and `e` read as the imaginary unit and Euler's number."""
    if not isinstance(expression, sympy.Basic):
        return expression  # math-verify's parse also returns the answer's text
    mapping = {symbol: _CONSTANTS[symbol.name] for symbol in expression.free_symbols if symbol.name in _CONSTANTS}
    return expression.xreplace(mapping) if mapping else expression


def _parse(latex: str) -> list[Any] | None:
    """math-verify's parse with the constants read as such; None when it fails or would cost too much to compare."""
    parsed = [_with_constants(item) for item in parse(f"${latex}$", extraction_config=_EXTRACTION_CONFIG, parsing_timeout=None)]
    if not parsed or any(
        isinstance(item, sympy.Basic) and expanded_terms(item, MAX_EXPANDED_TERMS) > MAX_EXPANDED_TERMS for item in parsed
    ):
        return None
    return parsed


def symbolically_equal(predicted: str, gold: str) -> bool:
    """Whether math-verify finds the two answers equal once parsed (False when either cannot be parsed safely)."""
    gold_parsed = _parse(gold)
    predicted_parsed = _parse(predicted) if gold_parsed else None
    if not gold_parsed or not predicted_parsed:
        return False
    return verify(gold_parsed, predicted_parsed, timeout_seconds=None)
