"""One rank of a multi-process critic run, started by the tests with RANK/WORLD_SIZE/MASTER_* set.

Reads a JSON spec (critic config, batch), computes values and takes one train step; rank 0 writes the
metrics and values as JSON and the updated weights as safetensors.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from rl_core.losses import ValueLoss
from rl_core.train_batch import TrainBatch
from rl_fsdp import FSDPBackend, FSDPConfig

spec = json.loads(Path(sys.argv[1]).read_text())
out = Path(spec["out"])
config = dict(spec["config"])
loss = ValueLoss(value_clip=config.pop("value_clip"))
critic = FSDPBackend(FSDPConfig(head="value", **config))
batch = TrainBatch(**spec["batch"])
metrics = [critic.train_step(batch, loss) for _ in range(2)]
values = [t.tolist() for t in critic.forward(batch)]
weights = {name: t.cpu().clone() for name, t in critic.weights()}
if critic.rank == 0:
    save_file(weights, str(out / "weights.safetensors"))
    (out / "result.json").write_text(json.dumps({"metrics": metrics, "values": values}))
critic.close()
