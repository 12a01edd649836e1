"""FSDP backend train step with its default flags against a plain Hugging Face forward + backward + AdamW
step, in one run, at equal shapes: a Qwen3-0.6B-shaped model (random init, bf16), B x T tokens.

Phases (--phases): `hf_baseline` (bench_megatron.py's: the whole batch in one forward, float32 log-softmax
over the response positions); `fsdp_default` (FSDPConfig with no micro-batch flag: token-budget micro-batches,
packed, decoder layers and log-probs compiled on CUDA); `fsdp_eager` (the same with torch_compile off, the
default before it); `fsdp_chunked` (the default with --log-probs-chunk-size 4096); `fsdp_recompute` (the
default with activation checkpointing); `fsdp_varied` (the default on samples of eight different lengths,
1,024-3,840 tokens, the same 16k tokens in all: packed rows of unequal samples, as RL batches are);
`fsdp_mbs8` / `fsdp_mbs1` (padded micro-batches of 8 / 1 samples). Each reports tokens/s (tokens over the
mean of the timed steps after warm-up) and, on CUDA, peak allocated memory.

    PYTHONPATH=packages/rl-core/src:packages/rl-fsdp/src python bench/train/bench_fsdp.py --out result.json
    # on a CPU, tiny shapes, to check that it runs:
    PYTHONPATH=packages/rl-core/src:packages/rl-fsdp/src python bench/train/bench_fsdp.py --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time

import torch
from bench_megatron import qwen3_06b_shape, train_batch

PHASES = ("hf_baseline", "fsdp_default", "fsdp_eager", "fsdp_chunked", "fsdp_recompute", "fsdp_varied", "fsdp_mbs8",
          "fsdp_mbs1")
VARIED_LENGTHS = (1024, 1536, 2048, 2560, 1280, 1792, 2304, 3840)
"""fsdp_varied's sample lengths (16,384 tokens, as 8 x 2,048), each with a 512-token prompt."""


def tiny_shape():
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=512,
    )


def varied_batch(lengths: tuple[int, ...], prompt: int, vocab: int):
    """A batch of samples of the given total lengths, each `prompt` tokens of prompt and the rest response."""
    from rl_core.train_batch import TrainBatch

    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    responses = [n - prompt for n in lengths]
    advantages = torch.randn(len(lengths), generator=gen).tolist()
    return TrainBatch(tokens=tokens, response_lengths=responses, loss_masks=[[1] * r for r in responses],
                      advantages=[[a] * r for a, r in zip(advantages, responses)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device: torch.device, warmup: int, steps: int) -> tuple[float, float | None]:
    """Seconds per step (mean over `steps` after `warmup`) and, on CUDA, peak allocated GiB over all of them."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return (time.perf_counter() - start) / steps, peak


def _release(device: torch.device) -> None:
    """Free what a phase held, compiled graphs included (each phase starts as a fresh process would)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def hf_baseline(config, batch, device: torch.device, dtype: torch.dtype, warmup: int, steps: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    ids = torch.tensor(batch.tokens, device=device)
    response = batch.response_lengths[0]
    targets = ids[:, -response:]
    advantages = torch.tensor([a[0] for a in batch.advantages], device=device)[:, None]

    def step():
        logits = model(input_ids=ids).logits[:, -response - 1 : -1].float()
        log_probs = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        loss = -(advantages * log_probs).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = timed(step, device, warmup, steps)
    del model, optimizer
    _release(device)
    return {"seconds_per_step": seconds, "tokens_per_s": ids.numel() / seconds, "peak_gib": peak}


def fsdp_backend(config, batch, device: torch.device, dtype: str, warmup: int, steps: int, **flags) -> dict:
    from rl_core.losses import PolicyLoss
    from rl_fsdp import FSDPConfig, build_backend

    with tempfile.TemporaryDirectory() as model_dir:
        config.save_pretrained(model_dir)  # config.json only: the backend random-inits as HF does
        backend_config = FSDPConfig(model_path=model_dir, device=device.type, param_dtype=dtype, lr=1e-6, **flags)
        backend = build_backend(backend_config)
        loss = PolicyLoss()
        compiled = backend.compiled
        try:
            seconds, peak = timed(lambda: backend.train_step(batch, loss), device, warmup, steps)
        finally:
            backend.close()
    del backend
    _release(device)
    tokens = sum(len(t) for t in batch.tokens)
    chosen = {name: getattr(backend_config, name) for name in (
        "use_dynamic_batch_size", "max_tokens_per_gpu", "micro_batch_size", "log_probs_chunk_size", "gradient_checkpointing")}
    return {"seconds_per_step": seconds, "tokens_per_s": tokens / seconds, "peak_gib": peak, **chosen, "compiled": compiled}


def parse_arguments(phases: tuple[str, ...]) -> argparse.Namespace:
    """The command line both train-step benches take (bench_megatron.py calls it with its phases)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on 4 x 64 tokens, on the CPU if no GPU")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--response", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--phases", nargs="+", choices=phases, default=list(phases))
    parser.add_argument("--out", default=None)
    return parser.parse_args()


def bench_setting(args: argparse.Namespace):
    """Device, model config, equal-length batch, compute dtype and the results' header, from the arguments."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = tiny_shape() if args.tiny else qwen3_06b_shape()
    batch_size, seq, response = (4, 64, 48) if args.tiny else (8, 2048, 1536)
    batch_size, seq, response = args.batch or batch_size, args.seq or seq, args.response or response
    batch = train_batch(batch_size, seq, response, config.vocab_size)
    # bf16 compute on GPUs (float32 master weights in the backends); float32 on a CPU, where bf16 is slow.
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    results: dict = {"shape": "tiny" if args.tiny else "qwen3-0.6b", "batch": batch_size, "seq": seq, "response": response,
                     "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": dtype}
    return device, config, batch, dtype, results


def run_phases(phases: dict, args: argparse.Namespace, results: dict, device: torch.device) -> None:
    """Each phase of --phases in turn, its figures (and vs_hf) printed and written to --out as it ends."""
    for name in args.phases:
        try:
            results[name] = phases[name]()
        except Exception as error:  # noqa: BLE001 - one failed phase should not hide the others' figures
            results[name] = {"error": f"{type(error).__name__}: {error}"[:800]}
            _release(device)
        if "tokens_per_s" in results[name] and "tokens_per_s" in results.get("hf_baseline", {}):
            results[name]["vs_hf"] = results[name]["tokens_per_s"] / results["hf_baseline"]["tokens_per_s"]
        print(name, json.dumps(results[name]), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)


def main() -> None:
    args = parse_arguments(PHASES)
    device, config, batch, dtype, results = bench_setting(args)
    seq, response = results["seq"], results["response"]
    lengths = tuple(n * seq // 2048 for n in VARIED_LENGTHS)
    varied = varied_batch(lengths, seq - response, config.vocab_size)
    phases = {
        "hf_baseline": lambda: hf_baseline(config, batch, device, getattr(torch, dtype), args.warmup, args.steps),
        "fsdp_default": lambda: fsdp_backend(config, batch, device, dtype, args.warmup, args.steps),
        "fsdp_eager": lambda: fsdp_backend(config, batch, device, dtype, args.warmup, args.steps, torch_compile=False),
        "fsdp_varied": lambda: fsdp_backend(config, varied, device, dtype, args.warmup, args.steps),
        "fsdp_chunked": lambda: fsdp_backend(config, batch, device, dtype, args.warmup, args.steps, log_probs_chunk_size=4096),
        "fsdp_recompute": lambda: fsdp_backend(config, batch, device, dtype, args.warmup, args.steps, gradient_checkpointing=True),
        "fsdp_mbs8": lambda: fsdp_backend(config, batch, device, dtype, args.warmup, args.steps, micro_batch_size=8),
        "fsdp_mbs1": lambda: fsdp_backend(config, batch, device, dtype, args.warmup, args.steps, micro_batch_size=1),
    }
    run_phases(phases, args, results, device)


if __name__ == "__main__":
    main()
