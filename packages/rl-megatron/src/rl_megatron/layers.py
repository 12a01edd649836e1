"""The layer spec the backend builds GPTModel from: SDPA core attention (context-parallel aware) and an
RMSNorm that works under sequence parallelism, in place of the local spec's unfused attention (which ran
out of memory at 8 x 2048 on the GPU) and torch norms (which refuse sequence parallelism).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn


class RMSNorm(nn.Module):
    """HF's RMSNorm (float32 statistics, weight applied in the input dtype). Under sequence parallelism its
    weight is marked `sequence_parallel`, so megatron-core sums its gradient over TP ranks (each saw a
    slice of the sequence)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_: object) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over the CP group; the gradient of each rank's slice is summed over the ranks
    whose queries read it (gloo has no reduce-scatter: all-reduce, then slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.size = group, dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.size, dim=0)[ctx.rank], None


def cp_positions(local_len: int, cp_rank: int, cp_size: int, device: torch.device) -> torch.Tensor:
    """Global sequence positions of this CP rank's tokens: chunks r and 2*cp-1-r of 2*cp equal chunks."""
    chunk = local_len // 2
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk, device=device)
    return torch.cat([first, second])


class SDPAttention(MegatronModule):
    """Causal core attention through `F.scaled_dot_product_attention` (flash / memory-efficient kernels,
    GQA without repeating K/V). Under context parallelism K and V are all-gathered over the CP group and
    the causal mask is taken on global positions."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        self.cp_size = config.context_parallel_size

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention takes padded [s, b, h, d] input without packing or attention bias")
        sq, b = query.shape[:2]
        mask = None
        if self.cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            rank = parallel_state.get_context_parallel_rank()
            q_pos = cp_positions(sq, rank, self.cp_size, query.device)
            k_pos = torch.cat([cp_positions(sq, r, self.cp_size, query.device) for r in range(self.cp_size)])
            key, value = _GatherSequence.apply(key, group), _GatherSequence.apply(value, group)
            mask = k_pos[None, :] <= q_pos[:, None]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=mask is None,
            scale=self.softmax_scale,
            enable_gqa=True,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


class ValueHead(nn.Module):
    """A scalar per position in place of GPTModel's output layer (a critic): Linear(hidden, 1), replicated on
    every TP rank and starting at zero, so every value is 0 before the first update. Under sequence
    parallelism the sequence is gathered with a split (not summed) backward: every TP rank computes the
    same loss from the same values."""

    def __init__(self, config: TransformerConfig, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, hidden_size, dtype=config.params_dtype))
        self.bias = nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
        self.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return F.linear(hidden, self.weight, self.bias), None


def _local_layer_spec(qk_norm: bool, num_experts: int | None) -> ModuleSpec:
    spec = copy.deepcopy(get_gpt_layer_local_spec(num_experts=num_experts, qk_layernorm=qk_norm, normalization="RMSNorm"))
    layer = spec.submodules
    layer.input_layernorm = RMSNorm
    layer.pre_mlp_layernorm = RMSNorm
    attention = layer.self_attention.submodules
    attention.core_attention = SDPAttention
    if qk_norm:
        attention.q_layernorm = RMSNorm
        attention.k_layernorm = RMSNorm
    return spec


def local_sdpa_block_spec(config: TransformerConfig, qk_norm: bool, experts: list[int | None]) -> TransformerBlockSubmodules:
    """megatron-core's local layer spec with SDPA attention and our RMSNorm everywhere (layers, QK, final);
    `experts` per layer of this stage: None for a dense MLP, else the expert count of its MoE layer
    (sequential experts: the local spec's grouped GEMM needs CUDA)."""
    if len(experts) != get_num_layers_to_build(config):
        raise ValueError(f"{len(experts)} layer kinds for {get_num_layers_to_build(config)} layers on this stage")
    specs = {n: _local_layer_spec(qk_norm, n) for n in set(experts)}
    return TransformerBlockSubmodules(layer_specs=[specs[n] for n in experts], layer_norm=RMSNorm)


def transformer_engine_block_spec(
    config: TransformerConfig, qk_norm: bool, experts: list[int | None], grouped_gemm: bool
) -> TransformerBlockSubmodules:
    """megatron-core's TransformerEngine spec (fused attention with its own CP, TE norms and linears;
    TE's grouped experts with `grouped_gemm`)."""
    from megatron.core.extensions.transformer_engine import TENorm
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    specs = {
        n: get_gpt_layer_with_transformer_engine_spec(num_experts=n, moe_grouped_gemm=grouped_gemm, qk_layernorm=qk_norm)
        for n in set(experts)
    }
    return TransformerBlockSubmodules(layer_specs=[specs[n] for n in experts], layer_norm=TENorm)
