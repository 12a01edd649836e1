"""Times rl-core's loss and advantage functions on one CPU batch (default 256 samples x 4096 tokens).

Each row is the median of --repeats runs after three warm-up runs. Loss rows are forward + backward of one call
over the whole batch (the gradient reaches a [B, T] log-prob leaf); advantage rows take per-sample rewards
(and KL, values) to per-token advantages.
Usage: uv run --frozen python bench/core/bench_losses.py [--batch 256] [--tokens 4096] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from rl_core.algorithms.advantages import compute_advantages
from rl_core.algorithms.policy_loss import LossDenominators, PolicyLossConfig, policy_loss
from rl_core.algorithms.value_loss import value_loss
from rl_core.algorithms.whitening import whiten_advantages


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):  # warm-up: the allocator grows its cache during the first calls
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, T = args.batch, args.tokens

    base = -torch.rand(B, T) * 3
    old = base + 0.05 * torch.randn(B, T)
    rollout = old + 0.05 * torch.randn(B, T)
    ref = base + 0.05 * torch.randn(B, T)
    entropy = torch.rand(B, T)
    advantages = torch.randn(B, 1).expand(B, T).contiguous()
    mask = torch.ones(B, T)
    den = LossDenominators(num_tokens=float(B * T), num_samples=float(B))

    def loss_case(config: PolicyLossConfig) -> Callable[[], object]:
        def run() -> None:
            lp = base.clone().requires_grad_()
            loss, _ = policy_loss(config, log_probs=lp, old_log_probs=old, advantages=advantages, mask=mask, denominators=den,
                                  ref_log_probs=ref, entropy=entropy, rollout_log_probs=rollout)
            loss.backward()

        return run

    def value_case() -> None:
        values = base.clone().requires_grad_()
        loss, _ = value_loss(values=values, old_values=old, returns=ref, mask=mask, denominators=den, value_clip=0.2)
        loss.backward()

    kl = dict(use_kl_loss=True, kl_loss_coef=0.01, entropy_coef=0.001)
    cases: list[tuple[str, Callable[[], object]]] = [
        ("policy_loss ppo (+ KL loss, entropy)", loss_case(PolicyLossConfig(**kl))),
        ("policy_loss ppo + TIS + OPSM", loss_case(PolicyLossConfig(**kl, use_tis=True, use_opsm=True))),
        ("policy_loss gspo", loss_case(PolicyLossConfig(**kl, pg_loss_type="gspo"))),
        ("policy_loss cispo", loss_case(PolicyLossConfig(**kl, pg_loss_type="cispo", eps_clip=1.0, eps_clip_high=4.0))),
        ("value_loss (clipped)", value_case),
    ]

    rewards = torch.randint(0, 2, (B,)).float().tolist()
    lengths = [T] * B
    log_probs = list(base.unbind())
    ref_list = list(ref.unbind())
    values = list(torch.randn(B, T).unbind())
    masks = list(mask.unbind())
    cases += [
        ("advantages grpo", lambda: compute_advantages("grpo", rewards, 8, lengths)),
        ("advantages reinforce_plus_plus (KL, gamma, whitening)", lambda: compute_advantages(
            "reinforce_plus_plus", rewards, 8, lengths, gamma=0.99, kl_coef=0.01, log_probs=log_probs,
            ref_log_probs=ref_list, normalize_advantages=True)),
        ("advantages reinforce_plus_plus_baseline (KL, whitening)", lambda: compute_advantages(
            "reinforce_plus_plus_baseline", rewards, 8, lengths, kl_coef=0.01, log_probs=log_probs, ref_log_probs=ref_list,
            normalize_advantages=True)),
        ("advantages ppo (GAE, KL)", lambda: compute_advantages(
            "ppo", rewards, 8, lengths, gamma=0.99, lambd=0.95, kl_coef=0.01, log_probs=log_probs, ref_log_probs=ref_list,
            values=values)),
        ("whiten_advantages alone", lambda: whiten_advantages(log_probs, masks)),
    ]

    print(f"B={B} T={T} ({B * T:,} tokens), torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print("| function | ms |")
    print("|---|---:|")
    for name, fn in cases:
        print(f"| {name} | {median_ms(fn, args.repeats):.1f} |")


if __name__ == "__main__":
    main()
