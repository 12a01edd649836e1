"""Decode attention over the paged KV pool in one Triton kernel: one program per (request, KV head,
split of the context), reading each slot through the request-to-token table, so no step copies the
cache; the query heads of one KV head share every key/value load (grouped-query attention).
Splits (flash-decoding) keep the GPU busy when the batch is small; a second kernel merges them.

Lengths are read on the device, so a call never depends on host values and can be captured in a
CUDA graph. `TRITON_INTERPRET=1` runs it on CPU tensors (the tests do, in a subprocess).
"""

from __future__ import annotations

import importlib.util

import torch

_SPLIT_TOKENS = 256  # context tokens per split at most when splitting


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [T, Hkv, D]
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,  # [R, C] int32
    rows: torch.Tensor,  # [B] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float | None,
    num_splits: int | None = None,
) -> torch.Tensor:
    import triton

    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    if num_splits is None:
        num_splits = decode_splits(batch, kv_heads, req_to_token.shape[1], q.device)
    block_h = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(dim))
    out = torch.empty(batch, heads, dim, dtype=q.dtype, device=q.device)
    if num_splits == 1:  # no merge: the one split writes the output
        partial, lse = out.unsqueeze(2), out.new_empty(1, 1, dtype=torch.float32)
    else:
        partial = torch.empty(batch, heads, num_splits, dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, req_to_token, rows, seq_lens, partial, lse,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        req_to_token.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1),
        num_splits,
        GROUP=group, DIM=dim, BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_N=64,
        IEEE=q.dtype == torch.float32, STORE_LSE=num_splits > 1,
    )
    if num_splits == 1:
        return out
    _merge_kernel[(batch, heads)](
        partial, lse, out,
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        num_splits,
        DIM=dim, BLOCK_D=block_d,
    )
    return out


def decode_splits(batch: int, kv_heads: int, context_length: int, device: torch.device) -> int:
    """Enough programs to fill the GPU about twice, never splits shorter than `_SPLIT_TOKENS`
    of the longest possible context; a fixed function of the batch shape (CUDA-graph friendly)."""
    if device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = max(1, (2 * sms) // max(1, batch * kv_heads))
    return int(max(1, min(wanted, 16, -(-context_length // _SPLIT_TOKENS))))


try:  # the kernels exist only where Triton does; callers check triton_available() first
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, ReqToToken, Rows, SeqLens, Partial, Lse,
        scale,
        stride_qb, stride_qh,
        stride_kt, stride_kh,
        stride_vt, stride_vh,
        stride_rt,
        stride_pb, stride_ph, stride_ps,
        stride_lb, stride_lh,
        num_splits,
        GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, IEEE: tl.constexpr, STORE_LSE: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        row = tl.load(Rows + b).to(tl.int64)
        seq_len = tl.load(SeqLens + b)
        per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        start = split * per_split
        end = tl.minimum(start + per_split, seq_len)

        offs_h = tl.arange(0, BLOCK_H)
        h_mask = offs_h < GROUP
        heads = kvh * GROUP + offs_h
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < DIM
        q = tl.load(
            Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=h_mask[:, None] & d_mask[None, :], other=0.0,
        )
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            slot = tl.load(ReqToToken + row * stride_rt + offs_n, mask=n_mask, other=0).to(tl.int64)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(K + slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = tl.where(n_mask[None, :], qk * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(
            Partial + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :],
            out.to(Partial.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :],
        )
        if STORE_LSE:
            tl.store(Lse + b * stride_lb + heads * stride_lh + split, lse, mask=h_mask)

    @triton.jit
    def _merge_kernel(
        Partial, Lse, Out,
        stride_pb, stride_ph, stride_ps,
        stride_lb, stride_lh,
        stride_ob, stride_oh,
        num_splits,
        DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < DIM
        m = tl.load(Lse + b * stride_lb + h * stride_lh)
        for s in range(1, num_splits):
            m = tl.maximum(m, tl.load(Lse + b * stride_lb + h * stride_lh + s))
        total = m * 0.0
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s in range(num_splits):
            lse = tl.load(Lse + b * stride_lb + h * stride_lh + s)
            w = tl.where(lse > float("-inf"), tl.exp(lse - m), 0.0)
            part = tl.load(Partial + b * stride_pb + h * stride_ph + s * stride_ps + offs_d, mask=d_mask, other=0.0)
            acc += w * part
            total += w
        tl.store(Out + b * stride_ob + h * stride_oh + offs_d, (acc / total).to(Out.dtype.element_ty), mask=d_mask)

except ImportError:  # pragma: no cover - Triton ships with CUDA builds of torch
    pass
