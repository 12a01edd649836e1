"""Megatron backend train step against a plain Hugging Face forward + backward + AdamW step, in one run, at
equal shapes: a Qwen3-0.6B-shaped model (random init, bf16), a global batch of B x T tokens.

Both steps run the policy-gradient surrogate over the response tokens' log-probs (the backend through
rl-core's PolicyLoss, the baseline as -(A * log p) over the same tokens). Phases (--phases): `hf_baseline`
(bench_fsdp.py's); `megatron_mbs8` / `megatron_mbs4` (micro-batches of 8 / 4 samples, the backend's defaults:
torch_compile on, the LM head at the response positions only); `megatron_mbs8_chunked` (log-probs 4,096
tokens at a time); `megatron_mbs8_eager` (torch_compile off, the gain of compiling in the same run). Each
reports tokens/s (B x T over the mean of the timed steps after warm-up) and, on CUDA, peak allocated memory.

    PYTHONPATH=packages/rl-core/src:packages/rl-megatron/src python bench/train/bench_megatron.py --out result.json
    # on a CPU, tiny shapes, to check that it runs:
    PYTHONPATH=packages/rl-core/src:packages/rl-megatron/src python bench/train/bench_megatron.py --tiny
"""

from __future__ import annotations

import functools
import tempfile

import torch


def qwen3_06b_shape():
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=40960,
    )


def train_batch(batch: int, seq: int, response: int, vocab: int):
    from rl_core.train_batch import TrainBatch

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen).tolist()
    advantages = (torch.randn(batch, generator=gen)).tolist()
    return TrainBatch(
        tokens=tokens, response_lengths=[response] * batch, loss_masks=[[1] * response] * batch,
        advantages=[[a] * response for a in advantages],
    )


def megatron_backend(config, batch, device: torch.device, dtype: str, warmup: int, steps: int, **flags) -> dict:
    from bench_fsdp import _release, timed  # the device-aware timer and clean-up (bench_fsdp imports this module)

    from rl_core.losses import PolicyLoss
    from rl_megatron import MegatronConfig, build_backend

    with tempfile.TemporaryDirectory() as model_dir:
        config.save_pretrained(model_dir)  # config.json only: the backend random-inits as HF does
        backend_config = MegatronConfig(model_path=model_dir, device=device.type, param_dtype=dtype, lr=1e-6, clip_grad=1.0, **flags)
        backend = build_backend(backend_config)
        try:
            loss = PolicyLoss()
            seconds, peak = timed(lambda: backend.train_step(batch, loss), device, warmup, steps)
        finally:
            backend.close()
    tokens = sum(len(t) for t in batch.tokens)
    del backend
    _release(device)
    chosen = {name: getattr(backend_config, name) for name in ("micro_batch_size", "log_probs_chunk_size", "torch_compile")}
    return {"seconds_per_step": seconds, "tokens_per_s": tokens / seconds, "peak_gib": peak, **chosen}


PHASES = ("hf_baseline", "megatron_mbs8", "megatron_mbs4", "megatron_mbs8_chunked", "megatron_mbs8_eager")


def main() -> None:
    from bench_fsdp import bench_setting, hf_baseline, parse_arguments, run_phases

    args = parse_arguments(PHASES)
    device, config, batch, dtype, results = bench_setting(args)
    chunk = 32 if args.tiny else 4096  # as bench_fsdp.py's fsdp_chunked: 3 chunks of a micro-batch of 8 x 1536
    run = functools.partial(megatron_backend, config, batch, device, dtype, args.warmup, args.steps)
    phases = {
        "hf_baseline": lambda: hf_baseline(config, batch, device, getattr(torch, dtype), args.warmup, args.steps),
        "megatron_mbs8": lambda: run(micro_batch_size=8),
        "megatron_mbs4": lambda: run(micro_batch_size=4),
        "megatron_mbs8_chunked": lambda: run(micro_batch_size=8, log_probs_chunk_size=chunk),
        "megatron_mbs8_eager": lambda: run(micro_batch_size=8, torch_compile=False),
    }
    run_phases(phases, args, results, device)


if __name__ == "__main__":
    main()
