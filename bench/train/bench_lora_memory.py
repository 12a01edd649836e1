"""GPU memory and step time of the FSDP backend with LoRA against full fine-tuning, in one run, at equal
shapes: a Qwen3-0.6B-shaped model (random init, bf16 compute), a GRPO step over B x T tokens with the KL
loss on (so full fine-tuning holds a reference copy and LoRA reuses the base with adapters off).

    PYTHONPATH=packages/rl-core/src:packages/rl-fsdp/src python bench/train/bench_lora_memory.py --out result.json
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time

import torch
from bench_megatron import qwen3_06b_shape, train_batch  # type: ignore[import-not-found]


def run(model_dir: str, batch, lora_rank: int, steps: int) -> dict:
    from rl_core.algorithms.policy_loss import PolicyLossConfig
    from rl_core.losses import PolicyLoss
    from rl_fsdp import FSDPConfig, build_backend

    torch.cuda.reset_peak_memory_stats()
    backend = build_backend(FSDPConfig(model_path=model_dir, device="cuda", param_dtype="bfloat16", lr=1e-5,
                                       micro_batch_size=4, ref_model=True, lora_rank=lora_rank))
    after_build = torch.cuda.memory_allocated()
    loss = PolicyLoss(PolicyLossConfig(use_kl_loss=True, kl_loss_coef=0.01))
    backend.train_step(batch, loss)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        backend.train_step(batch, loss)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    trainable = sum(p.numel() for p in backend.model.parameters() if p.requires_grad)
    held = sum(p.numel() for p in backend.model.parameters()) + (
        sum(p.numel() for p in backend.reference.parameters()) if backend.reference is not None else 0)
    result = {"lora_rank": lora_rank, "gib_after_build": after_build / 2**30,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "seconds_per_step": seconds,
              "tokens_per_s": sum(len(t) for t in batch.tokens) / seconds, "trainable_params": trainable,
              "params_held": held}
    backend.close()
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    config = qwen3_06b_shape()
    batch = train_batch(args.batch, args.seq, args.seq // 2, config.vocab_size)
    with tempfile.TemporaryDirectory() as model_dir:
        config.save_pretrained(model_dir)
        rows = [run(model_dir, batch, rank, args.steps) for rank in (0, 16)]
    print(json.dumps(rows, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
