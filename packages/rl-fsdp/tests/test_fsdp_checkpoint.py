import dataclasses
import random
from pathlib import Path

import pytest
import torch

from rl_core.losses import PolicyLoss, ValueLoss
from rl_fsdp import FSDPBackend, FSDPConfig


def weights(backend):
    return {name: t.cpu().clone() for name, t in backend.weights()}


def adam_moments(optimizer):
    return [{k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
            for state in optimizer.state.values()]


def test_a_resumed_backend_holds_the_same_weights_and_adam_state_and_takes_the_same_next_step(llama_dir, make_batch, tmp_path):
    config = FSDPConfig(model_path=llama_dir, lr=1e-2, param_dtype="float32")
    first, second = make_batch(4, seed=1), make_batch(4, seed=2)
    trained, resumed = FSDPBackend(config), FSDPBackend(config)
    try:
        trained.train_step(first, PolicyLoss())
        trained.save(tmp_path / "ckpt")
        resumed.load(tmp_path / "ckpt")
        for name, tensor in weights(trained).items():
            torch.testing.assert_close(weights(resumed)[name], tensor, atol=0, rtol=0)
        for ours, theirs in zip(adam_moments(resumed.optimizer), adam_moments(trained.optimizer), strict=True):
            assert ours.keys() == theirs.keys() == {"step", "exp_avg", "exp_avg_sq"}
            for key in ours:
                torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0)

        trained.train_step(second, PolicyLoss())
        resumed.train_step(second, PolicyLoss())
        for name, tensor in weights(trained).items():
            torch.testing.assert_close(weights(resumed)[name], tensor, atol=1e-6, rtol=0)
    finally:
        trained.close()
        resumed.close()


def test_weights_alone_without_adam_state_do_not_reproduce_the_next_step(llama_dir, make_batch, tmp_path):
    config = FSDPConfig(model_path=llama_dir, lr=1e-2, param_dtype="float32")
    first, second = make_batch(4, seed=1), make_batch(4, seed=2)
    trained = FSDPBackend(config)
    try:
        trained.train_step(first, PolicyLoss())
        trained.save_pretrained(tmp_path / "hf")
        trained.train_step(second, PolicyLoss())
        want = weights(trained)
    finally:
        trained.close()
    weights_only = FSDPBackend(config.model_copy(update={"model_path": tmp_path / "hf"}))
    try:
        weights_only.train_step(second, PolicyLoss())
        got = weights(weights_only)
    finally:
        weights_only.close()
    assert max((got[name] - tensor).abs().max().item() for name, tensor in want.items()) > 1e-4


def test_loading_a_folder_without_a_checkpoint_names_it(llama_dir, tmp_path):
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir))
    try:
        with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
            backend.load(tmp_path)
    finally:
        backend.close()


def test_a_critic_resumes_with_its_value_head_and_optimizer(llama_dir, make_batch, tmp_path):
    config = FSDPConfig(model_path=llama_dir, head="value", lr=1e-2, param_dtype="float32")
    plain = make_batch(4, seed=3)
    rng = random.Random(3)
    batch = dataclasses.replace(
        plain,
        returns=[[rng.uniform(-1, 1) for _ in range(n)] for n in plain.response_lengths],
        values=[[rng.uniform(-0.3, 0.3) for _ in range(n)] for n in plain.response_lengths],
    )
    trained, resumed = FSDPBackend(config), FSDPBackend(config)
    try:
        trained.train_step(batch, ValueLoss())
        trained.save(tmp_path / "critic")
        resumed.load(tmp_path / "critic")
        trained.train_step(batch, ValueLoss())
        resumed.train_step(batch, ValueLoss())
        for got, want in zip(resumed.forward(batch), trained.forward(batch), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    finally:
        trained.close()
        resumed.close()


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_two_ranks_and_on_one(run_two_ranks, tied_dir, make_batch, tmp_path):
    config = dict(model_path=str(tied_dir), lr=0.5, adam_eps=1.0, param_dtype="float32", micro_batch_size=2)
    batch = make_batch(4, seed=5)
    result, two_rank_weights = run_two_ranks(Path(__file__).with_name("_fsdp_checkpoint_worker.py"), config, batch)
    assert result["max_diff"] < 1e-6
    # The same checkpoint, read by one rank (each rank's shards are reassembled), takes the same step.
    one = FSDPBackend(FSDPConfig(**config))
    try:
        one.load(tmp_path / "ckpt")
        one.train_step(batch, PolicyLoss())
        for name, tensor in weights(one).items():
            torch.testing.assert_close(tensor, two_rank_weights[name], atol=1e-5, rtol=0)
    finally:
        one.close()
