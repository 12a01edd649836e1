"""The trainer side's weight-sync group joins SGLang's own process-group helper over gloo.

The engine ranks run SGLang 0.5.23's `init_custom_process_group`: imported from SGLang where it is
installed (e.g. the wheel with `--no-deps` plus its few small imports), else its source as read
from the wheel into the API fixture. Each engine TP rank is its own process, as in SGLang, and
picks its rank with the expression SGLang's weight updater uses (`rank_offset + tp_rank`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rl_sglang.api_fixture import sglang_api
from rl_sglang.launcher import free_port
from rl_sglang.process_group import join_weight_sync_group

pytestmark = pytest.mark.slow
GROUP = "weight_update_group"
TIMEOUT_S = 180  # each engine rank imports torch: slow on a loaded 2-core machine
SRC = str(Path(__file__).resolve().parents[1] / "src")


# One SGLang TP rank, in its own process: join as SGLang's weight updater does, then receive as its
# `receive_weights_from_distributed` does (`torch.distributed.broadcast(..., src=0, group=pg)`).
ENGINE_RANK = r"""
import importlib.util, json, sys, types
import torch
from rl_sglang.api_fixture import sglang_api
from rl_sglang.process_group import tcp_init_method

port, rank_offset, tp_rank, world_size, group_name = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
shapes = json.loads(sys.argv[6])
try:
    from sglang.srt.utils.common import init_custom_process_group as helper
    where = "installed sglang"
except ImportError:
    namespace = {"torch": torch, "torch_release": tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])}
    exec(sglang_api()["process_group"]["helper_source"], namespace)
    helper, where = namespace["init_custom_process_group"], "source from the wheel"
rank = eval(sglang_api()["process_group"]["engine_rank"], {}, {"rank_offset": rank_offset, "self": types.SimpleNamespace(tp_rank=tp_rank)})
group = helper(backend="gloo", init_method=tcp_init_method("127.0.0.1", port), world_size=world_size, rank=rank, group_name=group_name)
received = []
for shape in shapes:
    buffer = torch.empty(shape, dtype=torch.float32)
    torch.distributed.broadcast(buffer, src=0, group=group)
    received.append(buffer.tolist())
print(json.dumps({"rank": rank, "received": received, "helper": where}), flush=True)
# Leave without running gloo's destructors: its threads, still up at interpreter exit, can abort the process
# ("terminate called without an active exception") after the work is done; SGLang keeps the group for its life.
import os
os._exit(0)
"""


def test_the_trainer_side_group_meets_sglangs_helper_and_broadcasts_to_every_tp_rank():
    assert sglang_api()["process_group"]["engine_rank"] == "rank_offset + self.tp_rank"
    port, tp_size = free_port(), 2
    world_size = 1 + tp_size
    generator = torch.Generator().manual_seed(0)
    sent = [torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
    shapes = json.dumps([list(t.shape) for t in sent])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)}
    engines = [
        subprocess.Popen(
            [sys.executable, "-c", ENGINE_RANK, str(port), "1", str(tp_rank), str(world_size), GROUP, shapes],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for tp_rank in range(tp_size)
    ]
    try:
        group = join_weight_sync_group("127.0.0.1", port, 0, world_size, GROUP, "gloo", timeout_s=TIMEOUT_S)
        for tensor in sent:
            group.broadcast_from_rank0(tensor.clone())
        outputs = [process.communicate(timeout=TIMEOUT_S) for process in engines]
    except Exception as exc:  # say what the engine ranks said
        for process in engines:
            process.kill()
        raise AssertionError(f"{exc}; engine ranks said: {[p.communicate()[1][-2000:] for p in engines]}") from exc
    for process, (_, stderr) in zip(engines, outputs):
        assert process.returncode == 0, stderr
    answers = [json.loads(stdout) for stdout, _ in outputs]
    assert sorted(a["rank"] for a in answers) == [1, 2]
    for answer in answers:
        assert answer["received"] == [t.tolist() for t in sent]
