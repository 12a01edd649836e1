"""`EmbeddedEngine`: an aiohttp server with SGLang's native routes and payloads over a Hugging Face
model, for machines without SGLang (CPU boxes, CI). Routes and fields follow SGLang
`SGLANG_VERSION_CODED_AGAINST` (`http_server.py`, `io_struct.py`)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import torch
from aiohttp import web
from safetensors import safe_open

from rl_sglang.embedded.model_runner import MEMORY_TAGS, ModelRunner, parse_dtype
from rl_sglang.embedded.options import EngineOptions
from rl_sglang.embedded.sampling import SamplingParams
from rl_sglang.embedded.scheduler import Scheduler
from rl_sglang.embedded.weight_group import WeightUpdateGroup

logger = logging.getLogger(__name__)

HEALTH_CHECK_TIMEOUT_S = 20.0


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
        self.runner: ModelRunner | None = None
        self.scheduler: Scheduler | None = None
        self._groups: dict[str, WeightUpdateGroup] = {}
        self._app_runner: web.AppRunner | None = None
        self._weights_lock: asyncio.Lock | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        """Load the model (off the loop), start the scheduler and the HTTP server; return the URL."""
        self.runner = await asyncio.to_thread(
            ModelRunner,
            self.model_path,
            device=self.device,
            dtype=self.dtype,
            seed=self.seed,
            max_running_requests=self.max_running_requests,
            options=self.options,
        )
        self.scheduler = Scheduler(self.runner, self.max_running_requests)
        self.scheduler.start()
        self._weights_lock = asyncio.Lock()
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
        self._groups.clear()

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30, middlewares=[_errors_as_json])
        app.router.add_post("/generate", self._generate)
        app.router.add_get("/health", self._health)
        app.router.add_get("/health_generate", self._health_generate)
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
        return app

    # ---- generation ---------------------------------------------------------------------------

    async def _generate(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if body.get("stream"):
            raise BadRequest("stream: streaming is not supported by the embedded engine")
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
        submitted = []
        try:
            for rid, prompt in zip(rids, prompts):
                submitted.append(_parse(lambda: self.scheduler.submit(str(rid), prompt, params, return_logprob)))
            answers = await asyncio.gather(*(r.future for r in submitted))
        except (BadRequest, asyncio.CancelledError):  # a bad sibling or a gone client: stop the rest
            for r in submitted:
                self.scheduler.abort(r.rid)
            raise
        return web.json_response(answers if batched else answers[0])

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
        body = await _json_body(request)
        self.scheduler.abort(None if body.get("abort_all") else str(body.get("rid", "")))
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
        return web.Response(status=200)

    async def _health_generate(self, request: web.Request) -> web.Response:
        """One greedy token through the scheduler; while generation is held on purpose, alive is enough."""
        if self.scheduler.holds:
            return web.Response(status=200)
        probe = self.scheduler.submit(
            f"HEALTH_CHECK_{uuid.uuid4().hex}", [0], SamplingParams(temperature=0.0, max_new_tokens=1), False
        )
        try:
            await asyncio.wait_for(asyncio.shield(probe.future), HEALTH_CHECK_TIMEOUT_S)
        except Exception:  # timeout or a failed step
            self.scheduler.abort(probe.rid)
            return web.Response(status=503)
        return web.Response(status=200)

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
                "random_seed": self.seed,
                "weight_version": self.runner.weight_version,
                "held": sorted(self.scheduler.holds),
                "released_memory_tags": sorted(self.runner.released_tags),
                "weight_update_groups": sorted(self._groups),
            }
        )

    async def _flush_cache(self, request: web.Request) -> web.Response:
        self.scheduler.flush_cache()
        return web.Response(text="Cache flushed.\n")

    # ---- memory -------------------------------------------------------------------------------

    async def _release_memory(self, request: web.Request) -> web.Response:
        tags = _tags(await _json_body(request))
        self.scheduler.hold("released")
        if "kv_cache" in tags:
            await self.scheduler.drop_running_batch()
        await self.scheduler.on_model_thread(self.runner.release, tags)
        return web.json_response(None)

    async def _resume_memory(self, request: web.Request) -> web.Response:
        tags = _tags(await _json_body(request))
        await self.scheduler.on_model_thread(self.runner.resume, tags)
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
        async with self._weights_lock:
            try:
                tensors = await asyncio.to_thread(_read_safetensors, Path(model_path))
            except (OSError, ValueError) as exc:
                return _weights_answer(False, f"cannot read weights from {model_path}: {exc}")
            return await self._apply_weights(tensors, body.get("weight_version"))

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
            return _weights_answer(False, f"failed to join weight update group {group_name!r}: {exc}")
        return _weights_answer(True, f"joined weight update group {group_name!r} at rank {args[2]}")

    async def _destroy_weights_update_group(self, request: web.Request) -> web.Response:
        group_name = str((await _json_body(request)).get("group_name", "weight_update_group"))
        if self._groups.pop(group_name, None) is None:
            return _weights_answer(False, f"no weight update group {group_name!r}")
        return _weights_answer(True, f"destroyed weight update group {group_name!r}")

    async def _update_weights_from_distributed(self, request: web.Request) -> web.Response:
        """Receive every announced tensor (so the trainer's broadcasts never hang), then check and apply."""
        body = await _json_body(request)
        group_name = str(body.get("group_name", "weight_update_group"))
        names, dtype_names, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtype_names, list) and isinstance(shapes, list)):
            raise BadRequest("names, dtypes and shapes must be lists")
        if not len(names) == len(dtype_names) == len(shapes):
            raise BadRequest(f"names, dtypes and shapes differ in length: {len(names)}, {len(dtype_names)}, {len(shapes)}")
        group = self._groups.get(group_name)
        if group is None:
            return _weights_answer(False, f"no weight update group {group_name!r}; call /init_weights_update_group")
        try:
            dtypes = [parse_dtype(str(d)) for d in dtype_names]
        except ValueError as exc:
            return _weights_answer(False, f"dtypes: {exc}")
        async with self._weights_lock:
            received = await asyncio.to_thread(group.receive, shapes, dtypes)
            return await self._apply_weights(list(zip(names, received)), body.get("weight_version"))

    async def _apply_weights(self, tensors: list[tuple[str, torch.Tensor]], weight_version: Any) -> web.Response:
        problem = self.runner.check_weights((name, tuple(t.shape)) for name, t in tensors)
        if problem is not None:
            return _weights_answer(False, problem)
        version = None if weight_version is None else str(weight_version)
        await self.scheduler.on_model_thread(self.runner.load_weights, tensors, version)
        return _weights_answer(True, f"updated {len(tensors)} tensors, weight_version={self.runner.weight_version}")


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


def _weights_answer(success: bool, message: str) -> web.Response:
    return web.json_response({"success": success, "message": message}, status=200 if success else 400)


def _parse(make):
    try:
        return make()
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
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
