import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rl_core.algorithms.policy_loss import PolicyLossConfig
from safetensors.torch import load_file

from rl_fsdp import FSDPBackend, FSDPConfig

WORKER = Path(__file__).with_name("_fsdp_worker.py")
TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(tmp_path, config: dict, batch) -> tuple[dict, dict]:
    """Start two gloo ranks on loopback; returns rank 0's results (metrics, log-probs) and weights."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"config": config, "batch": dataclasses.asdict(batch), "out": str(tmp_path)}))
    env = os.environ | {
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(spec)], env=env | {"RANK": str(rank)}, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    try:
        errors = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, err) in enumerate(zip(procs, errors)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{err[-3000:]}"
    return json.loads((tmp_path / "result.json").read_text()), load_file(tmp_path / "weights.safetensors")


def one_rank(config: dict, batch):
    backend = FSDPBackend(FSDPConfig(**config))
    try:
        log_probs = backend.compute_log_probs(batch)
        metrics = backend.train_step(batch)
        weights = {name: t.cpu().clone() for name, t in backend.named_weights()}
    finally:
        backend.close()
    return metrics, log_probs, weights


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_samples, old_policy",
    [(5, "rollout"), (1, "batch")],
    ids=["uneven-split-rollout-as-old", "fewer-samples-than-ranks-tis-with-batch-old"],
)
def test_two_ranks_give_the_same_update_as_one(tmp_path, tied_dir, make_batch, num_samples, old_policy):
    loss = PolicyLossConfig(use_kl_loss=True, kl_loss_coef=0.1, entropy_coef=0.01, use_tis=old_policy == "batch")
    config = dict(
        model_path=str(tied_dir), lr=0.5, adam_eps=1.0, param_dtype="float32", micro_batch_size=2,
        loss=dataclasses.asdict(loss), use_rollout_logprobs=old_policy == "rollout",
    )
    batch = make_batch(num_samples, seed=7, rollout_log_probs=True)
    if old_policy == "batch":
        # The filler micro-batch of the rank without a sample must carry old and rollout log-probs too.
        batch = dataclasses.replace(batch, old_log_probs=[[lp + 1.5 for lp in row] for row in batch.rollout_log_probs])
    result, weights = run_two_ranks(tmp_path, config, batch)
    metrics, log_probs, expected = one_rank(config | {"loss": loss}, batch)

    for got, want in zip(result["log_probs"], log_probs):
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-6, rtol=0)
    assert sorted(weights) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], atol=1e-5, rtol=0)
    assert sorted(result["metrics"]) == sorted(metrics)
    for key in ("loss", "pg_loss", "pg_clipfrac", "ppo_kl", "entropy", "kl_loss", "grad_norm", "train_rollout_logprob_abs_diff", "tis", "ois"):
        assert result["metrics"][key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), key
