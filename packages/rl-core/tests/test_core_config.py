import subprocess
import sys

import pytest
from pydantic import ValidationError

from rl_core.config import AlgorithmConfig, BatchConfig, DataConfig, SamplingConfig


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


def test_algorithm_flags_keep_slimes_names():
    fields = set(AlgorithmConfig.model_fields)
    slime_flags = {
        "advantage_estimator", "disable_rewards_normalization", "disable_grpo_std_normalization", "normalize_advantages",
        "gamma", "lambd", "kl_coef", "value_clip", "use_kl_loss", "kl_loss_coef", "kl_loss_type", "use_unbiased_kl",
        "entropy_coef", "eps_clip", "eps_clip_high", "eps_clip_c", "use_rollout_logprobs", "use_tis", "tis_clip",
        "tis_clip_low", "use_opsm", "opsm_delta",
    }
    assert slime_flags <= fields


@pytest.mark.parametrize("field", ["kl_coef", "kl_loss_coef", "entropy_coef", "tis_clip_low", "opsm_delta"])
def test_negative_coefficients_are_refused_by_name(field):
    with pytest.raises(ValidationError, match=field):
        AlgorithmConfig(**{field: -0.1})


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"use_tis": True, "tis_clip": 0.5, "tis_clip_low": 0.8}, ["tis_clip_low", "tis_clip"]),
        ({"kl_coef": 0.1, "advantage_estimator": "ppo", "use_kl_loss": True, "kl_loss_coef": 0.1}, ["kl_coef", "kl_loss_coef"]),
        ({"kl_coef": 0.1}, ["kl_coef", "grpo", "use-kl-loss"]),
        ({"advantage_estimator": "reinforce_plus_plus"}, ["normalize-advantages"]),
        ({"use_tis": True, "use_rollout_logprobs": True}, ["use_tis", "use_rollout_logprobs"]),
        ({"eps_clip_c": 1.1, "eps_clip_high": 0.28}, ["eps_clip_c", "eps_clip_high"]),
        ({"gamma": 0.9}, ["gamma", "grpo"]),
        ({"lambd": 0.9, "advantage_estimator": "reinforce_plus_plus", "normalize_advantages": True}, ["lambd"]),
        ({"value_clip": 0.5, "advantage_estimator": "gspo"}, ["value_clip"]),
        ({"disable_rewards_normalization": True, "advantage_estimator": "ppo"}, ["disable_rewards_normalization"]),
        ({"tis_mode": "mask"}, ["tis_mode", "use-tis"]),
        ({"opsm_delta": 0.01}, ["opsm_delta", "use-opsm"]),
        ({"advantage_estimator": "cispo", "eps_clip_c": 3.0}, ["eps_clip_c", "cispo"]),
        ({"gamma": 1.5, "advantage_estimator": "ppo"}, ["gamma"]),
    ],
)
def test_invalid_algorithm_combinations_name_the_fields(kwargs, named):
    with pytest.raises(ValidationError) as e:
        AlgorithmConfig(**kwargs)
    for name in named:
        assert name in str(e.value)


def test_valid_combinations_from_slimes_examples_are_accepted():
    AlgorithmConfig(advantage_estimator="ppo", gamma=0.99, lambd=0.95, kl_coef=0.05, value_clip=0.2, normalize_advantages=True)
    AlgorithmConfig(advantage_estimator="reinforce_plus_plus_baseline", kl_coef=0.01, normalize_advantages=True)
    AlgorithmConfig(advantage_estimator="cispo", eps_clip=1.0, eps_clip_high=4.0)
    AlgorithmConfig(use_tis=True, tis_clip=2.0, tis_mode="mask", use_opsm=True, opsm_delta=1e-3, eps_clip_c=3.0)


def test_loss_variant_follows_the_estimator():
    assert AlgorithmConfig(advantage_estimator="gspo").policy_loss_config().pg_loss_type == "gspo"
    assert AlgorithmConfig(advantage_estimator="cispo").policy_loss_config().pg_loss_type == "cispo"
    ppo = AlgorithmConfig(advantage_estimator="ppo", use_tis=True, tis_clip_low=0.5, use_opsm=True)
    loss = ppo.policy_loss_config()
    assert (loss.pg_loss_type, loss.use_tis, loss.tis_clip, loss.tis_clip_low, loss.use_opsm) == ("ppo", True, 2.0, 0.5, True)
    assert ppo.use_critic and not AlgorithmConfig().use_critic


def test_advantage_config_carries_the_reward_flags():
    cfg = AlgorithmConfig(
        advantage_estimator="ppo", gamma=0.9, lambd=0.8, kl_coef=0.1, kl_loss_type="k3", normalize_advantages=True
    ).advantage_config()
    assert (cfg.estimator, cfg.gamma, cfg.lambd, cfg.kl_coef, cfg.kl_type, cfg.normalize_advantages) == ("ppo", 0.9, 0.8, 0.1, "k3", True)
    dr_grpo = AlgorithmConfig(disable_grpo_std_normalization=True).advantage_config()
    assert not dr_grpo.std_normalize and dr_grpo.rewards_normalization


def test_parsing_the_config_does_not_import_torch():
    code = "import sys, rl_core.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_over_sampling_must_cover_the_rollout_batch():
    assert BatchConfig(rollout_batch_size=4, n_samples_per_prompt=2, over_sampling_batch_size=6).over_sampling_batch_size == 6
    with pytest.raises(ValidationError, match=r"over_sampling_batch_size \(3\) is smaller than rollout_batch_size \(4\)"):
        BatchConfig(rollout_batch_size=4, n_samples_per_prompt=2, over_sampling_batch_size=3)


def test_data_hooks_are_named_like_slimes_flags():
    cfg = DataConfig(
        prompt_data="train.parquet@[0:100]",
        dynamic_sampling_filter_path="rl_core.dynamic_sampling.check_reward_nonzero_std",
        buffer_filter_path="my.module.pick",
    )
    assert str(cfg.prompt_data).endswith("train.parquet@[0:100]")
