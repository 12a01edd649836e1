"""Log-probs and entropy of next tokens from vocab-parallel logits, without gathering the vocabulary.

Each TP rank holds logits for a 1/TP slice of the vocabulary. The softmax normaliser, the target's logit
and the entropy's sum are per-rank partial sums, all-reduced through megatron-core's
`reduce_from_tensor_model_parallel_region` (sum forward, identity backward: every TP rank computes the
same loss from the reduced values, so each rank's gradient of its slice is exactly the upstream one).
The maximum taken for stability is detached: the result does not depend on it.

The per-rank parts are pure local math with the collectives between them, so that torch.compile can fuse
each (the float32 casts, exp and sums over the [N, V/TP] logits become reductions that never write a
float32 copy of the logits; their backward recomputes from the bfloat16 logits).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def _peak(logits: torch.Tensor, temperature: float, padding: torch.Tensor | None) -> torch.Tensor:
    """max over this rank's vocabulary of logits / temperature (division is monotonic: max first)."""
    x = logits.detach()
    if padding is not None:
        x = x.masked_fill(padding, float("-inf"))
    return x.max(dim=-1).values.float() / temperature


def _shifted(logits: torch.Tensor, peak: torch.Tensor, temperature: float, padding: torch.Tensor | None) -> torch.Tensor:
    shifted = logits.float() / temperature - peak.unsqueeze(-1)
    return shifted if padding is None else shifted.masked_fill(padding, float("-inf"))


def _normaliser_and_target(
    logits: torch.Tensor, peak: torch.Tensor, index: torch.Tensor, in_range: torch.Tensor, temperature: float,
    padding: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of sum(exp(shifted)) and of the target's shifted logit (0 where another rank holds it)."""
    shifted = _shifted(logits, peak, temperature, padding)
    target = shifted.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return shifted.exp().sum(-1), torch.where(in_range, target, torch.zeros_like(target))


def _weighted_sum(shifted: torch.Tensor, exp: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """sum(exp(shifted) * shifted); padding columns (exp 0, shifted -inf) count 0."""
    weighted = exp * shifted
    return (weighted if padding is None else weighted.masked_fill(padding, 0.0)).sum(-1)


def _entropy_part(logits: torch.Tensor, peak: torch.Tensor, temperature: float, padding: torch.Tensor | None) -> torch.Tensor:
    """This rank's share of the entropy's sum, on its own (an entropy without gradient keeps nothing)."""
    shifted = _shifted(logits, peak, temperature, padding)
    return _weighted_sum(shifted, shifted.exp(), padding)


def _all_parts(
    logits: torch.Tensor, peak: torch.Tensor, index: torch.Tensor, in_range: torch.Tensor, temperature: float,
    padding: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The normaliser, target and entropy shares from one exp (an entropy with gradient)."""
    shifted = _shifted(logits, peak, temperature, padding)
    exp = shifted.exp()
    target = shifted.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return exp.sum(-1), torch.where(in_range, target, torch.zeros_like(target)), _weighted_sum(shifted, exp, padding)


_Parts = tuple[Callable[..., torch.Tensor], Callable[..., tuple[torch.Tensor, torch.Tensor]], Callable[..., torch.Tensor],
               Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
_EAGER: _Parts = (_peak, _normaliser_and_target, _entropy_part, _all_parts)


@functools.cache
def _compiled_parts() -> _Parts:
    """The local parts through torch.compile (wrapped once per process, compiled at first call)."""
    peak, normaliser_and_target, entropy_part, all_parts = _EAGER
    return torch.compile(peak), torch.compile(normaliser_and_target), torch.compile(entropy_part), torch.compile(all_parts)


def vocab_parallel_log_probs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[target] and the entropy of that distribution, over [..., V/TP]
    logits whose last dim covers vocabulary ids vocab_start.. of this rank. Ids at or past `vocab_size`
    (Megatron's padding rows) get probability 0. `compiled`: the local parts through torch.compile."""
    peak_of, normaliser_and_target, entropy_part, all_parts = _compiled_parts() if compiled else _EAGER
    width = logits.shape[-1]
    padding: torch.Tensor | None = torch.arange(vocab_start, vocab_start + width, device=logits.device) >= vocab_size
    if not bool(padding.any()):  # type: ignore[union-attr]
        padding = None
    tp_group = parallel_state.get_tensor_model_parallel_group()
    peak = peak_of(logits, temperature, padding)
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=tp_group)

    in_range = (targets >= vocab_start) & (targets < vocab_start + width)
    index = (targets - vocab_start).clamp(0, width - 1)
    entropy_with_grad = with_entropy and entropy_grad and torch.is_grad_enabled()
    if entropy_with_grad:
        sum_exp, target_shifted, weighted = all_parts(logits, peak, index, in_range, temperature, padding)
    else:
        sum_exp, target_shifted = normaliser_and_target(logits, peak, index, in_range, temperature, padding)
    sum_exp = reduce_from_tensor_model_parallel_region(sum_exp)
    log_norm = sum_exp.log()
    log_probs = reduce_from_tensor_model_parallel_region(target_shifted) - log_norm

    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_with_grad):
            if not entropy_with_grad:
                weighted = entropy_part(logits, peak, temperature, padding)
            # H = log Z - E_p[z], with z the shifted logits.
            entropy = log_norm - reduce_from_tensor_model_parallel_region(weighted) / sum_exp
    return log_probs, entropy
