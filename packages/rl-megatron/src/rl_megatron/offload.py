"""Giving the accelerator's memory to a colocated engine between steps, and taking it back.

Megatron's DDP keeps parameters and gradients as views into flat buffers, and the optimizer keeps views
too, so tensors are not moved: each underlying storage is copied to host memory and resized to zero bytes,
then resized back and refilled. Every view stays valid, and nothing has to be re-pointed.
"""

from __future__ import annotations

from typing import Iterable

import torch


def _storages(tensors: Iterable[torch.Tensor]) -> list[torch.UntypedStorage]:
    seen: dict[int, torch.UntypedStorage] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = storage
    return list(seen.values())


def _bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class Offloader:
    """Host copies of a set of device storages, which are emptied while offloaded."""

    def __init__(self) -> None:
        self._held: list[tuple[torch.UntypedStorage, torch.Tensor]] = []

    @property
    def offloaded(self) -> bool:
        return bool(self._held)

    def offload(self, tensors: Iterable[torch.Tensor]) -> None:
        if self._held:
            return
        for storage in _storages(tensors):
            pin = storage.device.type == "cuda"
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pin).copy_(_bytes(storage))
            self._held.append((storage, host))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        for storage, _ in self._held:
            storage.resize_(0)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def onload(self) -> None:
        for storage, host in self._held:
            storage.resize_(host.numel())
            _bytes(storage).copy_(host, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._held = []


def training_tensors(model, optimizer, *extra_models) -> list[torch.Tensor]:
    """Parameters and gradient buffers of the DDP model, the optimizer's master weights and state, and
    the parameters of `extra_models` (the reference model)."""
    tensors: list[torch.Tensor] = []
    for buffer in [*getattr(model, "buffers", []), *getattr(model, "expert_parallel_buffers", [])]:
        for name in ("param_data", "grad_data"):
            if getattr(buffer, name, None) is not None:
                tensors.append(getattr(buffer, name))
    for net in (model, *extra_models):
        if net is not None:
            tensors.extend(p.data for p in net.parameters())
            tensors.extend(p.main_grad for p in net.parameters() if getattr(p, "main_grad", None) is not None)
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            tensors.extend(group["params"])
        for state in inner.state.values():
            tensors.extend(v for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return tensors
