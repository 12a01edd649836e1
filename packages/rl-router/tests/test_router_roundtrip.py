import asyncio
import subprocess
import sys

import pytest

from rl_router import EngineAdapter, Router, RouterClient, RouterError


def payload(input_ids, rid=None):
    out = {"input_ids": input_ids, "sampling_params": {"temperature": 1.0, "max_new_tokens": 8}, "return_logprob": True}
    if rid is not None:
        out["rid"] = rid
    return out


async def test_a_generate_round_trip_returns_the_engines_sglang_response(fake_engine, serve):
    engine = fake_engine("e0")
    async with asyncio.timeout(10), serve({"e0": engine}) as (_, client):
        response = await client.generate(payload([1, 2, 3], rid="r-1"))
    assert response["output_ids"] == [3, 2, 1]
    assert response["meta_info"]["finish_reason"] == {"type": "stop"}
    assert response["meta_info"]["weight_version"] == "7"
    assert response["meta_info"]["output_token_logprobs"] == [[-0.5, 3, None], [-0.5, 2, None], [-0.5, 1, None]]
    assert engine.calls == [payload([1, 2, 3], rid="r-1")]


async def test_a_request_without_rid_gets_one_assigned_before_reaching_the_engine(fake_engine, serve):
    engine = fake_engine("e0")
    async with asyncio.timeout(10), serve({"e0": engine}) as (_, client):
        response = await client.generate(payload([5]))
    rid = engine.calls[0]["rid"]
    assert isinstance(rid, str) and rid
    assert response["meta_info"]["id"] == rid


async def test_an_engine_error_reaches_the_client_as_router_error_and_the_router_keeps_serving(fake_engine, serve):
    broken, healthy = fake_engine("broken", fail_with="CUDA out of memory"), fake_engine("ok")
    async with asyncio.timeout(10), serve({"broken": broken, "ok": healthy}) as (_, client):
        with pytest.raises(RouterError, match="CUDA out of memory"):
            await client.generate(payload([1]))  # round robin: the first request goes to "broken"
        assert (await client.generate(payload([4, 5])))["output_ids"] == [5, 4]


async def test_a_non_string_rid_is_answered_with_an_error_naming_the_field(fake_engine, serve):
    async with asyncio.timeout(10), serve({"e0": fake_engine("e0")}) as (_, client):
        with pytest.raises(RouterError, match="'rid'"):
            await client.generate({"input_ids": [1], "rid": 12})


async def test_generate_without_engines_fails_with_a_clear_error(serve):
    async with asyncio.timeout(10), serve({}) as (_, client):
        with pytest.raises(RouterError, match="no engines"):
            await client.generate(payload([1]))


async def test_the_router_binds_to_loopback_on_an_ephemeral_port_by_default(fake_engine):
    router = Router({"e0": fake_engine("e0")})
    async with asyncio.timeout(10), router:
        host_port = router.address.removeprefix("tcp://")
        host, port = host_port.rsplit(":", 1)
        assert router.address.startswith("tcp://")
        assert host == "127.0.0.1"
        assert int(port) > 0


async def test_binding_an_unusable_address_raises_an_error_naming_it(fake_engine):
    with pytest.raises(OSError, match="not-a-transport://x"):
        await asyncio.wait_for(Router({}, address="not-a-transport://x").start(), 5)


async def test_a_client_can_stand_in_for_an_engine_so_routers_chain(fake_engine, serve):
    inner_engine = fake_engine("inner")
    async with asyncio.timeout(10), serve({"inner": inner_engine}) as (_, inner_client):
        assert isinstance(inner_client, EngineAdapter)
        async with serve({"downstream": inner_client}) as (_, outer_client):
            response = await outer_client.generate(payload([7, 8]))
            await outer_client.abort("r-9")
            assert await inner_client.is_healthy()
    assert response["output_ids"] == [8, 7]
    assert inner_engine.aborts == ["r-9"]


async def test_closing_a_client_fails_its_waiting_requests_with_router_error(fake_engine, serve):
    async with asyncio.timeout(10), serve({"slow": fake_engine("slow", delay_s=5)}) as (_, client):
        waiting = asyncio.create_task(client.generate(payload([1])))
        await asyncio.sleep(0.2)
        client.close()
        with pytest.raises(RouterError, match="closed"):
            await waiting


def test_a_router_thread_serves_a_synchronous_driver(fake_engine):
    engine = fake_engine("e0")

    async def use(address):
        client = RouterClient(address)
        try:
            return await asyncio.wait_for(client.generate(payload([1, 2])), 10)
        finally:
            client.close()

    with Router({"e0": engine}).run_in_thread() as thread:
        assert thread.address.startswith("tcp://127.0.0.1:")
        assert asyncio.run(use(thread.address))["output_ids"] == [2, 1]
        thread.add_engine("e1", fake_engine("e1"))
        assert thread.metrics()["router/engines"] == 2.0
        thread.remove_engine("e0")
        assert thread.router.engines == ["e1"]


def test_one_client_keeps_working_across_successive_event_loops(fake_engine):
    with Router({"e0": fake_engine("e0")}).run_in_thread() as thread:
        client = RouterClient(thread.address)
        try:
            for n in range(3):  # a synchronous driver calling asyncio.run once per rollout
                assert asyncio.run(asyncio.wait_for(client.generate(payload([n, 9])), 10))["output_ids"] == [9, n]
        finally:
            client.close()


def test_importing_rl_router_does_not_import_torch():
    code = "import sys, rl_router; assert 'torch' not in sys.modules; assert 'rl_core' not in sys.modules"
    env = _env_with_src()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr


def _env_with_src():
    import os
    import pathlib

    import rl_router

    env = dict(os.environ)
    src = str(pathlib.Path(rl_router.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env
