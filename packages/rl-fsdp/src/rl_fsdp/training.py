"""Steps every sharded model (policy, critic) takes alike: its optimizer, the clipped update, metric sums
over ranks, and per-token outputs of a whole batch gathered onto every rank."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from rl_core.backend_config import BackendConfig
from rl_core.lr_schedule import learning_rate
from rl_core.micro_batches import MicroBatch
from rl_core.train_batch import TrainBatch


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train (all of them, or LoRA's adapters on a frozen base)."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, config: BackendConfig) -> torch.optim.Optimizer:
    """AdamW (Megatron's adam: decoupled weight decay) or SGD with weight decay, as --optimizer says, over
    the trainable parameters only (no optimizer state for a frozen base); AdamW on CUDA through torch's
    fused kernel (one launch for all parameters, the same update)."""
    params = trainable_parameters(model)
    fused = params[0].is_cuda if params else False
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        fused=fused or None,
    )


def clip_and_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, config: BackendConfig, step: int
) -> dict[str, float]:
    """Clip the global gradient norm (0: no clipping), take optimizer step number `step` (from 1) at the
    scheduled learning rate, zero the gradients; returns grad_norm and lr."""
    max_norm = config.clip_grad if config.clip_grad > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_norm)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    rate = learning_rate(
        step, lr=config.lr, min_lr=config.min_lr, decay_style=config.lr_decay_style,
        decay_iters=config.lr_decay_iters, warmup_iters=config.lr_warmup_iters,
    )
    for group in optimizer.param_groups:
        group["lr"] = rate
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": float(grad_norm), "lr": float(optimizer.param_groups[0]["lr"])}


def sum_over_ranks(sums: Mapping[str, torch.Tensor], world_size: int) -> dict[str, float]:
    """Per-micro-batch metric shares summed over this rank's micro-batches, then over all ranks (collective)."""
    names = sorted(sums)
    if not names:
        return {}
    totals = torch.stack([sums[name].float() for name in names])
    if world_size > 1:
        dist.all_reduce(totals)
    return {name: float(value) for name, value in zip(names, totals.tolist())}


@torch.no_grad()
def gather_per_token(
    batch: TrainBatch,
    micro_batches: list[MicroBatch],
    forward: Callable[[MicroBatch], torch.Tensor],
    device: torch.device,
    world_size: int,
) -> list[torch.Tensor]:
    """`forward(mb)` -> [B, T] response-token outputs of this rank's micro-batches, assembled into one
    float32 CPU tensor per sample of the whole batch, on every rank (collective)."""
    offsets = [0]
    for length in batch.response_lengths:
        offsets.append(offsets[-1] + length)
    flat = torch.zeros(offsets[-1], dtype=torch.float32, device=device)
    for mb in micro_batches:
        out = forward(mb)
        for row, i in enumerate(mb.sample_indices):
            flat[offsets[i] : offsets[i + 1]] = out[row, : batch.response_lengths[i]].float()
    if world_size > 1:
        dist.all_reduce(flat)
    flat = flat.cpu()
    return [flat[offsets[i] : offsets[i + 1]].clone() for i in range(len(batch))]
