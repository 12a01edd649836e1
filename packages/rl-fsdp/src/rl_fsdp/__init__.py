"""Training backend on PyTorch FSDP2 for Hugging Face causal language models, and PPO's critic."""

from rl_fsdp.backend import FSDPBackend
from rl_fsdp.config import CriticConfig, FSDPConfig
from rl_fsdp.critic import FSDPCritic

__all__ = ["CriticConfig", "FSDPBackend", "FSDPConfig", "FSDPCritic"]
__version__ = "0.1.0"
