"""Log-probs and entropy of next tokens from vocab-parallel logits, without gathering the vocabulary.

Each TP rank holds logits for a 1/TP slice of the vocabulary. The softmax normaliser, the target's logit
and the entropy's sum are per-rank partial sums, all-reduced through megatron-core's
`reduce_from_tensor_model_parallel_region` (sum forward, identity backward: every TP rank computes the
same loss from the reduced values, so each rank's gradient of its slice is exactly the upstream one).
The maximum taken for stability is detached: the result does not depend on it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def vocab_parallel_log_probs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[target] and the entropy of that distribution, over [..., V/TP]
    logits whose last dim covers vocabulary ids vocab_start.. of this rank. Ids at or past `vocab_size`
    (Megatron's padding rows) get probability 0."""
    local = logits.float() / temperature
    ids = torch.arange(vocab_start, vocab_start + local.shape[-1], device=local.device)
    padding = ids >= vocab_size
    if bool(padding.any()):
        local = local.masked_fill(padding, float("-inf"))
    tp_group = parallel_state.get_tensor_model_parallel_group()
    peak = local.detach().max(dim=-1).values
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = local - peak.unsqueeze(-1)
    exp = shifted.exp()
    sum_exp = reduce_from_tensor_model_parallel_region(exp.sum(-1))
    log_norm = sum_exp.log()

    in_range = (targets >= vocab_start) & (targets < vocab_start + local.shape[-1])
    index = (targets - vocab_start).clamp(0, local.shape[-1] - 1).unsqueeze(-1)
    target_shifted = torch.where(in_range, shifted.gather(-1, index).squeeze(-1), torch.zeros_like(log_norm))
    log_probs = reduce_from_tensor_model_parallel_region(target_shifted) - log_norm

    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            # H = log Z - E_p[z]; padding columns have exp 0 and are left out of the product.
            weighted = torch.where(padding, torch.zeros_like(exp), exp * shifted).sum(-1)
            entropy = log_norm - reduce_from_tensor_model_parallel_region(weighted) / sum_exp
    return log_probs, entropy
