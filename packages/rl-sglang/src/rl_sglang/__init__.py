"""SGLang engine side of the RL framework.

Light on import: `SGLangClient` and the launcher need neither torch nor transformers; the embedded
engine (`rl_sglang.embedded`) and the weight transports (`rl_sglang.weight_sync`) import them.
"""

from rl_sglang.client import SGLangClient
from rl_sglang.errors import EngineError
from rl_sglang.version import SGLANG_VERSION_CODED_AGAINST

__all__ = ["EngineError", "SGLANG_VERSION_CODED_AGAINST", "SGLangClient"]
