"""The sync loop's generate phase alone, split into where its time goes, for each engine setting in one run.

`bench/loop/gpu_loop.sh`'s rollout (32 prompts x 8 samples, up to 64 new tokens, the quickstart's addition
task, math reward) through exactly the pieces rl-train's RolloutManager assembles: the config parsed from
the same flags, the engine launched with the arguments EngineActor gives it, the data source, the reward,
the ZMQ router (cache-aware policy, metrics middleware) over `SGLangClient`, the default generator and
`default_rollout`'s steps (generate every sample, then grade them). Each variant gets its own engine process; before and after each rollout the engine's
cumulative scheduler counters (/server_info `internal_states`) are read, so each rollout is split into:

- decode / prefill steps the engine ran (device-independent: what a GPU pays per forward pass),
- model: time on the engine's model thread (forward, sampling, the wait for the device),
- sched: the scheduler's bookkeeping inside those steps (host work per step),
- idle: the engine waiting for requests,
- rest: the generate wall time left (the engine's event loop: HTTP, JSON, admission; the router and the
  rollout's own code while the engine waits on them),
- ramp: from the rollout's start until the engine received its last request.

Variants: `rows64` is the engine's old default under rl-train (64 running requests: the rollout went in
waves), `default` rl-train's default now (rows for the whole rollout), `direct` the same engine setting with
the 256 requests sent straight to the engine through `SGLangClient` (no router; not graded).

    python3 bench/loop/rollout_split.py                                    # CPU, the tiny model
    python3 bench/loop/rollout_split.py --size 100m --device cuda --out r.json   # the loop's model on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rl_apps.cli import parse_config
from rl_apps.quickstart import build_model, make_addition_data
from rl_apps.train_config import TrainConfig
from rl_sglang.client import SGLangClient
from rl_sglang.launcher import EngineProcess, launch_engine

VARIANTS = {"rows64": ["--sglang-max-running-requests", "64"], "default": [], "direct": []}
COLUMNS = (
    "generate_s",
    "reward_s",
    "tok_per_s",
    "decode_steps",
    "mean_batch",
    "prefill_steps",
    "model_s",
    "sched_s",
    "idle_s",
    "rest_s",
    "ramp_s",
)


def loop_config(task: Path, device: str, extra: list[str]) -> TrainConfig:
    """The config `gpu_loop.sh ... --update-weight-transport tensor` parses to (its rollout half)."""
    argv = [
        "--hf-checkpoint", str(task / "model"), "--prompt-data", str(task / "train.jsonl"), "--rm-type", "math",
        "--rollout-batch-size", "32", "--n-samples-per-prompt", "8", "--rollout-max-response-len", "64",
        "--rollout-shuffle", "--train-device", device, "--rollout-device", device, "--colocate",
        "--update-weight-transport", "tensor", "--output-dir", str(task / "run"), *extra,
    ]  # fmt: skip
    return parse_config(TrainConfig, argv, "rollout_split", "bench")


def start_engine(config: TrainConfig) -> EngineProcess:
    """As `rl_apps.actors.EngineActor._launch` starts engine 0."""
    args = {k: v for k, v in config.sglang_args.items() if k != "host"}
    args.setdefault("device", config.rollout_device)
    args.setdefault("seed", config.rollout_seed)
    process = launch_engine(config.engine_type, str(config.hf_checkpoint), sglang_args=args)
    try:
        process.wait_until_healthy(900)
    except BaseException:
        process.terminate()
        raise
    return process


async def counters(client: SGLangClient) -> dict[str, float]:
    return (await client.get_server_info())["internal_states"][0]


def split(before: dict[str, float], after: dict[str, float], started: float, generate_s: float) -> dict[str, float]:
    d = {k: after[k] - before[k] for k in after}
    return {
        "decode_steps": d["decode_steps"], "mean_batch": d["decode_rows"] / max(1.0, d["decode_steps"]),
        "prefill_steps": d["prefill_steps"], "prefill_tokens": d["prefill_tokens"], "model_s": d["model_s"],
        "sched_s": d["step_s"] - d["model_s"], "idle_s": d["idle_s"], "rest_s": generate_s - d["step_s"] - d["idle_s"],
        "ramp_s": after["last_submit_monotonic_s"] - started,
    }  # fmt: skip


async def run_variant(config: TrainConfig, url: str, name: str, rollouts: int, warmup: int) -> list[dict[str, float]]:
    """The RolloutManager's pieces, built as rl_apps.actors.RolloutManager builds them (without Ray)."""
    from rl_apps.data import build_data_source, load_tokenizer
    from rl_apps.slime_api import slime_args
    from rl_core.rollout import default_generator, generate_samples, regroup, score_samples
    from rl_rewards import build_reward
    from rl_router import MetricsMiddleware, Router, RouterClient, RouterThread
    from rl_sglang.generation import SGLangGenerate

    tokenizer = load_tokenizer(config)
    data = build_data_source(config, tokenizer)
    reward = build_reward(config.rm_type, config.custom_rm_path, slime_args=slime_args(config), group_rm=config.group_rm,
                          **config.reward_options())  # fmt: skip
    timeout = config.rollout_request_timeout_s()
    router = RouterThread(Router(
        {"engine0": SGLangClient(url, timeout_s=timeout + 30)}, policy=config.router_policy,
        middleware=[MetricsMiddleware()], health_interval_s=None, health_timeout_s=config.rollout_health_check_timeout,
        engine_timeout_s=timeout,
    ))  # fmt: skip
    client = RouterClient(router.start())
    direct = SGLangClient(url, timeout_s=timeout)
    engine = SGLangGenerate(direct if name == "direct" else client)
    generator = default_generator(engine, config.sampling_params(), max_context_len=config.rollout_max_context_len)
    rows = []
    try:
        for index in range(warmup + rollouts):
            before = await counters(direct)
            started = time.monotonic()
            # default_rollout's path without a filter, with the engine's counters read between its two halves
            groups = data.get_samples(config.rollout_batch_size)
            groups = regroup(groups, await generate_samples(generator, [s for g in groups for s in g]))
            timing = {"generate": time.monotonic() - started}
            after = await counters(direct)
            samples = [s for g in groups for s in g]
            graded = time.monotonic()
            if name != "direct":
                await score_samples(reward, samples, max_error_ratio=config.max_reward_error_ratio)
            timing["reward"] = time.monotonic() - graded
            tokens = sum(s.response_length for s in samples)
            row = {"rollout": index, "samples": len(samples), "tokens": tokens, "generate_s": timing["generate"],
                   "reward_s": timing["reward"], "tok_per_s": tokens / timing["generate"],
                   **split(before, after, started, timing["generate"])}  # fmt: skip
            if index >= warmup:
                rows.append(row)
            print(f"{name} rollout {index}{' (warm-up)' if index < warmup else ''}: "
                  + " ".join(f"{k}={row[k]:.3f}" for k in COLUMNS), flush=True)  # fmt: skip
    finally:
        await direct.close()
        client.close()
        router.stop()
    return rows


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in COLUMNS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "100m"], default="tiny", help="quickstart model (100m: gpu_loop.sh's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rollouts", type=int, default=4, help="measured rollouts per variant")
    parser.add_argument("--warmup", type=int, default=1, help="rollouts run first and left out")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="write every row and the medians as JSON here")
    args = parser.parse_args()
    task = Path(tempfile.mkdtemp(prefix="rollout_split_"))
    params = build_model(task / "model", args.size)
    make_addition_data(task / "train.jsonl")
    print(f"model: {params:,} parameters ({args.size}) on {args.device}", flush=True)
    results: dict[str, Any] = {"size": args.size, "device": args.device, "variants": {}}
    for name in args.variants:
        config = loop_config(task, args.device, VARIANTS[name])
        engine_args = {k: v for k, v in config.sglang_args.items()}
        with start_engine(config) as process:
            rows = asyncio.run(run_variant(config, process.url, name, args.rollouts, args.warmup))
        results["variants"][name] = {"engine_args": engine_args, "rows": rows, "median": medians(rows)}
    print(f"\nmedians over {args.rollouts} rollouts of 256 samples x <= 64 new tokens ({args.size}, {args.device}):")
    print(f"{'variant':<10}{'rows':>6}" + "".join(f"{c:>14}" for c in COLUMNS))
    for name, result in results["variants"].items():
        rows_arg = result["engine_args"].get("max_running_requests", "")
        print(f"{name:<10}{rows_arg:>6}" + "".join(f"{result['median'][c]:>14.3f}" for c in COLUMNS))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
