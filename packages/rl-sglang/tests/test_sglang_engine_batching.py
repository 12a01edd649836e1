"""The embedded engine's continuous batching, KV pool, prefix cache and decode kernel, each checked
against an independent computation: a plain HF forward of each request alone, without any cache."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rl_sglang.client import SGLangClient
from rl_sglang.embedded import EmbeddedEngine
from rl_sglang.embedded.__main__ import options_from_args, parse_args
from rl_sglang.embedded.options import EngineOptions
from rl_sglang.launcher import build_embedded_argv

GREEDY = {"temperature": 0, "ignore_eos": True}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _logprobs(answer: dict) -> list[float]:
    return [entry[0] for entry in answer["meta_info"]["output_token_logprobs"]]


async def _serve(model_dir, **options):
    engine = EmbeddedEngine(str(model_dir), device="cpu", dtype="float32", max_running_requests=8, options=EngineOptions(**options))
    await asyncio.wait_for(engine.start(), 60)
    return engine, SGLangClient(engine.url, timeout_s=60)


async def _close(engine, client):
    await client.close()
    await asyncio.wait_for(engine.stop(), 60)


async def _wait_for_tokens(engine, rid: str, count: int) -> None:
    for _ in range(4000):
        request = engine.scheduler._by_rid.get(rid)
        if request is not None and len(request.output_ids) >= count:
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"{rid} never reached {count} tokens")


async def test_requests_joining_a_running_batch_match_each_request_run_alone(client, engine, model_dir, ref):
    first = asyncio.create_task(
        client.generate({"input_ids": [5, 9, 14, 3], "sampling_params": {**GREEDY, "max_new_tokens": 60}, "return_logprob": True, "rid": "a"})
    )
    await asyncio.wait_for(_wait_for_tokens(engine, "a", 5), 30)
    late = [[7, 8], [20, 21, 22, 23, 24, 25, 26], [11]]
    joined = [
        asyncio.create_task(
            client.generate({"input_ids": p, "sampling_params": {**GREEDY, "max_new_tokens": 12 + 3 * i}, "return_logprob": True, "rid": f"j{i}"})
        )
        for i, p in enumerate(late)
    ]
    await asyncio.wait_for(_wait_for_tokens(engine, "j0", 1), 30)
    still_running = engine.scheduler._by_rid.get("a")
    assert still_running is not None and 5 <= len(still_running.output_ids) < 60  # they joined mid-batch
    answers = await asyncio.wait_for(asyncio.gather(first, *joined), 60)
    for prompt, answer in zip([[5, 9, 14, 3], *late], answers):
        n = len(answer["output_ids"])
        assert answer["output_ids"] == ref.greedy(model_dir, prompt, n)
        assert _logprobs(answer) == pytest.approx(ref.teacher_forced_logprobs(model_dir, prompt, answer["output_ids"]), abs=1e-4)


async def test_the_samples_of_one_prompt_prefill_it_once_and_flush_cache_forgets_it(client, engine, model_dir, ref):
    prompt = [4, 8, 15, 16, 23, 42]
    payload = {"input_ids": prompt, "sampling_params": {**GREEDY, "max_new_tokens": 6}, "return_logprob": True}
    answers = await asyncio.wait_for(asyncio.gather(*(client.generate(payload) for _ in range(4))), 60)
    cached = sorted(a["meta_info"]["cached_tokens"] for a in answers)
    assert cached == [0, 5, 5, 5]  # one prefill; the others reuse all but the last prompt token
    expected = ref.greedy(model_dir, prompt, 6)
    for answer in answers:
        assert answer["output_ids"] == expected
        assert _logprobs(answer) == pytest.approx(ref.teacher_forced_logprobs(model_dir, prompt, expected), abs=1e-4)
    again = await asyncio.wait_for(client.generate(payload), 60)
    assert again["meta_info"]["cached_tokens"] == 5
    await asyncio.wait_for(client.flush_cache(), 10)
    flushed = await asyncio.wait_for(client.generate(payload), 60)
    assert flushed["meta_info"]["cached_tokens"] == 0
    assert flushed["output_ids"] == expected
    pool = engine.runner.pool
    assert pool.allocator.available + engine.runner.prefix_cache.evictable_tokens == pool.tokens  # nothing leaked


async def test_server_info_counts_the_steps_rows_and_tokens_a_batch_of_requests_took(client, engine):
    before = (await asyncio.wait_for(client.get_server_info(), 10))["internal_states"][0]
    prompts = [[3, 4, 5, 6], [3, 4, 5, 6], [9, 10], [11, 12, 13]]
    lengths = [5, 3, 7, 4]
    answers = await asyncio.wait_for(asyncio.gather(*(
        client.generate({"input_ids": p, "sampling_params": {**GREEDY, "max_new_tokens": n}}) for p, n in zip(prompts, lengths)
    )), 60)  # fmt: skip
    after = (await asyncio.wait_for(client.get_server_info(), 10))["internal_states"][0]
    delta = {k: after[k] - before[k] for k in after}
    assert [a["meta_info"]["completion_tokens"] for a in answers] == lengths
    cached = sum(a["meta_info"]["cached_tokens"] for a in answers)
    assert delta["requests"] == len(prompts)
    # a request's first token comes from its prefill step, every other one from a decode step
    assert delta["decode_rows"] == sum(n - 1 for n in lengths)
    assert delta["decode_steps"] >= max(lengths) - 1
    assert delta["prefill_tokens"] == sum(len(p) for p in prompts) - cached
    assert delta["cached_tokens"] == cached
    assert 0 < delta["model_s"] <= delta["step_s"]
    assert after["last_submit_monotonic_s"] > before["last_submit_monotonic_s"]


async def test_aborting_the_request_that_fills_a_shared_prompt_hands_the_prompt_to_a_sibling(model_dir, ref):
    engine, client = await _serve(model_dir, chunked_prefill_size=2)  # the filler's prefill spans many steps
    try:
        prompt = [(7 * i) % 60 + 3 for i in range(41)]
        params = {**GREEDY, "max_new_tokens": 12}
        filler = asyncio.create_task(client.generate({"input_ids": prompt, "sampling_params": params, "rid": "filler"}))
        for _ in range(20000):  # until the filler is part-way through its prompt
            request = engine.scheduler._by_rid.get("filler")
            if request is not None and 0 < request.kv_len < 20:
                break
            await asyncio.sleep(0.0005)
        siblings = [asyncio.create_task(client.generate({"input_ids": prompt, "sampling_params": params})) for _ in range(3)]
        await asyncio.sleep(0.001)
        engine.scheduler.abort("filler")
        assert (await asyncio.wait_for(filler, 30))["meta_info"]["finish_reason"]["type"] == "abort"
        answers = await asyncio.wait_for(asyncio.gather(*siblings), 60)
        assert sorted(a["meta_info"]["cached_tokens"] for a in answers) == [0, 40, 40]  # one sibling prefilled it anew
        expected = ref.greedy(model_dir, prompt, 12)
        assert all(a["output_ids"] == expected for a in answers)
        pool = engine.runner.pool
        assert pool.allocator.available + engine.runner.prefix_cache.evictable_tokens == pool.tokens
    finally:
        await _close(engine, client)


async def test_a_long_prompt_prefilled_in_chunks_matches_a_plain_forward(model_dir, ref):
    engine, client = await _serve(model_dir, chunked_prefill_size=3, disable_radix_cache=True)
    try:
        prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
        short = [7, 7]
        answers = await asyncio.wait_for(
            asyncio.gather(
                *(client.generate({"input_ids": p, "sampling_params": {**GREEDY, "max_new_tokens": 8}, "return_logprob": True}) for p in (prompt, short))
            ),
            60,
        )
        for p, answer in zip((prompt, short), answers):
            assert answer["output_ids"] == ref.greedy(model_dir, p, 8)
            assert _logprobs(answer) == pytest.approx(ref.teacher_forced_logprobs(model_dir, p, answer["output_ids"]), abs=1e-4)
            assert answer["meta_info"]["cached_tokens"] == 0
    finally:
        await _close(engine, client)


async def test_a_small_kv_pool_queues_requests_until_slots_free_and_refuses_one_that_cannot_fit(model_dir, ref):
    engine, client = await _serve(model_dir, max_total_tokens=40)
    try:
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]  # each needs prompt + 20 slots: two at a time at most
        answers = await asyncio.wait_for(
            asyncio.gather(*(client.generate({"input_ids": p, "sampling_params": {**GREEDY, "max_new_tokens": 20}}) for p in prompts)), 60
        )
        for p, answer in zip(prompts, answers):
            assert answer["output_ids"] == ref.greedy(model_dir, p, 20)
        too_big = await asyncio.wait_for(client.generate({"input_ids": [5, 6], "sampling_params": {**GREEDY, "max_new_tokens": 50}}), 60)
        assert too_big["meta_info"]["finish_reason"]["type"] == "abort"
        assert "KV slots" in too_big["meta_info"]["finish_reason"]["message"]
    finally:
        await _close(engine, client)


def test_rl_train_sglang_flags_reach_the_engine_options_through_the_launcher_argv():
    flags = {
        "mem_fraction_static": 0.5, "max_total_tokens": 4096, "context_length": 2048, "chunked_prefill_size": 512,
        "cuda_graph_max_bs": 32, "disable_cuda_graph": True, "disable_radix_cache": True,
    }  # fmt: skip
    argv = build_embedded_argv("/m", "127.0.0.1", 1, {"device": "cpu", **flags})
    assert options_from_args(parse_args(argv[3:])) == EngineOptions(**flags)
    with pytest.raises(ValueError, match="--mem-fraction-static"):
        EngineOptions(mem_fraction_static=1.5)


def test_the_triton_kernels_equal_attention_over_the_gathered_cache_hf_rmsnorm_and_indexed_writes():
    """Run in the Triton interpreter on CPU (a subprocess: the switch is read when triton is imported)."""
    pytest.importorskip("triton")
    script = r"""
import torch
from rl_sglang.embedded.decode_kernel import decode_attention
torch.manual_seed(0)
B, Hq, Hkv, D, T, C = 4, 6, 2, 24, 200, 96
k, v = torch.randn(T + 1, Hkv, D), torch.randn(T + 1, Hkv, D)
q = torch.randn(B, Hq, D)
lens = torch.tensor([1, 17, 64, 96], dtype=torch.int32)
table = torch.zeros(B + 1, C, dtype=torch.int32)
slots = torch.randperm(T)[: int(lens.sum())] + 1
offset = 0
for i in range(B):
    table[i + 1, : lens[i]] = slots[offset : offset + lens[i]].int()
    offset += int(lens[i])
rows = torch.arange(1, B + 1, dtype=torch.int32)
worst = 0.0
for splits in (1, 3):
    out = decode_attention(q, k, v, table, rows, lens, 0.3, num_splits=splits)
    for i in range(B):
        idx = table[i + 1, : lens[i]].long()
        kk = k[idx].transpose(0, 1).repeat_interleave(Hq // Hkv, 0).double()
        vv = v[idx].transpose(0, 1).repeat_interleave(Hq // Hkv, 0).double()
        p = torch.softmax((q[i].double()[:, None, :] @ kk.transpose(1, 2)) * 0.3, dim=-1)
        worst = max(worst, (out[i].double() - (p @ vv)[:, 0]).abs().max().item())
from rl_sglang.embedded.fused_ops import rms_norm, store_kv
weight, x = torch.randn(D), torch.randn(3, 5, D) * 4
expected = weight.double() * x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()  # HF's RMSNorm
worst = max(worst, (rms_norm(x, weight, 1e-6).double() - expected).abs().max().item())
key, value = torch.randn(5, Hkv, D).transpose(0, 1), torch.randn(5, Hkv, D).transpose(0, 1)
at = torch.tensor([9, 2, 150, 33, 4])
store_kv(k, v, at, key, value)
worst = max(worst, (k[at] - key.transpose(0, 1)).abs().max().item(), (v[at] - value.transpose(0, 1)).abs().max().item())
print(worst)
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-5
