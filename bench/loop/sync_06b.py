"""Colocated weight sync of a Qwen3-0.6B-shaped model through rl-train's own code path: an FSDP trainer
(bf16 compute, float32 master weights) hands its weights to an embedded engine process on the same GPU with
`TensorWeightTransport` (CUDA-IPC handles, /update_weights_from_tensor, inside a weight-update session), call
to the engine answering that it serves the new version. Each sync is split into the trainer-side gather
(`backend.weights()` materialised) and the transport's update of the gathered list.

    PYTHONPATH=packages/rl-core/src:packages/rl-fsdp/src:packages/rl-sglang/src:bench/train python3 bench/loop/sync_06b.py
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from bench_lora import start_engine
from bench_megatron import qwen3_06b_shape

from rl_fsdp import FSDPConfig, build_backend
from rl_sglang.weight_sync import TensorWeightTransport


def seconds(call) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--syncs", type=int, default=5)
    args = parser.parse_args()
    model_dir = tempfile.mkdtemp(prefix="sync-06b-")
    qwen3_06b_shape().save_pretrained(model_dir)
    backend = build_backend(FSDPConfig(model_path=model_dir, device="cuda", param_dtype="bfloat16", torch_compile=False))
    backend.save_pretrained(model_dir)  # the engine starts from the trainer's weights
    engine = start_engine(model_dir, "cuda")
    transport = TensorWeightTransport([engine.url])
    spans = time_engine_calls(transport)
    try:
        for i in range(args.syncs):
            total = seconds(lambda: transport.update(backend.weights(), f"w{i}"))
            named: list = []
            gather = seconds(lambda: named.extend(backend.weights()))
            spans.clear()
            update = seconds(lambda: transport.update(named, f"v{i}"))
            calls = ", ".join(f"{name} {ms:.1f}" for name, ms in spans)
            print(f"sync {i}: total {total * 1e3:.1f} ms, gather {gather * 1e3:.1f} ms, update(given list) {update * 1e3:.1f} ms"
                  f" [{calls}]", flush=True)
        print("engine side:", *[line for line in engine.stderr_tail(20000).splitlines() if "weights updated" in line][-6:], sep="\n  ")
    finally:
        transport.close()
        engine.terminate()
        backend.close()


def time_engine_calls(transport: TensorWeightTransport) -> list[tuple[str, float]]:
    """(call, ms) of each engine call and bucket preparation the transport makes, in order, appended as they end."""
    spans: list[tuple[str, float]] = []

    def timed(name, call, is_async):
        async def async_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return await call(*args, **kwargs)
            finally:
                spans.append((name, (time.perf_counter() - start) * 1e3))

        def sync_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                spans.append((name, (time.perf_counter() - start) * 1e3))

        return async_call if is_async else sync_call

    client = transport._clients[0]
    for name in ("begin_weight_update", "update_weights_from_tensor", "end_weight_update"):
        setattr(client, name, timed(name.split("_")[0] if name != "update_weights_from_tensor" else "bucket", getattr(client, name), True))
    transport._prepare_bucket = timed("prepare", transport._prepare_bucket, False)  # type: ignore[method-assign]
    return spans


if __name__ == "__main__":
    main()
