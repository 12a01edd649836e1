"""RewardHub: concurrency limit, counted errors and timeouts, dict rewards, async graders."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from rl_rewards import RewardHub, RewardInput


def _items(count: int, response: str = "r") -> list[RewardInput]:
    return [{"prompt": f"p{i}", "response": response, "label": i, "metadata": {"i": i}} for i in range(count)]


class _ConcurrencyProbe:
    """Sync grader that records how many calls overlap."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0

    def __call__(self, *, prompt, response, label, metadata) -> float:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.02)
        with self.lock:
            self.active -= 1
        return float(label)


async def test_rewards_hub_never_runs_more_graders_at_once_than_its_concurrency() -> None:
    probe = _ConcurrencyProbe()
    hub = RewardHub(probe, concurrency=3)
    rewards = await hub.score_batch(_items(20))
    assert rewards == [float(i) for i in range(20)]
    assert probe.peak == 3
    assert hub.stats == {"scored": 20, "errors": 0, "timeouts": 0}


async def test_rewards_hub_runs_sync_graders_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    seen_threads: list[int] = []

    def grader(*, prompt, response, label, metadata) -> float:
        seen_threads.append(threading.get_ident())
        return 1.0

    await RewardHub(grader).score_batch(_items(4))
    assert seen_threads and loop_thread not in seen_threads


async def test_rewards_hub_gives_error_reward_for_a_raising_grader_and_counts_it() -> None:
    def grader(*, prompt, response, label, metadata) -> float:
        if label == 2:
            raise ZeroDivisionError("bad sample")
        return 1.0

    hub = RewardHub(grader, error_reward=-1.0)
    assert await hub.score_batch(_items(4)) == [1.0, 1.0, -1.0, 1.0]
    assert hub.stats == {"scored": 3, "errors": 1, "timeouts": 0}
    assert hub.last_errors == ["item 2: ZeroDivisionError: bad sample"]


async def test_rewards_hub_times_out_a_sleeping_grader_and_counts_it() -> None:
    def grader(*, prompt, response, label, metadata) -> float:
        if label == 1:
            time.sleep(5)
        return 1.0

    hub = RewardHub(grader, timeout_s=0.2)
    started = time.monotonic()
    rewards = await hub.score_batch(_items(3))
    assert time.monotonic() - started < 2.0
    assert rewards == [1.0, 0.0, 1.0]
    assert hub.stats == {"scored": 2, "errors": 0, "timeouts": 1}
    assert hub.last_errors[0].startswith("item 1: timed out")


async def test_rewards_hub_times_out_an_async_grader() -> None:
    async def grader(*, prompt, response, label, metadata) -> float:
        await asyncio.sleep(5 if label == 0 else 0)
        return 0.5

    hub = RewardHub(grader, timeout_s=0.1, error_reward=-2.0)
    assert await hub.score_batch(_items(2)) == [-2.0, 0.5]
    assert hub.stats["timeouts"] == 1


async def test_rewards_hub_awaits_async_graders_concurrently() -> None:
    async def grader(*, prompt, response, label, metadata) -> float:
        await asyncio.sleep(0.1)
        return label * 2.0

    hub = RewardHub(grader, concurrency=50)
    started = time.monotonic()
    assert await hub.score_batch(_items(50)) == [i * 2.0 for i in range(50)]
    assert time.monotonic() - started < 1.0


async def test_rewards_hub_awaits_an_awaitable_returned_by_a_sync_callable() -> None:
    async def inner(label) -> float:
        return float(label) + 0.5

    def grader(*, prompt, response, label, metadata):
        return inner(label)

    assert await RewardHub(grader).score_batch(_items(2)) == [0.5, 1.5]


async def test_rewards_hub_accepts_an_object_with_async_call() -> None:
    class Grader:
        async def __call__(self, *, prompt, response, label, metadata) -> float:
            return metadata["i"] + 1.0

    assert await RewardHub(Grader()).score_batch(_items(3)) == [1.0, 2.0, 3.0]


async def test_rewards_hub_picks_the_reward_key_from_dict_rewards() -> None:
    def grader(*, prompt, response, label, metadata) -> dict[str, float]:
        return {"accuracy": float(label), "format": 0.25}

    hub = RewardHub(grader, reward_key="format")
    assert await hub.score_batch(_items(2)) == [0.25, 0.25]
    assert hub.stats["errors"] == 0


async def test_rewards_hub_names_the_missing_reward_key_and_the_available_ones() -> None:
    def grader(*, prompt, response, label, metadata) -> dict[str, float]:
        return {"accuracy": 1.0, "format": 0.0}

    hub = RewardHub(grader, reward_key="score")
    assert await hub.score_batch(_items(1)) == [0.0]
    assert hub.stats["errors"] == 1
    assert "'score'" in hub.last_errors[0] and "accuracy" in hub.last_errors[0] and "format" in hub.last_errors[0]


async def test_rewards_hub_counts_a_dict_reward_without_a_reward_key_as_an_error() -> None:
    hub = RewardHub(lambda **_: {"accuracy": 1.0})
    assert await hub.score_batch(_items(1)) == [0.0]
    assert "reward_key" in hub.last_errors[0]


@pytest.mark.parametrize("bad_value", [None, "1.0", float("nan"), float("inf")])
async def test_rewards_hub_counts_a_non_numeric_or_non_finite_reward_as_an_error(bad_value) -> None:
    hub = RewardHub(lambda **_: bad_value, error_reward=-1.0)
    assert await hub.score_batch(_items(1)) == [-1.0]
    assert hub.stats["errors"] == 1


async def test_rewards_hub_converts_bools_and_ints_to_float() -> None:
    hub = RewardHub(lambda *, label, **_: [True, 3][label])
    rewards = await hub.score_batch(_items(2))
    assert rewards == [1.0, 3.0] and all(type(reward) is float for reward in rewards)


async def test_rewards_hub_keeps_stats_across_batches_and_resets_last_errors() -> None:
    def grader(*, prompt, response, label, metadata) -> float:
        if response == "boom":
            raise RuntimeError("boom")
        return 1.0

    hub = RewardHub(grader)
    await hub.score_batch(_items(2, response="boom"))
    await hub.score_batch(_items(3))
    assert hub.stats == {"scored": 3, "errors": 2, "timeouts": 0}
    assert hub.last_errors == []


def test_rewards_hub_score_batch_sync_works_without_a_loop() -> None:
    hub = RewardHub(lambda *, label, **_: label / 10)
    assert hub.score_batch_sync(_items(3)) == [0.0, 0.1, 0.2]


async def test_rewards_hub_score_batch_sync_refuses_to_run_inside_a_loop() -> None:
    with pytest.raises(RuntimeError, match="await score_batch"):
        RewardHub(lambda **_: 1.0).score_batch_sync(_items(1))


async def test_rewards_hub_scores_an_empty_batch_as_empty() -> None:
    assert await RewardHub(lambda **_: 1.0).score_batch([]) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"concurrency": 0}, "concurrency"), ({"timeout_s": 0}, "timeout_s")],
)
def test_rewards_hub_rejects_bad_settings(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        RewardHub(lambda **_: 1.0, **kwargs)


def test_rewards_hub_with_another_reward_key_shares_the_grader_and_settings() -> None:
    calls = []

    def components(*, prompt, response, label, metadata):
        calls.append(label)
        return {"score": -1.0 + label, "acc": float(label % 2)}

    train_hub = RewardHub(components, reward_key="score", timeout_s=3.0, concurrency=2, error_reward=-5.0)
    eval_hub = train_hub.with_reward_key("acc")
    assert train_hub.score_batch_sync(_items(3)) == [-1.0, 0.0, 1.0]
    assert eval_hub.score_batch_sync(_items(3)) == [0.0, 1.0, 0.0]
    assert eval_hub.grader is components and len(calls) == 6
    assert (eval_hub.timeout_s, eval_hub.concurrency, eval_hub.error_reward) == (3.0, 2, -5.0)
    assert train_hub.with_reward_key("score") is train_hub


def test_rewards_registry_says_which_graders_take_an_option() -> None:
    from rl_rewards import default_registry

    assert {name for name in default_registry.names() if default_registry.takes_option(name, "isolate")} == {
        "math", "dapo", "deepscaler",
    }
    assert default_registry.takes_option("remote", "url") and not default_registry.takes_option("nope", "url")
