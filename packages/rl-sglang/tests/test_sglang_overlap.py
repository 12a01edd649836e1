"""The embedded engine's overlapped decode schedule (step k+1 queued before step k's results are processed)
against the serial one (`--disable-overlap-schedule`) and against a plain HF forward of each request alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from rl_sglang.client import SGLangClient
from rl_sglang.embedded import EmbeddedEngine
from rl_sglang.embedded.options import EngineOptions
from rl_sglang.errors import EngineError

PROMPTS = [[5, 9, 14, 3], [7, 8], [20, 21, 22, 23, 24], [11], [30, 2, 17]]
LENGTHS = [14, 6, 11, 9, 1]
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])


async def _run(model_dir, device: str, stops: list[list[int]], **options) -> tuple[list[dict], dict, int]:
    """Every prompt at once (greedy, log-probs on); the answers, the counters they took and the KV slots
    still held afterwards."""
    engine = EmbeddedEngine(
        str(model_dir), device=device, dtype="float32", max_running_requests=8,
        options=EngineOptions(disable_radix_cache=True, **options),
    )  # fmt: skip
    await asyncio.wait_for(engine.start(), 120)
    client = SGLangClient(engine.url, timeout_s=60)
    try:
        before = engine.scheduler.counters_now()
        answers = await asyncio.wait_for(
            asyncio.gather(
                *(
                    client.generate({
                        "input_ids": prompt, "return_logprob": True,
                        "sampling_params": {"temperature": 0, "ignore_eos": True, "max_new_tokens": n, "stop_token_ids": stop},
                    })  # fmt: skip
                    for prompt, n, stop in zip(PROMPTS, LENGTHS, stops)
                )
            ),
            60,
        )
        after = engine.scheduler.counters_now()
        free = engine.runner.pool.allocator.available
        return answers, {k: after[k] - before[k] for k in after}, engine.runner.pool.tokens - free
    finally:
        await client.close()
        await asyncio.wait_for(engine.stop(), 60)


@pytest.mark.parametrize("device", ["cpu", CUDA])
async def test_the_overlapped_schedule_gives_the_serial_greedy_tokens_and_logprobs_and_stops_without_an_extra_token(
    model_dir, ref, device
):
    tolerance = 1e-6 if device == "cpu" else 1e-4  # CUDA: another batch size may run another graph bucket
    reference_tolerance = 1e-4 if device == "cpu" else 1e-3  # as the other tests against a plain forward
    free_runs = [ref.greedy(model_dir, p, n) for p, n in zip(PROMPTS, LENGTHS)]
    # request 0 and 2 end on a stop token mid-way (the token they would emit at step 3 and 5), the others by length
    stops = [[free_runs[0][3]], [], [free_runs[2][5]], [], []]
    on = {"enable_overlap_schedule": True} if device == "cuda" else {}  # serial is CUDA's default
    overlapped, counts_overlapped, held_overlapped = await _run(model_dir, device, stops, **on)
    serial, counts_serial, held_serial = await _run(model_dir, device, stops, disable_overlap_schedule=True)
    for prompt, free_run, stop, a, b in zip(PROMPTS, free_runs, stops, overlapped, serial):
        expected = free_run[: free_run.index(stop[0]) + 1] if stop else free_run
        assert a["output_ids"] == b["output_ids"] == expected
        assert a["meta_info"]["completion_tokens"] == len(expected)
        assert a["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
        assert [e[1] for e in a["meta_info"]["output_token_logprobs"]] == expected
        lp_a = [e[0] for e in a["meta_info"]["output_token_logprobs"]]
        lp_b = [e[0] for e in b["meta_info"]["output_token_logprobs"]]
        assert lp_a == pytest.approx(lp_b, abs=tolerance)
        assert lp_a == pytest.approx(ref.teacher_forced_logprobs(model_dir, prompt, expected), abs=reference_tolerance)
    # the overlap runs one row more for each request a stop token ended (found a step late), none for lengths
    assert counts_overlapped["decode_rows"] - counts_serial["decode_rows"] == 2
    assert counts_overlapped["decode_steps"] == counts_serial["decode_steps"]
    assert held_overlapped == held_serial == 0  # every slot, the extra rows' ones included, is back in the pool


async def test_a_decode_step_that_fails_fails_its_requests_returns_their_slots_and_the_engine_serves_on(model_dir, ref):
    engine = EmbeddedEngine(
        str(model_dir), device="cpu", dtype="float32", max_running_requests=8, options=EngineOptions(disable_radix_cache=True)
    )
    await asyncio.wait_for(engine.start(), 60)
    client = SGLangClient(engine.url, timeout_s=60)
    decode, calls = engine.runner.decode, []

    def failing_on_the_fourth_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("device lost")
        return decode(*args, **kwargs)

    engine.runner.decode = failing_on_the_fourth_step
    try:
        payload = {"sampling_params": {"temperature": 0, "ignore_eos": True, "max_new_tokens": 12}}
        failed = await asyncio.wait_for(
            asyncio.gather(*(client.generate({**payload, "input_ids": p}) for p in PROMPTS[:3]), return_exceptions=True), 60
        )
        assert all(isinstance(f, EngineError) and f.status == 500 and "device lost" in str(f) for f in failed)
        engine.runner.decode = decode
        answer = await asyncio.wait_for(client.generate({**payload, "input_ids": PROMPTS[0]}), 60)
        assert answer["output_ids"] == ref.greedy(model_dir, PROMPTS[0], 12)
        assert engine.runner.pool.allocator.available == engine.runner.pool.tokens
    finally:
        await client.close()
        await asyncio.wait_for(engine.stop(), 60)


async def test_pausing_in_place_mid_decode_stops_after_the_queued_steps_and_continuing_gives_the_same_tokens(model_dir, ref):
    engine = EmbeddedEngine(str(model_dir), device="cpu", dtype="float32", max_running_requests=8)
    await asyncio.wait_for(engine.start(), 60)
    client = SGLangClient(engine.url, timeout_s=60)
    payload = {"input_ids": PROMPTS[0], "rid": "p", "return_logprob": True,
               "sampling_params": {"temperature": 0, "ignore_eos": True, "max_new_tokens": 40}}  # fmt: skip
    try:
        task = asyncio.create_task(client.generate(payload))
        while len(getattr(engine.scheduler._by_rid.get("p"), "output_ids", ())) < 5:
            await asyncio.sleep(0.001)
        await asyncio.wait_for(client.pause_generation(mode="in_place"), 10)
        while engine.scheduler._queued:  # the steps queued at the pause are collected
            await asyncio.sleep(0.001)
        held = engine.scheduler._by_rid["p"]
        paused_at, steps = len(held.output_ids), engine.scheduler.counters.decode_steps
        await asyncio.sleep(0.2)  # and no new one starts
        assert (len(held.output_ids), engine.scheduler.counters.decode_steps) == (paused_at, steps) and paused_at < 40
        assert not engine.scheduler._queued
        await asyncio.wait_for(client.continue_generation(), 10)
        answer = await asyncio.wait_for(task, 60)
    finally:
        await client.close()
        await asyncio.wait_for(engine.stop(), 60)
    assert answer["output_ids"] == ref.greedy(model_dir, PROMPTS[0], 40)
    served = [e[0] for e in answer["meta_info"]["output_token_logprobs"]]
    assert served == pytest.approx(ref.teacher_forced_logprobs(model_dir, PROMPTS[0], answer["output_ids"]), abs=1e-4)


def test_the_overlapped_schedule_is_the_cpu_default_and_on_cuda_only_asked_for():
    assert EngineOptions().overlap_schedule("cpu") and not EngineOptions().overlap_schedule("cuda")
    assert EngineOptions(enable_overlap_schedule=True).overlap_schedule("cuda")
    assert not EngineOptions(disable_overlap_schedule=True).overlap_schedule("cpu")
    with pytest.raises(ValueError, match="contradict"):
        EngineOptions(disable_overlap_schedule=True, enable_overlap_schedule=True)
