"""Megatron backend with TP=2 and with PP=2 on 2 GPUs against the one-GPU run (TP=1), in one run, on the same
weights and batch (issue 15, item 3).

Each layout runs in ranks of its own (forked from a forkserver that imported megatron-core once), started the
way torchrun starts them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: the backend's
`join_process_group` reads them; rank r takes GPU r). Per layout: the policy log-probs of the batch (no
gradients), then --steps timed train steps after --warmup (rl-core's PolicyLoss, AdamW), tokens/s. The log-probs
of TP=2 / PP=2 are compared with TP=1's; bf16 tolerance is measured, not assumed: the same TP=1 forward in
float32 gives the rounding noise bf16 itself adds (`bf16_noise`), and a layout passes when its difference from
TP=1 is within 2x that noise.

    # GPU (2 GPUs), the Qwen3-0.6B shape and bench_megatron.py's batch (8 x 2048, 1536 response tokens):
    python3 bench/multigpu/megatron_parallel.py --out OUT/megatron_parallel.json
    # CPU check (gloo, tiny model, float32 everywhere so the noise baseline is 0 and the bound is float32's):
    uv run --frozen python bench/multigpu/megatron_parallel.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
from bench_megatron import qwen3_06b_shape, train_batch  # type: ignore[import-not-found]  # noqa: E402

LAYOUTS = {"tp1": dict(world=1), "tp2": dict(world=2, tensor_model_parallel_size=2),
           "pp2": dict(world=2, pipeline_model_parallel_size=2)}


def tiny_shape():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=512)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, port: int, settings: dict, args: dict, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        buffer = io.BytesIO()  # as bytes: a tensor on the queue is a shared-memory handle that dies with this process
        torch.save(run_layout(settings, args), buffer)
        results.put((rank, buffer.getvalue(), None))
    except BaseException:  # noqa: BLE001 - the parent reports it with the layout's name
        results.put((rank, None, traceback.format_exc()))


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_layout(settings: dict, args: dict) -> dict:
    from rl_core.losses import PolicyLoss
    from rl_megatron import MegatronConfig, build_backend

    backend = build_backend(MegatronConfig(model_path=args["model_dir"], device=args["device"], param_dtype=args["dtype"],
                                           lr=1e-6, clip_grad=1.0, micro_batch_size=args["micro_batch_size"],
                                           torch_compile=args["compile"], **settings))
    batch = train_batch(*args["batch"])
    try:
        log_probs = backend.forward(batch)
        is_result_rank = int(os.environ["RANK"]) == backend.result_rank
        answer: dict = {"log_probs": [t.float().cpu() for t in log_probs] if is_result_rank else None}
        if args["steps"] == 0:
            return answer
        loss = PolicyLoss()
        for _ in range(args["warmup"]):
            backend.train_step(batch, loss)
        synchronize(args["device"])
        start = time.perf_counter()
        metrics = [backend.train_step(batch, loss) for _ in range(args["steps"])]
        synchronize(args["device"])
        seconds = (time.perf_counter() - start) / args["steps"]
        peak = torch.cuda.max_memory_allocated() / 2**30 if args["device"] == "cuda" else None
        answer.update(seconds_per_step=seconds, peak_gib=peak, last_step={k: float(v) for k, v in metrics[-1].items()})
        return answer
    finally:
        backend.close()


def launch(ranks, name: str, settings: dict, args: dict, timeout: float) -> list[dict]:
    world = settings["world"]
    settings = {k: v for k, v in settings.items() if k != "world"}
    results = ranks.Queue()
    port = free_port()
    procs = [ranks.Process(target=rank_main, args=(r, world, port, settings, args, results)) for r in range(world)]
    for proc in procs:
        proc.start()
    answers: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(answers) < world:
            rank, value, error = results.get(timeout=max(deadline - time.monotonic(), 1.0))
            if error is not None:
                raise RuntimeError(f"{name} rank {rank} failed:\n{error}")
            answers[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return [answers[r] for r in range(world)]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on 4 x 64 tokens (a CPU check)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the layers (the backend's GPU default; "
                        "off here so that three layouts' compilations fit one device call)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per layout")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if "tp1" not in args.layouts:
        parser.error("--layouts must include tp1: the others are compared with it")
    if args.device == "cuda" and torch.cuda.device_count() < max(LAYOUTS[n]["world"] for n in args.layouts):
        parser.error(f"--device cuda: {torch.cuda.device_count()} GPU(s) visible, the layouts need 2")

    config = tiny_shape() if args.tiny else qwen3_06b_shape()
    shape = (4, 64, 48) if args.tiny else (8, 2048, 1536)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    model_dir = tempfile.mkdtemp(prefix="megatron-parallel-")
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)  # one set of weights for every layout
    common = dict(model_dir=model_dir, device=args.device, dtype=dtype, micro_batch_size=args.micro_batch_size,
                  compile=args.compile, batch=(*shape, config.vocab_size), warmup=args.warmup, steps=args.steps)
    ranks = multiprocessing.get_context("forkserver")
    ranks.set_forkserver_preload(["torch", "transformers", "rl_megatron.backend"])
    tokens = shape[0] * shape[1]
    result: dict = {"shape": "tiny" if args.tiny else "qwen3-0.6b", "batch": shape, "device": args.device, "dtype": dtype,
                    "micro_batch_size": args.micro_batch_size, "compile": args.compile}
    log_probs: dict[str, list[torch.Tensor]] = {}
    if dtype != "float32":  # the rounding noise of bf16 itself: TP=1 in float32, forward only
        [fp32] = launch(ranks, "tp1-float32", LAYOUTS["tp1"], {**common, "dtype": "float32", "steps": 0}, args.timeout)
        log_probs["fp32"] = fp32["log_probs"]
    for name in args.layouts:
        start = time.perf_counter()
        try:
            answers = launch(ranks, name, LAYOUTS[name], common, args.timeout)
        except Exception as error:  # noqa: BLE001 - one failed layout should not hide the others' figures
            result[name] = {"error": f"{type(error).__name__}: {error}"[-1500:], "traceback": traceback.format_exc()[-1500:]}
            print(name, json.dumps(result[name]), flush=True)
            continue
        log_probs[name] = next(a["log_probs"] for a in answers if a["log_probs"] is not None)
        row = {k: answers[0][k] for k in ("seconds_per_step", "peak_gib", "last_step")}
        row["peak_gib_per_rank"] = [a["peak_gib"] for a in answers]
        row["tokens_per_s"] = tokens / row["seconds_per_step"]
        row["wall_s"] = time.perf_counter() - start
        result[name] = row
    noise = max_abs_diff(log_probs["fp32"], log_probs["tp1"]) if "fp32" in log_probs else 0.0
    result["bf16_noise"] = noise  # max |log p(tp1, bf16) - log p(tp1, float32)|
    for name in args.layouts:
        if name == "tp1" or name not in log_probs or "tp1" not in log_probs:
            continue
        diff = max_abs_diff(log_probs[name], log_probs["tp1"])
        bound = 2 * noise if noise > 0 else 1e-4  # float32 on the CPU: only reordering noise
        result[name].update(max_abs_diff_vs_tp1=diff, log_probs_bound=bound, log_probs_ok=diff <= bound,
                            tokens_per_s_vs_tp1=result[name]["tokens_per_s"] / result["tp1"]["tokens_per_s"])
    for name in args.layouts:
        print(name, json.dumps(result[name]), flush=True)
    print("bf16_noise", noise)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
