"""slime's `perf/*` figures of one rollout: rollout and train throughput, model TFLOP/s, step time and the
trainer's idle share, weight-sync time, peak GPU memory per phase.

Names follow slime (perf/rollout_time, perf/tokens_per_gpu_per_sec, perf/actor_train_time,
perf/actor_train_tflops, perf/actor_train_tok_per_s, perf/train_wait_time, perf/step_time,
perf/wait_time_ratio, perf/update_weights_time ...). A figure that cannot be measured here is left out,
never logged as 0: per-GPU rates and CUDA memory where the part runs on the CPU, TFLOP/s for a model
whose config lacks the fields the formula reads.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

GIB = float(1 << 30)


def read_hf_config(model_path: Path | str) -> dict[str, Any]:
    """The model's config.json (a multimodal config's `text_config`, the part the trainer's FLOPs go to)."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return config.get("text_config") or config


def forward_flops(hf_config: dict[str, Any], seq_lens: Iterable[int]) -> float | None:
    """FLOPs of one forward pass over each sequence on its own (no padding), counting matrix products only:
    the q/k/v/o projections, the attention scores and their weighted sum over the whole s x s matrix (what
    SDPA computes under a causal mask; torch.utils.flop_counter counts the same), the gated (SwiGLU) MLP of
    the Llama/Qwen families or, for Qwen-style MoE layers, the router, the top-k experts and the shared
    expert, and the LM head. None when the config lacks a field the formula needs."""
    try:
        h, layers, vocab = int(hf_config["hidden_size"]), int(hf_config["num_hidden_layers"]), int(hf_config["vocab_size"])
        q_heads = int(hf_config["num_attention_heads"])
        kv_heads = int(hf_config.get("num_key_value_heads") or q_heads)
        head_dim = int(hf_config.get("head_dim") or h // q_heads)
        dense_ffn = int(hf_config["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return None
    attention_proj = 2 * h * (q_heads + 2 * kv_heads) * head_dim + 2 * q_heads * head_dim * h
    dense_mlp = 3 * 2 * h * dense_ffn
    moe_layers, moe_mlp = _moe_layers(hf_config, layers, h)
    per_token = (
        layers * attention_proj
        + (layers - moe_layers) * dense_mlp
        + moe_layers * moe_mlp
        + 2 * h * vocab
    )
    total = 0.0
    for s in seq_lens:
        total += s * per_token + layers * 4 * q_heads * head_dim * s * s
    return total


def _moe_layers(hf_config: dict[str, Any], layers: int, h: int) -> tuple[int, int]:
    """(number of MoE layers, FLOPs per token of one MoE layer's MLP) for Qwen2/Qwen3-MoE style configs."""
    experts = hf_config.get("num_experts") or hf_config.get("num_local_experts")
    if not experts:
        return 0, 0
    top_k, expert_ffn = int(hf_config["num_experts_per_tok"]), int(hf_config["moe_intermediate_size"])
    step = int(hf_config.get("decoder_sparse_step") or 1)
    dense_only = set(hf_config.get("mlp_only_layers") or [])
    count = sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    per_token = 2 * h * int(experts) + top_k * 3 * 2 * h * expert_ffn
    if shared := int(hf_config.get("shared_expert_intermediate_size") or 0):
        per_token += 3 * 2 * h * shared + 2 * h  # the shared expert and its one-unit gate
    return count, per_token


@dataclass
class PhaseClock:
    """Wall time and trained sequence lengths per trainer phase (log_probs, ref_log_probs, actor_train, ...),
    as the driver sees the calls to every rank; `take()` hands them over and starts afresh."""

    seconds: dict[str, float] = field(default_factory=dict)
    seq_lens: dict[str, list[int]] = field(default_factory=dict)

    def record(self, phase: str, started: float, batch: Any) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started
        self.seq_lens.setdefault(phase, []).extend(len(tokens) for tokens in batch.tokens)

    def take(self) -> PhaseClock:
        taken = PhaseClock(self.seconds, self.seq_lens)
        self.seconds, self.seq_lens = {}, {}
        return taken


def rollout_perf(samples: Sequence[Any], rollout_time: float, num_gpus: int | None) -> dict[str, float]:
    """Generation throughput as slime counts it: the tokens the engines sampled (the loss-mask tokens, so a
    tool's output does not count) over the rollout's wall time; per GPU only when the engines have GPUs."""
    generated = [sum(s.effective_loss_mask()) for s in samples]
    out = {"perf/rollout_time": rollout_time}
    if rollout_time > 0 and generated:
        out["perf/rollout_tokens_per_sec"] = sum(generated) / rollout_time
        out["perf/longest_sample_tokens_per_sec"] = max(generated) / rollout_time
        if num_gpus:
            out["perf/tokens_per_gpu_per_sec"] = sum(generated) / rollout_time / num_gpus
    return out


# The backward pass costs two forwards (the gradients of each product's input and of its weight).
TRAIN_FLOPS_PER_FORWARD = 3
PHASE_FLOPS = {"log_probs": 1, "ref_log_probs": 1, "actor_train": TRAIN_FLOPS_PER_FORWARD}


def train_perf(clock: PhaseClock, hf_config: dict[str, Any] | None, world_size: int) -> dict[str, float]:
    """`perf/<phase>_time` for every phase, tokens per second of the optimizer steps, and model TFLOP/s per
    trainer rank (the sequences' FLOPs over the phase's time and the ranks sharing it)."""
    out: dict[str, float] = {}
    for phase, seconds in clock.seconds.items():
        out[f"perf/{phase}_time"] = seconds
        if seconds <= 0:
            continue
        if phase.endswith("_train"):
            out[f"perf/{phase}_tok_per_s"] = sum(clock.seq_lens[phase]) / seconds
        if phase in PHASE_FLOPS and hf_config is not None:
            flops = forward_flops(hf_config, clock.seq_lens[phase])
            if flops is not None:
                out[f"perf/{phase}_tflops"] = PHASE_FLOPS[phase] * flops / seconds / world_size / 1e12
    return out


def step_perf(step_time: float, wait_time: float, train_time: float | None, update_weights_time: float | None) -> dict[str, float]:
    """The step and its parts: `perf/wait_time_ratio` is the share of the step the trainer sat idle waiting
    for a rollout (all of the generation in the synchronous loop, what training did not hide under async)."""
    out = {"perf/step_time": step_time, "perf/train_wait_time": wait_time}
    if step_time > 0:
        out["perf/wait_time_ratio"] = wait_time / step_time
    if train_time is not None:
        out["perf/train_time"] = train_time
    if update_weights_time is not None:
        out["perf/update_weights_time"] = update_weights_time
    return out


def memory_perf(peaks: dict[str, int | None]) -> dict[str, float]:
    """Peak CUDA memory allocated by the policy's ranks (the largest rank) in each phase, in GiB; phases on
    the CPU (None) are left out."""
    return {f"perf/{phase}_max_memory_allocated_gb": peak / GIB for phase, peak in peaks.items() if peak is not None}
