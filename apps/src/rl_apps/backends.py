"""The training backend `--train-backend` names, built by its package's factory (imported only when chosen)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rl_core.backend_config import BackendConfig
    from rl_core.protocols import TrainingBackend


def build_backend(config: BackendConfig) -> TrainingBackend:
    """A `rl_core.protocols.TrainingBackend` from a BackendConfig whose `type` picks the package. The return
    type makes the type checker (.ci/run) prove that each backend meets the Protocol."""
    if config.type == "fsdp":
        from rl_fsdp import FSDPConfig
        from rl_fsdp import build_backend as build_fsdp

        assert isinstance(config, FSDPConfig)
        return build_fsdp(config)
    if config.type == "megatron":
        from rl_megatron import MegatronConfig
        from rl_megatron import build_backend as build_megatron

        assert isinstance(config, MegatronConfig)
        return build_megatron(config)
    raise ValueError(f"--train-backend {config.type!r}: no such training backend (fsdp, megatron)")
