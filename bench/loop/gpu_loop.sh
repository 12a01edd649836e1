#!/usr/bin/env bash
# The sync GRPO loop on one GPU: embedded engine and FSDP trainer colocated (half a GPU each to Ray),
# a 104M-parameter Qwen2-shaped model built from a config, bf16 training. Writes metrics.jsonl whose
# time/* fields are the step-time breakdown recorded in bench/loop/README.md.
# Usage: bench/loop/gpu_loop.sh OUT_DIR [extra rl-train flags]
set -euo pipefail
out=${1:?usage: bench/loop/gpu_loop.sh OUT_DIR [flags]}
shift
python3 -m rl_apps.quickstart --out "$out/task" --size 100m
python3 -m rl_apps.train \
  --hf-checkpoint "$out/task/model" --prompt-data "$out/task/train.jsonl" --rm-type math \
  --rollout-batch-size 32 --n-samples-per-prompt 8 --rollout-max-response-len 64 --rollout-shuffle \
  --num-rollout 12 --lr 1e-5 --micro-batch-size 64 --param-dtype bfloat16 \
  --train-device cuda --rollout-device cuda --colocate --update-weight-transport disk \
  --output-dir "$out/run" --no-use-tensorboard "$@"
