"""What slime's hook functions import, under this project's names. A slime custom generate or reward
function runs here with its imports changed to these:

    from slime.utils.types import Sample                    ->  from rl_apps.slime_api import Sample
    from slime.utils.http_utils import post                 ->  from rl_apps.slime_api import post
    from slime.rollout.sglang_rollout import GenerateState  ->  from rl_apps.slime_api import GenerateState

`args` is the run's configuration under slime's field names (`args.hf_checkpoint`,
`args.rollout_max_response_len`, ...), with `args.sglang_router_ip` / `args.sglang_router_port` naming an
HTTP endpoint that speaks SGLang's /generate in front of the router.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rl_core.sample import Sample
from rl_sglang.gateway import post

__all__ = ["GenerateState", "Sample", "post", "slime_args"]


class GenerateState:
    """slime's per-process generation state: the run's tokenizer and the rollout's sampling parameters,
    built once per model folder however often a generate function constructs it."""

    _by_model: dict[str, GenerateState] = {}
    args: Any
    tokenizer: Any
    sampling_params: dict[str, Any]

    def __new__(cls, args: Any) -> GenerateState:
        key = str(args.hf_checkpoint)
        if key not in cls._by_model:
            from rl_sglang.tokenizer import load_tokenizer

            state = super().__new__(cls)
            state.args = args
            state.tokenizer = load_tokenizer(key)
            state.sampling_params = dict(
                temperature=args.rollout_temperature, top_p=args.rollout_top_p, top_k=args.rollout_top_k,
                max_new_tokens=args.rollout_max_response_len,
                **({"stop_token_ids": list(args.rollout_stop_token_ids)} if args.rollout_stop_token_ids else {}),
            )
            cls._by_model[key] = state
        return cls._by_model[key]

    def __init__(self, args: Any) -> None:
        """Everything is set once, in __new__."""


def slime_args(config: Any, router_url: str | None = None) -> Namespace:
    """`config` as slime's `args`: every field under its name (paths as strings), the HTTP router address,
    and the flags a slime function asserts on."""
    values = {k: str(v) if isinstance(v, Path) else v for k, v in config.model_dump().items()}
    address = urlsplit(router_url) if router_url else None
    values.update(
        sglang_router_ip=address.hostname if address else None,
        sglang_router_port=address.port if address else None,
        partial_rollout=values.get("partial_rollout", False),
    )
    return Namespace(**values)
