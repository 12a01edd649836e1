"""`rl-train --train-backend megatron`: the same loop and RL step with the megatron-core backend behind the
TrainingBackend seam; the engines serve exactly the weights it exports under HF names."""

import pytest

from rl_apps.metrics import read_metrics
from rl_apps.train import InputError, check_inputs, run


@pytest.mark.slow
def test_the_loop_trains_through_megatron_and_the_engines_serve_its_weights(tiny_run_config, tmp_path):
    rows = read_metrics(run(tiny_run_config(tmp_path / "run", train_backend="megatron", num_rollout=2,
                                            update_weight_transport="disk", use_tensorboard=False, save_reward_curve=False)))
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:
        # The engine's log-probs equal the trainer's before the update: its weights are the backend's export.
        assert row["train/train_rollout_logprob_abs_diff"] < 1e-3
        assert row["train/grad_norm"] > 0
    assert rows[1]["rollout/weight_version_min"] == rows[1]["rollout/weight_version_max"] == 1


def test_megatron_flags_are_checked_against_the_model_before_ray_starts(tiny_run_config, tmp_path):
    with pytest.raises(InputError, match="--tensor-model-parallel-size=3: does not divide"):
        check_inputs(tiny_run_config(tmp_path / "run", train_backend="megatron", tensor_model_parallel_size=3))
    with pytest.raises(ValueError, match="--tensor-model-parallel-size: megatron-core flag.*--train-backend megatron"):
        tiny_run_config(tmp_path / "run", tensor_model_parallel_size=2)
