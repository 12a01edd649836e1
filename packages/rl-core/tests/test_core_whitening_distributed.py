"""--normalize-advantages over two data-parallel ranks (gloo on this machine) gives the single-process result."""

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rl_core.algorithms.advantages import compute_advantages

WORKER = Path(__file__).with_name("_whitening_worker.py")
REWARDS = [1.0, 0.0, 2.0, 0.5, -1.0, 3.0]
LENGTHS = [3, 1, 4, 2, 5, 2]
MASKS = [[1, 0, 1], [1], [0, 1, 1, 1], [1, 1], [1, 1, 0, 0, 1], [0, 1]]
SHARDS = [[0, 1], [2, 3, 4, 5]]  # uneven shards, as ranks may hold after dynamic filtering


def advantages(indices, process_group=None):
    return compute_advantages(
        "reinforce_plus_plus",
        [REWARDS[i] for i in indices],
        1,
        [LENGTHS[i] for i in indices],
        gamma=0.9,
        normalize_advantages=True,
        loss_masks=[torch.tensor(MASKS[i]) for i in indices],
        process_group=process_group,
    )


def test_two_gloo_ranks_whiten_their_shards_with_the_global_statistics(tmp_path):
    # Rank 1 runs in a subprocess (_whitening_worker.py), rank 0 here: one extra interpreter, not two.
    out = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"store": str(tmp_path / "store"), "shards": SHARDS, "rewards": REWARDS, "lengths": LENGTHS,
                                "masks": MASKS, "gamma": 0.9, "out": out}))
    worker = subprocess.Popen([sys.executable, str(WORKER), str(spec), "1"], stderr=subprocess.PIPE, text=True)
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=2,
                                timeout=timedelta(seconds=60))
        try:
            rank0 = [a.tolist() for a in advantages(SHARDS[0], process_group=dist.group.WORLD)]
        finally:
            dist.destroy_process_group()
        _, errors = worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, errors
    distributed = rank0 + json.loads(Path(out[1]).read_text())
    single = [a.tolist() for a in advantages(range(len(REWARDS)))]
    assert len(distributed) == len(single)
    for got, want in zip(distributed, single):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    shard_alone = advantages(SHARDS[1])  # without the group, a shard's own statistics differ
    assert shard_alone[0].tolist() != pytest.approx(single[2], rel=1e-3)
