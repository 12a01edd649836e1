"""Disaggregated weight sync (issue 15, item 1): an FSDP trainer on GPU 0 (this process; bf16 compute, float32
master weights) and an embedded engine process on GPU 1, weights sent by NCCL broadcast through rl-train's own
code path: `backend.weights()` into `BroadcastWeightTransport(urls, address, backend="nccl")`, as the trainer
actor's `update_weights` does with --update-weight-transport broadcast (engines join through
/init_weights_update_group; buckets through /update_weights_from_distributed inside a weight-update session).

Per sync (median of --syncs after one warm-up that also builds the group): call -> update() returned, and call ->
a /generate answer that reports the new weight version (the engine serving it). The baseline, in the same run
once trainer and engine are gone: a plain `torch.distributed.broadcast` between two processes on the same two
GPUs of the same bytes (what the transport sends: each storage once, in the engine's dtype) in the transport's
bucket sizes. Target: the transport's bandwidth within 2x of the plain broadcast's.

    python3 bench/multigpu/sync_broadcast.py --out OUT/sync_broadcast.json          # 2 GPUs, Qwen3-0.6B shape
    uv run --frozen python bench/multigpu/sync_broadcast.py --tiny --device cpu     # CPU check (gloo)
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
from bench_lora import synchronize, tiny_shape  # type: ignore[import-not-found]  # noqa: E402
from bench_megatron import qwen3_06b_shape  # type: ignore[import-not-found]  # noqa: E402

NCCL_SAFETY = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def served_version(url: str) -> str:
    payload = json.dumps({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}).encode()
    request = urllib.request.Request(url + "/generate", payload, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())["meta_info"]["weight_version"]


def sent_bucket_bytes(named: list, dtype: torch.dtype, bucket_bytes: int) -> list[int]:
    """The byte sizes of the buckets the transport sends (its own helpers: each storage once, in `dtype`)."""
    from rl_sglang.weight_sync.common import _buckets, _in_dtype, _once_per_storage

    buckets = _buckets(_in_dtype(_once_per_storage(iter(named)), dtype), bucket_bytes, split_on_dtype=False)
    return [sum(t.numel() * t.element_size() for _, t in bucket) for bucket in buckets]


def plain_rank(rank: int, port: int, device: str, buckets: list[int], repeats: int, results) -> None:
    """One rank of the baseline: the same bucket sizes broadcast from rank 0 as flat uint8 tensors."""
    os.environ.update(NCCL_SAFETY)
    backend = "nccl" if device == "cuda" else "gloo"
    on = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(on)
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=120))
    tensors = [torch.full((n,), rank, dtype=torch.uint8, device=on) for n in buckets]
    times = []
    for i in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        for tensor in tensors:
            torch.distributed.broadcast(tensor, src=0)
        synchronize(device)
        if i > 0:
            times.append(time.perf_counter() - start)
    ok = all(bool((t == 0).all()) for t in tensors)
    torch.distributed.destroy_process_group()
    results.put((rank, statistics.median(times), ok))


def plain_broadcast(device: str, buckets: list[int], repeats: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=plain_rank, args=(r, port, device, buckets, repeats, results)) for r in range(2)]
    for proc in procs:
        proc.start()
    answers = {}
    for _ in procs:
        rank, seconds, ok = results.get(timeout=300)
        answers[rank] = (seconds, ok)
    for proc in procs:
        proc.join(timeout=30)
    seconds = max(s for s, _ in answers.values())
    return {"seconds": seconds, "received_ok": all(ok for _, ok in answers.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (a CPU check)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--syncs", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        parser.error(f"--device cuda: {torch.cuda.device_count()} GPU(s) visible; trainer and engine need one each")
    os.environ.update(NCCL_SAFETY)  # and so in the engine process, which inherits this environment

    from rl_fsdp import FSDPConfig, build_backend
    from rl_sglang.launcher import launch_engine
    from rl_sglang.weight_sync import BroadcastWeightTransport
    from rl_sglang.weight_sync.common import DEFAULT_BUCKET_BYTES

    cuda = args.device == "cuda"
    model_dir = tempfile.mkdtemp(prefix="sync-broadcast-")
    (tiny_shape() if args.tiny else qwen3_06b_shape()).save_pretrained(model_dir)
    if cuda:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0,1")
        torch.cuda.set_device(0)
    backend = build_backend(FSDPConfig(model_path=model_dir, device=args.device, param_dtype="bfloat16" if cuda else "float32",
                                       torch_compile=False))
    backend.save_pretrained(model_dir)  # the engine starts from the trainer's weights
    engine_dtype = torch.bfloat16 if cuda else torch.float32
    engine_env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ["CUDA_VISIBLE_DEVICES"].split(",")[1]} if cuda else None
    engine_args = {"device": args.device, "dtype": str(engine_dtype).removeprefix("torch."), "max_running_requests": 4}
    engine_args.update({"mem_fraction_static": 0.5} if cuda else {"max_total_tokens": 4096})
    engine = launch_engine("embedded", model_dir, sglang_args=engine_args, env=engine_env)
    result: dict = {"shape": "tiny" if args.tiny else "qwen3-0.6b", "device": args.device,
                    "gpus": [torch.cuda.get_device_name(i) for i in range(2)] if cuda else None}
    try:
        engine.wait_until_healthy(600)
        transport = BroadcastWeightTransport([engine.url], "127.0.0.1", backend="nccl" if cuda else "gloo")
        named = list(backend.weights())
        buckets = sent_bucket_bytes(named, engine_dtype, DEFAULT_BUCKET_BYTES)
        result.update(tensors=len(named), bytes_sent=sum(buckets), buckets=len(buckets))
        to_update, to_serving, gather = [], [], []
        for i in range(args.syncs + 1):
            version = f"v{i}"
            synchronize(args.device)
            start = time.perf_counter()
            transport.update(backend.weights(), version)  # what TrainerActor.update_weights does
            updated = time.perf_counter() - start
            answered = served_version(engine.url)
            serving = time.perf_counter() - start
            if answered != version:
                raise RuntimeError(f"sync {i}: the engine answered with weight version {answered!r}, not {version!r}")
            synchronize(args.device)
            start = time.perf_counter()
            materialised = [t for _, t in backend.weights()]
            synchronize(args.device)
            gather.append(time.perf_counter() - start)
            del materialised
            if i > 0:  # the first sync also builds the NCCL group
                to_update.append(updated)
                to_serving.append(serving)
            print(f"sync {i}: update {updated * 1e3:.1f} ms, call->serving {serving * 1e3:.1f} ms", flush=True)
        transport.close()
    finally:
        engine.terminate()
        backend.close()
    del backend, named
    if cuda:
        torch.cuda.empty_cache()
    median_update, median_gather = statistics.median(to_update), statistics.median(gather)
    result.update(median_update_s=median_update, median_call_to_serving_s=statistics.median(to_serving),
                  median_gather_s=median_gather, syncs=args.syncs)
    result["transport_GBps"] = result["bytes_sent"] / max(median_update - median_gather, 1e-9) / 1e9  # the wire part
    result["transport_GBps_incl_gather"] = result["bytes_sent"] / median_update / 1e9
    plain = plain_broadcast(args.device, buckets, args.syncs)
    result["plain_broadcast"] = {**plain, "GBps": result["bytes_sent"] / plain["seconds"] / 1e9}
    result["plain_over_transport"] = result["plain_broadcast"]["GBps"] / result["transport_GBps_incl_gather"]
    result["within_2x"] = result["plain_over_transport"] <= 2.0
    print(json.dumps(result, indent=2), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
