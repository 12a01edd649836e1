"""The multi-GPU bench's own checks (not in CI's testpaths): quick ones of its arithmetic and arguments, and the
whole set on 2 GPUs (`multi_gpu`), which asserts issue 15's targets.

    uv run --frozen pytest bench/multigpu -q                       # quick checks, ~5 s
    python3 -m pytest bench/multigpu -q -m multi_gpu               # on the x2 machine, ~8 min
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import loops  # type: ignore[import-not-found]  # noqa: E402


def test_the_loop_summary_takes_medians_after_the_first_rollouts_and_the_step_over_max_generate_train():
    rows = [{"step": i, "time/step": step, "time/train": train, "perf/rollout_time": generate}
            for i, (step, train, generate) in enumerate([(9.0, 9.0, 9.0), (9.0, 9.0, 9.0), (3.0, 1.0, 2.5),
                                                         (5.0, 4.0, 2.0), (4.0, 1.0, 3.0)])]
    summary = loops.summarize(rows, skip=2)
    assert summary["rows_in_median"] == 3
    assert summary["median"]["time/step"] == 4.0  # middle of 3, 4, 5
    assert summary["max_generate_train"] == 3.0  # middle of max(2.5, 1), max(2, 4), max(3, 1) = 2.5, 4, 3
    assert summary["step_over_max_generate_train"] == pytest.approx(4.0 / 3.0)


def test_two_gpus_run_the_async_loop_disaggregated_and_name_the_layouts_that_need_three():
    runs, left_out = loops.layouts(2)
    assert all("--colocate" not in flags for module, flags in runs.values() if module == "rl_apps.train_async")
    assert sorted(left_out) == ["async_1engine_2trainers", "async_2engines_1trainer"]
    four, none_left = loops.layouts(4)
    assert none_left == {} and all("broadcast" in flags for _, flags in four.values())


def test_the_megatron_script_refuses_layouts_without_the_one_gpu_reference():
    answer = subprocess.run([sys.executable, str(HERE / "megatron_parallel.py"), "--layouts", "tp2", "--device", "cpu"],
                            capture_output=True, text=True, timeout=60)
    assert answer.returncode == 2 and "--layouts must include tp1" in answer.stderr


@pytest.mark.multi_gpu
def test_the_four_multi_gpu_runs_meet_issue_15s_targets(tmp_path):
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    subprocess.run(["bash", str(HERE / "run_all.sh"), str(tmp_path)], env=env, check=True, timeout=560)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sync_broadcast"]["within_2x"]
    megatron = summary["megatron_parallel"]
    assert megatron["tp2"]["log_probs_ok"] and megatron["pp2"]["log_probs_ok"]
    for name, layout in summary["loops"]["layouts"].items():
        assert layout["returncode"] == 0, name
        if name.startswith("async"):
            assert layout["step_over_max_generate_train"] <= 1.15, name
    assert summary["fault_tolerance"]["ok"]
