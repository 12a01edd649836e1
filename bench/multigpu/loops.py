"""rl-train and rl-train-async with several engines or several FSDP trainer ranks (issue 15, item 2): the
step-time breakdown of each layout from its metrics.jsonl (median over rollouts 2.., of every time/* and perf/*
key), and rl-train-async's step against max(generate, train) of the same rows (target: within 1.15x).

The task and flags are bench/loop/gpu_loop.sh's (rl_apps.quickstart --size 100m, 32 prompts x 8 samples, up to
64 new tokens, micro-batch 64, bf16, --no-torch-compile unless --compile), run through rl-train's own placement flags. Which layouts fit depends on
the GPUs (rl-train-async refuses --colocate, so each of its engines and trainer ranks needs a GPU of its own):
- 3 or more GPUs: 2 engines + 1 trainer and 1 engine + 2 trainer ranks, sync and async, disaggregated, weights
  over NCCL (--update-weight-transport broadcast);
- 2 GPUs: the sync loop's 2 + 1 layouts colocated (--colocate: trainer rank i and engine i share GPU i; disk
  transport for 2 engines, since CUDA-IPC handles reach only an engine on the trainer's GPU; tensor for 2 trainer
  ranks), and sync and async with 1 engine + 1 trainer disaggregated over broadcast (the async layout 2 GPUs hold);
- --device cpu: the 2-GPU set on CPU processes (gloo; --colocate dropped, which rl-train refuses without GPUs),
  the tiny task, a check of the script.
Layouts left out are named in the JSON with the reason.

    python3 bench/multigpu/loops.py --out OUT/loops                    # GPU: 2 GPUs ~4 min, 4 GPUs ~5 min
    uv run --frozen python bench/multigpu/loops.py --device cpu --out /tmp/loops   # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TASK_FLAGS = ["--rm-type", "math", "--rollout-batch-size", "32", "--n-samples-per-prompt", "8",
              "--rollout-max-response-len", "64", "--rollout-shuffle", "--lr", "1e-5", "--micro-batch-size", "64",
              "--no-use-tensorboard", "--no-save-reward-curve"]
CPU_TASK_FLAGS = ["--rm-type", "math", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
                  "--rollout-max-response-len", "8", "--lr", "1e-3", "--global-batch-size", "16",
                  "--no-use-tensorboard", "--no-save-reward-curve"]
TWO_ENGINES_ONE_TRAINER = ["--actor-num-gpus-per-node", "1", "--rollout-num-gpus", "2"]
ONE_ENGINE_TWO_TRAINERS = ["--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "1"]
ONE_AND_ONE = ["--actor-num-gpus-per-node", "1", "--rollout-num-gpus", "1"]
BROADCAST = ["--update-weight-transport", "broadcast"]


def layouts(gpus: int) -> tuple[dict[str, tuple[str, list[str]]], dict[str, str]]:
    """name -> (module, placement flags), and the layouts left out with why."""
    if gpus >= 3:
        return {
            "sync_2engines_1trainer": ("rl_apps.train", TWO_ENGINES_ONE_TRAINER + BROADCAST),
            "sync_1engine_2trainers": ("rl_apps.train", ONE_ENGINE_TWO_TRAINERS + BROADCAST),
            "async_2engines_1trainer": ("rl_apps.train_async", TWO_ENGINES_ONE_TRAINER + BROADCAST),
            "async_1engine_2trainers": ("rl_apps.train_async", ONE_ENGINE_TWO_TRAINERS + BROADCAST),
        }, {}
    return {
        "sync_2engines_1trainer_colocated": ("rl_apps.train", TWO_ENGINES_ONE_TRAINER + ["--colocate", "--update-weight-transport", "disk"]),
        "sync_1engine_2trainers_colocated": ("rl_apps.train", ONE_ENGINE_TWO_TRAINERS + ["--colocate", "--update-weight-transport", "tensor"]),
        "sync_1engine_1trainer": ("rl_apps.train", ONE_AND_ONE + BROADCAST),
        "async_1engine_1trainer": ("rl_apps.train_async", ONE_AND_ONE + BROADCAST),
    }, {
        "async_2engines_1trainer": f"rl-train-async refuses --colocate and 2 engines + 1 trainer need 3 GPUs; {gpus} here",
        "async_1engine_2trainers": f"rl-train-async refuses --colocate and 1 engine + 2 trainer ranks need 3 GPUs; {gpus} here",
    }


def summarize(rows: list[dict], skip: int) -> dict:
    """Medians of time/* and perf/* over rollouts after the first `skip` (compilation, first shapes), and the
    step against max(generate, train) of the same rows (generate: the rollout's generate+reward wall time)."""
    kept = [r for r in rows if r["step"] >= skip] or rows
    keys = sorted({k for r in kept for k in r if k.startswith(("time/", "perf/"))})
    medians = {k: statistics.median(r[k] for r in kept if k in r) for k in keys}
    out: dict = {"rollouts": len(rows), "rows_in_median": len(kept), "median": medians}
    bound = [max(r.get("perf/rollout_time", r.get("time/generate", 0.0)), r["time/train"]) for r in kept if "time/train" in r]
    if bound and "time/step" in medians:
        out["max_generate_train"] = statistics.median(bound)
        out["step_over_max_generate_train"] = medians["time/step"] / out["max_generate_train"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when torch sees a GPU")
    parser.add_argument("--num-rollout", type=int, default=None, help="default 5 on GPU, 3 on CPU")
    parser.add_argument("--only", nargs="+", default=None, help="layout names to run (default: all that fit)")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per layout")
    parser.add_argument("--compile", action="store_true", help="keep rl-train's torch.compile on CUDA (off by default"
                        " here: its first steps' compilation would not fit four layouts into one device call)")
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if device == "cuda" else 2
    if device == "cuda" and gpus < 2:
        parser.error(f"{gpus} GPU(s) visible: the layouts need 2 or more (or give --device cpu for a CPU check)")
    runs, left_out = layouts(gpus)
    if args.only:
        unknown = sorted(set(args.only) - set(runs))
        if unknown:
            parser.error(f"--only {unknown}: not a layout for {gpus} GPU(s); these are {sorted(runs)}")
        runs = {k: v for k, v in runs.items() if k in args.only}
    num_rollout = args.num_rollout or (5 if device == "cuda" else 3)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    task = args.out / "task"
    subprocess.run([sys.executable, "-m", "rl_apps.quickstart", "--out", str(task),
                    "--size", "100m" if device == "cuda" else "tiny"], check=True, env=env)
    common = ["--hf-checkpoint", str(task / "model"), "--prompt-data", str(task / "train.jsonl"),
              "--num-rollout", str(num_rollout), "--train-device", device, "--rollout-device", device]
    common += TASK_FLAGS + ["--param-dtype", "bfloat16"] if device == "cuda" else CPU_TASK_FLAGS
    if device == "cuda" and not args.compile:
        common.append("--no-torch-compile")
    result: dict = {"device": device, "gpus": gpus, "num_rollout": num_rollout, "left_out": left_out, "layouts": {}}
    for name, (module, flags) in runs.items():
        run_dir = args.out / name
        if device == "cpu" and "--colocate" in flags:
            # rl-train refuses --colocate without GPUs (every part is a CPU process of its own), and the tensor
            # transport's shared-memory handles did not reach an engine of another Ray actor on the CPU
            # ("AuthenticationError: digest sent was rejected"): disk stands in.
            flags = [f for f in flags if f != "--colocate"]
            flags = [*flags[:-2], "--update-weight-transport", "disk"] if flags[-2:] == ["--update-weight-transport", "tensor"] else flags
        command = [sys.executable, "-m", module, *common, *flags, "--output-dir", str(run_dir)]
        start = time.perf_counter()
        with open(args.out / f"{name}.log", "w") as log:
            try:
                code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        entry: dict = {"command": " ".join(command[1:]), "returncode": code, "wall_s": time.perf_counter() - start}
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            entry.update(summarize(rows, skip=2 if num_rollout > 3 else 1))
        if code != 0:
            entry["log_tail"] = (args.out / f"{name}.log").read_text()[-1500:]
        result["layouts"][name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k not in ("command", "log_tail")}), flush=True)
        (args.out / "loops.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
