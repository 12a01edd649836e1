"""The `ifeval` reward: verifiable instruction-following constraints, scored one by one.

The label lists constraints, as `{"constraints": [...]}`, a bare list, or the same as a JSON string:
  {"type": "word_count", "min": 50, "max": 100}      words are runs of `\\w` characters
  {"type": "sentence_count", "min": 2, "max": 5}     sentences end at . ! or ? followed by space or the end
  {"type": "keywords", "keywords": ["apple"]}        each must appear as a whole word, any case
  {"type": "forbidden_words", "words": ["banana"]}   none may appear as a whole word, any case
  {"type": "json_format"}                            the response (a ```json fence allowed) parses as JSON
  {"type": "lowercase"} / {"type": "uppercase"}      no letter of the other case, and at least one letter
  {"type": "starts_with", "phrase": "Dear"}          after stripping whitespace, any case
  {"type": "ends_with", "phrase": "Any questions?"}
An optional "name" names a constraint's result (default: its type, `#2`... for repeats). Google IFEval's
`{"instruction_id_list": [...], "kwargs": [...]}` is accepted for the matching instructions.
Reward = fraction satisfied; `IfEvalGrader.check` gives the per-constraint results.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s+|$)")
_JSON_FENCE = re.compile(r"^```(?:json)?\s*\n?(?P<body>.*?)\n?```$", re.DOTALL | re.IGNORECASE)


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def sentence_count(text: str) -> int:
    return sum(1 for part in _SENTENCE_END.split(text.strip()) if _WORD.search(part))


def _contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", text, re.IGNORECASE) is not None


def _is_json(text: str) -> bool:
    text = text.strip()
    fenced = _JSON_FENCE.match(text)
    try:
        json.loads(fenced.group("body") if fenced else text)
    except ValueError:
        return False
    return True


def _bound(params: dict[str, Any], key: str, where: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"ifeval reward: {where}.{key} must be a non-negative integer, got {value!r}")
    return value


def _count_check(count: Callable[[str], int]) -> Callable[[str, dict[str, Any], str], bool]:
    def check(text: str, params: dict[str, Any], where: str) -> bool:
        low, high = _bound(params, "min", where), _bound(params, "max", where)
        if low is None and high is None:
            raise ValueError(f"ifeval reward: {where} needs 'min' and/or 'max'")
        if low is not None and high is not None and low > high:
            raise ValueError(f"ifeval reward: {where} has min {low} above max {high}")
        value = count(text)
        return (low is None or value >= low) and (high is None or value <= high)

    return check


def _words(params: dict[str, Any], key: str, where: str) -> list[str]:
    words = params.get(key)
    if isinstance(words, str):
        words = [words]
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"ifeval reward: {where}.{key} must be a non-empty list of words, got {words!r}")
    return words


def _phrase(params: dict[str, Any], where: str) -> str:
    phrase = params.get("phrase")
    if not isinstance(phrase, str) or not phrase.strip():
        raise ValueError(f"ifeval reward: {where}.phrase must be a non-empty string, got {phrase!r}")
    return phrase.strip().lower()


CHECKS: dict[str, Callable[[str, dict[str, Any], str], bool]] = {
    "word_count": _count_check(word_count),
    "sentence_count": _count_check(sentence_count),
    "keywords": lambda text, p, w: all(_contains_word(text, word) for word in _words(p, "keywords", w)),
    "forbidden_words": lambda text, p, w: not any(_contains_word(text, word) for word in _words(p, "words", w)),
    "json_format": lambda text, p, w: _is_json(text),
    "lowercase": lambda text, p, w: text == text.lower() and text != text.upper(),
    "uppercase": lambda text, p, w: text == text.upper() and text != text.lower(),
    "starts_with": lambda text, p, w: text.strip().lower().startswith(_phrase(p, w)),
    "ends_with": lambda text, p, w: text.strip().lower().endswith(_phrase(p, w)),
}


def _relation_bounds(kwargs: dict[str, Any], count_key: str, where: str) -> dict[str, int]:
    relation, count = kwargs.get("relation"), kwargs.get(count_key)
    if not isinstance(count, int):
        raise ValueError(f"ifeval reward: {where}.{count_key} must be an integer, got {count!r}")
    if relation == "less than":
        return {"max": count - 1}
    if relation == "at least":
        return {"min": count}
    raise ValueError(f"ifeval reward: {where}.relation must be 'less than' or 'at least', got {relation!r}")


_IFEVAL_INSTRUCTIONS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "length_constraints:number_words": lambda k, w: {"type": "word_count", **_relation_bounds(k, "num_words", w)},
    "length_constraints:number_sentences": lambda k, w: {
        "type": "sentence_count",
        **_relation_bounds(k, "num_sentences", w),
    },
    "keywords:existence": lambda k, w: {"type": "keywords", "keywords": k.get("keywords")},
    "keywords:forbidden_words": lambda k, w: {"type": "forbidden_words", "words": k.get("forbidden_words")},
    "detectable_format:json_format": lambda k, w: {"type": "json_format"},
    "change_case:english_lowercase": lambda k, w: {"type": "lowercase"},
    "change_case:english_capital": lambda k, w: {"type": "uppercase"},
    "startend:end_checker": lambda k, w: {"type": "ends_with", "phrase": k.get("end_phrase")},
}


def _from_ifeval(label: dict[str, Any]) -> list[dict[str, Any]]:
    ids, kwargs = label["instruction_id_list"], label.get("kwargs") or [{} for _ in label["instruction_id_list"]]
    if len(ids) != len(kwargs):
        raise ValueError(f"ifeval reward: {len(ids)} instruction ids but {len(kwargs)} kwargs")
    constraints = []
    for index, (instruction, params) in enumerate(zip(ids, kwargs)):
        if instruction not in _IFEVAL_INSTRUCTIONS:
            raise ValueError(
                f"ifeval reward: instruction_id_list[{index}] {instruction!r} is not supported; "
                f"supported: {', '.join(sorted(_IFEVAL_INSTRUCTIONS))}"
            )
        constraint = _IFEVAL_INSTRUCTIONS[instruction](params or {}, f"kwargs[{index}]")
        constraints.append({**constraint, "name": instruction})
    return constraints


def parse_constraints(label: Any) -> list[dict[str, Any]]:
    """The label's constraints as dicts with a `type`; malformed labels raise naming the field."""
    if isinstance(label, str):
        try:
            label = json.loads(label)
        except json.JSONDecodeError as error:
            raise ValueError(f"ifeval reward: label is a string but not JSON: {error}") from error
    if isinstance(label, dict) and "instruction_id_list" in label:
        return _from_ifeval(label)
    if isinstance(label, dict):
        label = label.get("constraints")
    if not isinstance(label, list) or not label:
        raise ValueError("ifeval reward: label needs a non-empty list of constraints")
    for index, constraint in enumerate(label):
        if not isinstance(constraint, dict) or constraint.get("type") not in CHECKS:
            found = constraint.get("type") if isinstance(constraint, dict) else constraint
            raise ValueError(
                f"ifeval reward: constraints[{index}].type {found!r} is not one of {', '.join(sorted(CHECKS))}"
            )
    return label


class IfEvalGrader:
    """Fraction of the label's constraints the response satisfies.

    With `components=True` returns `{"reward": fraction, <constraint name>: 1.0 or 0.0, ...}`
    (pick `reward_key="reward"`).
    """

    def __init__(self, *, components: bool = False) -> None:
        self.components = components

    def check(self, response: str, label: Any) -> dict[str, bool]:
        """Whether each constraint holds, keyed by its name."""
        results: dict[str, bool] = {}
        for index, constraint in enumerate(parse_constraints(label)):
            name = str(constraint.get("name") or constraint["type"])
            key, repeat = name, 2
            while key in results:
                key, repeat = f"{name}#{repeat}", repeat + 1
            results[key] = CHECKS[constraint["type"]](response or "", constraint, f"constraints[{index}]")
        return results

    def __call__(self, *, prompt: str, response: str, label: Any, metadata: dict[str, Any]) -> Any:
        results = self.check(response, label)
        reward = sum(results.values()) / len(results)
        if not self.components:
            return reward
        return {"reward": reward, **{name: float(passed) for name, passed in results.items()}}
