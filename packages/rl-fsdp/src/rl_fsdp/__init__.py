"""Training backend on PyTorch FSDP2 for Hugging Face causal language models."""

from rl_fsdp.backend import FSDPBackend
from rl_fsdp.config import FSDPConfig

__all__ = ["FSDPBackend", "FSDPConfig"]
__version__ = "0.1.0"
