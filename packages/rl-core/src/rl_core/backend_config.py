"""What every training backend is built from, whichever implements it; each backend package extends it
with a `type` literal and its own fields, and a `build_backend(config)` factory beside it reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rl_core.micro_batch_plan import Batching

DEFAULT_MAX_TOKENS_PER_GPU = 16384
"""Token budget of a dynamic micro-batch when none is given: eight 2,048-token samples, one pass large
enough to keep a GPU's matmuls busy; lower it (or turn on activation checkpointing) for large models."""


class BackendConfig(BaseModel):
    """One model the loop trains: the policy (LM head), PPO's critic (value head) or an SFT model."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    type: str
    """Which backend implements it (`fsdp`, `megatron`); slime's --train-backend."""
    model_path: Path
    """Hugging Face model directory: config.json plus *.safetensors, or config.json alone for a random init."""
    head: Literal["lm", "value"] = "lm"
    """lm: the causal LM (forward gives log-probs); value: its body with a scalar value head, starting at zero."""
    ref_model: bool = False
    """Keep a frozen copy of the initial weights, the KL reference (forward(model="reference"))."""
    rollout_temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature of the engine; logits are divided by it so log-probs match the engine's."""
    seed: int = 42
    """Seed of the random init when model_path has no weights (the same on every rank)."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """adam is AdamW (decoupled weight decay), as Megatron's adam."""
    lr: float = Field(1e-6, ge=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    """Floor of the decayed learning rate."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    lr_decay_iters: int | None = Field(None, gt=0)
    """Optimizer steps over which the learning rate decays from lr to min_lr; None: it stays at lr."""
    lr_warmup_iters: int = Field(0, ge=0)
    """Optimizer steps of linear warm-up from 0 to lr."""
    weight_decay: float = Field(0.0, ge=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_eps: float = Field(1e-8, gt=0.0)
    clip_grad: float = Field(1.0, ge=0.0)
    """Max global gradient norm; 0 disables clipping (the norm is still reported)."""
    micro_batch_size: int = Field(1, gt=0)
    """Samples per forward/backward pass on each rank, without use_dynamic_batch_size."""
    use_dynamic_batch_size: bool | None = None
    """Form each rank's micro-batches by a token budget (max_tokens_per_gpu), samples packed into one row
    without padding, attention kept within each sample (slime's --use-dynamic-batch-size). None: on where
    the backend implements it, unless micro_batch_size is given."""
    max_tokens_per_gpu: int | None = Field(None, gt=0)
    """Token budget of a training micro-batch with use_dynamic_batch_size (a longer sample runs alone);
    default DEFAULT_MAX_TOKENS_PER_GPU."""
    log_probs_max_tokens_per_gpu: int | None = Field(None, gt=0)
    """Token budget of a micro-batch of forward() (log-probs, values: no gradients, so it can be larger);
    default max_tokens_per_gpu."""
    balance_data: bool = False
    """Deal samples to data-parallel ranks so each gets about the same number of tokens (longest first
    onto the lightest rank), instead of sample i to rank i % world_size."""
    log_probs_chunk_size: int = Field(-1, ge=-1)
    """Compute log-probs and entropy this many response tokens at a time (the LM head, softmax and, in
    training, their recomputation in the backward pass), so the full-vocabulary logits of a micro-batch
    never exist at once; -1: all response tokens of a micro-batch at once."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available (nccl), else CPU (gloo)."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of forward/backward; master weights, gradient reduction and optimizer state stay float32."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (slime's --recompute-granularity full)."""
    torch_compile: bool = True
    """Compile each decoder layer's forward and the log-prob function with torch.compile, on CUDA only (on a
    CPU the eager path runs)."""
    lora_rank: int = Field(0, ge=0)
    """Rank of the LoRA adapters trained instead of the full weights; 0: full fine-tuning. The base stays
    frozen, the KL reference is the base with adapters off (no second copy), the engines get merged weights."""
    lora_alpha: float = Field(16.0, gt=0.0)
    """Scale numerator of the adapters: the update is (lora_alpha / lora_rank) * B @ A."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input in train steps."""
    lora_target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1)
    """Layers that get adapters: ["all-linear"] (every linear layer but the LM head) or module names
    (q_proj, v_proj, ...: each matches the layers whose name ends with it)."""
    lora_adapter_path: Path | None = None
    """A PEFT adapter folder (adapter_config.json and weights, as peft's save_pretrained writes) to start
    from; its config gives rank, alpha, dropout and target modules."""

    supports_lora: ClassVar[bool] = False
    """Whether the backend implements the lora_* fields; those that do not refuse them."""
    supports_dynamic_batch_size: ClassVar[bool] = False
    """Whether the backend implements use_dynamic_batch_size, balance_data and log_probs_chunk_size."""
    supports_log_probs_chunk_size: ClassVar[bool] = False
    """Whether a backend without supports_dynamic_batch_size still implements log_probs_chunk_size."""
    unsupported_batching_reason: ClassVar[str] = "it is not implemented there"
    """Why a backend without supports_dynamic_batch_size refuses those fields (part of the error)."""

    @model_validator(mode="after")
    def _check_head(self) -> BackendConfig:
        if self.head == "value" and self.ref_model:
            raise ValueError("ref_model is set on a value-head backend; only the policy (head 'lm') keeps a reference")
        return self

    @model_validator(mode="after")
    def _resolve_batching(self) -> BackendConfig:
        dynamic = self.use_dynamic_batch_size
        if dynamic is None:
            dynamic = self.supports_dynamic_batch_size and "micro_batch_size" not in self.model_fields_set
        wanted: list[str] = ["use_dynamic_batch_size"] if dynamic else []
        wanted += ["balance_data"] if self.balance_data else []
        chunking = self.supports_dynamic_batch_size or self.supports_log_probs_chunk_size
        wanted += ["log_probs_chunk_size"] if self.log_probs_chunk_size != -1 and not chunking else []
        if not self.supports_dynamic_batch_size and wanted:
            names = ", ".join(wanted)
            raise ValueError(f"{names}: not supported by the {self.type!r} backend: {self.unsupported_batching_reason}")
        budgets = sorted(name for name in ("max_tokens_per_gpu", "log_probs_max_tokens_per_gpu") if getattr(self, name) is not None)
        if not dynamic and budgets:
            raise ValueError(f"{', '.join(budgets)} set but use_dynamic_batch_size is off: the budgets size its micro-batches")
        if dynamic and self.use_dynamic_batch_size and "micro_batch_size" in self.model_fields_set:
            raise ValueError(
                "micro_batch_size and use_dynamic_batch_size are both set: dynamic micro-batches are formed by"
                " max_tokens_per_gpu, not by a sample count; give one of them"
            )
        object.__setattr__(self, "use_dynamic_batch_size", dynamic)
        if dynamic:
            tokens = self.max_tokens_per_gpu or DEFAULT_MAX_TOKENS_PER_GPU
            object.__setattr__(self, "max_tokens_per_gpu", tokens)
            object.__setattr__(self, "log_probs_max_tokens_per_gpu", self.log_probs_max_tokens_per_gpu or tokens)
        if self.log_probs_chunk_size == 0:
            raise ValueError("log_probs_chunk_size 0: give a positive number of tokens, or -1 for no chunking")
        return self

    def batching(self, training: bool) -> Batching:
        """How train steps (training) or forward() split a rank's share of a batch into micro-batches."""
        budget = self.max_tokens_per_gpu if training else self.log_probs_max_tokens_per_gpu
        return Batching(micro_batch_size=self.micro_batch_size, max_tokens=budget if self.use_dynamic_batch_size else None,
                        balance_data=self.balance_data)

    @property
    def uses_lora(self) -> bool:
        return self.lora_rank > 0 or self.lora_adapter_path is not None

    @model_validator(mode="after")
    def _check_lora(self) -> BackendConfig:
        tuning = sorted(name for name in ("lora_alpha", "lora_dropout", "lora_target_modules") if name in self.model_fields_set)
        if not self.uses_lora:
            if tuning:
                raise ValueError(f"{', '.join(tuning)} set but lora_rank is 0 and there is no lora_adapter_path: no LoRA to apply them to")
            return self
        if not self.supports_lora:
            raise ValueError(f"LoRA (lora_rank / lora_adapter_path) is not implemented by the {self.type!r} backend; use 'fsdp'")
        if self.head == "value":
            raise ValueError("LoRA is set on a value-head backend; adapters are trained on the policy (head 'lm') only")
        if self.lora_adapter_path is not None:
            self._take_adapter_config(self.lora_adapter_path)
        return self

    def _take_adapter_config(self, path: Path) -> None:
        """Fill rank, alpha and dropout from the adapter's config; refuse values that contradict it."""
        file = path / "adapter_config.json"
        if not file.is_file():
            raise ValueError(f"lora_adapter_path {path}: no adapter_config.json there (not a PEFT adapter folder)")
        adapter = json.loads(file.read_text())
        if adapter.get("peft_type") != "LORA":
            raise ValueError(f"{file}: peft_type is {adapter.get('peft_type')!r}, not 'LORA'")
        if "lora_target_modules" in self.model_fields_set:
            raise ValueError(f"lora_target_modules set with lora_adapter_path: the adapter's config ({file}) names its target modules")
        for name, key in (("lora_rank", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
            value = adapter.get(key)
            if value is None:
                continue
            if name in self.model_fields_set and getattr(self, name) != value:
                raise ValueError(f"{name}={getattr(self, name)} contradicts {key}={value} in {file}")
            object.__setattr__(self, name, value)
