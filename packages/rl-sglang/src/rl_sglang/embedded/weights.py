"""The embedded engine's weight-update routes, as SGLang 0.5.23 answers them: from disk, from a
trainer's broadcast group, from tensor handles; the last two only inside a weight-update session
(`/begin_weight_update` ... `/end_weight_update`). Also /update_weight_version and the LoRA routes
(/load_lora_adapter, /load_lora_adapter_from_tensors, /unload_lora_adapter; `rl_sglang.embedded.lora`). Unless generation is paused, each update waits
for the requests in flight and holds new ones (`UpdateLock`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from aiohttp import web
from safetensors import safe_open

from rl_sglang.embedded.http import BadRequest, json_body, weights_answer
from rl_sglang.embedded.lora import LoraAdapter, adapter_from_tensors, read_adapter_folder
from rl_sglang.embedded.model_runner import ModelRunner, parse_dtype
from rl_sglang.embedded.scheduler import Scheduler
from rl_sglang.embedded.update_lock import UpdateLock
from rl_sglang.embedded.weight_group import WeightUpdateGroup
from rl_sglang.tensor_handoff import LOAD_FORMATS, load_entry, named_tensors_of

logger = logging.getLogger(__name__)

SESSION_REQUIRED = "{route} must run between begin_weight_update() and end_weight_update()"
NOT_FLUSHED = (
    "Weights were updated, but the cache was not flushed because requests are still running or queued. "
    "Retract or finish them, then call /flush_cache."
)


class WeightUpdates:
    """Weight-update state of one engine: its process groups, the open session, the locks.
    `busy` says whether requests run (SGLang's flush after an update refuses then)."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, busy: Callable[[], bool]):
        self.runner = runner
        self.scheduler = scheduler
        self._busy = busy
        self.groups: dict[str, WeightUpdateGroup] = {}
        self.session_open = False
        self.lock = asyncio.Lock()
        self.update_lock = UpdateLock()

    @property
    def updating(self) -> bool:
        return self.update_lock.updating or self.lock.locked()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/update_weights_from_disk", self._update_weights_from_disk)
        app.router.add_post("/init_weights_update_group", self._init_weights_update_group)
        app.router.add_post("/destroy_weights_update_group", self._destroy_weights_update_group)
        app.router.add_post("/update_weights_from_distributed", self._update_weights_from_distributed)
        app.router.add_post("/update_weights_from_tensor", self._update_weights_from_tensor)
        app.router.add_post("/begin_weight_update", self._begin_weight_update)
        app.router.add_post("/end_weight_update", self._end_weight_update)
        app.router.add_post("/update_weight_version", self._update_weight_version)
        app.router.add_post("/load_lora_adapter", self._load_lora_adapter)
        app.router.add_post("/load_lora_adapter_from_tensors", self._load_lora_adapter_from_tensors)
        app.router.add_post("/unload_lora_adapter", self._unload_lora_adapter)

    def close(self) -> None:
        for group in self.groups.values():
            group.close()
        self.groups.clear()

    async def _update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        model_path = body.get("model_path")
        if not isinstance(model_path, str):
            raise BadRequest("model_path: a folder path string is required")
        load_format = body.get("load_format")
        if load_format not in (None, "auto", "safetensors"):
            return weights_answer(False, f"load_format {load_format!r} is not supported; use safetensors")
        async with self._updating(body):
            try:
                tensors = await asyncio.to_thread(_read_safetensors, Path(model_path))
            except (OSError, ValueError) as exc:
                return weights_answer(False, f"cannot read weights from {model_path}: {exc}", num_paused_requests=0)
            return await self._apply_weights(tensors, body, num_paused_requests=0)

    @asynccontextmanager
    async def _updating(self, body: dict[str, Any]) -> AsyncIterator[None]:
        """One weight update at a time; unless generation is paused, it waits for the requests in
        flight and holds new ones (SGLang's model-update lock)."""
        if body.get("abort_all_requests"):
            self.scheduler.abort(None)
        async with self.lock:
            if "paused" in self.scheduler.holds:
                yield
            else:
                async with self.update_lock.exclusive():
                    yield

    async def _begin_weight_update(self, request: web.Request) -> web.Response:
        await json_body(request)
        if self.session_open:
            return weights_answer(False, "a weight-update session is already open; call end_weight_update() first")
        self.session_open = True
        return weights_answer(True, "Success")

    async def _end_weight_update(self, request: web.Request) -> web.Response:
        await json_body(request)
        if not self.session_open:
            return weights_answer(False, "no weight-update session is open; call begin_weight_update() first")
        self.session_open = False
        return weights_answer(True, "Success")

    async def _init_weights_update_group(self, request: web.Request) -> web.Response:
        body = await json_body(request)
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
        if group_name in self.groups:
            return weights_answer(False, f"weight update group {group_name!r} already exists")
        try:
            self.groups[group_name] = await asyncio.to_thread(WeightUpdateGroup, *args, device=self.runner.device)
        except Exception as exc:
            return weights_answer(False, f"Failed to initialize custom process group: {exc}.")
        return weights_answer(True, "Succeeded to initialize custom process group.")

    async def _destroy_weights_update_group(self, request: web.Request) -> web.Response:
        group_name = str((await json_body(request)).get("group_name", "weight_update_group"))
        group = self.groups.pop(group_name, None)
        if group is None:
            return weights_answer(False, "The group to be destroyed does not exist.")
        group.close()
        return weights_answer(True, "Succeeded to destroy custom process group.")

    async def _update_weights_from_distributed(self, request: web.Request) -> web.Response:
        """Receive every announced tensor (so the trainer's broadcasts never hang), then check and
        apply. Outside a session it is refused before receiving anything, as SGLang does."""
        body = await json_body(request)
        if not self.session_open:
            return weights_answer(False, SESSION_REQUIRED.format(route="update_weights_from_distributed"))
        group_name = str(body.get("group_name", "weight_update_group"))
        names, dtype_names, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtype_names, list) and isinstance(shapes, list)):
            raise BadRequest("names, dtypes and shapes must be lists")
        if not len(names) == len(dtype_names) == len(shapes):
            raise BadRequest(f"names, dtypes and shapes differ in length: {len(names)}, {len(dtype_names)}, {len(shapes)}")
        load_format = body.get("load_format")
        if load_format not in (None, "flattened_bucket"):
            return weights_answer(False, f"load_format {load_format!r} is not supported for a broadcast")
        group = self.groups.get(group_name)
        if group is None:
            return weights_answer(False, f"Group {group_name} not in {sorted(self.groups)}. Please call `init_weights_update_group` first.")
        try:
            dtypes = [parse_dtype(str(d)) for d in dtype_names]
        except ValueError as exc:
            return weights_answer(False, f"dtypes: {exc}")
        receive = group.receive_flattened if load_format == "flattened_bucket" else group.receive
        async with self._updating(body):
            received = await asyncio.to_thread(receive, shapes, dtypes)
            return await self._apply_weights(list(zip(names, received)), body)

    async def _update_weights_from_tensor(self, request: web.Request) -> web.Response:
        """Tensors handed over by handle (`rl_sglang.tensor_handoff`); this engine is TP rank 0, so
        it opens entry 0 only. The sender keeps the memory alive until this answers."""
        body = await json_body(request)
        if not self.session_open:
            return weights_answer(False, SESSION_REQUIRED.format(route="update_weights_from_tensor"))
        entries = body.get("serialized_named_tensors")
        if not (isinstance(entries, list) and entries and all(isinstance(e, str) for e in entries)):
            raise BadRequest("serialized_named_tensors: a non-empty list of base64 strings (one per TP rank) is required")
        load_format = body.get("load_format")
        if load_format not in LOAD_FORMATS:
            return weights_answer(False, f"Unknown load_format={load_format}; the embedded engine reads {list(LOAD_FORMATS)}")
        async with self._updating(body):
            started = time.perf_counter()
            try:
                tensors = await asyncio.to_thread(lambda: named_tensors_of(load_entry(entries[0]), load_format))
            except Exception as exc:  # a payload that does not unpickle or has the wrong shape
                return weights_answer(False, f"cannot read serialized_named_tensors[0]: {type(exc).__name__}: {exc}")
            return await self._apply_weights(tensors, body, opened_s=time.perf_counter() - started)

    async def _apply_weights(
        self, tensors: list[tuple[str, torch.Tensor]], body: dict[str, Any], *, opened_s: float | None = None, **extra: Any
    ) -> web.Response:
        started = time.perf_counter()
        problem = self.runner.check_weights((name, tuple(t.shape)) for name, t in tensors)
        if problem is not None:
            return weights_answer(False, problem, **extra)
        weight_version = body.get("weight_version")
        version = None if weight_version is None else str(weight_version)
        checked = time.perf_counter()
        await self.scheduler.on_model_thread(self.runner.load_weights, tensors, version)
        opened = "" if opened_s is None else f"handles opened in {opened_s * 1e3:.1f} ms, "
        logger.info("weights updated (%d tensors; %schecked in %.1f ms, loaded in %.1f ms), weight_version=%s", len(tensors), opened,
                    (checked - started) * 1e3, (time.perf_counter() - checked) * 1e3, self.runner.weight_version)
        if body.get("flush_cache", True) and self._busy():  # paused with requests kept: SGLang's flush refuses
            return weights_answer(False, NOT_FLUSHED, **extra)
        return weights_answer(True, f"updated {len(tensors)} tensors, weight_version={self.runner.weight_version}", **extra)


    async def _update_weight_version(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        version = body.get("new_version")
        if not isinstance(version, str):
            raise BadRequest("new_version: a string is required")
        if body.get("abort_all_requests", True):  # SGLang's default
            self.scheduler.abort(None)
        await self.scheduler.on_model_thread(self.runner.set_weight_version, version)
        return web.json_response({"success": True, "message": f"weight_version={version}"})

    # ---- LoRA ---------------------------------------------------------------------------------

    def _loaded(self) -> dict[str, str]:
        adapter = self.runner.adapter
        return {} if adapter is None else {adapter.name: adapter.source}

    def _lora_answer(self, error: str | None) -> web.Response:
        """SGLang's LoRAUpdateOutput: success, error_message, loaded_adapters (name -> source)."""
        body = {"success": error is None, "error_message": error or "", "loaded_adapters": self._loaded()}
        return web.json_response(body, status=200 if error is None else 400)

    async def _load_lora_adapter(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        name, path = _lora_name(body), body.get("lora_path")
        if not isinstance(path, str):
            raise BadRequest("lora_path: a folder path string is required")
        try:
            adapter = await asyncio.to_thread(read_adapter_folder, name, Path(path))
        except (OSError, ValueError) as exc:
            return self._lora_answer(f"cannot load LoRA adapter {name!r} from {path}: {exc}")
        return await self._load_adapter(adapter, body)

    async def _load_lora_adapter_from_tensors(self, request: web.Request) -> web.Response:
        """This engine is TP rank 0: it opens entry 0 of serialized_named_tensors. The sender keeps the memory
        alive until this answers; the engine copies the factors it keeps."""
        body = await json_body(request)
        name, config, entries = _lora_name(body), body.get("config_dict"), body.get("serialized_named_tensors")
        if not isinstance(config, dict):
            raise BadRequest("config_dict: the adapter's PEFT config (adapter_config.json) as an object is required")
        if not (isinstance(entries, list) and entries and all(isinstance(e, str) for e in entries)):
            raise BadRequest("serialized_named_tensors: a non-empty list of base64 strings (one per TP rank) is required")
        load_format = body.get("load_format")
        if load_format not in LOAD_FORMATS:
            return self._lora_answer(f"Unknown load_format={load_format}; the embedded engine reads {list(LOAD_FORMATS)}")
        try:
            tensors = named_tensors_of(load_entry(entries[0]), load_format)
            adapter = adapter_from_tensors(name, "<tensors>", config, tensors)
        except Exception as exc:  # a payload that does not unpickle, or an adapter this engine cannot merge
            return self._lora_answer(f"cannot load LoRA adapter {name!r} from tensors: {type(exc).__name__}: {exc}")
        return await self._load_adapter(adapter, body)

    async def _load_adapter(self, adapter: LoraAdapter, body: dict[str, Any]) -> web.Response:
        async with self._updating(body):
            current = self.runner.adapter
            if current is not None:
                reason = "is already loaded" if current.name == adapter.name else "is loaded; this engine serves one adapter at a time"
                return self._lora_answer(f"LoRA adapter {current.name!r} {reason}: unload it first")
            problem = self.runner.check_adapter(adapter)
            if problem is not None:
                return self._lora_answer(problem)
            await self.scheduler.on_model_thread(self.runner.load_adapter, adapter)
            return self._lora_answer(None)

    async def _unload_lora_adapter(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        name = _lora_name(body)
        async with self._updating(body):
            if self.runner.adapter is None or self.runner.adapter.name != name:
                return self._lora_answer(f"LoRA adapter {name!r} is not loaded (loaded: {sorted(self._loaded())})")
            await self.scheduler.on_model_thread(self.runner.unload_adapter)
            return self._lora_answer(None)

    def check_lora_path(self, lora_path: Any) -> None:
        """What /generate's lora_path may name: the loaded adapter; None only while none is loaded (the base
        is not served beside a loaded adapter)."""
        loaded = self.runner.adapter
        if lora_path is None:
            if loaded is not None:
                raise BadRequest(f"lora_path: LoRA adapter {loaded.name!r} is applied to every request this engine serves; "
                                 "name it in lora_path, or unload it to be served the base model")
            return
        if not isinstance(lora_path, str):
            raise BadRequest("lora_path: one adapter name (a string) per request; this engine serves one adapter at a time")
        if loaded is None or loaded.name != lora_path:
            raise BadRequest(f"lora_path: LoRA adapter {lora_path!r} is not loaded (loaded: {sorted(self._loaded())})")


def _lora_name(body: dict[str, Any]) -> str:
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise BadRequest("lora_name: a non-empty string is required")
    return name


def _read_safetensors(folder: Path) -> list[tuple[str, torch.Tensor]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors file in {folder}")
    tensors: list[tuple[str, torch.Tensor]] = []
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            tensors.extend((name, handle.get_tensor(name)) for name in handle.keys())
    return tensors
