"""Attention over packed micro-batches: each sample attends causally within itself only.

A Hugging Face model takes it as an attention implementation registered with transformers'
AttentionInterface. Which samples a packed row holds is set by `packed_samples(mb)` around the forward
and backward passes, not passed through the model's keyword arguments: a compiled decoder layer would
otherwise specialise (and recompile) on every micro-batch's sample bounds. Compiled, the attention is an
opaque `torch.library` op (`rl_fsdp::packed_attention`) that reads the layout inside, so a compiled layer is
one graph with the op in it; its backward recomputes the attention from q, k and v and differentiates that.
Eager, the same kernels run with their own backward passes.

Kernels, fastest first: flash-attn's variable-length kernel where installed (CUDA, half precision);
samples of one length as one batched causal SDPA call (SDPA's flash kernel on a GPU, no [N, N] mask);
torch's own variable-length flash attention (`torch.nn.attention.varlen`, CUDA, half precision) when the
lengths differ; otherwise one batched SDPA call per run of equal lengths. Padded (unpacked) calls go to
transformers' SDPA unchanged. No attention dropout (refused): the recomputed backward would draw another mask.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from rl_core.micro_batches import MicroBatch

ATTENTION_NAME = "rl_packed_sdpa"

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # flash-attn is optional
    flash_attn_varlen_func = None


def _torch_varlen() -> tuple[Callable[..., Any] | None, dict[str, Any], bool]:
    """torch's varlen attention, the keyword that makes it causal, and whether it takes GQA heads (its
    signature changed between torch releases)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}, False
    params = inspect.signature(varlen_attn).parameters
    causal: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return varlen_attn, causal, "enable_gqa" in params


_VARLEN, _VARLEN_CAUSAL, _VARLEN_GQA = _torch_varlen()


@dataclass(frozen=True)
class PackedLayout:
    """Where each sample of a packed row starts."""

    bounds: tuple[int, ...]
    """Start offsets of the samples and the row's length, as Python ints (no device-to-host copy per layer)."""
    cu_seqlens: torch.Tensor
    """The same offsets, int32 on the row's device (what variable-length kernels take)."""
    max_seqlen: int


_layout: PackedLayout | None = None
"""The open packed layout. A module global, not a context variable: the backward pass (which recomputes
checkpointed layers) runs on autograd's own threads. Read only inside the attention ops, never in traced code."""
_packing = False
"""Whether a packed layout is open: all a compiled layer reads (a bool, so its guard has two values only)."""


@contextlib.contextmanager
def packed_samples(mb: MicroBatch) -> Iterator[None]:
    """Attention of the forward and backward passes run inside attends within each sample of `mb` (a packed
    micro-batch; a padded one opens nothing)."""
    global _layout, _packing
    previous = _layout
    if mb.cu_seqlens is not None:
        _layout = PackedLayout(mb.sample_offsets, mb.cu_seqlens, mb.max_seqlen)
    _packing = _layout is not None
    try:
        yield
    finally:
        _layout = previous
        _packing = previous is not None


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
    if not _packing:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("packed attention has no logit soft-capping: turn off use_dynamic_batch_size (--micro-batch-size)")
    if dropout and module.training:
        raise ValueError(_DROPOUT_REFUSED.format(dropout))
    window = kwargs.get("sliding_window")
    if torch.compiler.is_compiling():
        return torch.ops.rl_fsdp.packed_attention(query, key, value, scaling, window), None
    # Eager: the kernels' own backward passes, no recomputation.
    return _attend(query[0], key[0], value[0], _open_layout(query, window), scaling).unsqueeze(0), None


_DROPOUT_REFUSED = (
    "packed attention has no attention dropout (its backward pass recomputes the attention, which would draw another"
    " mask), and this model's is {}: set attention_dropout to 0 in the model's config.json, or turn off"
    " use_dynamic_batch_size (--micro-batch-size)"
)


def _open_layout(query: torch.Tensor, sliding_window: int | None) -> PackedLayout:
    """The open layout, checked against a [1, H, N, D] query of this forward or backward pass."""
    layout = _layout
    if layout is None or query.shape[0] != 1 or query.shape[2] != layout.bounds[-1]:
        held = "no packed layout is open" if layout is None else f"the open packed layout holds one row of {layout.bounds[-1]}"
        raise RuntimeError(
            f"packed attention got {query.shape[0]} x {query.shape[2]} tokens while {held}: a forward or backward pass"
            " of another micro-batch inside (or outside) packed_samples()"
        )
    if sliding_window is not None and layout.max_seqlen > sliding_window:
        raise ValueError(
            f"a packed sample of {layout.max_seqlen} tokens is longer than this model's sliding window ({sliding_window}),"
            " which packed attention does not apply: turn off use_dynamic_batch_size (--micro-batch-size)"
        )
    return layout


# One opaque op for dynamo (a compiled decoder layer stays one graph): its inputs are the tensors alone, the
# layout is read inside, so no guard sees the samples' bounds. Its backward is a second opaque op that
# recomputes the attention (q, k, v are all it saves) and differentiates the kernel that ran.
@torch.library.custom_op(
    "rl_fsdp::packed_attention", mutates_args=(),
    schema="(Tensor query, Tensor key, Tensor value, float? scaling, int? sliding_window) -> Tensor",
)
def _packed_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None, sliding_window: int | None
) -> torch.Tensor:
    layout = _open_layout(query, sliding_window)
    return _attend(query[0], key[0], value[0], layout, scaling).unsqueeze(0).contiguous()


@_packed_attention_op.register_fake
def _packed_attention_shape(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None, sliding_window: int | None
) -> torch.Tensor:
    batch, heads, tokens, _ = query.shape
    return query.new_empty(batch, tokens, heads, value.shape[-1])


@torch.library.custom_op(
    "rl_fsdp::packed_attention_backward", mutates_args=(),
    schema="(Tensor grad, Tensor query, Tensor key, Tensor value, float? scaling, int? sliding_window)"
    " -> (Tensor, Tensor, Tensor)",
)
def _packed_attention_backward_op(
    grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
    sliding_window: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = _open_layout(query, sliding_window)
    with _autograd_inside_an_op():
        inputs = [t.detach().requires_grad_() for t in (query, key, value)]
        out = _attend(inputs[0][0], inputs[1][0], inputs[2][0], layout, scaling)
        grads = torch.autograd.grad(out, inputs, grad[0])
    return grads[0].contiguous(), grads[1].contiguous(), grads[2].contiguous()


@_packed_attention_backward_op.register_fake
def _packed_attention_backward_shapes(
    grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
    sliding_window: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (query, key, value))  # type: ignore[return-value]


_AUTOGRAD_KEYS = (
    torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
    torch._C.DispatchKey.AutogradNestedTensor, torch._C.DispatchKey.ADInplaceOrView,
)


@contextlib.contextmanager
def _autograd_inside_an_op() -> Iterator[None]:
    """Records autograd graphs inside an op's kernel, which the dispatcher runs with autograd's keys excluded
    (torch.func.vjp would do the same, but refuses flash-attn's old-style autograd.Function)."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        excluded = excluded.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), torch.enable_grad():
        yield


def _save_inputs(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    query, key, value, ctx.scaling, ctx.sliding_window = inputs
    ctx.save_for_backward(query, key, value)


def _packed_attention_grads(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    query, key, value = ctx.saved_tensors
    grads = torch.ops.rl_fsdp.packed_attention_backward(grad, query, key, value, ctx.scaling, ctx.sliding_window)
    return (*grads, None, None)


_packed_attention_op.register_autograd(_packed_attention_grads, setup_context=_save_inputs)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: PackedLayout, scaling: float | None) -> torch.Tensor:
    """query [Hq, N, D], key/value [Hkv, N, D] -> [N, Hq, D], causal within each sample."""
    half_on_gpu = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
    if flash_attn_varlen_func is not None and half_on_gpu:
        return flash_attn_varlen_func(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), layout.cu_seqlens, layout.cu_seqlens,
            layout.max_seqlen, layout.max_seqlen, softmax_scale=scaling, causal=True,
        )
    lengths = [end - start for start, end in zip(layout.bounds, layout.bounds[1:])]
    runs = [(length, len(list(group))) for length, group in groupby(lengths)]
    if len(runs) > 1 and _VARLEN is not None and half_on_gpu:
        return _torch_varlen_attention(query, key, value, layout, scaling)
    pieces, start = [], 0
    for length, count in runs:
        end = start + length * count
        pieces.append(_batched_causal(query[:, start:end], key[:, start:end], value[:, start:end], count, scaling))
        start = end
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _batched_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, count: int, scaling: float | None) -> torch.Tensor:
    """`count` consecutive samples of one length as one batched SDPA call: [H, count * L, D] -> [count * L, Hq, D]."""

    def rows(x: torch.Tensor) -> torch.Tensor:
        heads, tokens, dim = x.shape
        return x.view(heads, count, tokens // count, dim).transpose(0, 1)

    out = F.scaled_dot_product_attention(
        rows(query), rows(key), rows(value), is_causal=True, scale=scaling,
        enable_gqa=query.shape[0] != key.shape[0],
    )
    return out.transpose(1, 2).reshape(-1, query.shape[0], query.shape[2])


def _torch_varlen_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: PackedLayout, scaling: float | None
) -> torch.Tensor:
    assert _VARLEN is not None
    groups = query.shape[0] // key.shape[0]
    extra: dict[str, Any] = dict(_VARLEN_CAUSAL, scale=scaling)
    if groups > 1 and _VARLEN_GQA:
        extra["enable_gqa"] = True
    elif groups > 1:
        key, value = key.repeat_interleave(groups, dim=0), value.repeat_interleave(groups, dim=0)
    return _VARLEN(
        query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), layout.cu_seqlens, layout.cu_seqlens,
        layout.max_seqlen, layout.max_seqlen, **extra,
    )


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
    dropout = getattr(model.config, "attention_dropout", 0.0)
    if dropout:
        raise ValueError(_DROPOUT_REFUSED.format(dropout))
    model.set_attn_implementation(ATTENTION_NAME)
