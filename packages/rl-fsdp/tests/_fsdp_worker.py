"""One rank of a multi-process FSDP run, started by the tests with RANK/WORLD_SIZE/MASTER_* set.

Reads a JSON spec (backend config, policy-loss settings, batch), takes one train step, and writes rank 0's results:
metrics and log-probs as JSON, the updated weights as safetensors.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from rl_core.algorithms.policy_loss import PolicyLossConfig
from rl_core.losses import PolicyLoss
from rl_core.train_batch import TrainBatch
from rl_fsdp import FSDPBackend, FSDPConfig

spec = json.loads(Path(sys.argv[1]).read_text())
out = Path(spec["out"])
config = dict(spec["config"])
loss = PolicyLoss(PolicyLossConfig(**config.pop("loss")), use_rollout_logprobs=config.pop("use_rollout_logprobs"))
backend = FSDPBackend(FSDPConfig(**config))
batch = TrainBatch(**spec["batch"])
log_probs = [t.tolist() for t in backend.forward(batch)]
metrics = backend.train_step(batch, loss)
weights = {name: t.cpu().clone() for name, t in backend.weights()}
if backend.rank == 0:
    save_file(weights, str(out / "weights.safetensors"))
    (out / "result.json").write_text(json.dumps({"metrics": metrics, "log_probs": log_probs}))
backend.close()
