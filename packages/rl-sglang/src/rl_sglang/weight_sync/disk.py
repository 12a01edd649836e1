"""`DiskWeightTransport`: weights through safetensors files and /update_weights_from_disk."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import torch
from safetensors.torch import save_file

from rl_sglang.client import SGLangClient
from rl_sglang.weight_sync.adapter import replace_adapter, write_adapter_folder
from rl_sglang.weight_sync.common import (
    DEFAULT_BUCKET_BYTES,
    _BackgroundLoop,
    _buckets,
    _close_all,
    _gather_raising,
    _on_all,
)

logger = logging.getLogger(__name__)


class DiskWeightTransport:
    """Writes each version as safetensors shards (HF layout with an index) into a fresh subfolder of
    `directory`, has every engine load it via /update_weights_from_disk, then deletes the versions
    this transport wrote before.

    `skip_unreachable`: an engine whose connection drops during the update (it died) is skipped rather than
    failing the sync; the engine's supervisor restarts it from the newest complete version on disk, which
    is this one (rl-train's --use-fault-tolerance)."""

    def __init__(
        self,
        engine_urls: list[str],
        directory: str | Path,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_s: float = 600,
        skip_unreachable: bool = False,
    ):
        if not engine_urls:
            raise ValueError("engine_urls is empty")
        self.skip_unreachable = skip_unreachable
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.bucket_bytes = bucket_bytes
        self._loop = _BackgroundLoop()
        self._clients = [SGLangClient(url, timeout_s=timeout_s) for url in engine_urls]
        self._written: list[Path] = []
        self._adapters_loaded: set[str] = set()

    def _fresh_folder(self, weight_version: str) -> Path:
        stem = "weights_" + (re.sub(r"[^A-Za-z0-9_.-]", "_", weight_version) or "unnamed")
        folder, suffix = self.directory / stem, 1
        while folder.exists():
            folder, suffix = self.directory / f"{stem}-{suffix}", suffix + 1
        folder.mkdir()
        return folder

    def write(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> Path:
        folder = self._fresh_folder(weight_version)
        shard_maps: list[list[str]] = []
        for index, bucket in enumerate(_buckets(named_tensors, self.bucket_bytes)):
            # clone: tied weights share storage, which safetensors refuses to write twice
            tensors = {name: t.to("cpu").contiguous().clone() for name, t in bucket}
            save_file(tensors, str(folder / f"shard-{index:05d}.safetensors"), metadata={"format": "pt"})
            shard_maps.append(list(tensors))
        total = len(shard_maps)
        weight_map = {}
        for index, names in enumerate(shard_maps):
            final = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
            (folder / f"shard-{index:05d}.safetensors").rename(folder / final)
            weight_map.update({name: final for name in names})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return folder

    def update(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> None:
        folder = self.write(named_tensors, weight_version)
        self._written.append(folder)
        self._loop.run(self._load_everywhere(folder, weight_version))
        # Older versions go only once every engine holds this one; a skipped engine reloads from disk.
        for old in self._written[:-1]:
            shutil.rmtree(old, ignore_errors=True)
        self._written = self._written[-1:]

    def update_adapter(self, lora_name: str, config: dict[str, Any], named_tensors: Iterable[tuple[str, torch.Tensor]],
                       weight_version: str) -> None:
        """Adapter-only sync: a PEFT adapter folder (config + LoRA tensors only) that every engine loads
        through /load_lora_adapter as `lora_name`, replacing the version this transport loaded before."""
        if self.skip_unreachable:
            raise ValueError("adapter-only sync does not skip unreachable engines: a restarted engine reloads full weights")
        folder = write_adapter_folder(self._fresh_folder(f"adapter_{weight_version}"), config, named_tensors)
        self._written.append(folder)

        async def load_everywhere() -> None:
            await _gather_raising([  # raises the first failure once all have answered
                replace_adapter(c, lora_name, functools.partial(c.load_lora_adapter, lora_name, str(folder)), weight_version,
                                loaded_before=lora_name in self._adapters_loaded)
                for c in self._clients
            ])

        self._loop.run(load_everywhere())
        self._adapters_loaded.add(lora_name)
        for old in self._written[:-1]:
            shutil.rmtree(old, ignore_errors=True)
        self._written = self._written[-1:]

    async def _load_everywhere(self, folder: Path, weight_version: str) -> None:
        if not self.skip_unreachable:
            await _on_all(self._clients, "update_weights_from_disk", str(folder), weight_version=weight_version)
            return
        results = await asyncio.gather(
            *(c.update_weights_from_disk(str(folder), weight_version=weight_version) for c in self._clients),
            return_exceptions=True,
        )
        for client, result in zip(self._clients, results):
            if isinstance(result, (aiohttp.ClientConnectionError, asyncio.TimeoutError)):
                logger.warning("engine %s unreachable during the weight update (%s); it reloads %s when it restarts",
                               client.base_url, type(result).__name__, folder.name)
            elif isinstance(result, BaseException):
                raise result

    def close(self) -> None:
        self._loop.run(_close_all(self._clients))
        self._loop.close()
