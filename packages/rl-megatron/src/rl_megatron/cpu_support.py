"""What megatron-core needs to run on CPU ranks with gloo (tests, CI): its CUDA-only calls pointed at the CPU.

megatron-core allocates scratch tensors with `device="cuda"` (schedules, DDP buffers, optimizer, clip_grads),
asks `torch.cuda.current_device()`, waits on CUDA streams and checks `param.type() == "torch.cuda.FloatTensor"`.
None of these touch the maths; on a CPU backend they are redirected for the duration of each call into
megatron-core (`on_cpu()`), and nothing is changed on a CUDA backend.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.RLock()
_depth = 0
_saved: dict[str, Any] = {}


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Any tensor factory or `.to()`/`.cuda()` asked for a CUDA device gets the CPU instead (and no pinning)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.to and args[1:2] and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoEvent:
    """Stands in for a CUDA event: there is nothing to wait for."""

    def synchronize(self) -> None: ...

    def wait(self, *args: Any) -> None: ...


class _NoStream:
    """Stands in for a CUDA stream: CPU work is already in program order, so every stream is the same one
    (the MoE token dispatcher's side stream compares equal to the current stream)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NoStream)

    def __hash__(self) -> int:
        return 0

    def wait_stream(self, other: Any) -> None: ...

    def synchronize(self) -> None: ...

    def record_event(self, *args: Any) -> _NoEvent:
        return _NoEvent()


def _cuda_type(self: torch.Tensor, *args: Any, **kwargs: Any):
    reported = _saved["Tensor.type"](self, *args, **kwargs)
    if not args and not kwargs and isinstance(reported, str) and reported.startswith("torch.") and not reported.startswith("torch.cuda.") and self.device.type == "cpu":
        return reported.replace("torch.", "torch.cuda.", 1)
    return reported


_CUDA_STUBS = {
    "current_device": lambda: "cpu",
    "synchronize": lambda *a, **k: None,
    "empty_cache": lambda: None,
    "Stream": _NoStream,
    "stream": lambda *a, **k: contextlib.nullcontext(),
    "current_stream": lambda *a, **k: _NoStream(),
    "default_stream": lambda *a, **k: _NoStream(),
}


def _all_to_all_with_list_splits(*args: Any, **kwargs: Any):
    """The MoE token dispatcher turns its all-to-all split sizes into host arrays only when they sit on a
    GPU; on CPU they stay tensors, which the collective does not take. Hand them over as lists."""
    for key in ("output_split_sizes", "input_split_sizes"):
        if torch.is_tensor(kwargs.get(key)):
            kwargs[key] = kwargs[key].tolist()
    return _saved["all_to_all_single"](*args, **kwargs)


def _megatron_rng_stubs() -> dict[str, Any]:
    """Activation recompute saves and restores the CUDA RNG around each checkpointed block; on CPU only
    the CPU generator (which megatron-core saves and restores beside it) exists."""
    return {
        "_get_cuda_rng_state": lambda *a, **k: torch.get_rng_state(),
        "_set_cuda_rng_state": lambda *a, **k: None,
    }


@contextlib.contextmanager
def on_cpu(enabled: bool = True) -> Iterator[None]:
    """Redirect megatron-core's CUDA-only calls to the CPU inside the block (re-entrant; no-op if not enabled)."""
    global _depth
    if not enabled:
        yield
        return
    with _lock:
        if _depth == 0:
            for name, stub in _CUDA_STUBS.items():
                _saved[name] = getattr(torch.cuda, name)
                setattr(torch.cuda, name, stub)
            from megatron.core.tensor_parallel import random as megatron_random

            for name, stub in _megatron_rng_stubs().items():
                _saved["random." + name] = getattr(megatron_random, name)
                setattr(megatron_random, name, stub)
            _saved["Tensor.type"] = torch.Tensor.type
            torch.Tensor.type = _cuda_type  # type: ignore[method-assign, assignment]
            _saved["all_to_all_single"] = torch.distributed.all_to_all_single
            torch.distributed.all_to_all_single = _all_to_all_with_list_splits
        _depth += 1
    try:
        with _CudaToCpu():
            yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for name in _CUDA_STUBS:
                    setattr(torch.cuda, name, _saved.pop(name))
                torch.Tensor.type = _saved.pop("Tensor.type")  # type: ignore[method-assign]
                torch.distributed.all_to_all_single = _saved.pop("all_to_all_single")
                from megatron.core.tensor_parallel import random as megatron_random

                for name in _megatron_rng_stubs():
                    setattr(megatron_random, name, _saved.pop("random." + name))
