"""Isolated grading in memory-limited worker processes, and the hub's cap on abandoned grader threads."""

from __future__ import annotations

import asyncio
import resource
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rl_rewards import (
    IsolatedGrader,
    RewardHub,
    WorkerCrashedError,
    WorkerTimeoutError,
    build_reward,
    default_registry,
)

HOSTILE_GRADER = textwrap.dedent(
    """
    import os, time

    def grade(*, prompt, response, label, metadata):
        if label == "hog":
            blocks = []
            while True:
                blocks.append(bytearray(64 * 1024 * 1024))
        if label == "hang":
            time.sleep(60)
        if label == "crash":
            os._exit(3)
        if label == "print":
            print("noise on stdout")
        return {"score": float(len(response)), "pid": float(os.getpid())}
    """
)


@pytest.fixture(scope="module")
def hostile_pool(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("isolated") / "hostile_grader.py"
    path.write_text(HOSTILE_GRADER)
    pool = IsolatedGrader(f"{path}:grade", workers=1, memory_mb=300, timeout_s=2.0)
    yield pool
    pool.close()


def _call(grader, response: str = "abc", label="ok"):
    return grader(prompt="", response=response, label=label, metadata={})


def test_rewards_isolated_grader_returns_the_workers_value(hostile_pool: IsolatedGrader) -> None:
    assert _call(hostile_pool, "abcd")["score"] == 4.0


def test_rewards_isolated_memory_hog_fails_in_the_worker_not_the_trainer(hostile_pool: IsolatedGrader) -> None:
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(RuntimeError, match="MemoryError"):
        _call(hostile_pool, label="hog")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100 * 1024  # KiB
    assert _call(hostile_pool, "xy")["score"] == 2.0


def test_rewards_isolated_timeout_kills_the_worker_and_replaces_it(hostile_pool: IsolatedGrader) -> None:
    pid_before = _call(hostile_pool)["pid"]
    restarts_before = hostile_pool.restarts
    started = time.monotonic()
    with pytest.raises(WorkerTimeoutError, match="killed and replaced"):
        _call(hostile_pool, label="hang")
    assert time.monotonic() - started < 4.0
    assert hostile_pool.restarts == restarts_before + 1
    after = _call(hostile_pool)
    assert after["score"] == 3.0 and after["pid"] != pid_before


def test_rewards_isolated_crashed_worker_is_reported_and_replaced(hostile_pool: IsolatedGrader) -> None:
    with pytest.raises(WorkerCrashedError, match="status 3"):
        _call(hostile_pool, label="crash")
    assert _call(hostile_pool)["score"] == 3.0


def test_rewards_isolated_grader_prints_do_not_corrupt_replies(hostile_pool: IsolatedGrader) -> None:
    assert _call(hostile_pool, "12345", label="print")["score"] == 5.0


def test_rewards_isolated_grader_refuses_a_sample_that_is_not_json(hostile_pool: IsolatedGrader) -> None:
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        _call(hostile_pool, label=object())


def test_rewards_isolated_math_through_build_reward_grades_and_counts_timeouts(tmp_path: Path) -> None:
    hub = build_reward("math", None, grader_options={"isolate": True, "workers": 1, "timeout_s": 5.0}, timeout_s=60.0)
    try:
        items = [
            {"prompt": "", "response": r"\boxed{\frac{1}{2}}", "label": "0.5", "metadata": {}},
            {"prompt": "", "response": r"\boxed{2\sqrt{2}}", "label": r"\sqrt{8}", "metadata": {}},
            {"prompt": "", "response": r"\boxed{3}", "label": "4", "metadata": {}},
            {"prompt": "", "response": r"\boxed{9^{99999999}}", "label": "7", "metadata": {}},
        ]
        assert hub.score_batch_sync(items) == [1.0, 1.0, 0.0, 0.0]
        assert hub.stats == {"scored": 4, "errors": 0, "timeouts": 0}
    finally:
        hub.grader.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workers": 2}, "need isolate=True"),
        ({"isolate": True, "shiny": 1}, "takes no options"),
        ({"isolate": True, "workers": 0}, "workers must be at least 1"),
    ],
)
def test_rewards_isolation_options_are_checked(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        default_registry.create("math", **options)


def test_rewards_custom_reward_can_be_isolated_and_its_spec_is_checked_first(tmp_path: Path) -> None:
    path = tmp_path / "hostile_grader.py"
    path.write_text(HOSTILE_GRADER)
    with pytest.raises(AttributeError, match="missing"):
        build_reward(None, f"{path}:missing", grader_options={"isolate": True})
    with pytest.raises(ValueError, match="isolate"):
        build_reward(None, f"{path}:grade", grader_options={"workers": 2})
    hub = build_reward(None, f"{path}:grade", grader_options={"isolate": True, "workers": 1}, reward_key="score")
    assert isinstance(hub.grader, IsolatedGrader)
    hub.grader.close()


async def test_rewards_hub_caps_abandoned_threads_and_recovers_when_they_finish() -> None:
    release = threading.Event()

    def grader(*, prompt, response, label, metadata) -> float:
        if response == "block":
            release.wait(timeout=10)
        return 1.0

    hub = RewardHub(grader, concurrency=1, timeout_s=0.1, max_abandoned_threads=2)
    items = [{"prompt": "", "response": "block", "label": None, "metadata": {}} for _ in range(4)]
    started = time.monotonic()
    assert await hub.score_batch(items) == [0.0] * 4
    assert time.monotonic() - started < 1.0  # the last two were refused without waiting out a timeout
    assert hub.stats == {"scored": 0, "errors": 2, "timeouts": 2}
    assert hub.abandoned_threads == 2
    assert "max_abandoned_threads=2" in hub.last_errors[2]
    release.set()
    for _ in range(100):
        if hub.abandoned_threads == 0:
            break
        await asyncio.sleep(0.02)
    assert hub.abandoned_threads == 0
    assert await hub.score_batch([{"prompt": "", "response": "ok", "label": None, "metadata": {}}]) == [1.0]


async def test_rewards_hub_keeps_dict_components_of_the_latest_batch() -> None:
    hub = RewardHub(lambda *, label, **_: {"score": label, "format": 1.0} if label else 0.5, reward_key="score")
    items = [{"prompt": "", "response": "", "label": label, "metadata": {}} for label in (2.0, 0)]
    assert await hub.score_batch(items) == [2.0, 0.5]
    assert hub.last_components == [{"score": 2.0, "format": 1.0}, None]
