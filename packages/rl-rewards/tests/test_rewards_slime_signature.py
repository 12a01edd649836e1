"""Reward functions in slime's signatures: `reward_func(args, sample)` per sample and, with --group-rm,
`reward_func(args, samples)` per prompt group; both see the whole sample objects."""

from types import SimpleNamespace

import pytest

from rl_rewards import build_reward


def write(tmp_path, text):
    path = tmp_path / "slime_reward.py"
    path.write_text(text)
    return path


async def test_a_slime_signature_reward_gets_the_args_and_the_whole_sample(tmp_path):
    path = write(tmp_path, "async def reward_func(args, sample, **kwargs):\n"
                           "    return args.scale * len(sample.tokens) + (sample.label == sample.response)\n")
    hub = build_reward(None, f"{path}:reward_func", slime_args=SimpleNamespace(scale=0.5))
    samples = [SimpleNamespace(tokens=[1, 2, 3], label="4", response="4"), SimpleNamespace(tokens=[1], label="4", response="5")]
    items = [{"prompt": "", "response": s.response, "label": s.label, "metadata": {}, "sample": s} for s in samples]
    assert await hub.score_batch(items) == [2.5, 0.5]
    assert hub.last_failed == []


async def test_group_rm_scores_each_prompt_group_in_one_call_and_a_failing_group_is_reported(tmp_path):
    path = write(tmp_path, "def reward_func(args, samples):\n"
                           "    if samples[0].group_index == 1:\n"
                           "        raise ValueError('judge down')\n"
                           "    best = max(len(s.response) for s in samples)\n"
                           "    return [float(len(s.response) == best) for s in samples]\n")
    hub = build_reward(None, f"{path}:reward_func", slime_args=None, group_rm=True)
    samples = [SimpleNamespace(group_index=g, response="x" * n) for g, n in [(0, 1), (0, 3), (1, 2), (1, 2), (2, 5), (2, 5)]]
    items = [{"prompt": "", "response": s.response, "label": None, "metadata": {}, "sample": s} for s in samples]
    assert await hub.score_batch(items) == [0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert hub.last_failed == [2, 3] and hub.last_errors == ["item 2: ValueError: judge down"]
    assert hub.stats == {"scored": 4, "errors": 2, "timeouts": 0}


def test_group_rm_without_a_custom_function_is_refused():
    with pytest.raises(ValueError, match="--group-rm .* --custom-rm-path"):
        build_reward("math", None, group_rm=True)
