"""The engine's attention, registered with transformers' `AttentionInterface`, so the HF model code
runs unchanged while every attention layer writes its new keys/values into the engine's KV pool and
reads the whole context from there.

The model is always called on one packed row of tokens ([1, N]); `ForwardBatch` says which request
each token belongs to. Two ways to attend:
- decode (one new token per request, CUDA with Triton): `decode_kernel`, which reads each request's
  slots through the request-to-token table without copying them (graph-safe: no host values);
- extend (prefill chunks, and decode anywhere else): the context is gathered into padded groups and
  attended with SDPA's grouped-query path (`enable_gqa`, no `repeat_kv`) under a causal/length mask.

Under torch.compile (`compiled_layers`) both are one opaque custom op, `rl_sglang::layer_attention`, whose
inputs are only the layer's q/k/v: the layer and the batch come from `layer_cursor`, set outside the
compiled region, so one compiled graph serves every layer and every batch size.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from rl_sglang.embedded.kv_cache import SINK, KVPool

ATTN_IMPLEMENTATION = "rl_sglang_engine"
BATCH_KWARG = "engine_batch"
# Padded area (queries x keys) a group of extend rows may reach, relative to the real area.
_GROUP_SLACK = 2.0
_GROUP_MIN_AREA = 1 << 14


@dataclass
class ExtendGroup:
    q_index: torch.Tensor  # [G, Qmax] packed token index of each query (padding: any valid index)
    kv_index: torch.Tensor  # [G, Lmax] pool slot of each context position (padding: the sink)
    mask: torch.Tensor  # [G, 1, Qmax, Lmax] bool, True = attend
    src: torch.Tensor  # [n] flat index into G*Qmax of the real queries
    dst: torch.Tensor  # [n] their packed token index


@dataclass
class ForwardBatch:
    pool: KVPool
    out_slots: torch.Tensor  # [N] where each token's K/V goes
    decode: bool = False
    fused: bool = False  # CUDA with Triton: write K/V with one kernel
    rows: torch.Tensor | None = None  # decode: [B] int32 table rows
    seq_lens: torch.Tensor | None = None  # decode: [B] int32 context length including the new token
    groups: list[ExtendGroup] = field(default_factory=list)
    compiled_layers: bool = False  # the layers run compiled: attention goes through `layer_attention`


def build_extend_groups(
    pool: KVPool, rows: list[int], prefix_lens: list[int], q_lens: list[int], device: torch.device
) -> list[ExtendGroup]:
    """Group the rows so that padding stays within `_GROUP_SLACK` of the real work; one SDPA call each.
    The device table must already hold every row's slots up to prefix_len + q_len."""
    starts, offset = [], 0
    for q in q_lens:
        starts.append(offset)
        offset += q
    order = sorted(range(len(rows)), key=lambda i: (q_lens[i], prefix_lens[i] + q_lens[i]), reverse=True)
    groups: list[list[int]] = []
    current: list[int] = []
    real, kv_max = 0, 0
    for i in order:
        kv = prefix_lens[i] + q_lens[i]
        if current:
            padded = (len(current) + 1) * q_lens[current[0]] * max(kv_max, kv)
            if padded > _GROUP_SLACK * (real + q_lens[i] * kv) + _GROUP_MIN_AREA:
                groups.append(current)
                current, real, kv_max = [], 0, 0
        current.append(i)
        real += q_lens[i] * kv
        kv_max = max(kv_max, kv)
    if current:
        groups.append(current)
    return [_make_group(pool, g, rows, prefix_lens, q_lens, starts, device) for g in groups]


def _make_group(pool, members, rows, prefix_lens, q_lens, starts, device) -> ExtendGroup:
    q_max = max(q_lens[i] for i in members)
    kv_lens = [prefix_lens[i] + q_lens[i] for i in members]
    l_max = max(kv_lens)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)  # noqa: E731
    row_t, prefix_t, q_t = as_tensor([rows[i] for i in members]), as_tensor([prefix_lens[i] for i in members]), as_tensor([q_lens[i] for i in members])
    start_t, kv_t = as_tensor([starts[i] for i in members]), as_tensor(kv_lens)
    j = torch.arange(q_max, device=device)
    pos = torch.arange(l_max, device=device)
    q_valid = j[None, :] < q_t[:, None]  # [G, Qmax]
    q_index = torch.where(q_valid, start_t[:, None] + j[None, :], 0)
    in_context = pos[None, :] < kv_t[:, None]  # [G, Lmax]
    kv_index = torch.where(in_context, pool.req_to_token[row_t][:, :l_max].to(torch.int64), SINK)
    causal = pos[None, None, :] <= (prefix_t[:, None, None] + j[None, :, None])  # padded queries still see position 0
    mask = (causal & in_context[:, None, :]).unsqueeze(1)
    src = torch.nonzero(q_valid.reshape(-1), as_tuple=True)[0]
    dst = q_index.reshape(-1)[src]
    return ExtendGroup(q_index, kv_index, mask, src, dst)


def engine_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, Hq, N, D], key/value [1, Hkv, N, D] for the N new tokens; returns ([1, N, Hq, D], None)."""
    batch: ForwardBatch | None = kwargs.get(BATCH_KWARG)
    if batch is None:
        raise RuntimeError(f"attention {ATTN_IMPLEMENTATION!r} runs only inside the embedded engine's forward")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("the embedded engine's attention has no sliding window, soft-capping or sinks")
    q = query[0].transpose(0, 1)  # [N, Hq, D]
    if batch.compiled_layers:
        out = layer_attention(q, key[0], value[0])  # the scaling comes with the cursor: no float in the graph
    else:
        out = attend(batch, module.layer_idx, q, key[0], value[0], scaling)
    return out.unsqueeze(0), None


def attend(batch: ForwardBatch, layer: int, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Store the new key/value [Hkv, N, D] in layer `layer` of the pool; attend q [N, Hq, D] over the context."""
    k_cache, v_cache = batch.pool.layer(layer)
    if batch.fused:
        from rl_sglang.embedded.fused_ops import store_kv

        store_kv(k_cache, v_cache, batch.out_slots, key, value)
    else:
        k_cache[batch.out_slots] = key.transpose(0, 1).to(k_cache.dtype)
        v_cache[batch.out_slots] = value.transpose(0, 1).to(v_cache.dtype)
    if batch.decode:
        from rl_sglang.embedded.decode_kernel import decode_attention

        assert batch.rows is not None and batch.seq_lens is not None, "a decode batch carries its rows and lengths"
        return decode_attention(q, k_cache, v_cache, batch.pool.req_to_token, batch.rows, batch.seq_lens, scaling)
    return _extend_attention(q, k_cache, v_cache, batch.groups, scaling)


class _Cursor(threading.local):
    batch: ForwardBatch | None = None
    layer: int = -1
    scaling: float | None = None


_CURSOR = _Cursor()


@contextmanager
def layer_cursor(batch: ForwardBatch, layer: int, scaling: float | None) -> Iterator[None]:
    """While a compiled layer runs: the batch, the pool layer and the softmax scale of its `layer_attention` call."""
    _CURSOR.batch, _CURSOR.layer, _CURSOR.scaling = batch, layer, scaling
    try:
        yield
    finally:
        _CURSOR.batch, _CURSOR.layer, _CURSOR.scaling = None, -1, None


@torch.library.custom_op("rl_sglang::layer_attention", mutates_args=())
def layer_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`attend` on the cursor's batch and layer; opaque to torch.compile, so the kernels inside (and the
    batch-size-dependent split choice of the decode kernel) never enter a graph. It writes the KV pool,
    which is no input of it: nothing else in a layer's graph reads the pool, so no order is lost."""
    batch = _CURSOR.batch
    if batch is None:
        raise RuntimeError("rl_sglang::layer_attention runs only inside a compiled layer of the embedded engine")
    q, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, key, value))
    return attend(batch, _CURSOR.layer, q, key, value, _CURSOR.scaling)


@layer_attention.register_fake
def _(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)


def _extend_attention(q, k_cache, v_cache, groups: list[ExtendGroup], scaling) -> torch.Tensor:
    n, heads, dim = q.shape
    out = q.new_empty(n, heads, dim)
    for g in groups:
        qg = q[g.q_index].transpose(1, 2)  # [G, Hq, Qmax, D]
        kg = k_cache[g.kv_index].transpose(1, 2).to(q.dtype)  # [G, Hkv, Lmax, D]
        vg = v_cache[g.kv_index].transpose(1, 2).to(q.dtype)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=scaling, enable_gqa=heads != kg.shape[1])
        out[g.dst] = og.transpose(1, 2).reshape(-1, heads, dim)[g.src]
    return out


AttentionInterface.register(ATTN_IMPLEMENTATION, engine_attention)
