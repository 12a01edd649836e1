"""Where a decode step's time goes in the embedded engine (one GPU): the CUDA-graph replay of the
forward, the sampler, and `ModelRunner.decode` end to end (host bookkeeping included), per batch
size, at a context of CONTEXT tokens; beside the roofline (weights + KV read at the measured copy
bandwidth). Qwen3-0.6B-shaped random model, bf16.

    python bench/engine/profile_decode.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from bench_rollout import qwen3_0p6b_config  # noqa: E402

from rl_sglang.embedded.model_runner import ModelRunner  # noqa: E402
from rl_sglang.embedded.options import EngineOptions  # noqa: E402
from rl_sglang.embedded.sampling import SamplingBatch, SamplingParams, sample  # noqa: E402

CONTEXT = 256


def timed(fn, repeat: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def main() -> None:
    with tempfile.TemporaryDirectory() as model_dir:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(qwen3_0p6b_config(), dtype=torch.bfloat16).save_pretrained(model_dir)
        runner = ModelRunner(model_dir, device="cuda", dtype="bfloat16", max_running_requests=1024,
                             options=EngineOptions(cuda_graph_max_bs=1024, max_total_tokens=1024 * (CONTEXT + 8)))
    x = torch.empty(1 << 28, device="cuda")
    copy_bw = 2 * x.numel() * 4 / (timed(lambda: x.clone(), 10) / 1e3)
    del x
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    report = {"copy_TB_s": round(copy_bw / 1e12, 2), "graphs": runner.graphs is not None, "rows": []}
    for bs in (64, 256, 512, 1024):
        pool = runner.pool
        rows = list(range(1, bs + 1))
        slots = pool.allocator.alloc(bs * CONTEXT).view(bs, CONTEXT)
        for i, r in enumerate(rows):
            pool.req_to_token[r, :CONTEXT] = slots[i].cuda().int()
        positions = [CONTEXT - 1] * bs
        new = slots[:, -1].contiguous()
        params = [SamplingParams(temperature=1.0)] * bs
        host = torch.cat([torch.zeros(1, bs, dtype=torch.int64), torch.tensor([positions, rows]), new.view(1, -1)])
        with torch.inference_mode():
            forward_ms = timed(lambda: runner.graphs.replay(host)) if runner.graphs else float("nan")
            logits = runner._decode_logits(rows, positions, [0] * bs, new)
            sample_ms = timed(lambda: sample(logits, SamplingBatch(params, runner.device), runner.generator))
        step_ms = timed(lambda: runner.decode(rows, positions, [0] * bs, new, params))
        kv = bs * CONTEXT * runner.layout.bytes_per_token
        report["rows"].append({
            "batch": bs, "graph_forward_ms": round(forward_ms, 2), "sample_ms": round(sample_ms, 2),
            "decode_call_ms": round(step_ms, 2), "tok_s": round(bs / step_ms * 1e3),
            "roofline_ms": round((weights + kv) / copy_bw * 1e3, 2),
        })  # fmt: skip
        pool.allocator.free(slots.reshape(-1))
        print(json.dumps(report["rows"][-1]), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
