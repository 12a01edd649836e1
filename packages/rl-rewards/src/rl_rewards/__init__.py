"""Reward functions and the hub that scores batches of them; meets rl-core's `RewardModel` by shape."""

from rl_rewards.answer_extraction import extract_math_answer
from rl_rewards.custom_loading import load_custom_reward
from rl_rewards.factory import build_reward
from rl_rewards.hub import RewardHub, RewardValueError
from rl_rewards.math_grader import math_answers_equal, math_reward
from rl_rewards.registry import GraderFactory, RewardRegistry, default_registry, register
from rl_rewards.text_graders import exact_match_reward, extract_choice, f1_reward, multiple_choice_reward
from rl_rewards.types import Grader, RewardInput, RewardValue

__all__ = [
    "Grader",
    "GraderFactory",
    "RewardHub",
    "RewardInput",
    "RewardRegistry",
    "RewardValue",
    "RewardValueError",
    "build_reward",
    "default_registry",
    "exact_match_reward",
    "extract_choice",
    "extract_math_answer",
    "f1_reward",
    "load_custom_reward",
    "math_answers_equal",
    "math_reward",
    "multiple_choice_reward",
    "register",
]
