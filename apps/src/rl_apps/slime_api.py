"""What slime's hook functions import, under this project's names. A slime custom generate or reward
function runs here with its imports changed to these:

    from slime.utils.types import Sample                    ->  from rl_apps.slime_api import Sample
    from slime.utils.http_utils import post                 ->  from rl_apps.slime_api import post
    from slime.rollout.sglang_rollout import GenerateState  ->  from rl_apps.slime_api import GenerateState

`args` is the run's configuration under slime's field names (`args.hf_checkpoint`,
`args.rollout_max_response_len`, ...), with `args.sglang_router_ip` / `args.sglang_router_port` naming an
HTTP endpoint that speaks SGLang's /generate in front of the router.

`generate_turn` and `append_observation` are this project's, not slime's: the turn loop that slime's
multi-turn examples (search-r1, retool) each write out (post the context, keep the sampled tokens with their
log-probs up to the action's closing tag, append the tool's answer with loss mask 0, stay within
`--rollout-max-context-len`), once. A function that uses them runs under slime with this file beside it.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from rl_core.sample import Sample
from rl_sglang.gateway import post

__all__ = ["GenerateState", "Sample", "Turn", "append_observation", "generate_turn", "post", "slime_args"]


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


@dataclass(frozen=True)
class Turn:
    """One policy turn, as `generate_turn` appended it to the sample."""

    text: str
    """The kept sampled text: through the first stop string, or all of it."""
    finish_reason: str
    """SGLang's: "stop" (the engine stopped, or the turn reached a stop string) or "length" (out of new tokens)."""


async def generate_turn(args: Any, sample: Sample, sampling_params: dict[str, Any], *,
                        stop: Sequence[str] = ()) -> Turn | None:
    """Sample the policy's next turn after `sample.tokens` and append it, trainable, with the engine's log-probs.

    The turn ends at the first of the `stop` strings (kept). SGLang would stop there itself with
    `"stop": [...]`, which the embedded engine does not implement: the sampled tokens are cut at the
    shortest prefix whose text holds one, so what is kept is exactly what was sampled, log-probs included
    (later tokens never influenced earlier ones). New tokens are capped so that prompt plus response stays
    within `--rollout-max-context-len`. Returns None, with the sample's status set, when the sample is
    done without a turn: ABORTED by the engine, or TRUNCATED with no room left in the context.
    """
    state = GenerateState(args)
    params = dict(sampling_params)
    if args.rollout_max_context_len is not None:
        room = args.rollout_max_context_len - len(sample.tokens)
        if room <= 0:
            sample.status = Sample.Status.TRUNCATED
            return None
        params["max_new_tokens"] = min(params.get("max_new_tokens", room), room)
    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
    output = await post(url, {"input_ids": sample.tokens, "sampling_params": params, "return_logprob": True})
    meta = output["meta_info"]
    if meta["finish_reason"]["type"] == "abort":
        sample.status = Sample.Status.ABORTED
        return None
    if "output_token_logprobs" not in meta:
        raise RuntimeError(f"{url} answered without meta_info.output_token_logprobs though return_logprob was set")
    # Exactly the tokens the engine sampled, with their log-probs: never re-tokenise the text.
    tokens = [entry[1] for entry in meta["output_token_logprobs"]]
    log_probs = [entry[0] for entry in meta["output_token_logprobs"]]
    keep = _through_first_stop(state.tokenizer, tokens, stop)
    stopped = keep is not None
    kept = tokens[:keep] if stopped else tokens
    text = state.tokenizer.decode(kept, skip_special_tokens=params.get("skip_special_tokens", True))
    sample.append_response_tokens(args, tokens=kept, log_probs=log_probs[:len(kept)], meta_info=meta, text=text)
    return Turn(text=text, finish_reason="stop" if stopped else meta["finish_reason"]["type"])


def append_observation(args: Any, sample: Sample, observation: str) -> bool:
    """Append a tool's or environment's text to the response with loss mask 0 (the policy did not write it);
    returns whether another turn can follow.

    Prompt plus response stays within `--rollout-max-context-len`, as training's batches expect: an
    observation that reaches it is cut to the room left (its head, what the policy would read first; slime's
    retool example cuts the same way), and the sample, with nothing more fitting, is TRUNCATED (False).
    """
    tokenizer = GenerateState(args).tokenizer
    ids = tokenizer(observation, add_special_tokens=False)["input_ids"]
    limit = args.rollout_max_context_len
    if limit is None or len(sample.tokens) + len(ids) < limit:
        sample.append_response_tokens(args, tokens=ids, trainable=False, text=observation)
        return True
    if len(sample.tokens) + len(ids) > limit:
        ids = ids[:max(0, limit - len(sample.tokens))]
        observation = tokenizer.decode(ids)
    sample.append_response_tokens(args, tokens=ids, trainable=False, text=observation)
    sample.status = Sample.Status.TRUNCATED
    return False


def _through_first_stop(tokenizer: Any, tokens: list[int], stop: Sequence[str]) -> int | None:
    """How many of `tokens` make the shortest prefix whose text holds a stop string; None when none does."""
    def holds_stop(n: int) -> bool:
        text = tokenizer.decode(tokens[:n])
        return any(s in text for s in stop)

    if not stop or not holds_stop(len(tokens)):
        return None
    low, high = 1, len(tokens)  # holding a stop string only grows with the prefix: bisect
    while low < high:
        middle = (low + high) // 2
        if holds_stop(middle):
            high = middle
        else:
            low = middle + 1
    return low
