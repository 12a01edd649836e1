"""The embedded engine's settings beyond the model path, under SGLang's flag names (the launcher
maps rl-train's `--sglang-X` to `--X`). Each one changes what the engine does; see `FLAG_HELP`."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class EngineOptions:
    """SGLang's defaults, except the overlapped decode schedule: on by default on a CPU only, where host work is
    most of a step. On an H200 a rollout of 256 requests measures the same either way (33.5-33.9k new tok/s
    overlapped, 31.7-34.3k serial, bench/engine/README.md): the event loop's work then competes with the model
    thread for the GIL, which costs about what the overlap saves."""

    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None
    context_length: int | None = None
    chunked_prefill_size: int = 8192
    cuda_graph_max_bs: int | None = None
    disable_cuda_graph: bool = False
    disable_radix_cache: bool = False
    enable_torch_compile: bool = False
    torch_compile_max_bs: int | None = None
    disable_overlap_schedule: bool = False
    enable_overlap_schedule: bool = False

    def overlap_schedule(self, device_type: str) -> bool:
        """Whether decode steps overlap their results' processing on this device."""
        if self.disable_overlap_schedule:
            return False
        return self.enable_overlap_schedule or device_type != "cuda"

    def __post_init__(self) -> None:
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}")
        for name in ("max_total_tokens", "context_length", "cuda_graph_max_bs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.torch_compile_max_bs is not None:
            if not self.enable_torch_compile:
                raise ValueError(f"--torch-compile-max-bs {self.torch_compile_max_bs} has no effect without --enable-torch-compile")
            if self.torch_compile_max_bs < 2:
                raise ValueError(
                    f"--torch-compile-max-bs must be >= 2, got {self.torch_compile_max_bs} (a batch of one decodes with the eager layers)"
                )
        if self.disable_overlap_schedule and self.enable_overlap_schedule:
            raise ValueError("--disable-overlap-schedule and --enable-overlap-schedule contradict each other; give one")
        if self.chunked_prefill_size < 1:
            raise ValueError(f"--chunked-prefill-size must be >= 1, got {self.chunked_prefill_size}")


FLAG_HELP = {
    "mem_fraction_static": "CUDA: fraction of GPU memory for weights + KV pool (default 0.85); the rest is for activations and CUDA graphs",
    "max_total_tokens": "cap on the KV pool's token slots (on CPU: its size; default 64k tokens or 2 GiB)",
    "context_length": "longest prompt + output (default: the model's max_position_embeddings)",
    "chunked_prefill_size": "most prompt tokens prefilled in one step; longer prompts are prefilled in chunks",
    "cuda_graph_max_bs": "largest decode batch captured in a CUDA graph (default: min(max_running_requests, 512))",
    "disable_cuda_graph": "decode eagerly instead of under captured CUDA graphs",
    "disable_radix_cache": "no prefix cache: every request prefills its whole prompt",
    "enable_torch_compile": "torch.compile the decoder layers for decode steps of 2..--torch-compile-max-bs requests (compiled at start, before the CUDA graphs)",
    "torch_compile_max_bs": "largest decode batch run through the compiled layers (default 32, SGLang's); larger ones run the eager layers",
    "disable_overlap_schedule": "run each decode step after the last one's results are processed, not while they are (the default on CUDA)",
    "enable_overlap_schedule": "embedded engine only: overlap decode steps with their results' processing on CUDA too (the CPU default;"
    " on an H200 it measures the same as serial, bench/engine/README.md)",
}
assert set(FLAG_HELP) == {f.name for f in fields(EngineOptions)}
