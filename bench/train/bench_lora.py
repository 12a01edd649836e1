"""LoRA against full fine-tuning on the FSDP backend, in one run at equal shapes: train tokens/s, peak memory
and weight-sync time to an embedded engine (a separate process on the same device, as rl-train colocates it).

A Qwen3-0.6B-shaped model (random init saved once, bf16 compute on CUDA), a GRPO step with the KL loss over
B x T tokens (full fine-tuning holds a reference copy; LoRA reuses the base with adapters off). Weight syncs,
each the median of --syncs after one warm-up, every gather/merge included:
- full fine-tuning: every weight, tensor transport (CUDA IPC / shared memory) and disk;
- LoRA: the adapter alone (what rl-train sends on those transports), and the merged weights (what it sends
  over broadcast), tensor and disk.
After each sync the engine's log-probs of a few sampled answers are checked against the trainer's, and the
no-grad forward of the policy and of the KL reference is timed.

    PYTHONPATH=packages/rl-core/src:packages/rl-fsdp/src:packages/rl-sglang/src \\
      python bench/train/bench_lora.py --out bench/train/lora_h200.json          # the H200 figure
    uv run --frozen python bench/train/bench_lora.py --size tiny --device cpu    # a CPU check of the script
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_megatron import qwen3_06b_shape, train_batch  # type: ignore[import-not-found]  # noqa: E402

LORA_NAME = "policy"


def tiny_shape():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=512)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(call: Callable[[int], Any], repeats: int) -> float:
    call(0)  # warm-up: transport set-up, first allocations
    times = []
    for i in range(1, repeats + 1):
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def start_engine(model_dir: str, device: str):
    from rl_sglang.launcher import launch_engine

    args: dict[str, Any] = {"device": device, "max_running_requests": 8}
    args.update({"mem_fraction_static": 0.5} if device == "cuda" else {"dtype": "float32", "max_total_tokens": 4096})
    engine = launch_engine("embedded", model_dir, sglang_args=args)
    engine.wait_until_healthy(600)
    return engine


def unload_adapter(url: str) -> None:
    import asyncio

    from rl_sglang.client import SGLangClient

    async def unload() -> None:
        client = SGLangClient(url)
        try:
            await client.unload_lora_adapter(LORA_NAME)
        finally:
            await client.close()

    asyncio.run(unload())


def engine_log_prob_gap(backend, url: str, vocab: int, lora_path: str | None) -> float:
    """Largest |engine - trainer| log-prob over a few sampled answers, served with the adapter named
    `lora_path` (or the weights the engine holds)."""
    import asyncio

    from rl_core.train_batch import TrainBatch
    from rl_sglang.client import SGLangClient

    prompts = [[(7 * i + j) % vocab for j in range(6)] for i in range(1, 5)]

    async def generate() -> list[dict]:
        client = SGLangClient(url)
        try:
            extra = {} if lora_path is None else {"lora_path": lora_path}
            return [await client.generate({"input_ids": p, "return_logprob": True, **extra,
                                           "sampling_params": {"temperature": 1.0, "max_new_tokens": 8, "ignore_eos": True}})
                    for p in prompts]
        finally:
            await client.close()

    answers = asyncio.run(generate())
    n = [len(a["output_ids"]) for a in answers]
    batch = TrainBatch(tokens=[p + a["output_ids"] for p, a in zip(prompts, answers)], response_lengths=n,
                       loss_masks=[[1] * k for k in n], advantages=[[0.0] * k for k in n])
    trainer = backend.forward(batch)
    return max(float((torch.tensor([e[0] for e in a["meta_info"]["output_token_logprobs"]]) - t).abs().max())
               for a, t in zip(answers, trainer))


def run(model_dir: str, batch, args: argparse.Namespace, lora_rank: int) -> dict:
    from rl_core.algorithms.policy_loss import PolicyLossConfig
    from rl_core.losses import PolicyLoss
    from rl_fsdp import FSDPConfig, build_backend
    from rl_sglang.weight_sync import DiskWeightTransport, TensorWeightTransport

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    backend = build_backend(FSDPConfig(
        model_path=model_dir, device=args.device, param_dtype="bfloat16" if cuda else "float32", lr=1e-5,
        micro_batch_size=args.micro_batch, ref_model=True, lora_rank=lora_rank,
        **({"lora_alpha": 2.0 * lora_rank, "lora_target_modules": ["all-linear"]} if lora_rank else {}),
    ))
    after_build = torch.cuda.memory_allocated() if cuda else None
    loss = PolicyLoss(PolicyLossConfig(use_kl_loss=True, kl_loss_coef=0.01))
    backend.train_step(batch, loss)  # warm-up
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        backend.train_step(batch, loss)
    synchronize(args.device)
    seconds = (time.perf_counter() - start) / args.steps
    forward_s = {model: median_seconds(lambda i: (backend.forward(batch, model=model), synchronize(args.device)), 3)
                 for model in ("policy", "reference")}
    result: dict[str, Any] = {
        "mode": f"lora rank {lora_rank} all-linear" if lora_rank else "full fine-tuning",
        "seconds_per_step": seconds, "train_tokens_per_s": sum(len(t) for t in batch.tokens) / seconds,
        # no-grad forwards over the batch: where LoRA's extra step time goes (peft's layers, adapters off)
        "policy_forward_s": forward_s["policy"], "reference_forward_s": forward_s["reference"],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "gib_after_build": after_build / 2**30 if after_build is not None else None,
        "trainable_params": sum(p.numel() for p in backend.model.parameters() if p.requires_grad),
        "params_held": sum(p.numel() for p in backend.model.parameters())
        + (sum(p.numel() for p in backend.reference.parameters()) if backend.reference is not None else 0),
    }
    engine = start_engine(model_dir, args.device)
    sync_dir = tempfile.mkdtemp(prefix="bench-lora-sync-")
    try:
        # On CPU, tensor handles (shared-memory file descriptors) open only in a process of the sender's family.
        transports = {**({"tensor": TensorWeightTransport([engine.url])} if cuda else {}),
                      "disk": DiskWeightTransport([engine.url], sync_dir)}
        try:
            for kind, transport in transports.items():
                if lora_rank:
                    adapter_bytes = sum(t.numel() * t.element_size() for _, t in backend.adapter_weights())
                    result["adapter_mib"] = adapter_bytes / 2**20
                    result[f"sync_adapter_{kind}_s"] = median_seconds(
                        lambda i: transport.update_adapter(LORA_NAME, backend.adapter_config(), backend.adapter_weights(),
                                                           f"{kind}-{i}"), args.syncs)
                    result[f"engine_log_prob_gap_after_{kind}_adapter_sync"] = engine_log_prob_gap(
                        backend, engine.url, args.vocab, LORA_NAME)
                    unload_adapter(engine.url)  # the next transport starts from an engine without it
                sent = "merged" if lora_rank else "full"
                result[f"sync_{sent}_{kind}_s"] = median_seconds(
                    lambda i: transport.update(backend.weights(), f"{kind}-full-{i}"), args.syncs)
                result[f"engine_log_prob_gap_after_{kind}_{sent}_sync"] = engine_log_prob_gap(
                    backend, engine.url, args.vocab, None)
        finally:
            for transport in transports.values():
                transport.close()
    finally:
        engine.terminate()
    result["engine_weights_mib"] = sum(t.numel() * (2 if cuda else 4) for _, t in backend.weights()) / 2**20
    backend.close()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["qwen3-0.6b", "tiny"], default="qwen3-0.6b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--syncs", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.size == "tiny":
        args.seq, args.batch, args.micro_batch = min(args.seq, 64), min(args.batch, 2), min(args.micro_batch, 2)
    config = qwen3_06b_shape() if args.size == "qwen3-0.6b" else tiny_shape()
    args.vocab = config.vocab_size
    batch = train_batch(args.batch, args.seq, args.seq // 2, config.vocab_size)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as model_dir:
        torch.manual_seed(0)  # the engines load these weights; the trainer the same
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(model_dir)
        rows = [run(model_dir, batch, args, rank) for rank in (0, args.lora_rank)]
    print(json.dumps(rows, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
