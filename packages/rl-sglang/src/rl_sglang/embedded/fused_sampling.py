"""The sampler of the common case in one Triton kernel: per-request temperature (0 = greedy) and no
top-k/top-p. One program per row streams the vocabulary once, keeping an online max and sum of
exponentials (the log-softmax at the row's temperature) and the running winner of a Gumbel-max race,
argmax(logits / T - log E) with E ~ Exp(1) from in-kernel Philox numbers; which is the same draw as
`sampling.sample`'s exponential race, argmax(p / E), without materialising p, E or a float copy of the
logits. The Philox key is one int64 drawn from the engine's `torch.Generator` on the device, so runs
with the same seed repeat and no call waits on the host.
"""

from __future__ import annotations

import torch

# Vocabulary entries per loop step of a program, as four chunks that share one Philox call (it yields
# four numbers per counter). 4096 bf16 logits = 8 KiB in flight per program per step.
_CHUNK = 1024
_SEED_HIGH = 1 << 62


def fused_sample(
    logits: torch.Tensor, temperatures: torch.Tensor, sampled: torch.Tensor | None, generator: torch.Generator, chunk: int = _CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits` [B, V] (any float dtype, unit last stride), `temperatures` [B] float32 (1.0 on greedy
    rows), `sampled` [B] bool or None (all greedy). Returns (tokens [B] int64, log-probs [B] float32)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if sampled is None:
        seed = sampled_flags = tokens  # unread: the kernel is compiled without the race
    else:
        seed = torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=logits.device, dtype=torch.int64)
        sampled_flags = sampled
    _sample_kernel[(rows,)](
        logits, logits.stride(0), temperatures, sampled_flags, seed, tokens, logprobs, vocab,
        RACE=sampled is not None, CHUNK=chunk, num_warps=8,
    )  # fmt: skip
    return tokens, logprobs


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _chunk_scores(z, u, valid, sampled, RACE: tl.constexpr):
        """A chunk's race scores: z - log(E) with E = -log(u) on sampled rows, z itself on greedy ones."""
        if RACE:
            race = z - tl.log(-tl.log(u))
            score = tl.where(sampled, race, z)
        else:
            score = z
        return tl.where(valid, score, float("-inf"))

    @triton.jit
    def _merge_winner(score, z, chunk_start, best, best_idx, best_z):
        """Keep the chunk's winner if it beats the running one (ties: the lower index, as torch.argmax)."""
        value, index = tl.max(score, 0, return_indices=True, return_indices_tie_break_left=True)
        won_z = tl.sum(tl.where(tl.arange(0, score.shape[0]) == index, z, 0.0), 0)
        take = value > best
        return tl.where(take, value, best), tl.where(take, chunk_start + index, best_idx), tl.where(take, won_z, best_z)

    @triton.jit
    def _online_logsumexp(z, m, s):
        new_m = tl.maximum(m, tl.max(z, 0))
        return new_m, s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), 0)

    @triton.jit
    def _sample_kernel(
        Logits, stride_row, Temps, Sampled, Seed, Tokens, LogProbs, vocab,
        RACE: tl.constexpr, CHUNK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        base = Logits + row * stride_row
        temperature = tl.load(Temps + row)
        sampled = False
        seed = 0
        if RACE:
            sampled = tl.load(Sampled + row) != 0
            seed = tl.load(Seed)
        lanes = tl.arange(0, CHUNK)
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.full((), 0.0, tl.float32)
        best = tl.full((), float("-inf"), tl.float32)
        best_idx = tl.full((), 0, tl.int32)
        best_z = tl.full((), float("-inf"), tl.float32)
        steps = tl.cdiv(vocab, 4 * CHUNK)
        for step in range(0, steps):
            start = step * (4 * CHUNK)  # within a row: int32 is enough
            o0 = start + lanes
            o1 = o0 + CHUNK
            o2 = o1 + CHUNK
            o3 = o2 + CHUNK
            z0 = tl.load(base + o0, mask=o0 < vocab, other=float("-inf")).to(tl.float32) / temperature
            z1 = tl.load(base + o1, mask=o1 < vocab, other=float("-inf")).to(tl.float32) / temperature
            z2 = tl.load(base + o2, mask=o2 < vocab, other=float("-inf")).to(tl.float32) / temperature
            z3 = tl.load(base + o3, mask=o3 < vocab, other=float("-inf")).to(tl.float32) / temperature
            u0 = z0  # unread without the race
            u1 = z0
            u2 = z0
            u3 = z0
            if RACE:  # one Philox call per four entries; its counter: the row and the step's first entry
                r0, r1, r2, r3 = tl.randint4x(seed, row * vocab + o0)
                u0 = tl.uint_to_uniform_float(r0)
                u1 = tl.uint_to_uniform_float(r1)
                u2 = tl.uint_to_uniform_float(r2)
                u3 = tl.uint_to_uniform_float(r3)
            m, s = _online_logsumexp(z0, m, s)
            m, s = _online_logsumexp(z1, m, s)
            m, s = _online_logsumexp(z2, m, s)
            m, s = _online_logsumexp(z3, m, s)
            best, best_idx, best_z = _merge_winner(_chunk_scores(z0, u0, o0 < vocab, sampled, RACE), z0, start + 0 * CHUNK, best, best_idx, best_z)
            best, best_idx, best_z = _merge_winner(_chunk_scores(z1, u1, o1 < vocab, sampled, RACE), z1, start + 1 * CHUNK, best, best_idx, best_z)
            best, best_idx, best_z = _merge_winner(_chunk_scores(z2, u2, o2 < vocab, sampled, RACE), z2, start + 2 * CHUNK, best, best_idx, best_z)
            best, best_idx, best_z = _merge_winner(_chunk_scores(z3, u3, o3 < vocab, sampled, RACE), z3, start + 3 * CHUNK, best, best_idx, best_z)
        tl.store(Tokens + row, best_idx)
        tl.store(LogProbs + row, best_z - m - tl.log(s))

except ImportError:  # pragma: no cover - Triton ships with CUDA builds of torch
    pass
