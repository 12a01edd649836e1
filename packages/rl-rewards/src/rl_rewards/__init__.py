"""Reward functions and the hub that scores batches of them; meets rl-core's `RewardModel` by shape."""

from rl_rewards.answer_extraction import extract_math_answer
from rl_rewards.code_grader import CodeGrader, CodeTest, extract_program, parse_code_tests
from rl_rewards.custom_loading import load_custom_reward
from rl_rewards.dapo_grader import DapoGrader, dapo_final_answer
from rl_rewards.deepscaler_grader import DeepScaleRGrader, deepscaler_solution
from rl_rewards.factory import build_reward
from rl_rewards.hub import RewardHub, RewardValueError
from rl_rewards.ifeval_grader import IfEvalGrader, parse_constraints
from rl_rewards.isolated_grader import IsolatedGrader, WorkerCrashedError, WorkerTimeoutError
from rl_rewards.math_grader import math_answers_equal, math_reward
from rl_rewards.registry import GraderFactory, RewardRegistry, default_registry, isolatable, register
from rl_rewards.remote_reward import RemoteRewardError, RemoteRewardModel
from rl_rewards.sandbox import SandboxLimits, SandboxResult, network_isolation, run_python_sandboxed
from rl_rewards.text_graders import exact_match_reward, extract_choice, f1_reward, multiple_choice_reward
from rl_rewards.types import Grader, RewardInput, RewardValue

__all__ = [
    "CodeGrader",
    "CodeTest",
    "DapoGrader",
    "DeepScaleRGrader",
    "Grader",
    "GraderFactory",
    "IfEvalGrader",
    "IsolatedGrader",
    "RemoteRewardError",
    "RemoteRewardModel",
    "RewardHub",
    "RewardInput",
    "RewardRegistry",
    "RewardValue",
    "RewardValueError",
    "SandboxLimits",
    "SandboxResult",
    "WorkerCrashedError",
    "WorkerTimeoutError",
    "build_reward",
    "dapo_final_answer",
    "deepscaler_solution",
    "default_registry",
    "exact_match_reward",
    "extract_choice",
    "extract_math_answer",
    "extract_program",
    "f1_reward",
    "isolatable",
    "load_custom_reward",
    "math_answers_equal",
    "math_reward",
    "multiple_choice_reward",
    "network_isolation",
    "parse_code_tests",
    "parse_constraints",
    "register",
    "run_python_sandboxed",
]
