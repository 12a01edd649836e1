"""The training backend `--train-backend` names, built by its package's factory (imported only when chosen)."""

from __future__ import annotations

from typing import Any


def build_backend(config: Any) -> Any:
    """A `rl_core.protocols.TrainingBackend` from a BackendConfig whose `type` picks the package."""
    if config.type == "fsdp":
        from rl_fsdp import build_backend as build_fsdp

        return build_fsdp(config)
    if config.type == "megatron":
        from rl_megatron import build_backend as build_megatron

        return build_megatron(config)
    raise ValueError(f"--train-backend {config.type!r}: no such training backend (fsdp, megatron)")
