"""Attention over packed micro-batches: each sample attends causally within itself only.

A Hugging Face model takes it as an attention implementation registered with transformers'
AttentionInterface; the micro-batch's sample bounds reach it through the forward's keyword arguments,
which transformers hands every attention call. With flash-attn installed (CUDA, half precision) it is
flash-attn's variable-length kernel; otherwise one causal SDPA call per sample, which on a GPU runs SDPA's
own flash kernel and needs no [N, N] mask. Padded (unpacked) calls go to transformers' SDPA unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from rl_core.micro_batches import MicroBatch

ATTENTION_NAME = "rl_packed_sdpa"
_BOUNDS_KEY = "packed_sample_bounds"
"""Keyword of the sample start offsets as Python ints (no device-to-host copy in every layer)."""

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # flash-attn is optional: per-sample SDPA instead
    flash_attn_varlen_func = None


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [1, Hq, N, D], key/value [1, Hkv, N, D] ->
    output [1, N, Hq, D]."""
    bounds = kwargs.pop(_BOUNDS_KEY, None)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    window = kwargs.get("sliding_window")
    longest = max(end - start for start, end in zip(bounds, bounds[1:]))
    if window is not None and longest > window:
        raise ValueError(
            f"a packed sample of {longest} tokens is longer than this model's sliding window ({window}), which"
            " packed attention does not apply: turn off use_dynamic_batch_size (--micro-batch-size)"
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("packed attention has no logit soft-capping: turn off use_dynamic_batch_size (--micro-batch-size)")
    dropout = dropout if module.training else 0.0
    if flash_attn_varlen_func is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        cu_seqlens = kwargs["cu_seq_lens_q"]
        out = flash_attn_varlen_func(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
            cu_seqlens, cu_seqlens, longest, longest, dropout_p=dropout, softmax_scale=scaling, causal=True,
        )
        return out.unsqueeze(0), None
    gqa = query.shape[1] != key.shape[1]
    pieces = [
        F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa,
        )
        for start, end in zip(bounds, bounds[1:])
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, packed_attention)
# Unpacked calls build the same masks as SDPA; packed calls pass an all-ones mask, which SDPA's mask
# builder turns into no mask at all.
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_packed_attention(model: PreTrainedModel) -> None:
    """Switch an SDPA model to packed attention (the same results on unpacked input)."""
    current = model.config._attn_implementation
    if current != "sdpa":
        raise ValueError(
            f"use_dynamic_batch_size packs samples into one row, which needs a model with SDPA attention;"
            f" {type(model).__name__} uses {current!r}: turn it off (--micro-batch-size)"
        )
    model.set_attn_implementation(ATTENTION_NAME)


def packed_forward_kwargs(mb: MicroBatch) -> dict[str, Any]:
    """What a model's forward needs beyond its inputs to attend within each sample of a packed `mb`
    (nothing for a padded one). The names flash-attn's path reads, plus the bounds as Python ints."""
    if mb.cu_seqlens is None:
        return {}
    return {
        "cu_seq_lens_q": mb.cu_seqlens,
        "cu_seq_lens_k": mb.cu_seqlens,
        "max_length_q": mb.max_seqlen,
        "max_length_k": mb.max_seqlen,
        _BOUNDS_KEY: mb.sample_offsets,
    }
