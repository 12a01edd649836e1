#!/usr/bin/env bash
# Issue 15's four multi-GPU runs, each under its own timeout, JSON results under OUT (bench/multigpu/README.md).
# On an nvidia-h200-x2 (packages on PYTHONPATH, wheels as for bench/loop/gpu_loop.sh):
#   bash bench/multigpu/run_all.sh $OUT/multigpu            # ~8 min in all
# CPU check of the whole set (gloo, tiny models):
#   bash bench/multigpu/run_all.sh /tmp/multigpu --device cpu
# PARTS="sync_broadcast megatron_parallel" runs only those (to split the set over two device calls).
# A part that fails or times out leaves its log and what JSON it wrote; the others still run.
set -uo pipefail
out=${1:?usage: bench/multigpu/run_all.sh OUT [--device cpu]}
shift
# NVLink multicast stays off (device README, KINDS.md), in every process started from here.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
mkdir -p "$out"
tiny=() scale=1
[[ " $* " == *" --device cpu "* ]] && tiny=(--tiny) scale=4  # CPU check: tiny models, 2 slow cores
part() {  # name seconds command...
  local name=$1 limit=$2; shift 2
  [[ " ${PARTS:-$name} " == *" $name "* ]] || return 0
  local start=$SECONDS
  limit=$((limit * scale))
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "{\"part\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - start)), \"limit_s\": $limit}" | tee -a "$out/parts.jsonl"
}
# limits (s) sum to 490 (8.2 min); expected on 2 H200s: ~1 min, ~1.5 min, ~3 min, ~1.5 min
part sync_broadcast 80 "$py" "$here/sync_broadcast.py" "${tiny[@]}" "$@" --out "$out/sync_broadcast.json"
part megatron_parallel 100 "$py" "$here/megatron_parallel.py" "${tiny[@]}" "$@" --timeout $((45 * scale)) --out "$out/megatron_parallel.json"
part loops 210 "$py" "$here/loops.py" "$@" --timeout $((50 * scale)) --out "$out/loops"
part fault_tolerance 100 "$py" "$here/fault_tolerance.py" "$@" --timeout $((90 * scale)) --out "$out/fault_tolerance"
"$py" - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
files = {"sync_broadcast": out / "sync_broadcast.json", "megatron_parallel": out / "megatron_parallel.json",
         "loops": out / "loops" / "loops.json", "fault_tolerance": out / "fault_tolerance" / "fault_tolerance.json"}
summary = {name: json.loads(p.read_text()) if p.exists() else None for name, p in files.items()}
parts = out / "parts.jsonl"
summary["parts"] = [json.loads(line) for line in parts.read_text().splitlines()] if parts.exists() else []
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print("wrote", out / "summary.json")
PY
