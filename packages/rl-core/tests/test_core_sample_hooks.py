"""slime's sample hooks between rollout and training, applied as slime applies them."""

import pytest

from rl_core.sample import Sample
from rl_core.sample_hooks import SampleHooks, apply_sample_hooks


def groups_of(rewards_by_group):
    return [[Sample(index=g * 10 + k, group_index=g, tokens=[1, 2, 3], response_length=1, reward=r)
             for k, r in enumerate(rewards)] for g, rewards in enumerate(rewards_by_group)]


def test_the_filter_marks_samples_and_the_process_hook_sees_dropped_groups_too():
    seen = {}

    def drop_zero_reward(args, groups):
        for group in groups:
            for sample in group:
                sample.remove_sample = sample.reward == 0.0

    def record(args, all_groups, data_source):
        seen["groups"], seen["source"] = [[s.index for s in g] for g in all_groups], data_source

    groups, dropped = groups_of([[1.0, 0.0], [0.0, 1.0]]), groups_of([[1.0, 1.0]])
    samples, rewards = apply_sample_hooks(SampleHooks(sample_filter=drop_zero_reward, all_samples_process=record),
                                          "args", groups, dropped, "source")
    assert [s.remove_sample for s in samples] == [False, True, True, False] and rewards is None
    assert seen == {"groups": [[0, 1], [10, 11], [0, 1]], "source": "source"}


def test_post_processed_rewards_and_converted_train_data_reach_training():
    samples, rewards = apply_sample_hooks(
        SampleHooks(reward_post_process=lambda args, s: ([x.reward for x in s], [x.reward * 2 - 1 for x in s])),
        None, groups_of([[1.0, 0.0]]), [], None)
    assert rewards == [1.0, -1.0]

    def convert(args, samples):
        return {"loss_masks": [[0] for _ in samples], "rewards": [0.25 for _ in samples]}

    samples, rewards = apply_sample_hooks(SampleHooks(convert_to_train_data=convert), None, groups_of([[1.0, 0.0]]), [], None)
    assert [s.loss_mask for s in samples] == [[0], [0]] and rewards == [0.25, 0.25]
    with pytest.raises(ValueError, match="'loss_masks' has 1 entries for 2 samples"):
        apply_sample_hooks(SampleHooks(convert_to_train_data=lambda a, s: {"loss_masks": [[1]]}), None,
                           groups_of([[1.0, 0.0]]), [], None)
