"""Settings of the FSDP training backend: rl-core's BackendConfig, selected by `type: fsdp`."""

from __future__ import annotations

from typing import ClassVar, Literal

from rl_core.backend_config import BackendConfig


class FSDPConfig(BackendConfig):
    """A Hugging Face causal LM (or its body with a value head) sharded with FSDP2 over every rank of the
    default process group; nothing beyond rl-core's common fields is needed. LoRA goes through peft;
    dynamic micro-batches are packed and attend within each sample (`rl_fsdp.packed_attention`)."""

    type: Literal["fsdp"] = "fsdp"
    supports_lora: ClassVar[bool] = True
    supports_dynamic_batch_size: ClassVar[bool] = True
