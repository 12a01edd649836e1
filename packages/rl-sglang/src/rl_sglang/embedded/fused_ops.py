"""Two small Triton kernels that cut the kernel count of a decode step on CUDA, where a step of a
small model is bound by how many kernels it launches (each costs a few microseconds even inside a
CUDA graph), not by arithmetic:
- `rms_norm`: HF's RMSNorm (fp32 statistics, cast back, times the weight) in one kernel instead of
  seven; `fuse_rms_norms` swaps it into a loaded model's RMSNorm modules of the known, plain kind,
  after checking on the module's own weights that it agrees with the module's forward;
- `store_kv`: a layer's new keys and values written to their pool slots in one kernel.
"""

from __future__ import annotations

import logging
import types

import torch

logger = logging.getLogger(__name__)

# weight * normalize(x): the RMSNorm classes whose forward is exactly that (Gemma's adds 1 to the weight)
PLAIN_RMS_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Qwen3MoeRMSNorm", "Qwen2MoeRMSNorm"}
_AGREE_RTOL = 1e-2  # a bf16 ulp: the reduction order of the mean may differ


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    import triton

    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), n, eps, BLOCK=triton.next_power_of_2(n))
    return out.view(*x.shape[:-1], n)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """key/value [Hkv, N, D] (any strides, unit last stride) into k_cache/v_cache [T, Hkv, D] at `slots` [N]."""
    import triton

    heads, n, dim = key.shape
    _store_kv_kernel[(n, heads)](
        key, value, k_cache, v_cache, slots,
        key.stride(1), key.stride(0), value.stride(1), value.stride(0),
        k_cache.stride(0), k_cache.stride(1),
        DIM=dim, BLOCK_D=triton.next_power_of_2(dim),
    )  # fmt: skip


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Give the plain RMSNorm modules of `model` the one-kernel forward; returns how many."""
    count, checked = 0, {}
    for module in model.modules():
        name = type(module).__name__
        if name not in PLAIN_RMS_NORMS or not hasattr(module, "variance_epsilon") or module.weight.device.type != "cuda":
            continue
        if name not in checked:
            checked[name] = _agrees(module)
            if not checked[name]:
                logger.warning("%s: the fused RMSNorm kernel disagrees with its forward; keeping HF's", name)
        if checked[name]:
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():  # inside a compiled layer inductor fuses HF's own math with its neighbours
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


@torch.inference_mode()
def _agrees(module: torch.nn.Module) -> bool:
    weight, eps = module.weight, module.variance_epsilon
    if not isinstance(weight, torch.Tensor) or not isinstance(eps, (int, float)):
        return False  # not the plain RMSNorm the kernel computes
    x = torch.randn(64, weight.shape[-1], device=weight.device, dtype=weight.dtype) * 3
    expected = module(x).float()
    got = rms_norm(x, weight, float(eps)).float()
    return bool(torch.allclose(got, expected, rtol=_AGREE_RTOL, atol=_AGREE_RTOL * expected.abs().max().item()))


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(X, W, Y, stride_x, stride_y, n, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        variance = tl.sum(xf * xf, 0) / n
        normed = (xf * tl.rsqrt(variance + eps)).to(x.dtype)  # HF casts back before the weight
        w = tl.load(W + offs, mask=mask, other=0.0)
        tl.store(Y + row * stride_y + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _store_kv_kernel(
        K, V, KC, VC, Slots, stride_kn, stride_kh, stride_vn, stride_vh, stride_ct, stride_ch,
        DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        n = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        slot = tl.load(Slots + n).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < DIM
        k = tl.load(K + n * stride_kn + h * stride_kh + offs, mask=mask)
        v = tl.load(V + n * stride_vn + h * stride_vh + offs, mask=mask)
        tl.store(KC + slot * stride_ct + h * stride_ch + offs, k.to(KC.dtype.element_ty), mask=mask)
        tl.store(VC + slot * stride_ct + h * stride_ch + offs, v.to(VC.dtype.element_ty), mask=mask)

except ImportError:  # pragma: no cover - Triton ships with CUDA builds of torch
    pass
