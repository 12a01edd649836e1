"""kill -9 of one engine process during a rollout of rl-train with --use-fault-tolerance (issue 15, item 4).

rl-train runs with 2 engines (on GPUs: gpu_loop.sh's task; 3+ GPUs: engines on GPUs of their own; 2 GPUs:
--colocate, trainer and engine 0 on GPU 0, engine 1 on GPU 1), --update-weight-transport disk (rl-train restarts
an engine only with disk: a new process reloads the newest weights from there), and engine_killer.py as a router
middleware that SIGKILLs one engine in the middle of rollout 1. Checked from rl-train's own outputs:
- training continued: metrics.jsonl has every step, and engines/restarts is 1;
- no sample lost or doubled: each rollout's saved samples (--save-debug-rollout-data) have exactly the indices
  of that rollout, once each, all with a response;
- the engine was restarted and re-synced: every answer of rollout k (k >= 1) carries weight version k, both
  engines answer after the kill, and the router readmitted one (router/readmissions >= 1).

    python3 bench/multigpu/fault_tolerance.py --out OUT/fault_tolerance              # GPU, ~2 min
    uv run --frozen python bench/multigpu/fault_tolerance.py --device cpu --out /tmp/ft   # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def check(out: Path, num_rollout: int, per_rollout: int) -> dict:
    from rl_core.debug_data import load_rollout

    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    served = [json.loads(line) for line in (out / "served.jsonl").read_text().splitlines()]
    kill = json.loads((out / "served.jsonl.kill").read_text()) if (out / "served.jsonl.kill").exists() else None
    checks: dict = {"steps": [r["step"] for r in rows], "kill": kill}
    checks["training_continued"] = checks["steps"] == list(range(num_rollout))
    checks["engine_restarts"] = rows[-1].get("engines/restarts") if rows else None
    checks["readmissions"] = rows[-1].get("router/readmissions") if rows else None
    exact = []
    for rollout_id in range(num_rollout):
        samples = load_rollout(out / "debug" / "rollout_{rollout_id}.jsonl", rollout_id)
        indices = sorted(s.index for s in samples)
        exact.append(indices == list(range(rollout_id * per_rollout, (rollout_id + 1) * per_rollout))
                     and all(s.response_length > 0 for s in samples))
    checks["each_sample_once"] = exact
    by_rollout = [served[i * per_rollout:(i + 1) * per_rollout] for i in range(num_rollout)]
    checks["versions_per_rollout"] = [sorted({str(s["version"]) for s in part}) for part in by_rollout]
    after_kill = [s for s in served if kill and s["n"] > kill["request"] + per_rollout]
    checks["engines_answering_after_kill"] = sorted({s["engine"] for s in after_kill})
    checks["ok"] = bool(
        kill and checks["training_continued"] and checks["engine_restarts"] == 1.0 and all(exact)
        and all(v == [str(k)] for k, v in enumerate(checks["versions_per_rollout"]) if k >= 1)
        and len(checks["engines_answering_after_kill"]) == 2 and (checks["readmissions"] or 0) >= 1
    )
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when torch sees a GPU")
    parser.add_argument("--num-rollout", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=240.0)
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if device == "cuda" and gpus < 2:
        parser.error(f"{gpus} GPU(s) visible: 2 engines and a trainer need 2 or more (or --device cpu)")
    if args.num_rollout < 3:
        parser.error("--num-rollout must be >= 3: the kill falls in rollout 1 and rollout 2 checks the re-synced engine")
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("served.jsonl", "served.jsonl.kill"):
        (args.out / stale).unlink(missing_ok=True)
    task = args.out / "task"
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    subprocess.run([sys.executable, "-m", "rl_apps.quickstart", "--out", str(task), "--size", "100m" if gpus else "tiny"],
                   check=True, env=env)
    if gpus:
        prompts, samples, flags = 32, 8, ["--rollout-max-response-len", "64", "--micro-batch-size", "64", "--lr", "1e-5",
                                          "--param-dtype", "bfloat16", "--no-torch-compile"]
        flags += ["--rollout-num-gpus", "2"] if gpus >= 3 else ["--colocate", "--rollout-num-engines", "2"]
    else:
        prompts, samples, flags = 4, 4, ["--rollout-max-response-len", "8", "--lr", "1e-3", "--rollout-num-engines", "2"]
    per_rollout = prompts * samples
    env.update(KILL_AT=str(per_rollout + per_rollout // 3), KILL_MODEL=str(task / "model"), KILL_SINCE=str(time.time()),
               KILL_LOG=str(args.out / "served.jsonl"))
    command = [sys.executable, "-m", "rl_apps.train", "--hf-checkpoint", str(task / "model"),
               "--prompt-data", str(task / "train.jsonl"), "--rm-type", "math", "--rollout-batch-size", str(prompts),
               "--n-samples-per-prompt", str(samples), "--num-rollout", str(args.num_rollout),
               "--train-device", device, "--rollout-device", device, *flags,
               "--use-fault-tolerance", "--update-weight-transport", "disk", "--rollout-health-check-interval", "0.3",
               "--rollout-health-check-timeout", "5", "--rollout-health-check-first-wait", "0.5",
               "--router-middleware-paths", f"{HERE / 'engine_killer.py'}:KillOneEngine",
               "--save-debug-rollout-data", str(args.out / "debug" / "rollout_{rollout_id}.jsonl"),
               "--output-dir", str(args.out / "run"), "--no-use-tensorboard", "--no-save-reward-curve"]
    start = time.perf_counter()
    with open(args.out / "train.log", "w") as log:
        try:
            code: int | str = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    result: dict = {"device": device, "gpus": gpus, "command": " ".join(command[1:]), "returncode": code,
                    "wall_s": time.perf_counter() - start}
    try:
        result.update(check(args.out, args.num_rollout, per_rollout))
    except (OSError, ValueError) as error:
        result.update(ok=False, error=f"{type(error).__name__}: {error}")
    if code != 0 or not result.get("ok"):
        result["log_tail"] = (args.out / "train.log").read_text()[-2000:]
    (args.out / "fault_tolerance.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("command",)}, indent=2))


if __name__ == "__main__":
    main()
