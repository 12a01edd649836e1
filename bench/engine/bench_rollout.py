"""Rollout throughput of the embedded engine against HF `model.generate`, in one run on one GPU.

N concurrent requests x (PROMPT prompt + NEW new tokens, sampled at temperature 1, log-probs on) go
through `SGLangClient` to an embedded engine started by the launcher, as the rollout sends them;
the baseline is HF `generate` over the same prompts at batch 256 (dynamic cache, sampling, no
top-k/top-p), first pass and a second pass on warm shapes. A Qwen3-0.6B-shaped random model, bf16.

Each engine run is split by the engine's cumulative counters (/server_info `internal_states`, read before
and after) and the client's clock (`time.monotonic`, shared with the engine process on one host) into:
decode / prefill steps, model (the model thread), sched (the scheduler's bookkeeping in those steps, of
which answer: building the answers), idle (waiting for requests), rest (the engine's event loop outside
steps: HTTP, admission, JSON), ramp (until the engine has the last request), and tail (from the engine
finishing its last request until the client has parsed that answer: serialising, sending, parsing), of which
client_gc is the client's own garbage collector.

    python bench/engine/bench_rollout.py [--requests 64 256 1024] [--out results.json]
    python bench/engine/bench_rollout.py --device cpu --tiny --requests 256 256   # the host side alone
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from rl_sglang.client import SGLangClient
from rl_sglang.launcher import launch_engine

PROMPT, NEW = 128, 256
TINY_VOCAB = 1024
SPLIT_COLUMNS = (
    "seconds", "new_tok_s", "decode_steps", "mean_batch", "prefill_steps", "model_s", "sched_s", "answer_s",
    "idle_s", "rest_s", "respond_s", "ramp_s", "tail_s", "client_gc_s",
)  # fmt: skip


def qwen3_0p6b_config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        tie_word_embeddings=True, eos_token_id=151645, bos_token_id=151643,
    )  # fmt: skip


def tiny_config() -> Qwen3Config:
    """Qwen3's layers at a size whose forward costs little on a CPU, so the host work per step shows."""
    return Qwen3Config(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=TINY_VOCAB - 1, bos_token_id=TINY_VOCAB - 2,
    )  # fmt: skip


def prompt_vocab(args) -> int:
    """Prompt tokens are drawn below this (clear of the special tokens at the top)."""
    return TINY_VOCAB - 2 if args.tiny else 151000


def prompts(count: int, seed: int, vocab: int = 151000) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, PROMPT), generator=g).tolist()


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


def logprob_gap(model_dir: str, answers: list[dict], batch: list[list[int]], device: str) -> dict:
    """Served log-probs (temperature 1) against a plain HF forward over prompt + output, as the trainer
    recomputes them: in bf16 (the train/rollout gap) and in fp32."""
    report = {}
    sequences = torch.tensor([p + a["output_ids"] for p, a in zip(batch, answers)], device=device)
    served = torch.tensor([[e[0] for e in a["meta_info"]["output_token_logprobs"]] for a in answers], device=device)
    for dtype in (torch.bfloat16, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        with torch.no_grad():
            logits = model(sequences).logits[:, PROMPT - 1 : -1].float()
        recomputed = torch.log_softmax(logits, -1).gather(-1, sequences[:, PROMPT:, None]).squeeze(-1)
        gap = (served - recomputed).abs()
        report[f"vs_hf_{str(dtype).removeprefix('torch.')}"] = {"mean_abs": round(gap.mean().item(), 5), "max_abs": round(gap.max().item(), 4)}
        del model, logits
        if device == "cuda":
            torch.cuda.empty_cache()
    return report


async def counters(client: SGLangClient) -> dict[str, float]:
    return (await client.get_server_info())["internal_states"][0]


def split(before: dict[str, float], after: dict[str, float], started: float, seconds: float, last_answer: float) -> dict:
    """Where one run's wall time went (see the module docstring); engine times are those between the snapshots."""
    d = {k: after[k] - before[k] for k in after}
    return {
        "decode_steps": int(d["decode_steps"]), "mean_batch": round(d["decode_rows"] / max(1.0, d["decode_steps"]), 1),
        "prefill_steps": int(d["prefill_steps"]), "prefill_tokens": int(d["prefill_tokens"]),
        "model_s": round(d["model_s"], 3), "sched_s": round(d["step_s"] - d["model_s"], 3),
        "answer_s": round(d["answer_s"], 3), "idle_s": round(d["idle_s"], 3),
        "rest_s": round(seconds - d["step_s"] - d["idle_s"], 3), "respond_s": round(d["respond_s"], 3),
        "ramp_s": round(after["last_submit_monotonic_s"] - started, 3),
        "tail_s": round(last_answer - after["last_finish_monotonic_s"], 3),
    }  # fmt: skip


class CollectorClock:
    """Seconds this process spends in the garbage collector while the clock is entered (client-side pauses)."""

    def __init__(self) -> None:
        self.seconds, self._since = 0.0, 0.0

    def _on_gc(self, phase: str, _info: dict) -> None:
        if phase == "start":
            self._since = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._since

    def __enter__(self) -> CollectorClock:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *_exc) -> None:
        gc.callbacks.remove(self._on_gc)


async def engine_run(
    client: SGLangClient, batch: list[list[int]], *, one_payload: bool = False, keep: list | None = None
) -> dict:
    params = {"temperature": 1.0, "max_new_tokens": NEW, "ignore_eos": True}
    arrivals: list[float] = []

    async def generate(payload: dict) -> dict:
        answer = await client.generate(payload)
        arrivals.append(time.monotonic())
        return answer

    before = await counters(client)
    started, start = time.monotonic(), time.perf_counter()
    with CollectorClock() as collector:
        if one_payload:
            answers = await generate({"input_ids": batch, "sampling_params": params, "return_logprob": True})
        else:
            answers = await asyncio.gather(
                *(generate({"input_ids": p, "sampling_params": params, "return_logprob": True}) for p in batch)
            )
    elapsed = time.perf_counter() - start
    after = await counters(client)
    if keep is not None:
        keep.extend(answers)
    new = sum(a["meta_info"]["completion_tokens"] for a in answers)
    assert all(len(a["meta_info"]["output_token_logprobs"]) == NEW for a in answers)
    row = {"requests": len(batch), "seconds": round(elapsed, 3), "new_tok_s": round(new / elapsed),
           "client_gc_s": round(collector.seconds, 3)}
    return {**row, **split(before, after, started, elapsed, max(arrivals))}


async def engine_bench(model_dir: str, counts: list[int], args, schedule: str) -> tuple[list[dict], str]:
    flags: dict = {"device": args.device, "max_running_requests": args.max_running_requests}
    if args.enable_torch_compile:
        flags["enable_torch_compile"] = True
        if args.torch_compile_max_bs is not None:
            flags["torch_compile_max_bs"] = args.torch_compile_max_bs
    if schedule == "serial" and args.device == "cpu":
        flags["disable_overlap_schedule"] = True
    if schedule == "overlap" and args.device == "cuda":
        flags["enable_overlap_schedule"] = True
    if args.device == "cuda":
        flags.update(dtype="bfloat16", cuda_graph_max_bs=args.cuda_graph_max_bs, mem_fraction_static=args.mem_fraction_static)
    else:  # the pool is sized by its token count on a CPU
        flags.update(dtype="float32", max_total_tokens=max(counts + [256]) * (PROMPT + NEW + 8))
    vocab = prompt_vocab(args)
    started = time.perf_counter()
    engine = launch_engine("embedded", model_dir, sglang_args=flags)
    results = []
    try:
        await asyncio.to_thread(engine.wait_until_healthy, 600)
        results.append({"engine_start_s": round(time.perf_counter() - started, 1)})
        client = SGLangClient(engine.url, timeout_s=900)
        try:
            await engine_run(client, prompts(16, seed=99, vocab=vocab))  # first prefill shapes, not counted
            kept: list[dict] = []
            for index, count in enumerate(counts):
                for run in range(args.passes):  # new prompts each pass: no prefix-cache hits
                    batch = prompts(count, seed=count + 100_000 * run, vocab=vocab)
                    row = {"pass": run + 1, **await engine_run(client, batch, keep=kept if index == run == 0 else None)}
                    results.append(row)
                    print(f"{schedule}: " + " ".join(f"{k}={row[k]}" for k in ("pass", "requests", *SPLIT_COLUMNS)), flush=True)
            first_8 = prompts(counts[0], seed=counts[0], vocab=vocab)[:8]
            results.append({"logprob_gap_first_8": await asyncio.to_thread(logprob_gap, model_dir, kept[:8], first_8, args.device)})
            if not args.skip_extras:
                results.append({"one_payload": True, **await engine_run(client, prompts(256, seed=256, vocab=vocab), one_payload=True)})
                shared = [p for p in prompts(64, seed=7, vocab=vocab) for _ in range(4)]  # 64 prompts x 4 samples
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
    parser.add_argument("--skip-hf", action="store_true", help="no HF generate baseline (always skipped on a CPU)")
    parser.add_argument("--skip-extras", action="store_true", help="no one-payload and 64x4 prefix-cache runs")
    parser.add_argument("--passes", type=int, default=2,
                        help="runs of each request count: the first opens the client's connections, the next find them open, "
                             "as a rollout manager's do after its first rollout")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--schedules", nargs="+", choices=["overlap", "serial"], default=["serial"],
                        help="one engine each: the serial decode schedule (the CUDA default), the overlapped one (the CPU default)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide Qwen3 with 1,024 tokens, not 0.6B-shaped")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.passes < 1:
        parser.error(f"--passes must be >= 1, got {args.passes}")
    on_gpu = args.device == "cuda"
    report: dict = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__, "tiny": args.tiny,
                    "enable_torch_compile": args.enable_torch_compile, "torch_compile_max_bs": args.torch_compile_max_bs}
    with tempfile.TemporaryDirectory() as model_dir:
        torch.manual_seed(0)
        config = tiny_config() if args.tiny else qwen3_0p6b_config()
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if on_gpu else torch.float32)
        model = model.to(args.device).eval()
        model.save_pretrained(model_dir)
        if on_gpu and not args.skip_hf:
            batch = prompts(256, seed=256, vocab=prompt_vocab(args))
            report["hf_generate_256_first_pass_tok_s"] = round(hf_generate(model, batch))
            report["hf_generate_256_second_pass_tok_s"] = round(hf_generate(model, batch))
            print(json.dumps(report), flush=True)
        del model
        if on_gpu:
            torch.cuda.empty_cache()
        # What is made before the runs (torch, transformers, the baseline) is out of the collector's reach, so a full
        # collection while answers are parsed does not walk it; client_gc_s is what is left of the client's pauses.
        gc.collect()
        gc.freeze()
        tails = {}
        for schedule in args.schedules:
            report[f"engine_{schedule}"], tails[schedule] = asyncio.run(engine_bench(model_dir, args.requests, args, schedule))
        gc.unfreeze()  # collectable again at exit, as the extensions' leak checks expect
    print(json.dumps(report, indent=1), flush=True)
    for schedule, tail in tails.items():
        print(f"---- engine stderr tail ({schedule}) ----\n" + tail, flush=True)
    print(f"{'schedule':<10}{'pass':>5}{'requests':>9}" + "".join(f"{c:>14}" for c in SPLIT_COLUMNS))
    for schedule in args.schedules:
        for row in report[f"engine_{schedule}"]:
            if "pass" in row:
                print(f"{schedule:<10}{row['pass']:>5}{row['requests']:>9}" + "".join(f"{row[c]:>14}" for c in SPLIT_COLUMNS))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
