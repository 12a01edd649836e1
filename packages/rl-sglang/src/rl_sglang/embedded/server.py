"""`EmbeddedEngine`: an aiohttp server with SGLang's native routes and payloads over a Hugging Face
model, for machines without SGLang (CPU boxes, CI). Routes, fields and status codes follow SGLang
`SGLANG_VERSION_CODED_AGAINST` (`http_server.py`, `io_struct.py`; the conformance test holds both
to the API fixture read from its wheel): abort matches request ids by prefix, health routes answer
503 while generation is held or a weight update runs, /flush_cache and memory release answer 400
unless idle, weight updates from a trainer run inside /begin_weight_update ... /end_weight_update."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, TypeVar

from aiohttp import web

from rl_sglang.embedded.http import BadRequest, errors_as_json, json_body, parse
from rl_sglang.embedded.model_runner import ModelRunner
from rl_sglang.embedded.options import EngineOptions
from rl_sglang.embedded.sampling import SamplingParams
from rl_sglang.embedded.scheduler import Scheduler
from rl_sglang.embedded.weights import WeightUpdates

logger = logging.getLogger(__name__)
T = TypeVar("T")

HEALTH_CHECK_TIMEOUT_S = 20.0
# SGLang's GPU memory tags; the embedded engine has no CUDA graphs, so that tag frees nothing.
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


class EmbeddedEngine:
    def __init__(
        self,
        model_path: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        device: str = "auto",
        dtype: str = "auto",
        max_running_requests: int = 64,
        seed: int = 0,
        options: EngineOptions | None = None,
    ):
        if max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {max_running_requests}")
        self.model_path = str(model_path)
        self.host = host
        self.port = port
        self.device = device
        self.dtype = dtype
        self.max_running_requests = max_running_requests
        self.seed = seed
        self.options = options or EngineOptions()
        self._runner: ModelRunner | None = None
        self._scheduler: Scheduler | None = None
        self._weights: WeightUpdates | None = None
        self._app_runner: web.AppRunner | None = None
        self._in_flight: dict[str, Any] = {}  # rid -> the scheduler's request, while it runs

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # The routes are served only between start() and stop(), when these exist.
    @property
    def runner(self) -> ModelRunner:
        return _started(self._runner, "model runner")

    @property
    def scheduler(self) -> Scheduler:
        return _started(self._scheduler, "scheduler")

    @property
    def weights(self) -> WeightUpdates:
        return _started(self._weights, "weight updates")

    async def start(self) -> str:
        """Load the model (off the loop), start the scheduler and the HTTP server; return the URL."""
        runner = self._runner = await asyncio.to_thread(
            ModelRunner,
            self.model_path,
            device=self.device,
            dtype=self.dtype,
            seed=self.seed,
            max_running_requests=self.max_running_requests,
            options=self.options,
        )
        scheduler = self._scheduler = Scheduler(runner, self.max_running_requests)
        scheduler.start()
        self._weights = WeightUpdates(runner, scheduler, self._busy)
        self._app_runner = web.AppRunner(self._build_app(), access_log=None)
        await self._app_runner.setup()
        site = web.TCPSite(self._app_runner, self.host, self.port)
        await site.start()
        self.port = self._app_runner.addresses[0][1]
        logger.info("embedded engine serving %s at %s", self.model_path, self.url)
        return self.url

    async def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.abort(None)  # answer in-flight requests so the HTTP shutdown need not wait
        if self._app_runner is not None:
            await self._app_runner.cleanup()
            self._app_runner = None
        if self._scheduler is not None:
            await self._scheduler.stop()
            self._scheduler = None
        if self._weights is not None:
            self._weights.close()

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30, middlewares=[errors_as_json])
        app.router.add_post("/generate", self._generate)
        app.router.add_get("/health", self._health)
        app.router.add_get("/health_generate", self._health_generate)
        app.router.add_get("/ping", self._ping)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/get_model_info", self._model_info)
        app.router.add_get("/model_info", self._model_info)
        app.router.add_get("/get_server_info", self._server_info)
        app.router.add_get("/server_info", self._server_info)
        for method in ("GET", "POST"):
            app.router.add_route(method, "/flush_cache", self._flush_cache)
            app.router.add_route(method, "/release_memory_occupation", self._release_memory)
            app.router.add_route(method, "/resume_memory_occupation", self._resume_memory)
        app.router.add_post("/abort_request", self._abort_request)
        app.router.add_post("/pause_generation", self._pause_generation)
        app.router.add_post("/continue_generation", self._continue_generation)
        self.weights.add_routes(app)
        return app

    # ---- generation ---------------------------------------------------------------------------

    async def _generate(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        if body.get("stream"):
            raise BadRequest("stream: streaming is not supported by the embedded engine")
        params = parse(lambda: SamplingParams.from_payload(body.get("sampling_params")))
        prompts, batched = self._prompts(body)
        rids = body.get("rid")
        if batched:
            if rids is None:
                rids = [uuid.uuid4().hex for _ in prompts]
            if not isinstance(rids, list) or len(rids) != len(prompts):
                raise BadRequest(f"rid: a batched request needs a list of {len(prompts)} rids")
        else:
            rids = [rids if rids is not None else uuid.uuid4().hex]
        return_logprob = bool(body.get("return_logprob", False))
        async with self.weights.update_lock.shared():
            self.weights.check_lora_path(body.get("lora_path"))  # under the lock: no adapter change in between
            submitted = []
            try:
                for rid, prompt in zip(rids, prompts):
                    submitted.append(self._submit(str(rid), prompt, params, return_logprob))
                answers = await asyncio.gather(*(r.future for r in submitted))
            except (BadRequest, asyncio.CancelledError):  # a bad sibling or a gone client: stop the rest
                for r in submitted:
                    self.scheduler.abort(r.rid)
                raise
        started = time.perf_counter()
        response = web.json_response(answers if batched else answers[0])
        self.scheduler.counters.respond_s += time.perf_counter() - started
        return response

    def _submit(self, rid: str, prompt: list[int], params: SamplingParams, return_logprob: bool) -> Any:
        request = parse(lambda: self.scheduler.submit(rid, prompt, params, return_logprob))
        self._in_flight[rid] = request
        request.future.add_done_callback(lambda _: self._in_flight.pop(rid, None))
        return request

    def _busy(self) -> bool:
        """SGLang's "not fully idle": requests running or queued; while paused, queued ones
        that have not started do not count."""
        paused = bool(self.scheduler.holds)
        return any(not (paused and not r.output_ids) for r in self._in_flight.values())

    def _prompts(self, body: dict[str, Any]) -> tuple[list[list[int]], bool]:
        if ("input_ids" in body) == ("text" in body):
            raise BadRequest("exactly one of input_ids or text is required")
        if "text" in body:
            text = body["text"]
            batched = isinstance(text, list)
            texts = text if batched else [text]
            if not all(isinstance(t, str) for t in texts):
                raise BadRequest("text: expected a string or a list of strings")
            prompts = [parse(lambda t=t: self.runner.encode_text(t)) for t in texts]
        else:
            ids = body["input_ids"]
            batched = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
            prompts = ids if batched else [ids]
        for index, prompt in enumerate(prompts):
            where = f"input_ids[{index}]" if batched else "input_ids"
            if not isinstance(prompt, list) or not prompt:
                raise BadRequest(f"{where}: expected a non-empty list of token ids")
            for token in prompt:
                if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < self.runner.vocab_size:
                    raise BadRequest(f"{where}: token {token!r} is not an id in [0, {self.runner.vocab_size})")
            if len(prompt) >= self.runner.context_length:
                raise BadRequest(
                    f"{where}: {len(prompt)} tokens do not fit the context length {self.runner.context_length}"
                )
        return prompts, batched

    async def _abort_request(self, request: web.Request) -> web.Response:
        """As SGLang: `abort_all`, or a `rid` that is in flight, which then also aborts every
        request whose rid starts with it; an unknown or empty rid changes nothing."""
        body = await json_body(request)
        if body.get("abort_all"):
            self.scheduler.abort(None)
            return web.Response(status=200)
        rid = body.get("rid")
        if isinstance(rid, str) and rid and rid in self._in_flight:
            for other in [r for r in self._in_flight if r.startswith(rid)]:
                self.scheduler.abort(other)
        return web.Response(status=200)

    async def _pause_generation(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise BadRequest(f"mode must be abort, retract or in_place, got {mode!r}")
        self.scheduler.hold("paused")
        if mode == "abort":
            self.scheduler.abort(None)
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def _continue_generation(self, request: web.Request) -> web.Response:
        self.scheduler.unhold("paused")
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    # ---- health and info ----------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return await self._health_generate(request)

    async def _health_generate(self, request: web.Request) -> web.Response:
        """One greedy token through the scheduler. 503 while generation is held (paused, memory
        released) or a weight update runs, where SGLang's probe would wait out its timeout."""
        if self.scheduler.holds or self.weights.updating:
            return web.Response(status=503)
        probe = self.scheduler.submit(
            f"HEALTH_CHECK_{uuid.uuid4().hex}", [0], SamplingParams(temperature=0.0, max_new_tokens=1), False
        )
        try:
            await asyncio.wait_for(asyncio.shield(probe.future), HEALTH_CHECK_TIMEOUT_S)
        except Exception:  # timeout or a failed step
            self.scheduler.abort(probe.rid)
            return web.Response(status=503)
        return web.Response(status=200)

    async def _ping(self, request: web.Request) -> web.Response:
        """Alive, whether or not generation is held (SGLang's /ping: an intentional pause such as a
        weight sync is not a reason to replace the engine)."""
        return web.Response(status=200)

    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if "paused" in self.scheduler.holds else 200)

    async def _model_info(self, request: web.Request) -> web.Response:
        config = self.runner.model.config
        return web.json_response(
            {
                "model_path": self.runner.model_path,
                "tokenizer_path": self.runner.model_path if self.runner.tokenizer is not None else None,
                "is_generation": True,
                "weight_version": self.runner.weight_version,
                "model_type": getattr(config, "model_type", None),
                "architectures": getattr(config, "architectures", None),
            }
        )

    async def _server_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "engine": "rl-sglang-embedded",
                "model_path": self.model_path,
                "host": self.host,
                "port": self.port,
                "device": str(self.runner.device),
                "dtype": str(self.runner.dtype).removeprefix("torch."),
                "max_running_requests": self.max_running_requests,
                "tp_size": 1,
                "dp_size": 1,
                "pp_size": 1,
                "random_seed": self.seed,
                "weight_version": self.runner.weight_version,
                "held": sorted(self.scheduler.holds),
                "released_memory_tags": sorted(self.runner.released_tags),
                "weight_update_groups": sorted(self.weights.groups),
                # SGLang's list of per-scheduler live states; here the one scheduler's cumulative counters
                "internal_states": [self.scheduler.counters_now()],
            }
        )

    async def _flush_cache(self, request: web.Request) -> web.Response:
        """Drop the prefix cache; refused while requests run, as SGLang does."""
        if self._busy():
            return web.Response(status=400, text="Cache not flushed because there are pending requests.\n")
        self.scheduler.flush_cache()
        return web.Response(text="Cache flushed.\n")

    # ---- memory -------------------------------------------------------------------------------

    async def _release_memory(self, request: web.Request) -> web.Response:
        """400 unless idle, as SGLang (pause generation first); requests arriving afterwards wait
        for the resume."""
        tags = _tags(await json_body(request))
        if self._busy():
            raise BadRequest("release_memory_occupation should be called only when server is idle.")
        self.scheduler.hold("released")
        await self.scheduler.on_model_thread(self.runner.release, [t for t in tags if t != "cuda_graph"])
        return web.json_response(None)

    async def _resume_memory(self, request: web.Request) -> web.Response:
        tags = _tags(await json_body(request))
        await self.scheduler.on_model_thread(self.runner.resume, [t for t in tags if t != "cuda_graph"])
        if not self.runner.released_tags:
            self.scheduler.unhold("released")
        return web.json_response(None)


def _started(part: T | None, name: str) -> T:
    if part is None:
        raise RuntimeError(f"the embedded engine's {name} exists only between start() and stop()")
    return part


def _tags(body: dict[str, Any]) -> list[str]:
    tags = body.get("tags")
    if tags is None:
        return list(MEMORY_TAGS)
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown:
        raise BadRequest(f"tags: {unknown[0]!r} is not one of {list(MEMORY_TAGS)}")
    return list(tags)
