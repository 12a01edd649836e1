import asyncio
from collections import Counter

import pytest

from rl_router import CacheAwarePolicy, make_policy
from rl_router.cache_aware import prefix_keys


def request(input_ids, rid=None):
    out = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": 4}}
    if rid is not None:
        out["rid"] = rid
    return out


def prompt(i, length=12):
    return [1000 * i + k for k in range(length)]


def test_prefix_keys_are_shared_exactly_up_to_the_last_common_block_boundary():
    a = prefix_keys(list(range(10)), block_size=4, max_tokens=100)
    b = prefix_keys(list(range(9)) + [99], block_size=4, max_tokens=100)
    assert len(a) == 3 and len(b) == 3  # two full blocks and the whole sequence
    assert a[:2] == b[:2] and a[2] != b[2]
    assert prefix_keys(list(range(10)), block_size=4, max_tokens=8) == a[:2]  # longer prefixes are not keyed
    assert prefix_keys([5, 6], block_size=4, max_tokens=100) == prefix_keys([5, 6], block_size=4, max_tokens=100)


def test_samples_of_one_prompt_stick_to_one_engine_while_new_prompts_go_to_the_least_loaded():
    policy = CacheAwarePolicy(block_size=4, imbalance_threshold=2)
    load = {"a": 0, "b": 0, "c": 0}
    chosen = []
    for i in range(3):
        for _ in range(3):
            name = policy.choose_for(request(prompt(i)), load)
            load[name] += 1
            chosen.append(name)
    assert [len(set(chosen[i : i + 3])) for i in (0, 3, 6)] == [1, 1, 1]
    assert sorted(set(chosen)) == ["a", "b", "c"]
    assert (policy.misses, policy.hits, policy.spills) == (3, 6, 0)


def test_an_owner_loaded_beyond_the_threshold_loses_the_request_to_the_least_loaded_engine():
    policy = CacheAwarePolicy(block_size=4, imbalance_threshold=3)
    owner = policy.choose_for(request(prompt(1)), {"a": 0, "b": 0})
    other = "b" if owner == "a" else "a"
    assert policy.choose_for(request(prompt(1)), {owner: 3, other: 0}) == owner  # 3 more is within the threshold
    assert policy.choose_for(request(prompt(1)), {owner: 4, other: 0}) == other  # 4 more is not
    assert policy.spills == 1
    assert policy.choose_for(request(prompt(1)), {owner: 0, other: 0}) == other  # the new owner keeps it


def test_an_owner_out_of_rotation_is_passed_over():
    policy = CacheAwarePolicy(block_size=4)
    owner = policy.choose_for(request(prompt(1)), {"a": 0, "b": 0})
    survivor = "b" if owner == "a" else "a"
    assert policy.choose_for(request(prompt(1)), {survivor: 5}) == survivor


def test_the_next_turn_of_a_conversation_follows_the_engine_that_served_the_previous_turn():
    policy = CacheAwarePolicy(block_size=4)
    load = {"a": 0, "b": 0, "c": 0}
    turn1 = request(prompt(7, 6))
    engine = policy.choose_for(turn1, load)
    policy.observe(turn1, {"output_ids": [1, 2, 3, 4, 5]}, engine)
    load = {name: (0 if name != engine else 1) for name in load}  # the owner is busier, within the threshold
    turn2 = request(prompt(7, 6) + [1, 2, 3, 4, 5] + [77, 78])
    assert policy.choose_for(turn2, load) == engine


def test_text_requests_are_keyed_by_characters():
    policy = CacheAwarePolicy(block_size=8)
    first = policy.choose_for({"text": "System: be brief. User: hi"}, {"a": 0, "b": 0})
    assert policy.choose_for({"text": "System: be brief. User: hello"}, {"a": 0, "b": 1}) == first


def test_the_prefix_map_stays_within_its_bound():
    policy = CacheAwarePolicy(block_size=2, max_entries=50)
    for i in range(200):
        policy.choose_for(request(prompt(i, 10)), {"a": 0})
    assert len(policy) == 50


@pytest.mark.parametrize("kwargs", [{"block_size": 0}, {"max_entries": 0}, {"imbalance_threshold": -1}])
def test_bad_settings_are_refused_by_name(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        CacheAwarePolicy(**kwargs)


async def test_through_the_router_samples_and_turns_share_an_engine_and_spill_when_it_is_overloaded(fake_engine, serve):
    engines = {name: fake_engine(name, delay_s=0.05) for name in ("a", "b", "c")}
    policy = CacheAwarePolicy(block_size=4, imbalance_threshold=4)
    assert isinstance(make_policy("cache_aware"), CacheAwarePolicy)
    async with asyncio.timeout(20), serve(engines, policy=policy) as (router, client):
        # 6 prompts x 4 samples, all at once
        group = await asyncio.gather(*(client.generate(request(prompt(p))) for p in range(6) for _ in range(4)))
        # two turns of 3 conversations: turn 2 extends turn 1's prompt + output
        turn1 = await asyncio.gather(*(client.generate(request(prompt(10 + c))) for c in range(3)))
        turn2 = await asyncio.gather(
            *(client.generate(request(prompt(10 + c) + r["output_ids"] + [5, 6])) for c, r in enumerate(turn1))
        )
        # 20 samples of one prompt at once: the owner takes them until it is 5 ahead, then others help
        burst = await asyncio.gather(*(client.generate(request(prompt(99))) for _ in range(20)))
        metrics = router.metrics()
    by_prompt = [Counter(r["meta_info"]["engine"] for r in group[i : i + 4]) for i in range(0, 24, 4)]
    assert all(len(c) == 1 for c in by_prompt), by_prompt
    assert len({next(iter(c)) for c in by_prompt}) == 3  # different prompts spread over the engines
    assert [r["meta_info"]["engine"] for r in turn2] == [r["meta_info"]["engine"] for r in turn1]
    burst_engines = Counter(r["meta_info"]["engine"] for r in burst)
    assert len(burst_engines) > 1 and max(burst_engines.values()) >= 5, burst_engines
    assert metrics["router/cache_aware/spills"] >= 1.0
    assert metrics["router/cache_aware/hits"] >= 18 + 3
