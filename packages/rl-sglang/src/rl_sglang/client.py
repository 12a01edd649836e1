"""`SGLangClient`: async calls to SGLang's native HTTP routes (or the embedded engine's, which match).

It is the engine adapter the router drives (`generate`, `abort`, `is_healthy`), so it imports neither
torch nor transformers: the router process stays light.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp

from rl_sglang.errors import EngineError

KEEPALIVE_S = 75.0
"""How long an idle connection stays in a client's pool: aiohttp's web server keep-alive, which the embedded engine uses."""


class SGLangClient:
    """One SGLang server. The client may be built outside any loop and used from several: each event loop
    that calls it gets an aiohttp session of its own, made lazily and closed when that loop shuts down (a
    trainer may call asyncio.run once per rollout), or by `close` on that loop."""

    def __init__(self, base_url: str, *, timeout_s: float = 600, health_timeout_s: float = 30):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.health_timeout_s = health_timeout_s
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}
        self._lifetimes: dict[asyncio.AbstractEventLoop, AsyncGenerator[None, None]] = {}

    def __repr__(self) -> str:
        return f"SGLangClient({self.base_url!r})"

    async def _get_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if loop not in self._sessions:
            lifetime = self._lifetimes[loop] = self._session_lifetime(loop)
            await anext(lifetime)
        return self._sessions[loop]

    async def _session_lifetime(self, loop: asyncio.AbstractEventLoop) -> AsyncGenerator[None, None]:
        """Holds `loop`'s session until the generator is closed: by `close`, or by the loop's shutdown
        (asyncio.run closes every async generator begun on its loop while the loop still runs, which is
        when an HTTP session can still be closed)."""
        # limit=0: no cap on connections; a rollout sends all its requests at once. Idle connections are kept
        # KEEPALIVE_S (aiohttp's default is 15 s), so the next rollout after a long train step finds them open:
        # opening 192 more took a 256-request rollout 0.3 s on an H200 (bench/engine/README.md).
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
        session = self._sessions[loop] = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s), connector=connector
        )
        try:
            yield
        finally:
            self._sessions.pop(loop, None)
            self._lifetimes.pop(loop, None)
            await session.close()

    async def close(self) -> None:
        """Close the running loop's session (the next call on this loop opens a new one)."""
        lifetime = self._lifetimes.get(asyncio.get_running_loop())
        if lifetime is not None:
            await lifetime.aclose()

    async def _request(self, method: str, route: str, payload: dict[str, Any] | None = None) -> Any:
        session = await self._get_session()
        async with session.request(method, self.base_url + route, json=payload) as response:
            text = await response.text()
            body = _parse_body(text)
            if response.status != 200:
                raise EngineError(route, response.status, body)
            if isinstance(body, dict) and body.get("success") is False:
                raise EngineError(route, response.status, body)
            return body

    # ---- rollout ----------------------------------------------------------------------------

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST /generate with an SGLang payload; the answer as SGLang gives it."""
        return await self._request("POST", "/generate", payload)

    async def abort(self, rid: str | None = None) -> None:
        """Abort one request by `rid`, or every request when `rid` is None."""
        payload = {"rid": rid} if rid is not None else {"abort_all": True}
        await self._request("POST", "/abort_request", payload)

    async def is_healthy(self) -> bool:
        """GET /health_generate (a one-token generation); when that fails, GET /ping, which SGLang
        answers 200 while it is paused or updating weights on purpose (its own rule for not
        replacing an instance during a weight sync). False on connection errors or timeouts."""
        if await self._status_is_200("/health_generate"):
            return True
        return await self._status_is_200("/ping")

    async def _status_is_200(self, route: str) -> bool:
        try:
            session = await self._get_session()
            timeout = aiohttp.ClientTimeout(total=self.health_timeout_s)
            async with session.get(self.base_url + route, timeout=timeout) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    # ---- control ----------------------------------------------------------------------------

    async def flush_cache(self) -> None:
        await self._request("POST", "/flush_cache")

    async def get_model_info(self) -> dict[str, Any]:
        """GET /model_info (SGLang 0.5.23 deprecates /get_model_info)."""
        return await self._request("GET", "/model_info")

    async def get_server_info(self) -> dict[str, Any]:
        """GET /server_info: the resolved server arguments (tp_size, dtype, ...) plus live state."""
        return await self._request("GET", "/server_info")

    async def pause_generation(self, mode: str = "abort") -> Any:
        """Hold the scheduler. SGLang's modes: "abort" (default) returns running requests aborted,
        "in_place"/"retract" keep them and resume on `continue_generation`."""
        return await self._request("POST", "/pause_generation", {"mode": mode})

    async def continue_generation(self) -> Any:
        return await self._request("POST", "/continue_generation", {})

    # ---- weights ----------------------------------------------------------------------------

    async def update_weights_from_disk(
        self, model_path: str, *, weight_version: str | None = None, load_format: str | None = None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"model_path": model_path}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        if load_format is not None:
            payload["load_format"] = load_format
        return await self._request("POST", "/update_weights_from_disk", payload)

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> dict[str, Any]:
        payload = {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": rank_offset,
            "world_size": world_size,
            "group_name": group_name,
            "backend": backend,
        }
        return await self._request("POST", "/init_weights_update_group", payload)

    async def destroy_weights_update_group(self, group_name: str) -> dict[str, Any]:
        return await self._request("POST", "/destroy_weights_update_group", {"group_name": group_name})

    async def begin_weight_update(self) -> dict[str, Any]:
        """Open a weight-update session; SGLang refuses /update_weights_from_distributed and
        /update_weights_from_tensor outside one."""
        return await self._request("POST", "/begin_weight_update", {})

    async def end_weight_update(self) -> dict[str, Any]:
        return await self._request("POST", "/end_weight_update", {})

    async def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        *,
        weight_version: str | None = None,
        flush_cache: bool = True,
        load_format: str | None = None,
    ) -> dict[str, Any]:
        """Receive one broadcast (inside a session). `load_format="flattened_bucket"`: the tensors
        arrive as one uint8 broadcast, back to back in the announced order."""
        payload: dict[str, Any] = {
            "names": names,
            "dtypes": dtypes,
            "shapes": shapes,
            "group_name": group_name,
            "flush_cache": flush_cache,
        }
        if weight_version is not None:
            payload["weight_version"] = weight_version
        if load_format is not None:
            payload["load_format"] = load_format
        return await self._request("POST", "/update_weights_from_distributed", payload)

    async def update_weights_from_tensor(
        self,
        serialized_named_tensors: list[str],
        *,
        load_format: str | None = None,
        flush_cache: bool = True,
        weight_version: str | None = None,
    ) -> dict[str, Any]:
        """Colocated update (inside a session): one base64 entry per engine TP rank (see
        `rl_sglang.tensor_handoff`). The caller keeps the tensors alive until this returns."""
        payload: dict[str, Any] = {
            "serialized_named_tensors": list(serialized_named_tensors),
            "load_format": load_format,
            "flush_cache": flush_cache,
        }
        if weight_version is not None:
            payload["weight_version"] = weight_version
        return await self._request("POST", "/update_weights_from_tensor", payload)

    async def update_weight_version(self, new_version: str, *, abort_all_requests: bool = False) -> dict[str, Any]:
        """Set the version /generate reports (after an adapter load, which carries none); SGLang aborts every
        request by default, the trainer's syncs run between rollouts and pass False."""
        return await self._request(
            "POST", "/update_weight_version", {"new_version": new_version, "abort_all_requests": abort_all_requests}
        )

    # ---- LoRA (needs --enable-lora / --max-lora-rank on the server) ---------------------------

    async def load_lora_adapter(self, lora_name: str, lora_path: str, *, pinned: bool = False) -> dict[str, Any]:
        """Load a PEFT adapter folder; requests then name it in /generate's `lora_path`."""
        return await self._request(
            "POST", "/load_lora_adapter", {"lora_name": lora_name, "lora_path": lora_path, "pinned": pinned}
        )

    async def unload_lora_adapter(self, lora_name: str) -> dict[str, Any]:
        return await self._request("POST", "/unload_lora_adapter", {"lora_name": lora_name})

    async def load_lora_adapter_from_tensors(
        self,
        lora_name: str,
        config_dict: dict[str, Any],
        serialized_named_tensors: list[str],
        *,
        load_format: str | None = None,
        pinned: bool = False,
    ) -> dict[str, Any]:
        """Load an adapter from tensors (one serialized entry per TP rank, as for weights);
        `config_dict` is the PEFT adapter_config.json."""
        payload: dict[str, Any] = {
            "lora_name": lora_name,
            "config_dict": config_dict,
            "serialized_named_tensors": list(serialized_named_tensors),
            "pinned": pinned,
        }
        if load_format is not None:
            payload["load_format"] = load_format
        return await self._request("POST", "/load_lora_adapter_from_tensors", payload)

    # ---- memory -------------------------------------------------------------------------------

    async def release_memory_occupation(self, tags: list[str] | None = None) -> Any:
        return await self._request("POST", "/release_memory_occupation", _tags_payload(tags))

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> Any:
        return await self._request("POST", "/resume_memory_occupation", _tags_payload(tags))


def _tags_payload(tags: list[str] | None) -> dict[str, Any]:
    return {} if tags is None else {"tags": list(tags)}


def _parse_body(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text
