"""`EmbeddedEngine`: an aiohttp server with SGLang's native routes and payloads over a Hugging Face
model, for machines without SGLang (CPU boxes, CI). Routes, fields and status codes follow SGLang
`SGLANG_VERSION_CODED_AGAINST` (`http_server.py`, `io_struct.py`; the conformance test holds both
to the API fixture read from its wheel): abort matches request ids by prefix, health routes answer
503 while generation is held or a weight update runs, /flush_cache and memory release answer 400
unless idle, weight updates from a trainer run inside /begin_weight_update ... /end_weight_update."""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import torch
from aiohttp import web
from safetensors import safe_open

from rl_sglang.embedded.model_runner import ModelRunner, parse_dtype
from rl_sglang.embedded.sampling import SamplingParams
from rl_sglang.embedded.scheduler import Scheduler
from rl_sglang.embedded.update_lock import UpdateLock
from rl_sglang.embedded.weight_group import WeightUpdateGroup
from rl_sglang.tensor_handoff import LOAD_FORMATS, load_entry, named_tensors_of

logger = logging.getLogger(__name__)

HEALTH_CHECK_TIMEOUT_S = 20.0
# SGLang's GPU memory tags; the embedded engine has no CUDA graphs, so that tag frees nothing.
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
SESSION_REQUIRED = "{route} must run between begin_weight_update() and end_weight_update()"
NOT_FLUSHED = (
    "Weights were updated, but the cache was not flushed because requests are still running or queued. "
    "Retract or finish them, then call /flush_cache."
)


class BadRequest(ValueError):
    """Client error; answered with HTTP 400 and the message."""


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
        self.runner: ModelRunner | None = None
        self.scheduler: Scheduler | None = None
        self._groups: dict[str, WeightUpdateGroup] = {}
        self._app_runner: web.AppRunner | None = None
        self._weights_lock: asyncio.Lock | None = None
        self._update_lock: UpdateLock | None = None
        self._in_flight: dict[str, Any] = {}  # rid -> the scheduler's request, while it runs
        self._session_open = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        """Load the model (off the loop), start the scheduler and the HTTP server; return the URL."""
        self.runner = await asyncio.to_thread(
            ModelRunner, self.model_path, device=self.device, dtype=self.dtype, seed=self.seed
        )
        self.scheduler = Scheduler(self.runner, self.max_running_requests)
        self.scheduler.start()
        self._weights_lock = asyncio.Lock()
        self._update_lock = UpdateLock()
        self._app_runner = web.AppRunner(self._build_app(), access_log=None)
        await self._app_runner.setup()
        site = web.TCPSite(self._app_runner, self.host, self.port)
        await site.start()
        self.port = self._app_runner.addresses[0][1]
        logger.info("embedded engine serving %s at %s", self.model_path, self.url)
        return self.url

    async def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.abort(None)  # answer in-flight requests so the HTTP shutdown need not wait
        if self._app_runner is not None:
            await self._app_runner.cleanup()
            self._app_runner = None
        if self.scheduler is not None:
            await self.scheduler.stop()
            self.scheduler = None
        for group in self._groups.values():
            group.close()
        self._groups.clear()

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30, middlewares=[_errors_as_json])
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
        app.router.add_post("/update_weights_from_disk", self._update_weights_from_disk)
        app.router.add_post("/init_weights_update_group", self._init_weights_update_group)
        app.router.add_post("/destroy_weights_update_group", self._destroy_weights_update_group)
        app.router.add_post("/update_weights_from_distributed", self._update_weights_from_distributed)
        app.router.add_post("/update_weights_from_tensor", self._update_weights_from_tensor)
        app.router.add_post("/begin_weight_update", self._begin_weight_update)
        app.router.add_post("/end_weight_update", self._end_weight_update)
        return app

    # ---- generation ---------------------------------------------------------------------------

    async def _generate(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if body.get("stream"):
            raise BadRequest("stream: streaming is not supported by the embedded engine")
        if body.get("lora_path") is not None:
            raise BadRequest("lora_path: the embedded engine serves no LoRA adapters (SGLang needs --enable-lora)")
        params = _parse(lambda: SamplingParams.from_payload(body.get("sampling_params")))
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
        async with self._update_lock.shared():
            submitted = []
            try:
                for rid, prompt in zip(rids, prompts):
                    submitted.append(self._submit(str(rid), prompt, params, return_logprob))
                answers = await asyncio.gather(*(r.future for r in submitted))
            except (BadRequest, asyncio.CancelledError):  # a bad sibling or a gone client: stop the rest
                for r in submitted:
                    self.scheduler.abort(r.rid)
                raise
        return web.json_response(answers if batched else answers[0])

    def _submit(self, rid: str, prompt: list[int], params: SamplingParams, return_logprob: bool) -> Any:
        request = _parse(lambda: self.scheduler.submit(rid, prompt, params, return_logprob))
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
            prompts = [_parse(lambda t=t: self.runner.encode_text(t)) for t in texts]
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
        body = await _json_body(request)
        if body.get("abort_all"):
            self.scheduler.abort(None)
            return web.Response(status=200)
        rid = body.get("rid")
        if isinstance(rid, str) and rid and rid in self._in_flight:
            for other in [r for r in self._in_flight if r.startswith(rid)]:
                self.scheduler.abort(other)
        return web.Response(status=200)

    async def _pause_generation(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
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
        if self.scheduler.holds or self._update_lock.updating or self._weights_lock.locked():
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
                "weight_update_groups": sorted(self._groups),
            }
        )

    async def _flush_cache(self, request: web.Request) -> web.Response:
        """No prefix cache is kept across requests, so there is nothing stale to drop; answered as
        SGLang does, which refuses while requests run."""
        if self._busy():
            return web.Response(status=400, text="Cache not flushed because there are pending requests.\n")
        return web.Response(text="Cache flushed.\n")

    # ---- memory -------------------------------------------------------------------------------

    async def _release_memory(self, request: web.Request) -> web.Response:
        """400 unless idle, as SGLang (pause generation first); requests arriving afterwards wait
        for the resume."""
        tags = _tags(await _json_body(request))
        if self._busy():
            raise BadRequest("release_memory_occupation should be called only when server is idle.")
        self.scheduler.hold("released")
        await self.scheduler.on_model_thread(self.runner.release, [t for t in tags if t != "cuda_graph"])
        return web.json_response(None)

    async def _resume_memory(self, request: web.Request) -> web.Response:
        tags = _tags(await _json_body(request))
        await self.scheduler.on_model_thread(self.runner.resume, [t for t in tags if t != "cuda_graph"])
        if not self.runner.released_tags:
            self.scheduler.unhold("released")
        return web.json_response(None)

    # ---- weights ------------------------------------------------------------------------------

    async def _update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        model_path = body.get("model_path")
        if not isinstance(model_path, str):
            raise BadRequest("model_path: a folder path string is required")
        load_format = body.get("load_format")
        if load_format not in (None, "auto", "safetensors"):
            return _weights_answer(False, f"load_format {load_format!r} is not supported; use safetensors")
        async with self._updating(body):
            try:
                tensors = await asyncio.to_thread(_read_safetensors, Path(model_path))
            except (OSError, ValueError) as exc:
                return _weights_answer(False, f"cannot read weights from {model_path}: {exc}", num_paused_requests=0)
            return await self._apply_weights(tensors, body, num_paused_requests=0)

    @asynccontextmanager
    async def _updating(self, body: dict[str, Any]) -> AsyncIterator[None]:
        """One weight update at a time; unless generation is paused, it waits for the requests in
        flight and holds new ones (SGLang's model-update lock)."""
        if body.get("abort_all_requests"):
            self.scheduler.abort(None)
        async with self._weights_lock:
            if "paused" in self.scheduler.holds:
                yield
            else:
                async with self._update_lock.exclusive():
                    yield

    async def _begin_weight_update(self, request: web.Request) -> web.Response:
        await _json_body(request)
        if self._session_open:
            return _weights_answer(False, "a weight-update session is already open; call end_weight_update() first")
        self._session_open = True
        return _weights_answer(True, "Success")

    async def _end_weight_update(self, request: web.Request) -> web.Response:
        await _json_body(request)
        if not self._session_open:
            return _weights_answer(False, "no weight-update session is open; call begin_weight_update() first")
        self._session_open = False
        return _weights_answer(True, "Success")

    async def _init_weights_update_group(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            group_name = str(body.get("group_name", "weight_update_group"))
            args = (
                str(body["master_address"]),
                int(body["master_port"]),
                int(body["rank_offset"]),
                int(body["world_size"]),
                group_name,
                str(body.get("backend", "nccl")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"init_weights_update_group: missing or bad field {exc}") from exc
        if group_name in self._groups:
            return _weights_answer(False, f"weight update group {group_name!r} already exists")
        try:
            self._groups[group_name] = await asyncio.to_thread(WeightUpdateGroup, *args, device=self.runner.device)
        except Exception as exc:
            return _weights_answer(False, f"Failed to initialize custom process group: {exc}.")
        return _weights_answer(True, "Succeeded to initialize custom process group.")

    async def _destroy_weights_update_group(self, request: web.Request) -> web.Response:
        group_name = str((await _json_body(request)).get("group_name", "weight_update_group"))
        group = self._groups.pop(group_name, None)
        if group is None:
            return _weights_answer(False, "The group to be destroyed does not exist.")
        group.close()
        return _weights_answer(True, "Succeeded to destroy custom process group.")

    async def _update_weights_from_distributed(self, request: web.Request) -> web.Response:
        """Receive every announced tensor (so the trainer's broadcasts never hang), then check and
        apply. Outside a session it is refused before receiving anything, as SGLang does."""
        body = await _json_body(request)
        if not self._session_open:
            return _weights_answer(False, SESSION_REQUIRED.format(route="update_weights_from_distributed"))
        group_name = str(body.get("group_name", "weight_update_group"))
        names, dtype_names, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtype_names, list) and isinstance(shapes, list)):
            raise BadRequest("names, dtypes and shapes must be lists")
        if not len(names) == len(dtype_names) == len(shapes):
            raise BadRequest(f"names, dtypes and shapes differ in length: {len(names)}, {len(dtype_names)}, {len(shapes)}")
        load_format = body.get("load_format")
        if load_format not in (None, "flattened_bucket"):
            return _weights_answer(False, f"load_format {load_format!r} is not supported for a broadcast")
        group = self._groups.get(group_name)
        if group is None:
            return _weights_answer(False, f"Group {group_name} not in {sorted(self._groups)}. Please call `init_weights_update_group` first.")
        try:
            dtypes = [parse_dtype(str(d)) for d in dtype_names]
        except ValueError as exc:
            return _weights_answer(False, f"dtypes: {exc}")
        receive = group.receive_flattened if load_format == "flattened_bucket" else group.receive
        async with self._updating(body):
            received = await asyncio.to_thread(receive, shapes, dtypes)
            return await self._apply_weights(list(zip(names, received)), body)

    async def _update_weights_from_tensor(self, request: web.Request) -> web.Response:
        """Tensors handed over by handle (`rl_sglang.tensor_handoff`); this engine is TP rank 0, so
        it opens entry 0 only. The sender keeps the memory alive until this answers."""
        body = await _json_body(request)
        if not self._session_open:
            return _weights_answer(False, SESSION_REQUIRED.format(route="update_weights_from_tensor"))
        entries = body.get("serialized_named_tensors")
        if not (isinstance(entries, list) and entries and all(isinstance(e, str) for e in entries)):
            raise BadRequest("serialized_named_tensors: a non-empty list of base64 strings (one per TP rank) is required")
        load_format = body.get("load_format")
        if load_format not in LOAD_FORMATS:
            return _weights_answer(False, f"Unknown load_format={load_format}; the embedded engine reads {list(LOAD_FORMATS)}")
        async with self._updating(body):
            try:
                tensors = await asyncio.to_thread(lambda: named_tensors_of(load_entry(entries[0]), load_format))
            except Exception as exc:  # a payload that does not unpickle or has the wrong shape
                return _weights_answer(False, f"cannot read serialized_named_tensors[0]: {type(exc).__name__}: {exc}")
            return await self._apply_weights(tensors, body)

    async def _apply_weights(self, tensors: list[tuple[str, torch.Tensor]], body: dict[str, Any], **extra: Any) -> web.Response:
        problem = self.runner.check_weights((name, tuple(t.shape)) for name, t in tensors)
        if problem is not None:
            return _weights_answer(False, problem, **extra)
        weight_version = body.get("weight_version")
        version = None if weight_version is None else str(weight_version)
        await self.scheduler.on_model_thread(self.runner.load_weights, tensors, version)
        if body.get("flush_cache", True) and self._busy():  # paused with requests kept: SGLang's flush refuses
            return _weights_answer(False, NOT_FLUSHED, **extra)
        return _weights_answer(True, f"updated {len(tensors)} tensors, weight_version={self.runner.weight_version}", **extra)


def _read_safetensors(folder: Path) -> list[tuple[str, torch.Tensor]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors file in {folder}")
    tensors = []
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            tensors.extend((name, handle.get_tensor(name)) for name in handle.keys())
    return tensors


def _tags(body: dict[str, Any]) -> list[str]:
    tags = body.get("tags")
    if tags is None:
        return list(MEMORY_TAGS)
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown:
        raise BadRequest(f"tags: {unknown[0]!r} is not one of {list(MEMORY_TAGS)}")
    return list(tags)


def _weights_answer(success: bool, message: str, **extra: Any) -> web.Response:
    return web.json_response({"success": success, "message": message, **extra}, status=200 if success else 400)


def _parse(make):
    try:
        return make()
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from exc
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


@web.middleware
async def _errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except BadRequest as exc:
        return web.json_response({"error": {"message": str(exc)}}, status=400)
    except web.HTTPException:
        raise
    except Exception as exc:
        logger.exception("%s failed", request.path)
        return web.json_response({"error": {"message": f"{type(exc).__name__}: {exc}"}}, status=500)
