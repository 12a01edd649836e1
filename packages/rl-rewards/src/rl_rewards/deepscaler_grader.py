"""The `deepscaler` reward (DeepScaleR's): the last `\\boxed{}` answer after the thinking, 1 or 0.

When the response contains `</think>`, only the text after the last one is read, so a boxed guess inside
the thinking does not count; otherwise the whole response is. Unlike `math` there is no fallback to an
answer phrase or the last number: no box, no reward.
"""

from __future__ import annotations

from typing import Any

from rl_rewards.answer_extraction import last_boxed
from rl_rewards.math_grader import gold_answers, matches_any

THINK_END = "</think>"


def deepscaler_solution(response: str) -> str:
    """The part of the response after the last `</think>`, or all of it when there is none."""
    return response.rpartition(THINK_END)[2] if THINK_END in response else response


class DeepScaleRGrader:
    """1.0 for a correct boxed answer after the thinking, else `incorrect_reward` (0.0)."""

    def __init__(self, *, correct_reward: float = 1.0, incorrect_reward: float = 0.0) -> None:
        self.correct_reward = correct_reward
        self.incorrect_reward = incorrect_reward

    def __call__(self, *, prompt: str, response: str, label: Any, metadata: dict[str, Any]) -> float:
        golds = gold_answers(label, "deepscaler")
        predicted = last_boxed(deepscaler_solution(response or ""))
        if not predicted:
            return self.incorrect_reward
        return self.correct_reward if matches_any(predicted, golds) else self.incorrect_reward
