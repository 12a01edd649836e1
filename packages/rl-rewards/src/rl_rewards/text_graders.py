"""Rewards on plain text: exact match, SQuAD token F1, and multiple-choice letters."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

from rl_rewards.answer_extraction import last_boxed, response_tail
from rl_rewards.labels import label_alternatives

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def exact_match_reward(*, prompt: str, response: str, label: Any, metadata: dict[str, Any]) -> float:
    """1.0 when the response equals a label up to surrounding and repeated whitespace (case counts)."""
    golds = label_alternatives(label, "exact_match")
    predicted = " ".join((response or "").split())
    return 1.0 if any(predicted == " ".join(gold.split()) for gold in golds) else 0.0


def squad_normalize(text: str) -> str:
    """SQuAD answer normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(predicted: str, gold: str) -> float:
    """SQuAD token-overlap F1 between two normalised answers."""
    predicted_tokens, gold_tokens = squad_normalize(predicted).split(), squad_normalize(gold).split()
    if not predicted_tokens or not gold_tokens:
        return float(predicted_tokens == gold_tokens)
    overlap = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_reward(*, prompt: str, response: str, label: Any, metadata: dict[str, Any]) -> float:
    """Best SQuAD F1 of the response's tail against any label."""
    golds = label_alternatives(label, "f1")
    predicted = response_tail(response or "")
    return max(token_f1(predicted, gold) for gold in golds)


_CHOICE = r"\(?\s*\**\s*(?P<letter>[A-Z])\s*\**\s*\)?(?![A-Za-z0-9'])"
_CHOICE_PHRASES = (
    re.compile(r"(?:answer|choice|option)\s*(?:is|:)\s*(?:option\s+|choice\s+)?:?\s*\**\s*" + _CHOICE, re.IGNORECASE),
    re.compile(r"(?:option|choice)\s+" + _CHOICE, re.IGNORECASE),
)
_PARENTHESISED = re.compile(r"\(\s*(?P<letter>[A-Z])\s*\)")
_BARE = re.compile(r"\s*\**\s*\(?\s*(?P<letter>[A-Z])\s*[).:]?\s*\**\s*")
_LEADING_LETTER = re.compile(r"^\s*\(?\s*(?P<letter>[A-Za-z])\s*(?:[).:]|\s|$)")


def extract_choice(response: str) -> str | None:
    """The chosen letter: boxed, "the answer is (B)", "Answer: B", "option B", the last "(B)", or a bare "B"."""
    text = response_tail(response)
    boxed = last_boxed(text)
    if boxed is not None:
        leading = _LEADING_LETTER.match(re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", boxed))
        if leading and leading.group("letter").isupper():
            return leading.group("letter")
    for phrase in _CHOICE_PHRASES:
        matches = [match for match in phrase.finditer(text) if match.group("letter").isupper()]
        if matches:
            return matches[-1].group("letter")
    parenthesised = _PARENTHESISED.findall(text)
    if parenthesised:
        return parenthesised[-1]
    bare = _BARE.fullmatch(text)
    return bare.group("letter") if bare else None


def _label_letter(label: str) -> str:
    match = _LEADING_LETTER.match(label)
    if match is None:
        raise ValueError(f"multiple_choice reward: label {label!r} does not start with a choice letter")
    return match.group("letter").upper()


def multiple_choice_reward(*, prompt: str, response: str, label: Any, metadata: dict[str, Any]) -> float:
    """1.0 when the letter the response chooses is the label's letter (label "B", "(B)" or "B. text")."""
    gold_letters = {_label_letter(gold) for gold in label_alternatives(label, "multiple_choice")}
    return 1.0 if extract_choice(response or "") in gold_letters else 0.0
