import asyncio
import logging
import random
import sys
import types

import pytest

from rl_router import MetricsMiddleware, RequestLogMiddleware, RouterError, RouterRequest, load_middleware


def payload(i):
    return {"input_ids": [i], "sampling_params": {}, "return_logprob": False, "rid": f"r{i}"}


class Recorder:
    """Records enter/exit and the engine it saw; tags the request on the way in and the response on the way out."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    async def __call__(self, request, call_next):
        self.log.append(f"{self.name}:enter:{request.engine}")
        request.metadata.setdefault("path", []).append(self.name)
        response = await call_next(request)
        response.setdefault("tags", []).append(self.name)
        self.log.append(f"{self.name}:exit")
        return response


class AnswerCachedPrompts:
    """Answers `input_ids == [0]` itself without calling the engine."""

    async def __call__(self, request, call_next):
        if request.payload["input_ids"] == [0]:
            return {"text": "cached", "output_ids": [], "meta_info": {"finish_reason": {"type": "stop"}}}
        return await call_next(request)


class PinToEngine:
    def __init__(self, engine):
        self.engine = engine

    async def __call__(self, request, call_next):
        request.engine = self.engine
        request.payload = {**request.payload, "sampling_params": {"temperature": 0.0}}
        return await call_next(request)


async def test_middlewares_run_outermost_first_and_unwind_in_reverse(fake_engine, serve):
    log = []
    middleware = [Recorder("outer", log), Recorder("inner", log)]
    async with asyncio.timeout(10), serve({"e0": fake_engine("e0")}, middleware=middleware) as (_, client):
        response = await client.generate(payload(1))
    assert log == ["outer:enter:e0", "inner:enter:e0", "inner:exit", "outer:exit"]
    assert response["tags"] == ["inner", "outer"]


async def test_a_short_circuiting_middleware_answers_without_the_engine(fake_engine, serve):
    engine, log = fake_engine("e0"), []
    middleware = [Recorder("outer", log), AnswerCachedPrompts(), Recorder("inner", log)]
    async with asyncio.timeout(10), serve({"e0": engine}, middleware=middleware) as (router, client):
        cached = await client.generate(payload(0))
        fresh = await client.generate(payload(5))
        outstanding = router.metrics()["router/engine/e0/outstanding"]
    assert cached["text"] == "cached" and cached["tags"] == ["outer"]
    assert fresh["output_ids"] == [5] and fresh["tags"] == ["inner", "outer"]
    assert [c["input_ids"] for c in engine.calls] == [[5]]
    assert outstanding == 0.0


async def test_a_middleware_can_pin_the_engine_and_rewrite_the_payload(fake_engine, serve):
    a, b = fake_engine("a"), fake_engine("b")
    async with asyncio.timeout(10), serve({"a": a, "b": b}, middleware=[PinToEngine("b")]) as (_, client):
        await asyncio.gather(*(client.generate(payload(i)) for i in range(6)))
    assert (len(a.calls), len(b.calls)) == (0, 6)
    assert all(c["sampling_params"] == {"temperature": 0.0} for c in b.calls)


async def test_metrics_middleware_counts_requests_errors_and_engines_through_the_router(fake_engine, serve):
    engines = {"ok": fake_engine("ok"), "bad": fake_engine("bad", fail_with="boom")}
    metrics = MetricsMiddleware()
    async with asyncio.timeout(10), serve(engines, middleware=[metrics]) as (_, client):
        results = await asyncio.gather(*(client.generate(payload(i)) for i in range(10)), return_exceptions=True)
        remote = await client.metrics()
    assert sum(isinstance(r, RouterError) for r in results) == 5
    assert remote["router/requests"] == 10.0
    assert remote["router/errors"] == 5.0
    assert remote["router/in_flight"] == 0.0
    assert remote["router/engine/ok/requests"] == 5.0 and remote["router/engine/ok/errors"] == 0.0
    assert remote["router/engine/bad/requests"] == 5.0 and remote["router/engine/bad/errors"] == 5.0
    assert 0.0 < remote["router/latency_p50_s"] <= remote["router/latency_p99_s"] < 5.0
    assert remote["router/engines"] == 2.0
    assert all(isinstance(v, float) for v in metrics.snapshot().values())


async def test_metrics_middleware_percentiles_match_nearest_rank_over_known_latencies():
    now = [0.0]
    metrics = MetricsMiddleware(clock=lambda: now[0])
    latencies_ms = list(range(1, 201))
    random.Random(0).shuffle(latencies_ms)
    for ms in latencies_ms:

        async def engine(request, ms=ms):
            now[0] += ms / 1000
            return {}

        await metrics(RouterRequest(rid="r", payload={}, engine="e"), engine)
    snap = metrics.snapshot()
    # nearest rank over 1..200 ms: the 100th and the 198th smallest values
    assert snap["router/latency_p50_s"] == pytest.approx(0.100)
    assert snap["router/latency_p99_s"] == pytest.approx(0.198)
    assert snap["router/engine/e/requests"] == 200.0


async def test_metrics_middleware_reports_in_flight_per_engine_while_requests_wait():
    metrics = MetricsMiddleware()
    release = asyncio.Event()

    async def engine(request):
        await release.wait()
        return {}

    async with asyncio.timeout(5):
        requests = [RouterRequest(rid=str(i), payload={}, engine="e") for i in range(3)]
        tasks = [asyncio.create_task(metrics(request, engine)) for request in requests]
        await asyncio.sleep(0)
        assert metrics.snapshot()["router/engine/e/in_flight"] == 3.0
        release.set()
        await asyncio.gather(*tasks)
    assert metrics.snapshot()["router/engine/e/in_flight"] == 0.0


async def test_request_log_middleware_logs_rid_engine_latency_and_finish_reason(fake_engine, serve, caplog):
    caplog.set_level(logging.INFO, logger="rl_router.requests")
    engines = {"a": fake_engine("a"), "b": fake_engine("b", fail_with="engine died")}
    async with asyncio.timeout(10), serve(engines, middleware=[RequestLogMiddleware()]) as (_, client):
        await client.generate(payload(1))
        with pytest.raises(RouterError):
            await client.generate(payload(2))
    lines = [r.getMessage() for r in caplog.records if r.name == "rl_router.requests"]
    assert len(lines) == 2
    assert lines[0].startswith("rid=r1 engine=a latency=") and lines[0].endswith("finish_reason=stop")
    assert lines[1].startswith("rid=r2 engine=b latency=") and "engine died" in lines[1]


async def test_middleware_named_by_import_path_is_loaded_into_the_router(fake_engine, serve, monkeypatch):
    module = types.ModuleType("router_test_plugins")
    log = []
    module.Tagger = type("Tagger", (Recorder,), {"__init__": lambda self: Recorder.__init__(self, "plugin", log)})
    monkeypatch.setitem(sys.modules, "router_test_plugins", module)
    middleware = ["router_test_plugins:Tagger"]
    async with asyncio.timeout(10), serve({"e0": fake_engine("e0")}, middleware=middleware) as (_, client):
        assert (await client.generate(payload(3)))["tags"] == ["plugin"]
    assert isinstance(load_middleware("rl_router:MetricsMiddleware", window=5), MetricsMiddleware)


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("rl_router.MetricsMiddleware", ValueError, "'rl_router.MetricsMiddleware' must look like"),
        (":Thing", ValueError, "':Thing' must look like"),
        ("no_such_module_xyz:Thing", ImportError, "'no_such_module_xyz:Thing': cannot import module"),
        ("rl_router:NoSuchThing", ImportError, "'rl_router:NoSuchThing': 'rl_router' has no attribute"),
        ("rl_router:__version__", TypeError, "'rl_router:__version__' is not callable"),
    ],
)
def test_load_middleware_errors_name_the_spec(spec, error, message):
    with pytest.raises(error, match=message):
        load_middleware(spec)


def test_load_middleware_reports_bad_constructor_arguments_with_the_spec():
    with pytest.raises(TypeError, match="'rl_router:MetricsMiddleware': cannot construct"):
        load_middleware("rl_router:MetricsMiddleware", colour="red")


FILE_MIDDLEWARE = """
class Stamp:
    def __init__(self):
        self.seen = 0

    async def __call__(self, request, call_next):
        self.seen += 1
        response = await call_next(request)
        return {**response, "stamped": self.seen}

    def snapshot(self):
        return {"stamp/seen": float(self.seen)}
"""


async def test_a_middleware_from_a_file_runs_in_the_chain_and_its_snapshot_reaches_router_metrics(
    tmp_path, serve, fake_engine
):
    path = tmp_path / "stamp.py"
    path.write_text(FILE_MIDDLEWARE)
    async with asyncio.timeout(10), serve({"e0": fake_engine("e0")}, middleware=[f"{path}:Stamp"]) as (router, client):
        assert [(await client.generate(payload(n)))["stamped"] for n in range(3)] == [1, 2, 3]
        assert router.metrics()["stamp/seen"] == 3.0


@pytest.mark.parametrize(
    ("source", "message"),
    [(None, "no file"), ("raise RuntimeError('broken plugin')", "failed: RuntimeError"), ("x = 1", "has no attribute")],
)
def test_file_middleware_errors_name_the_spec_and_the_file(tmp_path, source, message):
    path = tmp_path / "plugin.py"
    if source is not None:
        path.write_text(source)
    with pytest.raises(ImportError, match=message) as info:
        load_middleware(f"{path}:Stamp")
    assert f"{path}:Stamp" in str(info.value)
