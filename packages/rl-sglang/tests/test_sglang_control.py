"""Control routes of the embedded engine: abort, pause/continue, health, info, release/resume."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from rl_sglang.errors import EngineError

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


@pytest.mark.parametrize("tags", [None, ["kv_cache"], ["weights"], ["cuda_graph"]])
async def test_generation_after_release_and_resume_is_unchanged(client, engine, tags):
    payload = {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}, "return_logprob": True}
    before = await asyncio.wait_for(client.generate(payload), 30)
    await asyncio.wait_for(client.release_memory_occupation(tags), 30)
    expected_released = sorted(t for t in (tags or ["weights", "kv_cache"]) if t != "cuda_graph")
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


async def test_a_kv_cache_release_frees_the_pool_without_the_garbage_collector(client, engine):
    # The engine's own process freezes its start-up objects out of the collector (`__main__.serve`): what a release
    # drops must go by reference counting alone, or its memory would stay held until the process ends.
    await asyncio.wait_for(client.generate({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4}}), 30)
    pool, cache = weakref.ref(engine.runner.pool), weakref.ref(engine.runner.prefix_cache)
    gc.disable()
    try:
        await asyncio.wait_for(client.release_memory_occupation(["kv_cache"]), 30)
        assert pool() is None and cache() is None
    finally:
        gc.enable()
        await asyncio.wait_for(client.resume_memory_occupation(["kv_cache"]), 30)


async def test_releasing_memory_or_flushing_while_requests_run_is_refused_with_400_and_they_finish(client, engine):
    task = asyncio.create_task(client.generate({"input_ids": PROMPT, "sampling_params": {**LONG, "max_new_tokens": 60}, "rid": "kv"}))
    await asyncio.wait_for(_wait_until_generating(engine, "kv"), 30)
    for call in (client.release_memory_occupation(["kv_cache"]), client.flush_cache()):
        with pytest.raises(EngineError) as caught:
            await asyncio.wait_for(call, 30)
        assert caught.value.status == 400
    assert engine.runner.released_tags == set()
    answer = await asyncio.wait_for(task, 60)
    assert answer["meta_info"]["finish_reason"]["type"] == "length"  # untouched by the refused calls
    await asyncio.wait_for(client.flush_cache(), 10)  # idle now: accepted


async def test_abort_matches_request_ids_by_prefix_as_sglang_does(client, engine):
    rids = ["s-1", "s-10", "s-2"]
    tasks = {rid: asyncio.create_task(client.generate({"input_ids": PROMPT, "sampling_params": LONG, "rid": rid})) for rid in rids}
    for rid in rids:
        await asyncio.wait_for(_wait_until_generating(engine, rid), 30)
    await asyncio.wait_for(client.abort("s-"), 10)  # not a request id in flight: SGLang ignores it
    await asyncio.sleep(0.1)
    assert not any(task.done() for task in tasks.values())
    await asyncio.wait_for(client.abort("s-1"), 10)  # in flight: aborts s-1 and s-10, which it prefixes
    done = {rid: await asyncio.wait_for(tasks[rid], 30) for rid in ("s-1", "s-10")}
    assert {rid: a["meta_info"]["finish_reason"]["type"] for rid, a in done.items()} == {"s-1": "abort", "s-10": "abort"}
    assert not tasks["s-2"].done()
    await asyncio.wait_for(client.abort("s-2"), 10)
    assert (await asyncio.wait_for(tasks["s-2"], 30))["meta_info"]["finish_reason"]["type"] == "abort"


async def test_health_answers_503_while_paused_but_the_client_still_sees_a_live_engine(client, engine):
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async def status(route: str) -> int:
            async with session.get(engine.url + route) as response:
                return response.status

        assert [await status(r) for r in ("/health", "/health_generate", "/ping", "/ready")] == [200, 200, 200, 200]
        await asyncio.wait_for(client.pause_generation(mode="in_place"), 10)
        assert [await status(r) for r in ("/health", "/health_generate", "/ping", "/ready")] == [503, 503, 200, 503]
        assert await asyncio.wait_for(client.is_healthy(), 10)  # held on purpose, as SGLang's /ping says
        await asyncio.wait_for(client.continue_generation(), 10)
        assert await status("/health_generate") == 200


async def test_rl_routers_health_checks_keep_a_paused_engine_in_rotation_and_its_requests_complete(client, engine):
    """The router's pool with this client as adapter: a deliberate pause (as around a weight update)
    answers 503 on /health_generate, yet the engine stays in rotation and a request sent meanwhile
    finishes after continue_generation; a stopped engine is taken out."""
    engine_pool = pytest.importorskip("rl_router.engine_pool")
    policies = pytest.importorskip("rl_router.policies")
    from rl_sglang.client import SGLangClient

    pool = engine_pool.EnginePool(policies.make_policy("round_robin"), engine_timeout_s=None, health_timeout_s=10)
    adapter = SGLangClient(engine.url, health_timeout_s=5)
    pool.add("e0", adapter)
    try:
        await asyncio.wait_for(client.pause_generation(mode="in_place"), 10)
        assert await asyncio.wait_for(pool.check_health(), 20) == {"e0": True}

        async def routed():
            return await pool.attempt(pool.route(), {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3}, "rid": "held"})

        request = asyncio.create_task(routed())
        await asyncio.sleep(0.2)
        assert await asyncio.wait_for(pool.check_health(), 20) == {"e0": True} and not request.done()
        await asyncio.wait_for(client.continue_generation(), 10)
        answer = await asyncio.wait_for(request, 30)
        assert answer["meta_info"]["completion_tokens"] == 3 and pool.ejections == 0
        await asyncio.wait_for(engine.stop(), 30)
        assert await asyncio.wait_for(pool.check_health(), 20) == {"e0": False} and pool.out_of_rotation == ["e0"]
    finally:
        await adapter.close()
