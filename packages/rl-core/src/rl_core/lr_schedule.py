"""The learning rate of each optimizer step (Megatron's `--lr-decay-style`, `--lr-warmup-iters`), as a pure
function both backends call, so that one flag set gives one schedule whichever backend trains."""

from __future__ import annotations

import math
from typing import Literal

DecayStyle = Literal["constant", "linear", "cosine"]


def learning_rate(
    step: int,
    *,
    lr: float,
    min_lr: float = 0.0,
    decay_style: DecayStyle = "constant",
    decay_iters: int | None = None,
    warmup_iters: int = 0,
) -> float:
    """The rate of optimizer step `step` (1 for the first step).

    Warm-up rises linearly to `lr` over the first `warmup_iters` steps (step k of the warm-up uses
    lr * k / warmup_iters, so the first step already moves the weights). After it, `linear` and `cosine`
    decay from `lr` to `min_lr` by step `decay_iters` and stay at `min_lr`; `constant` stays at `lr`.
    """
    if step < 1:
        raise ValueError(f"optimizer steps count from 1, got {step}")
    if warmup_iters and step <= warmup_iters:
        return lr * step / warmup_iters
    if decay_style == "constant" or decay_iters is None:
        return lr
    if step >= decay_iters:
        return min_lr
    span = max(decay_iters - warmup_iters, 1)
    progress = (step - warmup_iters) / span
    coefficient = 1.0 - progress if decay_style == "linear" else 0.5 * (math.cos(math.pi * progress) + 1.0)
    return min_lr + coefficient * (lr - min_lr)
