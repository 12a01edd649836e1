"""Algorithm math, the Sample type, data sources, the RL step and the Protocols the other packages meet through.

The names a trainer of one's own needs are importable from here; heavy ones (torch) load on first use,
so that parsing flags with rl-core's config models stays light.
"""

from importlib import import_module
from typing import Any

from rl_core.sample import Sample, SampleStatus

_LAZY = {
    "BackendConfig": "rl_core.backend_config",
    "JsonlDataSource": "rl_core.data_source",
    "load_prompt_rows": "rl_core.data_source",
    "GenerateAnswer": "rl_core.generation",
    "GenerateRequest": "rl_core.generation",
    "PolicyLoss": "rl_core.losses",
    "SFTLoss": "rl_core.losses",
    "ValueLoss": "rl_core.losses",
    "RLStepConfig": "rl_core.config",
    "custom_generator": "rl_core.rollout",
    "default_generator": "rl_core.rollout",
    "default_rollout": "rl_core.rollout",
    "score_samples": "rl_core.rollout",
    "StepBackend": "rl_core.protocols",
    "TrainingBackend": "rl_core.protocols",
}

__all__ = ["Sample", "SampleStatus", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rl_core' has no attribute {name!r}")
