"""One rank of a two-rank checkpoint round trip, started by the tests with RANK/WORLD_SIZE/MASTER_* set.

Trains a step, saves the sharded checkpoint to <out>/ckpt, loads it into a second backend, takes the
same next step with both, and writes (rank 0) the largest weight difference and the resumed weights.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from rl_core.losses import PolicyLoss
from rl_core.train_batch import TrainBatch
from rl_fsdp import FSDPBackend, FSDPConfig

spec = json.loads(Path(sys.argv[1]).read_text())
out = Path(spec["out"])
config = FSDPConfig(**spec["config"])
batch = TrainBatch(**spec["batch"])
trained = FSDPBackend(config)
trained.train_step(batch, PolicyLoss())
trained.save(out / "ckpt")
resumed = FSDPBackend(config)
resumed.load(out / "ckpt")
trained.train_step(batch, PolicyLoss())
resumed.train_step(batch, PolicyLoss())
want = {name: t.cpu().clone() for name, t in trained.weights()}
got = {name: t.cpu().clone() for name, t in resumed.weights()}
if trained.rank == 0:
    save_file(got, str(out / "weights.safetensors"))
    max_diff = max((got[name] - want[name]).abs().max().item() for name in want)
    (out / "result.json").write_text(json.dumps({"max_diff": max_diff}))
resumed.close()
trained.close()
