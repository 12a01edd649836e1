import pytest
from pydantic import ValidationError

from rl_core.config import AlgorithmConfig, BatchConfig, SamplingConfig


def test_global_batch_defaults_to_one_step_per_rollout():
    cfg = BatchConfig(rollout_batch_size=32, n_samples_per_prompt=8)
    assert (cfg.global_batch_size, cfg.num_steps_per_rollout) == (256, 1)


def test_steps_are_derived_from_global_batch_size():
    cfg = BatchConfig(rollout_batch_size=32, n_samples_per_prompt=8, global_batch_size=64)
    assert cfg.num_steps_per_rollout == 4


def test_disagreeing_batch_fields_are_named():
    with pytest.raises(ValidationError) as e:
        BatchConfig(rollout_batch_size=32, n_samples_per_prompt=8, global_batch_size=128, num_steps_per_rollout=3)
    msg = str(e.value)
    for field in ("rollout_batch_size", "n_samples_per_prompt", "global_batch_size", "num_steps_per_rollout"):
        assert field in msg


def test_global_batch_that_does_not_divide_the_rollout_is_refused():
    with pytest.raises(ValidationError, match="not a multiple of global_batch_size"):
        BatchConfig(rollout_batch_size=3, n_samples_per_prompt=3, global_batch_size=4)


def test_micro_batch_must_divide_global_batch():
    with pytest.raises(ValidationError, match="micro_batch_size"):
        BatchConfig(rollout_batch_size=2, n_samples_per_prompt=3, micro_batch_size=4)


def test_kl_coef_without_use_kl_loss_is_refused():
    with pytest.raises(ValidationError, match="use_kl_loss"):
        AlgorithmConfig(kl_loss_coef=0.1)


def test_unknown_estimator_is_refused():
    with pytest.raises(ValidationError, match="advantage_estimator"):
        AlgorithmConfig(advantage_estimator="foo")


def test_unknown_field_is_refused():
    with pytest.raises(ValidationError, match="rollout_batchsize"):
        BatchConfig(rollout_batchsize=3)


def test_sampling_params_are_sglang_shaped():
    params = SamplingConfig(rollout_temperature=0.7, rollout_max_response_len=16, rollout_stop_token_ids=[2]).sampling_params()
    assert params == {"temperature": 0.7, "top_p": 1.0, "top_k": -1, "max_new_tokens": 16, "stop_token_ids": [2]}


def test_policy_loss_config_defaults_upper_clip_to_lower():
    assert AlgorithmConfig(eps_clip=0.1).policy_loss_config().eps_clip_high == 0.1
