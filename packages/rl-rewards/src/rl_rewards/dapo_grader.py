"""The `dapo` reward (DAPO's math reward): the last non-empty line must read `Answer: X`.

DAPO prompts end with "The last line of your response should be of the form Answer: $Answer"; its reward
is +1 for a correct answer and -1 otherwise. A response whose last line is not of that form gets
`format_error_reward` (DAPO's value, and the default, is -1: a format error is simply incorrect). As in
DAPO only the last `SCAN_CHARS` characters are read. Answers are compared with the `math` grader's
equivalence (string, exact number, then math-verify).
"""

from __future__ import annotations

import re
from typing import Any

from rl_rewards.math_grader import gold_answers, matches_any

SCAN_CHARS = 300
_ANSWER_LINE = re.compile(r"^\**\s*Answer\s*\**\s*:\s*\**\s*(?P<answer>.+?)\s*$", re.IGNORECASE)


def dapo_final_answer(response: str) -> str | None:
    """X from a last non-empty line `Answer: X` (markdown bold and a trailing full stop allowed), else None."""
    lines = [line for line in response[-SCAN_CHARS:].splitlines() if line.strip()]
    if not lines:
        return None
    match = _ANSWER_LINE.match(lines[-1].strip())
    if match is None:
        return None
    answer = match.group("answer").strip("*").strip().rstrip(".").strip()
    return answer or None


class DapoGrader:
    """+1 correct, -1 incorrect, `format_error_reward` without a final `Answer:` line.

    With `components=True` returns `{"score", "acc", "format_ok"}` (pick `reward_key="score"`).
    """

    def __init__(
        self,
        *,
        correct_reward: float = 1.0,
        incorrect_reward: float = -1.0,
        format_error_reward: float = -1.0,
        components: bool = False,
    ) -> None:
        self.correct_reward = correct_reward
        self.incorrect_reward = incorrect_reward
        self.format_error_reward = format_error_reward
        self.components = components

    def details(self, response: str, label: Any) -> dict[str, float]:
        golds = gold_answers(label, "dapo")
        predicted = dapo_final_answer(response or "")
        if predicted is None:
            return {"score": self.format_error_reward, "acc": 0.0, "format_ok": 0.0}
        correct = matches_any(predicted, golds)
        return {
            "score": self.correct_reward if correct else self.incorrect_reward,
            "acc": float(correct),
            "format_ok": 1.0,
        }

    def __call__(self, *, prompt: str, response: str, label: Any, metadata: dict[str, Any]) -> Any:
        details = self.details(response, label)
        return details if self.components else details["score"]
