"""Rollout throughput of the embedded engine against HF `model.generate`, in one run on one GPU.

N concurrent requests x (PROMPT prompt + NEW new tokens, sampled at temperature 1, log-probs on) go
through `SGLangClient` to an embedded engine started by the launcher, as the rollout sends them;
the baseline is HF `generate` over the same prompts at batch 256 (dynamic cache, sampling, no
top-k/top-p), first pass and a second pass on warm shapes. A Qwen3-0.6B-shaped random model, bf16.

    python bench/engine/bench_rollout.py [--requests 64 256 1024] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from rl_sglang.client import SGLangClient
from rl_sglang.launcher import launch_engine

PROMPT, NEW = 128, 256


def qwen3_0p6b_config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        tie_word_embeddings=True, eos_token_id=151645, bos_token_id=151643,
    )  # fmt: skip


def prompts(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 151000, (count, PROMPT), generator=g).tolist()


def hf_generate(model, batch: list[list[int]]) -> float:
    ids = torch.tensor(batch, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0,
    )  # fmt: skip
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return (out.shape[1] - PROMPT) * len(batch) / elapsed


def logprob_gap(model_dir: str, answers: list[dict], batch: list[list[int]]) -> dict:
    """Served log-probs (temperature 1) against a plain HF forward over prompt + output, as the trainer
    recomputes them: in bf16 (the train/rollout gap) and in fp32."""
    report = {}
    sequences = torch.tensor([p + a["output_ids"] for p, a in zip(batch, answers)], device="cuda")
    served = torch.tensor([[e[0] for e in a["meta_info"]["output_token_logprobs"]] for a in answers], device="cuda")
    for dtype in (torch.bfloat16, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()
        with torch.no_grad():
            logits = model(sequences).logits[:, PROMPT - 1 : -1].float()
        recomputed = torch.log_softmax(logits, -1).gather(-1, sequences[:, PROMPT:, None]).squeeze(-1)
        gap = (served - recomputed).abs()
        report[f"vs_hf_{str(dtype).removeprefix('torch.')}"] = {"mean_abs": round(gap.mean().item(), 5), "max_abs": round(gap.max().item(), 4)}
        del model, logits
        torch.cuda.empty_cache()
    return report


async def engine_run(client: SGLangClient, batch: list[list[int]], *, one_payload: bool = False, keep: list | None = None) -> dict:
    params = {"temperature": 1.0, "max_new_tokens": NEW, "ignore_eos": True}
    start = time.perf_counter()
    if one_payload:
        answers = await client.generate({"input_ids": batch, "sampling_params": params, "return_logprob": True})
    else:
        answers = await asyncio.gather(
            *(client.generate({"input_ids": p, "sampling_params": params, "return_logprob": True}) for p in batch)
        )
    elapsed = time.perf_counter() - start
    if keep is not None:
        keep.extend(answers)
    new = sum(a["meta_info"]["completion_tokens"] for a in answers)
    assert all(len(a["meta_info"]["output_token_logprobs"]) == NEW for a in answers)
    return {"requests": len(batch), "seconds": round(elapsed, 3), "new_tok_s": round(new / elapsed)}


async def engine_bench(model_dir: str, counts: list[int], args) -> tuple[list[dict], str]:
    flags = {
        "device": "cuda", "dtype": "bfloat16", "max_running_requests": args.max_running_requests,
        "cuda_graph_max_bs": args.cuda_graph_max_bs, "mem_fraction_static": args.mem_fraction_static,
        "enable_torch_compile": args.enable_torch_compile, "torch_compile_max_bs": args.torch_compile_max_bs,
    }  # fmt: skip
    started = time.perf_counter()
    engine = launch_engine("embedded", model_dir, sglang_args=flags)
    results = []
    try:
        await asyncio.to_thread(engine.wait_until_healthy, 600)
        results.append({"engine_start_s": round(time.perf_counter() - started, 1)})
        client = SGLangClient(engine.url, timeout_s=900)
        try:
            await engine_run(client, prompts(16, seed=99))  # first prefill shapes, not counted
            kept: list[dict] = []
            for count in counts:
                results.append(await engine_run(client, prompts(count, seed=count), keep=kept if count == counts[0] else None))
            results.append({"logprob_gap_first_8": await asyncio.to_thread(logprob_gap, model_dir, kept[:8], prompts(counts[0], seed=counts[0])[:8])})
            results.append({"one_payload": True, **await engine_run(client, prompts(256, seed=256), one_payload=True)})
            shared = [p for p in prompts(64, seed=7) for _ in range(4)]  # 64 prompts x 4 samples
            results.append({"prompts_x_samples": "64x4", **await engine_run(client, shared)})
        finally:
            await client.close()
    finally:
        tail = engine.stderr_tail(6000)
        engine.terminate()
    return results, tail


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--max-running-requests", type=int, default=1024)
    parser.add_argument("--cuda-graph-max-bs", type=int, default=1024)
    parser.add_argument("--mem-fraction-static", type=float, default=0.85)
    parser.add_argument("--enable-torch-compile", action="store_true", help="the engine's compiled decoder layers")
    parser.add_argument("--torch-compile-max-bs", type=int, default=None, help="with --enable-torch-compile (engine default 32)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "enable_torch_compile": args.enable_torch_compile, "torch_compile_max_bs": args.torch_compile_max_bs}  # fmt: skip
    with tempfile.TemporaryDirectory() as model_dir:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(qwen3_0p6b_config(), dtype=torch.bfloat16).cuda().eval()
        model.save_pretrained(model_dir)
        if not args.skip_hf:
            batch = prompts(256, seed=256)
            report["hf_generate_256_first_pass_tok_s"] = round(hf_generate(model, batch))
            report["hf_generate_256_second_pass_tok_s"] = round(hf_generate(model, batch))
            print(json.dumps(report), flush=True)
        del model
        torch.cuda.empty_cache()
        report["engine"], tail = asyncio.run(engine_bench(model_dir, args.requests, args))
    print(json.dumps(report, indent=1), flush=True)
    print("---- engine stderr tail ----\n" + tail, flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
