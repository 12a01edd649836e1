"""Normalisation of LaTeX answers for what math-verify misses or should not be trusted with.

Covers `\\dfrac`, `\\left`/`\\right`, thousands separators, percent, degrees, dollar signs, trailing units
and words, `x = ` prefixes, and a bare `pi` written for `\\pi`. The numeric reading (`as_number`) lets
plain numbers and fractions be compared exactly without sympy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_SUBSTITUTIONS = (
    (re.compile(r"\\[dt]frac(?![a-zA-Z])"), r"\\frac"),
    (re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])"), ""),
    (re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°"), ""),
    (re.compile(r"\\!"), ""),
    (re.compile(r"\\[,;:]|\\q?quad|~|\\ "), " "),
    (re.compile(r"\\\$"), ""),
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\displaystyle"), ""),
    (re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])"), r"\\pi"),  # a bare `pi` is the constant, not p times i
)
_PERCENT = re.compile(r"\\?%")
_TRAILING_TEXT_COMMAND = re.compile(r"^(?P<value>.*?[\d}])\s*\\(?:text|mbox|mathrm|textbf)\s*\{[^{}]*\}\s*$")
_TEXT_COMMAND = re.compile(r"\\(?:text|mbox|mathrm|textbf)\s*\{(?P<inner>[^{}]*)\}")
_ASSIGNMENT = re.compile(r"^[a-zA-Z]\s*=\s*(?=\S)")
_NUMBER_THEN_WORDS = re.compile(r"^(?P<value>[-+]?[\d.,]*\d(?:\s*/\s*\d+)?)\s+[A-Za-z]{2,}[\w\s.^{}/()-]*$")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_PLAIN_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d{1,3})?$")
_SLASH_FRACTION = re.compile(r"^(?P<sign>[-+]?)(?P<num>\d+)\s*/\s*(?P<den>\d+)$")
_LATEX_FRACTION = re.compile(r"^(?P<sign>[-+]?)\\frac\{(?P<num>[-+]?\d+)\}\{(?P<den>[-+]?\d+)\}$")
_MAX_NUMBER_CHARS = 64
"""Longer digit strings are not answers anyone writes; refusing them keeps Fraction arithmetic cheap."""


@dataclass(frozen=True)
class NormalizedAnswer:
    """An answer with formatting noise removed; `percent` records that a `%` was dropped."""

    latex: str
    percent: bool

    @property
    def key(self) -> str:
        """Whitespace-free form for string comparison."""
        return re.sub(r"\s+", "", self.latex)


def _strip_delimiters(text: str) -> str:
    changed = True
    while changed:
        changed = False
        text = text.strip()
        for opening, closing in _DELIMITERS:
            if len(text) >= len(opening) + len(closing) and text.startswith(opening) and text.endswith(closing):
                text = text[len(opening) : len(text) - len(closing)]
                changed = True
    return text


def normalize_math_answer(text: str) -> NormalizedAnswer:
    """Strip delimiters, spacing commands, units, percent and degree signs, and thousands separators."""
    text = _strip_delimiters(text)
    for pattern, replacement in _SUBSTITUTIONS:
        text = pattern.sub(replacement, text)
    percent = bool(_PERCENT.search(text))
    text = _PERCENT.sub("", text)
    trailing_unit = _TRAILING_TEXT_COMMAND.match(text)
    if trailing_unit:
        text = trailing_unit.group("value")
    text = _TEXT_COMMAND.sub(lambda match: match.group("inner"), text)
    text = re.sub(r"\s+", " ", text).strip().rstrip(".").strip()
    if text.count("=") == 1:
        text = _ASSIGNMENT.sub("", text)
    number_then_words = _NUMBER_THEN_WORDS.match(text)
    if number_then_words:
        text = number_then_words.group("value")
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    return NormalizedAnswer(latex=text, percent=percent)


def as_number(text: str) -> Fraction | None:
    """Exact value of a plain number, `a/b`, or `\\frac{a}{b}`; None for anything else."""
    text = text.replace(" ", "")
    if not text or len(text) > _MAX_NUMBER_CHARS:
        return None
    if _PLAIN_NUMBER.match(text):
        return Fraction(text)
    fraction = _SLASH_FRACTION.match(text) or _LATEX_FRACTION.match(text)
    if fraction is None or int(fraction.group("den")) == 0:
        return None
    value = Fraction(int(fraction.group("num")), int(fraction.group("den")))
    return -value if fraction.group("sign") == "-" else value
