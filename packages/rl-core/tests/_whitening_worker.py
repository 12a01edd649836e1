"""One data-parallel rank of the whitening test: whitens its shard's advantages with the group's statistics.

Usage: python _whitening_worker.py SPEC_JSON RANK, where the spec holds the store path, the shards and the
samples; writes this rank's advantages as JSON next to the store.
"""

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from rl_core.algorithms.advantages import compute_advantages

spec = json.loads(Path(sys.argv[1]).read_text())
rank = int(sys.argv[2])
dist.init_process_group("gloo", init_method=f"file://{spec['store']}", rank=rank, world_size=2, timeout=timedelta(seconds=60))
try:
    shard = spec["shards"][rank]
    advantages = compute_advantages(
        "reinforce_plus_plus",
        [spec["rewards"][i] for i in shard],
        1,
        [spec["lengths"][i] for i in shard],
        gamma=spec["gamma"],
        normalize_advantages=True,
        loss_masks=[torch.tensor(spec["masks"][i]) for i in shard],
        process_group=dist.group.WORLD,
    )
    Path(spec["out"][rank]).write_text(json.dumps([a.tolist() for a in advantages]))
finally:
    dist.destroy_process_group()
