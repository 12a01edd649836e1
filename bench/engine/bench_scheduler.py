"""The embedded engine's scheduler alone, without HTTP or a client: the serial decode schedule against the
overlapped one on one model runner in one process, alternated, N requests x (128 prompt + 256 new tokens,
temperature 1, log-probs on) submitted at once. Per run: decode steps, model-thread seconds and `sched`, the
seconds the model thread sat idle while the scheduler was stepping (host work the forward waited for).

    python bench/engine/bench_scheduler.py                      # CPU, bench_rollout's tiny Qwen3
    python bench/engine/bench_scheduler.py --device cuda --full # one GPU, the Qwen3-0.6B shape
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from bench_rollout import NEW, PROMPT, TINY_VOCAB, prompts, qwen3_0p6b_config, tiny_config  # noqa: E402

from rl_sglang.embedded.model_runner import ModelRunner  # noqa: E402
from rl_sglang.embedded.options import EngineOptions  # noqa: E402
from rl_sglang.embedded.sampling import SamplingParams  # noqa: E402
from rl_sglang.embedded.scheduler import Scheduler  # noqa: E402

DEPTHS = {"serial": 1, "overlap": 2}


async def run_all(runner: ModelRunner, requests: int, repeats: int, vocab: int) -> list[dict]:
    scheduler = Scheduler(runner, requests)
    scheduler.start()
    params = SamplingParams(temperature=1.0, max_new_tokens=NEW, ignore_eos=True)
    rows = []
    try:
        for index in range(2 * repeats + 1):
            schedule = "serial" if index % 2 else "overlap"
            scheduler._depth = DEPTHS[schedule]  # the one setting --disable-overlap-schedule changes
            before, start = scheduler.counters_now(), time.perf_counter()
            submitted = [scheduler.submit(f"{index}-{i}", p, params, True) for i, p in enumerate(prompts(requests, index, vocab))]
            await asyncio.gather(*(r.future for r in submitted))
            seconds = time.perf_counter() - start
            after = scheduler.counters_now()
            d = {k: after[k] - before[k] for k in after}
            row = {
                "schedule": schedule, "seconds": round(seconds, 3), "decode_steps": int(d["decode_steps"]),
                "model_s": round(d["model_s"], 3), "sched_s": round(d["step_s"] - d["model_s"], 3),
                "sched_ms_per_step": round((d["step_s"] - d["model_s"]) / d["decode_steps"] * 1e3, 3),
                "answer_s": round(d["answer_s"], 3),
            }  # fmt: skip
            print(("(warm-up) " if index == 0 else "") + json.dumps(row), flush=True)
            if index:
                rows.append(row)
    finally:
        await scheduler.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--full", action="store_true", help="the Qwen3-0.6B shape, not the tiny one")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=4, help="runs of each schedule, alternated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as model_dir:
        torch.manual_seed(0)
        config = qwen3_0p6b_config() if args.full else tiny_config()
        AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
        graphs = {"cuda_graph_max_bs": args.requests} if args.device == "cuda" else {}
        options = EngineOptions(max_total_tokens=args.requests * (PROMPT + NEW + 8) * 2, **graphs)
        runner = ModelRunner(model_dir, device=args.device, max_running_requests=args.requests, options=options)
    rows = asyncio.run(run_all(runner, args.requests, args.repeats, 151000 if args.full else TINY_VOCAB - 2))
    print(f"medians of {args.repeats} runs each ({args.requests} requests x {PROMPT} + {NEW}, {args.device}):")
    for schedule in DEPTHS:
        mine = [r for r in rows if r["schedule"] == schedule]
        print(schedule, {k: statistics.median(r[k] for r in mine) for k in mine[0] if k != "schedule"})


if __name__ == "__main__":
    main()
