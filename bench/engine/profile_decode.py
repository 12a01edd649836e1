"""Where a decode step's time goes in the embedded engine (one GPU): the CUDA-graph replay of the
forward, the sampler, and `ModelRunner.decode` end to end (host bookkeeping included), per batch
size, at a context of CONTEXT tokens; beside the roofline (weights + KV read at the measured copy
bandwidth). Qwen3-0.6B-shaped random model, bf16.

    python bench/engine/profile_decode.py             # the engine as configured by default
    python bench/engine/profile_decode.py --compare   # baseline (PyTorch sampler, eager layers),
                                                      # fused sampler, compiled layers + fused sampler

`--compare` runs the three variants in one process: the first two on one engine (the sampler is
switched per run), the third on an engine started with --enable-torch-compile (compile time printed),
after the first engine is closed.
"""

from __future__ import annotations

import argparse
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


def start_runner(model_dir: str, batches: list[int], compile_max_bs: int | None) -> ModelRunner:
    most = max(batches)
    options = EngineOptions(
        cuda_graph_max_bs=most, max_total_tokens=most * (CONTEXT + 8),
        enable_torch_compile=compile_max_bs is not None, torch_compile_max_bs=compile_max_bs,
    )  # fmt: skip
    return ModelRunner(model_dir, device="cuda", dtype="bfloat16", max_running_requests=most, options=options)


def profile(runner: ModelRunner, variant: str, batches: list[int], fused_sampling: bool) -> list[dict]:
    runner.fused_sampling = fused_sampling
    x = torch.empty(1 << 28, device="cuda")
    copy_bw = 2 * x.numel() * 4 / (timed(lambda: x.clone(), 10) / 1e3)
    del x
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    rows_out = []
    for bs in batches:
        pool = runner.pool
        assert pool is not None
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
            batch = SamplingBatch(params, runner.device)
            sample_ms = timed(lambda: sample(logits, batch, runner.generator, fused_sampling))
        step_ms = timed(lambda: runner.decode(rows, positions, [0] * bs, new, params, batch_key=("profile", bs)))
        kv = bs * CONTEXT * runner.layout.bytes_per_token
        rows_out.append({
            "variant": variant, "batch": bs, "graph_forward_ms": round(forward_ms, 2), "sample_ms": round(sample_ms, 3),
            "decode_call_ms": round(step_ms, 2), "tok_s": round(bs / step_ms * 1e3),
            "roofline_ms": round((weights + kv) / copy_bw * 1e3, 2),
        })  # fmt: skip
        pool.allocator.free(slots.reshape(-1))
        print(json.dumps(rows_out[-1]), flush=True)
    return rows_out


def sweep_sampler(batches: list[int], vocab: int) -> list[dict]:
    """The fused sampler alone at other tile sizes and warp counts (temperature 1), to tune its defaults."""
    from rl_sglang.embedded.fused_sampling import fused_sample

    generator = torch.Generator("cuda").manual_seed(0)
    out = []
    for bs in batches:
        logits = torch.randn(bs, vocab, device="cuda").to(torch.bfloat16)
        temps, sampled = torch.ones(bs, device="cuda"), torch.ones(bs, dtype=torch.bool, device="cuda")
        timings = {
            f"chunk{chunk}_warps{warps}": round(timed(lambda: fused_sample(logits, temps, sampled, generator, chunk, warps)), 3)
            for chunk in (256, 512, 1024) for warps in (4, 8, 16)
        }  # fmt: skip
        out.append({"batch": bs, "fused_sample_ms": timings})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 512, 1024])
    parser.add_argument("--compare", action="store_true", help="baseline, fused sampler, compiled layers + fused sampler")
    parser.add_argument("--torch-compile-max-bs", type=int, default=None, help="--compare: default the largest batch")
    args = parser.parse_args()
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    with tempfile.TemporaryDirectory() as model_dir:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(qwen3_0p6b_config(), dtype=torch.bfloat16).save_pretrained(model_dir)
        runner = start_runner(model_dir, args.batches, None)
        report["graphs"] = runner.graphs is not None
        if not args.compare:
            report["rows"] = profile(runner, "default", args.batches, fused_sampling=True)
        else:
            report["rows"] += profile(runner, "baseline", args.batches, fused_sampling=False)
            report["rows"] += profile(runner, "fused_sampler", args.batches, fused_sampling=True)
            report["sampler_sweep"] = sweep_sampler(args.batches, runner.vocab_size)
            runner.close()
            del runner
            torch.cuda.empty_cache()
            compile_max_bs = args.torch_compile_max_bs or max(args.batches)
            runner = start_runner(model_dir, args.batches, compile_max_bs)
            report["compile_s"] = round(runner.compile_seconds or float("nan"), 1)
            report["torch_compile_max_bs"] = compile_max_bs
            report["rows"] += profile(runner, "compiled+fused_sampler", args.batches, fused_sampling=True)
    print(json.dumps(report, indent=1))
    if args.compare:
        print(f"{'batch':>6} {'variant':>24} {'forward ms':>11} {'sample ms':>10} {'decode ms':>10} {'tok/s':>8}")
        for row in sorted(report["rows"], key=lambda r: r["batch"]):
            print(f"{row['batch']:>6} {row['variant']:>24} {row['graph_forward_ms']:>11} {row['sample_ms']:>10} "
                  f"{row['decode_call_ms']:>10} {row['tok_s']:>8}")  # fmt: skip


if __name__ == "__main__":
    main()
