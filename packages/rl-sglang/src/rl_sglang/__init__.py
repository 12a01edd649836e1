"""SGLang engine side of the RL framework.

Light on import: `SGLangClient` and the launcher need neither torch nor transformers; the embedded
engine (`rl_sglang.embedded`) and the weight transports (`rl_sglang.weight_sync`) import them.
"""

from typing import Any

from rl_sglang.client import SGLangClient
from rl_sglang.errors import EngineError
from rl_sglang.version import SGLANG_VERSION_CODED_AGAINST

__all__ = ["EngineError", "EngineHandle", "SGLANG_VERSION_CODED_AGAINST", "SGLangClient", "load_tokenizer"]


def __getattr__(name: str) -> Any:
    """`EngineHandle` and `load_tokenizer` pull in rl-core and transformers, so they load on first use."""
    if name == "EngineHandle":
        from rl_sglang.engine_handle import EngineHandle

        return EngineHandle
    if name == "load_tokenizer":
        from rl_sglang.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'rl_sglang' has no attribute {name!r}")
