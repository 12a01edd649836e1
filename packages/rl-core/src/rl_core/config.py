"""Typed configuration sections whose field names are slime's flag names (`rollout_batch_size` is
`--rollout-batch-size`). Combinations are checked here, where input enters, and errors name the fields."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from rl_core.algorithms.advantages import AdvantageConfig
    from rl_core.algorithms.policy_loss import PolicyLossConfig
    from rl_core.losses import PolicyLoss, SFTLoss, ValueLoss


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)
    help_section: ClassVar[str] = "other"
    """The `--help` group of the fields this class declares."""


class DataConfig(Section):
    help_section: ClassVar[str] = "data"

    prompt_data: Path | None = None
    """JSONL (one JSON object per line) or Parquet file of prompts; `path@[start:end]` takes a slice of its rows."""
    input_key: str = "prompt"
    """Key of the prompt (a string, or a list of chat messages) in each row."""
    label_key: str | None = "label"
    """Key of the reference answer in each row."""
    metadata_key: str = "metadata"
    """Key of a per-row dict copied into each sample's metadata."""
    apply_chat_template: bool = False
    """Render prompts with the tokenizer's chat template (with the generation prompt)."""
    apply_chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    """JSON object of extra keywords for the chat template, e.g. '{"enable_thinking": false}' (with --apply-chat-template)."""
    tool_key: str | None = "tools"
    """Key of a row's tool list (a JSON list or its string): passed to the chat template as tools= and kept in metadata["tools"]."""
    num_epoch: int | None = Field(None, gt=0)
    """Passes over the prompts: sets num_rollout to num_epoch x prompts // rollout_batch_size (give it or --num-rollout)."""
    rollout_shuffle: bool = False
    """Shuffle the prompts each epoch."""
    rollout_seed: int = 42
    """Seed of the prompt shuffle; engine i samples with seed rollout_seed + i (embedded: --seed, SGLang: --random-seed)."""
    rollout_max_prompt_len: int | None = None
    """Prompts longer than this many tokens are refused with the file and line."""
    dynamic_sampling_filter_path: str | None = None
    """Group filter `function(group) -> bool` as `module:function` or `path/to/file.py:function`, e.g.
    rl_core.dynamic_sampling:check_reward_nonzero_std."""
    buffer_filter_path: str | None = None
    """Buffer selection `function(buffer, num_groups) -> indices` as `module:function` or `path/to/file.py:function`;
    default: oldest groups first."""


class BatchConfig(Section):
    help_section: ClassVar[str] = "rollout"

    rollout_batch_size: int = Field(8, gt=0)
    """Prompts per rollout."""
    n_samples_per_prompt: int = Field(8, gt=0)
    """Responses sampled per prompt (the GRPO group size)."""
    global_batch_size: int | None = Field(None, gt=0)
    """Samples per optimizer step; defaults to all samples of a rollout."""
    num_steps_per_rollout: int | None = Field(None, gt=0)
    """Optimizer steps per rollout; derived from global_batch_size when not given."""
    micro_batch_size: int = Field(1, gt=0)
    """Samples per forward/backward pass."""
    over_sampling_batch_size: int | None = Field(None, gt=0)
    """Prompts generated per dynamic-sampling round; defaults to rollout_batch_size."""
    num_rollout: int = Field(100, gt=0)
    """Rollouts (generate -> train -> sync cycles) to run."""

    @model_validator(mode="after")
    def _check_batch_arithmetic(self) -> BatchConfig:
        samples = self.rollout_batch_size * self.n_samples_per_prompt
        where = (
            f"rollout_batch_size ({self.rollout_batch_size}) x n_samples_per_prompt ({self.n_samples_per_prompt})"
            f" = {samples} samples per rollout"
        )
        size, steps = self.global_batch_size, self.num_steps_per_rollout
        if size is None and steps is None:
            size = samples
        if size is None:
            assert steps is not None
            if samples % steps:
                raise ValueError(
                    f"{where} do not split into num_steps_per_rollout ({steps}) steps;"
                    f" {nearest_divisors(samples, steps, 'num_steps_per_rollout')}"
                )
            size = samples // steps
        if steps is None:
            if samples % size:
                raise ValueError(
                    f"{where} is not a multiple of global_batch_size ({size});"
                    f" {nearest_divisors(samples, size, 'global_batch_size')}"
                )
            steps = samples // size
        if size * steps != samples:
            hint = (f" (num_steps_per_rollout {samples // size} goes with global_batch_size {size})"
                    if samples % size == 0 else "")
            raise ValueError(
                f"{where}, but global_batch_size ({size}) x num_steps_per_rollout ({steps}) = {size * steps};"
                f" give one of them{hint}"
            )
        object.__setattr__(self, "global_batch_size", size)
        object.__setattr__(self, "num_steps_per_rollout", steps)
        if self.over_sampling_batch_size is not None and self.over_sampling_batch_size < self.rollout_batch_size:
            raise ValueError(
                f"over_sampling_batch_size ({self.over_sampling_batch_size}) is smaller than rollout_batch_size"
                f" ({self.rollout_batch_size}): each round must be able to fill the rollout"
            )
        if size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size ({size}) is not a multiple of micro_batch_size ({self.micro_batch_size});"
                f" {nearest_divisors(size, self.micro_batch_size, 'micro_batch_size')}"
            )
        return self


def nearest_divisors(total: int, wanted: int, name: str, *, multiple_of: int = 1) -> str:
    """'nearest that work: name A or B': the divisors of `total` (multiples of `multiple_of`) just below and above `wanted`."""
    fits = [d for d in range(multiple_of, total + 1, multiple_of) if total % d == 0]
    below = [d for d in fits if d < wanted][-1:]
    above = [d for d in fits if d > wanted][:1]
    options = below + above
    if not options:
        return f"no value of {name} works"
    return f"nearest that work: {name} {' or '.join(map(str, options))}"


class SamplingConfig(Section):
    help_section: ClassVar[str] = "rollout"

    rollout_temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature; 0 is greedy (as SGLang)."""
    rollout_top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest token set of this probability mass."""
    rollout_top_k: int = -1
    """-1 keeps every token."""
    rollout_max_response_len: int = Field(256, gt=0)
    """Most tokens generated per response."""
    rollout_stop_token_ids: list[int] | None = None
    """Token ids that end a response (kept in it), e.g. a chat template's end-of-turn token."""
    rollout_stop: list[str] | None = None
    """Strings that end a response; kept in the response text, as slime asks SGLang (no_stop_trim). SGLang engines only."""
    rollout_skip_special_tokens: bool | None = None
    """Drop special tokens from the response text the reward sees (default: the engine's, which drops them;
    slime sends false unless given)."""

    def sampling_params(self) -> dict:
        """The SGLang `sampling_params` these settings mean."""
        params: dict[str, Any] = {
            "temperature": self.rollout_temperature,
            "top_p": self.rollout_top_p,
            "top_k": self.rollout_top_k,
            "max_new_tokens": self.rollout_max_response_len,
        }
        if self.rollout_stop_token_ids:
            params["stop_token_ids"] = list(self.rollout_stop_token_ids)
        if self.rollout_stop:
            params["stop"] = list(self.rollout_stop)
            params["no_stop_trim"] = True  # the text keeps the stop string, as the response tokens do
        if self.rollout_skip_special_tokens is not None:
            params["skip_special_tokens"] = self.rollout_skip_special_tokens
        return params


# AlgorithmConfig fields that only shape advantages or the policy-gradient loss, which --loss-type sft_loss skips.
_POLICY_LOSS_ONLY = (
    "advantage_estimator", "disable_grpo_std_normalization", "disable_rewards_normalization", "normalize_advantages",
    "gamma", "lambd", "kl_coef", "value_clip", "use_kl_loss", "kl_loss_coef", "kl_loss_type", "use_unbiased_kl",
    "entropy_coef", "eps_clip", "eps_clip_high", "eps_clip_c", "use_rollout_logprobs", "use_tis", "tis_clip",
    "tis_clip_low", "tis_mode", "use_opsm", "opsm_delta", "num_critic_only_steps",
)


class AlgorithmConfig(Section):
    help_section: ClassVar[str] = "algorithm"

    loss_type: Literal["policy_loss", "sft_loss"] = "policy_loss"
    """policy_loss: the policy-gradient loss on advantages; sft_loss: negative log-likelihood of the
    loss-mask tokens, with no advantages computed (slime's supervised fine-tuning)."""
    advantage_estimator: str = "grpo"
    """Advantage estimator by name: grpo, gspo, cispo, reinforce_plus_plus, reinforce_plus_plus_baseline, ppo."""
    disable_grpo_std_normalization: bool = False
    """Subtract the group mean only; do not divide by the group std (Dr. GRPO)."""
    disable_rewards_normalization: bool = False
    """Use the raw rewards: no group mean subtracted, no std division (grpo, gspo, cispo, reinforce_plus_plus_baseline)."""
    normalize_advantages: bool = False
    """Whiten the advantages over the global batch (masked mean 0, std 1); required by the REINFORCE++ estimators."""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """Discount of token rewards (ppo, reinforce_plus_plus)."""
    lambd: float = Field(1.0, ge=0.0, le=1.0)
    """GAE lambda (ppo)."""
    kl_coef: float = Field(0.0, ge=0.0)
    """Weight of the KL(policy || reference) penalty folded into token rewards (ppo, reinforce_plus_plus*)."""
    value_clip: float = Field(0.2, gt=0.0)
    """Clip range of the critic's value change in the value loss (ppo)."""
    use_kl_loss: bool = False
    """Add kl_loss_coef x KL(policy || reference) to the loss."""
    kl_loss_coef: float = Field(0.0, ge=0.0)
    """Weight of the KL loss (with --use-kl-loss)."""
    kl_loss_type: Literal["k1", "k2", "k3", "low_var_kl"] = "low_var_kl"
    """KL estimator of the KL loss and of the reward penalty."""
    use_unbiased_kl: bool = False
    """Weight the KL loss by the importance ratio pi / pi_old (DeepSeek-V3.2)."""
    entropy_coef: float = Field(0.0, ge=0.0)
    """Weight of the entropy bonus (subtracted from the loss)."""
    eps_clip: float = Field(0.2, gt=0.0)
    """Lower PPO clip range: ratios below 1 - eps_clip are clipped."""
    eps_clip_high: float | None = Field(None, gt=0.0)
    """Upper PPO clip range; defaults to eps_clip."""
    eps_clip_c: float | None = Field(None, gt=1.0)
    """Dual-clip bound for negative advantages (must exceed 1 + eps_clip_high)."""
    loss_aggregation: Literal["token_mean", "sample_mean", "constant"] = "token_mean"
    """How token losses are reduced over the global batch."""
    loss_aggregation_constant: float = Field(1.0, gt=0.0)
    """Divisor of the summed loss when loss_aggregation is `constant`."""
    use_rollout_logprobs: bool = False
    """Use the engine's log-probs as the old policy instead of recomputing them in the trainer."""
    use_tis: bool = False
    """Truncated importance sampling: weight token losses by pi_old / pi_rollout within [tis_clip_low, tis_clip]."""
    tis_clip: float = Field(2.0, gt=0.0)
    """Upper bound of the importance weight."""
    tis_clip_low: float = Field(0.0, ge=0.0)
    """Lower bound of the importance weight."""
    tis_mode: Literal["truncate", "mask"] = "truncate"
    """truncate: clamp weights into the bounds; mask: zero the tokens whose weight falls outside them."""
    use_opsm: bool = False
    """Off-policy sequence masking: drop negative-advantage sequences whose KL from the old policy exceeds opsm_delta."""
    opsm_delta: float = Field(1e-4, ge=0.0)
    """Sequence KL threshold of off-policy sequence masking."""
    num_critic_only_steps: int = Field(0, ge=0)
    """The first N rollouts train only the critic (ppo), so the policy's first advantages come from a warmed-up critic."""

    @model_validator(mode="after")
    def _check_algorithm(self) -> AlgorithmConfig:
        # Imported here so that parsing flags does not import torch.
        from rl_core.algorithms.advantages import ADVANTAGE_ESTIMATORS, GROUP_RELATIVE, KL_SHAPED

        estimator = self.advantage_estimator
        if self.loss_type == "sft_loss":
            ignored_by_sft = [f"--{n.replace('_', '-')}" for n in _POLICY_LOSS_ONLY if n in self.model_fields_set]
            if ignored_by_sft:
                raise ValueError(
                    f"{', '.join(ignored_by_sft)}: shape advantages or the policy loss, which --loss-type sft_loss"
                    " does not compute; drop them or use --loss-type policy_loss"
                )
        if estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage_estimator {estimator!r} is not one of {sorted(ADVANTAGE_ESTIMATORS)}")
        if self.use_kl_loss and self.kl_loss_coef == 0.0:
            raise ValueError("use_kl_loss is set but kl_loss_coef is 0: set --kl-loss-coef or drop --use-kl-loss")
        if not self.use_kl_loss and self.kl_loss_coef > 0.0:
            raise ValueError(f"kl_loss_coef is {self.kl_loss_coef} but use_kl_loss is off: add --use-kl-loss")
        if self.kl_coef > 0.0 and self.kl_loss_coef > 0.0:
            raise ValueError(
                f"kl_coef ({self.kl_coef}) and kl_loss_coef ({self.kl_loss_coef}) are both set: put the KL either"
                " in the reward (--kl-coef) or in the loss (--use-kl-loss --kl-loss-coef), not both"
            )
        if self.kl_coef > 0.0 and estimator not in KL_SHAPED:
            raise ValueError(
                f"kl_coef ({self.kl_coef}) has no effect with advantage_estimator {estimator!r}: it shapes token"
                f" rewards only for {', '.join(KL_SHAPED)}; use --use-kl-loss --kl-loss-coef instead"
            )
        if estimator.startswith("reinforce_plus_plus") and not self.normalize_advantages:
            raise ValueError(f"advantage_estimator {estimator!r} needs normalize_advantages: add --normalize-advantages")
        ignored = {
            "disable_grpo_std_normalization": self.disable_grpo_std_normalization and estimator not in GROUP_RELATIVE,
            "disable_rewards_normalization": self.disable_rewards_normalization
            and estimator not in (*GROUP_RELATIVE, "reinforce_plus_plus_baseline"),
            "gamma": "gamma" in self.model_fields_set and estimator not in ("ppo", "reinforce_plus_plus"),
            "lambd": "lambd" in self.model_fields_set and estimator != "ppo",
            "value_clip": "value_clip" in self.model_fields_set and estimator != "ppo",
            "eps_clip_c": self.eps_clip_c is not None and estimator == "cispo",
        }
        for name, is_ignored in ignored.items():
            if is_ignored:
                raise ValueError(f"{name} is set but advantage_estimator {estimator!r} does not use it")
        if "num_critic_only_steps" in self.model_fields_set and not self.use_critic:
            raise ValueError(
                f"num_critic_only_steps is set but advantage_estimator {estimator!r} trains no critic (only 'ppo' does)"
            )
        if self.use_tis and self.use_rollout_logprobs:
            raise ValueError(
                "use_tis and use_rollout_logprobs are both set: TIS corrects the trainer's old log-probs towards the"
                " rollout ones, so drop --use-rollout-logprobs (or --use-tis)"
            )
        if self.tis_clip_low >= self.tis_clip:
            raise ValueError(f"tis_clip_low ({self.tis_clip_low}) must be below tis_clip ({self.tis_clip})")
        if "tis_mode" in self.model_fields_set and not self.use_tis:
            raise ValueError(f"tis_mode is {self.tis_mode!r} but use_tis is off: add --use-tis")
        if "opsm_delta" in self.model_fields_set and not self.use_opsm:
            raise ValueError(f"opsm_delta is {self.opsm_delta} but use_opsm is off: add --use-opsm")
        upper = 1.0 + (self.eps_clip_high if self.eps_clip_high is not None else self.eps_clip)
        if self.eps_clip_c is not None and self.eps_clip_c <= upper:
            raise ValueError(
                f"eps_clip_c ({self.eps_clip_c}) must exceed the upper clip bound 1 + eps_clip_high ({upper}),"
                " or dual clipping would cut losses inside the trust region"
            )
        return self

    @property
    def use_critic(self) -> bool:
        """Whether a critic must be trained (slime derives it from the estimator too)."""
        return self.advantage_estimator == "ppo"

    def advantage_config(self) -> AdvantageConfig:
        from rl_core.algorithms.advantages import AdvantageConfig

        return AdvantageConfig(
            estimator=self.advantage_estimator,
            std_normalize=not self.disable_grpo_std_normalization,
            rewards_normalization=not self.disable_rewards_normalization,
            normalize_advantages=self.normalize_advantages,
            gamma=self.gamma,
            lambd=self.lambd,
            kl_coef=self.kl_coef,
            kl_type=self.kl_loss_type,
        )

    def policy_loss_config(self) -> PolicyLossConfig:
        from rl_core.algorithms.policy_loss import PolicyLossConfig

        estimator = self.advantage_estimator
        return PolicyLossConfig(
            eps_clip=self.eps_clip,
            eps_clip_high=self.eps_clip_high if self.eps_clip_high is not None else self.eps_clip,
            eps_clip_c=self.eps_clip_c,
            use_kl_loss=self.use_kl_loss,
            kl_loss_coef=self.kl_loss_coef,
            kl_loss_type=self.kl_loss_type,
            use_unbiased_kl=self.use_unbiased_kl,
            entropy_coef=self.entropy_coef,
            aggregation=self.loss_aggregation,
            aggregation_constant=self.loss_aggregation_constant,
            pg_loss_type="gspo" if estimator == "gspo" else "cispo" if estimator == "cispo" else "ppo",
            use_tis=self.use_tis,
            tis_clip=self.tis_clip,
            tis_clip_low=self.tis_clip_low,
            tis_mode=self.tis_mode,
            use_opsm=self.use_opsm,
            opsm_delta=self.opsm_delta,
        )


class RLStepConfig(AlgorithmConfig, BatchConfig):
    """Everything `rl_core.rl_step.rl_step` reads: the algorithm and the batch arithmetic."""

    def policy_loss(self) -> PolicyLoss:
        from rl_core.losses import PolicyLoss

        return PolicyLoss(self.policy_loss_config(), use_rollout_logprobs=self.use_rollout_logprobs)

    def sft_loss(self) -> SFTLoss:
        from rl_core.losses import SFTLoss

        return SFTLoss(self.loss_aggregation, self.loss_aggregation_constant)

    def value_loss(self) -> ValueLoss:
        from rl_core.losses import ValueLoss

        return ValueLoss(self.value_clip, self.loss_aggregation, self.loss_aggregation_constant)
