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

# Philox counters per loop step of a program; each yields four numbers, so a step covers 4 * _CHUNK
# vocabulary entries (2048 bf16 logits = 4 KiB per program per step, 8 per thread at 8 warps).
_CHUNK = 512
_WARPS = 8
_SEED_HIGH = 1 << 62


def fused_sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    sampled: torch.Tensor | None,
    generator: torch.Generator,
    chunk: int = _CHUNK,
    num_warps: int = _WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits` [B, V] (any float dtype, unit last stride), `temperatures` [B] float32 (1.0 on greedy
    rows), `sampled` [B] bool or None (all greedy). Returns (tokens [B] int64, log-probs [B] float32).
    `chunk` (a power of two) and `num_warps` tune the kernel (bench/engine/profile_decode.py sweeps them)."""
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
        RACE=sampled is not None, CHUNK=chunk, num_warps=num_warps,
    )  # fmt: skip
    return tokens, logprobs


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _sample_kernel(
        Logits, stride_row, Temps, Sampled, Seed, Tokens, LogProbs, vocab,
        RACE: tl.constexpr, CHUNK: tl.constexpr,
    ):  # fmt: skip
        """A step reads a [CHUNK, 4] tile of the row (entry start + 4 i + k): the four Philox outputs of
        counter (row, start + 4 i) serve its row i. Each tile position keeps its own running max, sum of
        exponentials and race winner, so the loop has no cross-thread reduction; one at the end."""
        row = tl.program_id(0).to(tl.int64)
        base = Logits + row * stride_row
        temperature = tl.load(Temps + row)
        sampled = False
        seed = 0
        if RACE:
            sampled = tl.load(Sampled + row) != 0
            seed = tl.load(Seed)
        quad = 4 * tl.arange(0, CHUNK)
        k = tl.arange(0, 4)[None, :]
        tile = quad[:, None] + k
        m = tl.full((CHUNK, 4), -3.0e38, tl.float32)  # finite: a masked -inf entry then adds exp(-inf) = 0
        s = tl.zeros((CHUNK, 4), tl.float32)
        best = tl.full((CHUNK, 4), float("-inf"), tl.float32)
        best_idx = tl.full((CHUNK, 4), 2147483647, tl.int32)
        best_z = tl.zeros((CHUNK, 4), tl.float32)
        for start in range(0, vocab, 4 * CHUNK):
            offs = start + tile
            valid = offs < vocab
            z = tl.load(base + offs, mask=valid, other=float("-inf")).to(tl.float32) / temperature
            # online log-sum-exp with one exp per entry: e = exp(-|z - m|) scales whichever side is smaller
            e = tl.exp(-tl.abs(z - m))
            s = tl.where(z > m, s * e + 1.0, s + e)
            m = tl.maximum(m, z)
            score = z
            if RACE:
                r0, r1, r2, r3 = tl.randint4x(seed, row * vocab + start + quad)
                bits = tl.where(k == 0, r0[:, None], tl.where(k == 1, r1[:, None], tl.where(k == 2, r2[:, None], r3[:, None])))
                u = tl.uint_to_uniform_float(bits)  # [0, 1): u = 0 gives E = inf, a score of -inf
                score = tl.where(sampled, z - tl.log(-tl.log(u)), z)  # Gumbel-max: argmax(log p - log E)
            score = tl.where(valid, score, float("-inf"))
            take = score > best  # strict: a position's earlier (lower) index wins a tie, as torch.argmax
            best = tl.where(take, score, best)
            best_idx = tl.where(take, offs, best_idx)
            best_z = tl.where(take, z, best_z)
        top = tl.max(tl.max(m, 1), 0)
        total = tl.sum(tl.sum(s * tl.exp(m - top), 1), 0)
        winner = tl.max(tl.max(best, 1), 0)
        token = tl.min(tl.min(tl.where(best == winner, best_idx, 2147483647), 1), 0)
        token_z = tl.max(tl.max(tl.where(best_idx == token, best_z, float("-inf")), 1), 0)
        tl.store(Tokens + row, token)
        tl.store(LogProbs + row, token_z - top - tl.log(total))

except ImportError:  # pragma: no cover - Triton ships with CUDA builds of torch
    pass
