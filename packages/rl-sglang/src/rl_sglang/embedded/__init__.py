"""The embedded engine: SGLang's native HTTP API over a Hugging Face model, for machines without SGLang.

Run it with `python -m rl_sglang.embedded --model-path DIR --port N`, or in-process with
`EmbeddedEngine(...).start()`.
"""

from rl_sglang.embedded.server import EmbeddedEngine

__all__ = ["EmbeddedEngine"]
