"""Megatron backend train step against a plain Hugging Face forward + backward + AdamW step, in one run, at
equal shapes: a Qwen3-0.6B-shaped model (random init, bf16), a global batch of B x T tokens.

Both steps run the policy-gradient surrogate over the response tokens' log-probs (the backend through
rl-core's PolicyLoss, the baseline as -(A * log p) over the same tokens). Reports tokens/s (B x T per step,
mean of the timed steps after warm-up) and peak allocated GPU memory of each phase.

    PYTHONPATH=packages/rl-core/src:packages/rl-megatron/src python bench/train/bench_megatron.py --out result.json
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time

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


def timed(step, warmup: int, steps: int) -> tuple[float, float]:
    """Seconds per step (mean over `steps` after `warmup`) and peak allocated GiB over all of them."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated() / 2**30


def hf_baseline(config, batch, warmup: int, steps: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    ids = torch.tensor(batch.tokens, device="cuda")
    response = batch.response_lengths[0]
    targets = ids[:, -response:]
    advantages = torch.tensor([a[0] for a in batch.advantages], device="cuda")[:, None]

    def step():
        logits = model(input_ids=ids).logits[:, -response - 1 : -1].float()
        log_probs = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        loss = -(advantages * log_probs).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = timed(step, warmup, steps)
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return {"seconds_per_step": seconds, "tokens_per_s": ids.numel() / seconds, "peak_gib": peak}


def megatron_backend(config, batch, micro_batch_size: int, warmup: int, steps: int, **flags) -> dict:
    from rl_core.losses import PolicyLoss
    from rl_megatron import MegatronConfig, build_backend

    with tempfile.TemporaryDirectory() as model_dir:
        config.save_pretrained(model_dir)  # config.json only: the backend random-inits as HF does
        backend = build_backend(
            MegatronConfig(
                model_path=model_dir, device="cuda", param_dtype="bfloat16", lr=1e-6, clip_grad=1.0,
                micro_batch_size=micro_batch_size, **flags,
            )
        )
        loss = PolicyLoss()
        seconds, peak = timed(lambda: backend.train_step(batch, loss), warmup, steps)
    tokens = sum(len(t) for t in batch.tokens)
    backend.close()
    del backend
    gc.collect()
    torch.cuda.empty_cache()
    return {"seconds_per_step": seconds, "tokens_per_s": tokens / seconds, "peak_gib": peak, "micro_batch_size": micro_batch_size, **flags}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--response", type=int, default=1536)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    config = qwen3_06b_shape()
    batch = train_batch(args.batch, args.seq, args.response, config.vocab_size)
    results: dict = {"shape": "qwen3-0.6b", "batch": args.batch, "seq": args.seq, "response": args.response,
                     "gpu": torch.cuda.get_device_name()}

    def record(name, fn):
        try:
            results[name] = fn()
        except Exception as error:  # noqa: BLE001 - one failed phase should not hide the others' figures
            results[name] = {"error": f"{type(error).__name__}: {error}"[:800]}
            gc.collect()
            torch.cuda.empty_cache()
        print(name, json.dumps(results[name]), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)

    record("hf_baseline", lambda: hf_baseline(config, batch, args.warmup, args.steps))
    for mbs in args.micro_batch_sizes:
        record(f"megatron_mbs{mbs}", lambda mbs=mbs: megatron_backend(config, batch, mbs, args.warmup, args.steps))


if __name__ == "__main__":
    main()
