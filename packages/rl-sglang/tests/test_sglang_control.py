"""Control routes of the embedded engine: abort, pause/continue, health, info, release/resume."""

from __future__ import annotations

import asyncio

import pytest

LONG = {"temperature": 0, "max_new_tokens": 480, "ignore_eos": True}
PROMPT = [5, 9, 14, 3]


async def _wait_until_generating(engine, rid: str) -> None:
    """Bounded poll until `rid` has produced a few tokens (so an abort has partial output to return)."""
    for _ in range(2000):
        request = engine.scheduler._by_rid.get(rid)
        if request is not None and len(request.output_ids) >= 3:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{rid} never started generating")


async def test_abort_returns_the_partial_output_with_finish_reason_abort(client, engine):
    full = await asyncio.wait_for(client.generate({"input_ids": PROMPT, "sampling_params": {**LONG, "max_new_tokens": 40}}), 60)
    task = asyncio.create_task(client.generate({"input_ids": PROMPT, "sampling_params": LONG, "rid": "long-1", "return_logprob": True}))
    await asyncio.wait_for(_wait_until_generating(engine, "long-1"), 30)
    await asyncio.wait_for(client.abort("long-1"), 10)
    answer = await asyncio.wait_for(task, 30)
    meta = answer["meta_info"]
    assert meta["finish_reason"]["type"] == "abort"
    partial = answer["output_ids"]
    assert 3 <= len(partial) < LONG["max_new_tokens"]
    assert meta["completion_tokens"] == len(partial) == len(meta["output_token_logprobs"])
    assert partial[:40] == full["output_ids"][: len(partial[:40])]  # a prefix of the same greedy run


async def test_abort_all_stops_running_and_waiting_requests(client, engine):
    tasks = [
        asyncio.create_task(client.generate({"input_ids": PROMPT, "sampling_params": LONG, "rid": f"r{i}"})) for i in range(3)
    ]
    await asyncio.wait_for(_wait_until_generating(engine, "r0"), 30)
    await asyncio.wait_for(client.abort(None), 10)
    answers = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert [a["meta_info"]["finish_reason"]["type"] for a in answers] == ["abort"] * 3
    # the engine still serves afterwards
    after = await asyncio.wait_for(client.generate({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}}), 30)
    assert after["meta_info"]["completion_tokens"] == 2


async def test_pause_in_place_holds_requests_until_continue_generation(client):
    await asyncio.wait_for(client.pause_generation(mode="in_place"), 10)
    task = asyncio.create_task(client.generate({"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 4}}))
    await asyncio.sleep(0.3)
    assert not task.done()
    assert await asyncio.wait_for(client.is_healthy(), 10)  # held on purpose is not unhealthy
    await asyncio.wait_for(client.continue_generation(), 10)
    answer = await asyncio.wait_for(task, 30)
    assert answer["meta_info"]["finish_reason"]["type"] in ("length", "stop")


async def test_pause_in_default_abort_mode_aborts_what_is_running(client, engine):
    task = asyncio.create_task(client.generate({"input_ids": PROMPT, "sampling_params": LONG, "rid": "p1"}))
    await asyncio.wait_for(_wait_until_generating(engine, "p1"), 30)
    await asyncio.wait_for(client.pause_generation(), 10)
    answer = await asyncio.wait_for(task, 30)
    assert answer["meta_info"]["finish_reason"]["type"] == "abort"
    await asyncio.wait_for(client.continue_generation(), 10)


async def test_health_info_and_flush_routes_answer(client, engine, model_dir):
    assert await asyncio.wait_for(client.is_healthy(), 30)
    info = await asyncio.wait_for(client.get_model_info(), 10)
    assert info["model_path"] == str(model_dir)
    assert info["weight_version"] == "default"
    server = await asyncio.wait_for(client.get_server_info(), 10)
    assert server["max_running_requests"] == 8 and server["device"] == "cpu"
    await asyncio.wait_for(client.flush_cache(), 10)


async def test_a_stopped_engine_is_reported_unhealthy(model_dir):
    from rl_sglang.client import SGLangClient
    from rl_sglang.embedded import EmbeddedEngine

    engine = EmbeddedEngine(str(model_dir), device="cpu", dtype="float32")
    url = await asyncio.wait_for(engine.start(), 60)
    await asyncio.wait_for(engine.stop(), 60)
    client = SGLangClient(url, health_timeout_s=5)
    try:
        assert await asyncio.wait_for(client.is_healthy(), 10) is False
    finally:
        await client.close()


@pytest.mark.parametrize("tags", [None, ["kv_cache"], ["weights"]])
async def test_generation_after_release_and_resume_is_unchanged(client, engine, tags):
    payload = {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}, "return_logprob": True}
    before = await asyncio.wait_for(client.generate(payload), 30)
    await asyncio.wait_for(client.release_memory_occupation(tags), 30)
    expected_released = sorted(tags or ["weights", "kv_cache"])
    assert sorted(engine.runner.released_tags) == expected_released
    waiting = asyncio.create_task(client.generate(payload))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # held while released
    await asyncio.wait_for(client.resume_memory_occupation(tags), 30)
    assert engine.runner.released_tags == set()
    after = await asyncio.wait_for(waiting, 30)
    assert after["output_ids"] == before["output_ids"]
    assert [e[0] for e in after["meta_info"]["output_token_logprobs"]] == pytest.approx(
        [e[0] for e in before["meta_info"]["output_token_logprobs"]], abs=1e-5
    )


async def test_releasing_the_kv_cache_aborts_the_running_batch(client, engine):
    task = asyncio.create_task(client.generate({"input_ids": PROMPT, "sampling_params": LONG, "rid": "kv"}))
    await asyncio.wait_for(_wait_until_generating(engine, "kv"), 30)
    await asyncio.wait_for(client.release_memory_occupation(["kv_cache"]), 30)
    answer = await asyncio.wait_for(task, 30)
    assert answer["meta_info"]["finish_reason"]["type"] == "abort"
    assert engine.scheduler.running_count == 0 and engine.runner.pool is None  # the KV pool is gone
    await asyncio.wait_for(client.resume_memory_occupation(["kv_cache"]), 30)
    assert engine.runner.pool.allocator.available == engine.runner.pool.tokens  # a fresh, empty pool
