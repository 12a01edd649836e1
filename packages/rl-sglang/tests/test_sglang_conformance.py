"""Every call the project makes to an engine, and the launcher's argv, checked against SGLang's API as
read from its pinned wheel (`sglang_api.json`, written by `tools/sglang_fixture.py`; no SGLang here).

The calls are recorded where they arrive, at an embedded engine, so the same run also holds the
embedded engine to the fixture (its routes exist in SGLang with the same methods). The
`sglang`-marked test at the end drives a real SGLang server the same way (see the README).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web

from rl_sglang import client as client_module
from rl_sglang import conformance
from rl_sglang.api_fixture import sglang_api
from rl_sglang.client import SGLangClient
from rl_sglang.embedded import EmbeddedEngine
from rl_sglang.errors import EngineError
from rl_sglang.launcher import (
    build_embedded_argv,
    build_sglang_argv,
    launch_engine,
    sglang_available,
)
from rl_sglang.tensor_handoff import flattened_bucket, serialize_entry
from rl_sglang.version import SGLANG_VERSION_CODED_AGAINST
from rl_sglang.weight_sync import (
    BroadcastWeightTransport,
    DiskWeightTransport,
    TensorWeightTransport,
)
from rl_sglang.weight_sync.adapter import write_adapter_folder

PROMPT = [5, 9, 14, 3]
SAMPLING = {"temperature": 1.0, "top_p": 0.9, "top_k": 5, "max_new_tokens": 4, "stop_token_ids": [1]}


class RecordingEngine(EmbeddedEngine):
    """An embedded engine that records (method, path, JSON body, status) of every request."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, str, Any, int]] = []

    def _build_app(self) -> web.Application:
        app = super()._build_app()

        @web.middleware
        async def record(request: web.Request, handler):
            body = None
            if request.body_exists:
                text = await request.text()  # cached: the handler reads it again
                body = json.loads(text) if text else None
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # an unknown route (404) is raised, not returned
                self.calls.append((request.method, request.path, body, exc.status))
                raise
            self.calls.append((request.method, request.path, body, response.status))
            return response

        app.middlewares.insert(0, record)
        return app


@pytest.fixture
async def recording(model_dir):
    engine = RecordingEngine(str(model_dir), device="cpu", dtype="float32", max_running_requests=8)
    await asyncio.wait_for(engine.start(), 60)
    try:
        yield engine
    finally:
        await asyncio.wait_for(engine.stop(), 60)


def _loop_payload() -> dict[str, Any]:
    """The loop's /generate payload, as rl-core's default generator builds the request."""
    from rl_core.config import SamplingConfig
    from rl_core.generation import GenerateRequest
    from rl_core.rollout import request_id
    from rl_core.sample import Sample
    from rl_sglang.generation import sglang_payload

    params = SamplingConfig(rollout_max_response_len=4, rollout_stop_token_ids=[1]).sampling_params()
    return sglang_payload(GenerateRequest(input_ids=PROMPT, sampling_params=params, request_id=request_id(Sample(index=1))))


async def _expect_refused(call: Any) -> EngineError:
    with pytest.raises(EngineError) as caught:
        await asyncio.wait_for(call, 30)
    return caught.value


async def drive_every_call(url: str, model_factory: Any, tmp_path: Path, *, lora_available: bool) -> None:
    """Each route the loop, the transports and the launcher's health wait use, once at least."""
    client = SGLangClient(url, timeout_s=60, health_timeout_s=10)
    try:
        answer = await asyncio.wait_for(client.generate(_loop_payload()), 60)
        await asyncio.wait_for(client.abort(answer["meta_info"]["id"]), 10)
        await asyncio.wait_for(client.abort(None), 10)
        assert await asyncio.wait_for(client.is_healthy(), 30)
        await asyncio.wait_for(client.flush_cache(), 10)
        await asyncio.wait_for(client.get_model_info(), 10)
        await asyncio.wait_for(client.get_server_info(), 10)
        await asyncio.wait_for(client.pause_generation(mode="in_place"), 10)
        assert await asyncio.wait_for(client.is_healthy(), 30)  # paused on purpose: /health_generate 503, /ping 200
        await asyncio.wait_for(client.continue_generation(), 10)
        await asyncio.wait_for(client.pause_generation(), 10)
        await asyncio.wait_for(client.release_memory_occupation(["kv_cache", "weights", "cuda_graph"]), 30)
        await asyncio.wait_for(client.resume_memory_occupation(["kv_cache", "weights", "cuda_graph"]), 30)
        await asyncio.wait_for(client.release_memory_occupation(), 30)
        await asyncio.wait_for(client.resume_memory_occupation(), 30)
        await asyncio.wait_for(client.continue_generation(), 10)
        lora = {**_loop_payload(), "lora_path": "adapter-a"}
        await asyncio.wait_for(client.update_weight_version("v0"), 10)
        if lora_available:
            config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
            tensors = [("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(2, 32)),
                       ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", torch.zeros(32, 2))]
            write_adapter_folder(tmp_path / "adapter", config, tensors)
            await asyncio.wait_for(client.load_lora_adapter("adapter-a", str(tmp_path / "adapter"), pinned=False), 60)
            await asyncio.wait_for(client.generate(lora), 60)
            await asyncio.wait_for(client.unload_lora_adapter("adapter-a"), 30)
            await asyncio.wait_for(client.load_lora_adapter_from_tensors(
                "adapter-a", config, [serialize_entry(flattened_bucket(tensors))], load_format="flattened_bucket"), 60)
            await asyncio.wait_for(client.unload_lora_adapter("adapter-a"), 30)
        else:
            assert (await _expect_refused(client.generate(lora))).status == 400
            for call in (
                client.load_lora_adapter("adapter-a", str(tmp_path / "adapter")),
                client.unload_lora_adapter("adapter-a"),
                client.load_lora_adapter_from_tensors(
                    "adapter-a", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]},
                    [serialize_entry(flattened_bucket([("q_proj.lora_A.weight", torch.zeros(8, 32))]))],
                    load_format="flattened_bucket",
                ),
            ):
                assert (await _expect_refused(call)).status == 404
    finally:
        await client.close()
    for transport in (
        DiskWeightTransport([url], tmp_path / "disk", bucket_bytes=16 << 10),
        BroadcastWeightTransport([url], backend="gloo", bucket_bytes=16 << 10, timeout_s=60),
        BroadcastWeightTransport([url], backend="gloo", load_format="flattened_bucket", group_name="flat", timeout_s=60),
        TensorWeightTransport([url], bucket_bytes=16 << 10, load_format="flattened_bucket", timeout_s=60),
        TensorWeightTransport([url], load_format=None, timeout_s=60),
    ):
        try:
            await asyncio.wait_for(asyncio.to_thread(transport.update, model_factory(seed=1).named_parameters(), "v1"), 120)
        finally:
            await asyncio.wait_for(asyncio.to_thread(transport.close), 60)


def _problems(calls: list[tuple[str, str, Any, int]]) -> list[str]:
    """Each call against the fixture, with the weight-update session state each call sees."""
    problems, in_session = [], False
    for method, path, body, _ in calls:
        if path == "/end_weight_update" and not in_session:
            problems.append("end_weight_update outside a session")
        problems += conformance.call_problems(method, path, body, in_session=in_session)
        if path == "/begin_weight_update":
            in_session = True
        elif path == "/end_weight_update":
            in_session = False
    return problems


async def test_every_call_the_client_and_transports_make_conforms_to_the_pinned_sglang(recording, ref, tmp_path):
    await drive_every_call(recording.url, ref.make_model, tmp_path, lora_available=True)
    assert _problems(recording.calls) == []
    called = {path for _, path, _, _ in recording.calls}
    used_by_client = set(re.findall(r'"(/[a-z_]+)"', inspect.getsource(client_module)))
    assert used_by_client <= called, f"client routes this test does not exercise: {sorted(used_by_client - called)}"
    sessions = [path for _, path, _, _ in recording.calls if path in ("/begin_weight_update", "/end_weight_update")]
    assert sessions == ["/begin_weight_update", "/end_weight_update"] * 4  # one per session update


def test_the_checker_catches_what_sglang_would_refuse_or_silently_drop():
    assert conformance.call_problems("POST", "/generate", {"input_ids": [1], "sampling_params": {"max_tokens": 3}}) == [
        "POST /generate sampling_params: field 'max_tokens' is not in SGLang's SamplingParams"
    ]
    assert conformance.call_problems("POST", "/abort_request", {"request_id": "x"}) == [
        "POST /abort_request: field 'request_id' is not in SGLang's AbortReq"
    ]
    assert conformance.call_problems("POST", "/init_weights_update_group", {"master_address": "h", "master_port": "1"}) == [
        "POST /init_weights_update_group: required field 'rank_offset' missing",
        "POST /init_weights_update_group: required field 'world_size' missing",
        "POST /init_weights_update_group: field 'master_port'='1' does not fit int",
    ]
    assert conformance.call_problems("POST", "/update_weights_from_tensor", {"serialized_named_tensors": ["eA=="]}) == [
        "POST /update_weights_from_tensor: SGLang refuses it outside /begin_weight_update ... /end_weight_update"
    ]
    assert conformance.call_problems("GET", "/get_weights", None) == ["GET /get_weights: no such route in sglang==0.5.23"]
    assert conformance.value_fits("Optional[Union[List[List[int]], List[int]]]", [[1, 2], [3]])
    assert not conformance.value_fits("Optional[Union[List[List[int]], List[int]]]", [1, "2"])
    assert not conformance.value_fits("Literal['target', 'draft', 'all']", "both")


def test_the_embedded_engine_serves_only_sglang_routes_with_sglangs_methods(engine):
    routes = sglang_api()["routes"]
    served = {(r.method, r.resource.canonical) for r in engine._app_runner.app.router.routes() if r.method != "HEAD"}
    missing = sorted(f"{m} {p}" for m, p in served if p not in routes or m not in routes[p]["methods"])
    assert missing == []
    assert {"/begin_weight_update", "/end_weight_update", "/update_weights_from_tensor", "/ping"} <= {p for _, p in served}


def test_the_launchers_argv_uses_only_flags_the_pinned_parser_accepts():
    assert sglang_api()["sglang_version"] == SGLANG_VERSION_CODED_AGAINST
    argv = build_sglang_argv(
        "/models/qwen", "127.0.0.1", 30000,
        {"tp_size": 2, "mem_fraction_static": 0.7, "enable_memory_saver": True, "cuda_graph_bs_decode": [1, 2, 4],
         "random_seed": 1, "log_level": "warning", "disable_radix_cache": True},
    )  # fmt: skip
    assert conformance.argv_problems(argv) == []
    assert conformance.argv_problems(build_embedded_argv("/m", "127.0.0.1", 1, {"device": "cpu", "dtype": "float32", "seed": 2})[3:]) == []
    # and the argv check itself sees the 0.5.23 breakages
    assert conformance.argv_problems(["--cuda-graph-bs", "1", "2", "--seed", "3", "--enable-memory-saver", "yes", "--tp-size", "x"]) == [
        "--cuda-graph-bs: not a flag of sglang==0.5.23 launch_server",
        "--seed: not a flag of sglang==0.5.23 launch_server",
        "--enable-memory-saver: takes none value(s), got ['yes']",
        "--tp-size: 'x' is not int",
    ]


def test_tensor_payloads_use_only_globals_sglangs_safe_unpickler_admits():
    allowed = {tuple(pair) for pair in sglang_api()["tensor_payload_globals"]}
    tensors = [("a", torch.randn(3, 4)), ("b", torch.ones(2, dtype=torch.bfloat16)), ("c", torch.nn.Parameter(torch.zeros(2)).detach())]
    for payload in (flattened_bucket(tensors), tensors):
        data = base64.b64decode(serialize_entry(payload))
        assert _globals(data) <= allowed, _globals(data) - allowed


def _globals(data: bytes) -> set[tuple[str, str]]:
    """(module, name) of every global the pickle loads, seen by loading it (in this process)."""
    found: set[tuple[str, str]] = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            found.add((module, name))
            return super().find_class(module, name)

    Recording(io.BytesIO(data)).load()
    return found


@pytest.mark.sglang
@pytest.mark.skipif(not (sglang_available() and torch.cuda.is_available()), reason="needs SGLang and a CUDA GPU")
async def test_a_real_sglang_server_answers_every_call(model_dir, ref, tmp_path):
    """Where SGLang is installed: the same calls against `sglang.launch_server` on the tiny model."""
    process = launch_engine("sglang", str(model_dir), sglang_args={"mem_fraction_static": 0.3, "random_seed": 0,
                                                                   "enable_memory_saver": True, "log_level": "warning"})  # fmt: skip
    try:
        await asyncio.to_thread(process.wait_until_healthy, float(os.environ.get("SGLANG_START_TIMEOUT_S", 600)))
        await drive_every_call(process.url, ref.make_model, tmp_path, lora_available=False)
    finally:
        await asyncio.to_thread(process.terminate)


@pytest.mark.sglang
def test_the_fixtures_flags_are_those_of_sglangs_own_parser():
    """Where SGLang's server_args imports (the wheel with a few small packages is enough): the flags
    read with `ast` are the real parser's, with the same number of values each."""
    server_args = pytest.importorskip("sglang.srt.server_args")
    import argparse

    parser = argparse.ArgumentParser()
    server_args.ServerArgs.add_cli_args(parser)
    real = {
        flag: "none" if action.nargs == 0 else "list" if action.nargs in ("+", "*") else "one"
        for action in parser._actions
        for flag in action.option_strings
    }
    assert {flag: spec["takes"] for flag, spec in sglang_api()["flags"].items()} == real
