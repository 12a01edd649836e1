"""Training backend on PyTorch FSDP2 for Hugging Face causal language models (policy or value head)."""

from rl_fsdp.backend import FSDPBackend, build_backend
from rl_fsdp.config import FSDPConfig

__all__ = ["FSDPBackend", "FSDPConfig", "build_backend"]
__version__ = "0.1.0"
