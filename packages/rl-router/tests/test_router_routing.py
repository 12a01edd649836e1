import asyncio
from collections import Counter

import pytest

from rl_router import LeastOutstandingPolicy, RoundRobinPolicy, make_policy


def payload(i):
    return {"input_ids": [i, i + 1], "sampling_params": {"max_new_tokens": 4}, "return_logprob": False, "rid": f"r{i}"}


async def test_round_robin_spreads_200_concurrent_requests_evenly_over_3_engines(fake_engine, serve):
    engines = {name: fake_engine(name, delay_s=0.01) for name in ("a", "b", "c")}
    async with asyncio.timeout(20), serve(engines, policy="round_robin") as (_, client):
        responses = await asyncio.gather(*(client.generate(payload(i)) for i in range(200)))
    # every caller got its own answer back, despite 200 requests sharing one socket
    assert [r["output_ids"] for r in responses] == [[i + 1, i] for i in range(200)]
    assert sorted(len(e.calls) for e in engines.values()) == [66, 67, 67]
    assert sum(e.max_in_flight for e in engines.values()) > 3  # they really overlapped


async def test_least_outstanding_sends_most_requests_to_idle_engines_when_one_is_slow(fake_engine, serve):
    engines = {"slow": fake_engine("slow", delay_s=0.2), "fast1": fake_engine("fast1"), "fast2": fake_engine("fast2")}
    limit = asyncio.Semaphore(12)  # a rollout keeps a bounded number of requests in flight

    async def one(client, i):
        async with limit:
            return await client.generate(payload(i))

    async with asyncio.timeout(30), serve(engines, policy="least_outstanding") as (router, client):
        responses = await asyncio.gather(*(one(client, i) for i in range(200)))
        outstanding_after = {k: v for k, v in router.metrics().items() if k.endswith("/outstanding")}
    counts = Counter(r["meta_info"]["engine"] for r in responses)
    assert counts["slow"] + counts["fast1"] + counts["fast2"] == 200
    # round robin would give the slow engine 66 or 67; least-outstanding keeps it to a small share
    assert counts["slow"] < 200 // 6, counts
    assert abs(counts["fast1"] - counts["fast2"]) < 40, counts
    assert set(outstanding_after.values()) == {0.0}


async def test_an_engine_added_at_runtime_gets_traffic_and_a_removed_one_gets_none(fake_engine, serve):
    first, second = fake_engine("first"), fake_engine("second")
    async with asyncio.timeout(10), serve({"first": first}) as (router, client):
        await asyncio.gather(*(client.generate(payload(i)) for i in range(4)))
        router.add_engine("second", second)
        await asyncio.gather(*(client.generate(payload(i)) for i in range(4, 10)))
        assert len(second.calls) == 3
        router.remove_engine("first")
        await asyncio.gather(*(client.generate(payload(i)) for i in range(10, 15)))
        assert router.engines == ["second"]
    assert len(first.calls) == 4 + 3
    assert len(second.calls) == 3 + 5


async def test_removing_an_engine_lets_its_in_flight_request_finish(fake_engine, serve):
    slow = fake_engine("slow", delay_s=0.3)
    async with asyncio.timeout(10), serve({"slow": slow, "other": fake_engine("other")}) as (router, client):
        pending = asyncio.create_task(client.generate(payload(1)))
        while not slow.calls:
            await asyncio.sleep(0.01)
        router.remove_engine("slow")
        assert (await pending)["meta_info"]["engine"] == "slow"
        assert (await client.generate(payload(2)))["meta_info"]["engine"] == "other"


async def test_adding_a_duplicate_or_removing_an_unknown_engine_is_refused_by_name(fake_engine, serve):
    async with asyncio.timeout(10), serve({"a": fake_engine("a")}) as (router, _):
        with pytest.raises(ValueError, match="'a' is already registered"):
            router.add_engine("a", fake_engine("a"))
        with pytest.raises(KeyError, match="'zzz'"):
            router.remove_engine("zzz")
        with pytest.raises(TypeError, match="'bad'"):
            router.add_engine("bad", object())


async def test_abort_is_forwarded_to_every_engine_for_one_rid_and_for_all(fake_engine, serve):
    engines = {name: fake_engine(name) for name in ("a", "b", "c")}
    async with asyncio.timeout(10), serve(engines) as (_, client):
        await client.abort("r-42")
        await client.abort(("r-1", "r-2"))
        await client.abort()
    assert {name: e.aborts for name, e in engines.items()} == {name: ["r-42", "r-1", "r-2", None] for name in engines}


async def test_health_reports_each_engine_and_is_healthy_needs_one_healthy_engine(fake_engine, serve):
    engines = {"up": fake_engine("up"), "down": fake_engine("down", healthy=False)}
    async with asyncio.timeout(10), serve(engines) as (router, client):
        assert await client.health() == {"up": True, "down": False}
        assert await client.is_healthy()
        router.remove_engine("up")
        assert not await client.is_healthy()


def test_round_robin_policy_takes_engines_in_turn():
    policy = RoundRobinPolicy()
    assert [policy.choose({"a": 9, "b": 0, "c": 3}) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_outstanding_policy_picks_the_least_loaded_and_breaks_ties_in_turn():
    policy = LeastOutstandingPolicy()
    assert policy.choose({"a": 2, "b": 1, "c": 5}) == "b"
    tied = [policy.choose({"a": 0, "b": 0, "c": 0}) for _ in range(3)]
    assert sorted(tied) == ["a", "b", "c"]


def test_an_unknown_policy_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="'fastest'.*least_outstanding.*round_robin"):
        make_policy("fastest")
