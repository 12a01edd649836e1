import asyncio
import math

import pytest

from rl_core.data_source import JsonlDataSource, PromptRow
from rl_core.dynamic_sampling import check_reward_nonzero_std
from rl_core.generation import GenerateAnswer
from rl_core.hooks import load_function
from rl_core.metrics import pass_at_k, pass_at_k_metrics, rollout_metrics
from rl_core.rollout import default_generator, generate_groups
from rl_core.sample import Sample


def rows(n):
    return [PromptRow(f"p{i}", f"p{i}", [i], label=i, metadata={"difficulty": n - i}) for i in range(n)]


def scored(rewards, group_index=0):
    return [Sample(group_index=group_index, index=i, reward=r, response_length=1) for i, r in enumerate(rewards)]


async def one_token(request):
    return GenerateAnswer(output_ids=[7], text="x", log_probs=[-1.0], finish_reason="stop")


GENERATOR = default_generator(one_token, {})


def test_groups_with_equal_rewards_are_dropped():
    assert not check_reward_nonzero_std(scored([1.0, 1.0, 1.0]))
    assert not check_reward_nonzero_std(scored([0.0]))
    assert check_reward_nonzero_std(scored([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="not a number"):
        check_reward_nonzero_std([Sample(index=3, reward={"a": 1.0})])


def test_the_filter_is_reachable_by_its_import_path():
    assert load_function("rl_core.dynamic_sampling.check_reward_nonzero_std") is check_reward_nonzero_std
    assert load_function("rl_core.dynamic_sampling:check_reward_nonzero_std") is check_reward_nonzero_std
    with pytest.raises(ValueError, match="--dynamic-sampling-filter-path 'rl_core.nope.f'"):
        load_function("rl_core.nope.f", flag="--dynamic-sampling-filter-path")


class AlternatingReward:
    """Prompt groups alternate: all-equal rewards (dropped), then mixed rewards (kept)."""

    last_failed: list[int] = []
    last_errors: list[str] = []

    def __init__(self, group_size):
        self.group_size = group_size
        self.groups_seen = 0

    async def score_batch(self, items):
        out = []
        for _ in range(0, len(items), self.group_size):
            mixed = self.groups_seen % 2 == 1
            out += [float(mixed and j == 0) for j in range(self.group_size)]
            self.groups_seen += 1
        return out


def test_over_sampling_generates_until_enough_groups_pass_and_returns_the_surplus():
    source = JsonlDataSource(rows(20), n_samples_per_prompt=2)
    groups, stats = asyncio.run(
        generate_groups(GENERATOR, AlternatingReward(2), source, num_groups=3, over_sampling_batch_size=4,
                        sample_filter=check_reward_nonzero_std)
    )
    # rounds of 4 groups, every second one kept: 2 kept, then 2 more of which 1 fills the target
    assert len(groups) == 3 and all(check_reward_nonzero_std(g) for g in groups)
    assert (stats.rounds, stats.generated_groups, stats.kept_groups, stats.dropped_groups, stats.surplus_groups) == (2, 8, 3, 4, 1)
    assert stats.metrics()["rollout/dynamic_sampling/drop_ratio"] == 0.5
    surplus = source.get_samples(1)[0]  # the surplus group is served again first, as a fresh prompt
    assert surplus[0].prompt == "p7" and surplus[0].reward is None and surplus[0].response_length == 0


def test_dynamic_sampling_gives_up_after_a_bounded_number_of_rounds():
    class AllOnes:
        last_failed: list[int] = []
        last_errors: list[str] = []

        async def score_batch(self, items):
            return [1.0] * len(items)

    source = JsonlDataSource(rows(4), n_samples_per_prompt=2)
    with pytest.raises(RuntimeError, match="kept 0 of 2 groups after 3 rounds"):
        asyncio.run(generate_groups(GENERATOR, AllOnes(), source, num_groups=2,
                                    sample_filter=check_reward_nonzero_std, max_rounds=3))


def test_a_pluggable_buffer_filter_chooses_which_returned_groups_go_first():
    def hardest_first(buffer, num_groups):
        order = sorted(range(len(buffer)), key=lambda i: -buffer[i][0].metadata["difficulty"])
        return order[:num_groups]

    source = JsonlDataSource(rows(6), n_samples_per_prompt=1, buffer_filter=hardest_first)
    groups = source.get_samples(4)  # p0..p3, difficulties 6..3
    source.add_samples([groups[2], groups[0], groups[3]])
    assert [g[0].prompt for g in source.get_samples(2)] == ["p0", "p2"]
    assert [g[0].prompt for g in source.get_samples(2)] == ["p3", "p4"]  # the buffer runs dry, then new prompts


def test_a_buffer_filter_that_returns_bad_indices_is_refused():
    source = JsonlDataSource(rows(3), n_samples_per_prompt=1, buffer_filter=lambda buffer, n: [0, 0])
    source.add_samples(source.get_samples(2))
    with pytest.raises(ValueError, match=r"buffer_filter returned indices \[0, 0\]"):
        source.get_samples(2)


def test_pass_at_k_is_the_unbiased_estimator():
    # n = 4, c = 1: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - math.comb(3, 3) / math.comb(5, 3))


def test_pass_at_k_metrics_average_over_groups_with_enough_samples():
    metrics = pass_at_k_metrics([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert metrics["rollout/pass@1"] == pytest.approx((0.25 + 0.0 + 1.0) / 3)
    assert metrics["rollout/pass@2"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert metrics["rollout/pass@4"] == pytest.approx((1.0 + 1.0) / 2)  # the 2-sample group cannot take 4
    assert "rollout/pass@8" not in metrics


def test_rollout_metrics_report_pass_rates_and_response_length_spread():
    samples = scored([1.0, 0.0], group_index=0) + scored([0.0, 0.0], group_index=1)
    for s, n in zip(samples, [2, 4, 6, 12]):
        s.response_length = n
    m = rollout_metrics(samples)
    assert (m["rollout/response_len_min"], m["rollout/response_len_median"], m["rollout/response_len_max"]) == (2.0, 5.0, 12.0)
    assert m["rollout/response_len_std"] == pytest.approx(math.sqrt(((2 - 6) ** 2 + 2**2 + 0 + 6**2) / 4))
    assert m["rollout/pass@1"] == pytest.approx(0.25) and m["rollout/pass@2"] == pytest.approx(0.5)
    assert "rollout/pass@1" not in rollout_metrics(samples, log_passrate=False)
