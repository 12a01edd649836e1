"""A recorded multi-turn trajectory on a Sample: slime's semantics, checked against building the same
Sample turn by turn with Sample.append_response_tokens."""

import pytest
from pydantic import ValidationError

from rl_core.sample import Sample, SampleStatus
from rl_core.trajectory import Trajectory, apply_trajectory


def test_a_trajectory_gives_the_sample_that_appending_its_turns_one_by_one_gives():
    prompt, turn1, tool, turn2 = [5, 6, 7], [10, 11], [20, 21, 22], [12]
    trajectory = Trajectory(
        token_ids=prompt + turn1 + tool + turn2,
        loss_mask=[0, 0, 0, 1, 1, 0, 0, 0, 1],
        log_probs=[0.0, 0.0, 0.0, -0.5, -0.25, 0.0, 0.0, 0.0, -1.0],
        prompt_length=3, weight_versions=["3", "4"], finish_reason="length", response_text="xy tool z",
    )
    got = apply_trajectory(Sample(prompt="q", tokens=[1]), trajectory)

    expected = Sample(prompt="q", tokens=prompt)
    expected.append_response_tokens(tokens=turn1, log_probs=[-0.5, -0.25], meta_info={"weight_version": "3"}, text="xy")
    expected.append_response_tokens(tokens=tool, trainable=False, text=" tool ")
    expected.append_response_tokens(tokens=turn2, log_probs=[-1.0], meta_info={"weight_version": "4"}, text="z")
    for name in ("tokens", "response_length", "loss_mask", "rollout_log_probs", "weight_versions", "weight_version", "response"):
        assert getattr(got, name) == getattr(expected, name), name
    assert got.status == SampleStatus.TRUNCATED and got.prompt_length == 3


def test_misaligned_or_inconsistent_trajectories_are_refused_with_what_is_wrong():
    with pytest.raises(ValidationError, match="one entry per token, got 2, 1, 2"):
        Trajectory(token_ids=[1, 2], loss_mask=[0], log_probs=[0.0, 0.0], prompt_length=1)
    with pytest.raises(ValidationError, match="prompt holds tokens marked as sampled"):
        Trajectory(token_ids=[1, 2], loss_mask=[1, 1], log_probs=[-1.0, -1.0], prompt_length=1)
    with pytest.raises(ValidationError, match="prompt_length 3 is outside the 2 tokens"):
        Trajectory(token_ids=[1, 2], loss_mask=[0, 0], log_probs=[0.0, 0.0], prompt_length=3)
