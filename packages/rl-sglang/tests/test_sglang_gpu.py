"""The embedded engine on CUDA: generation, real release of GPU memory, weight sync into GPU params."""

from __future__ import annotations

import asyncio

import pytest
import torch

from rl_sglang.client import SGLangClient
from rl_sglang.embedded import EmbeddedEngine
from rl_sglang.weight_sync import BroadcastWeightTransport

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT = [5, 9, 14, 3]
PAYLOAD = {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}, "return_logprob": True}


@pytest.fixture
async def cuda_engine(model_dir, ref):
    async with ref.serving(model_dir, device="cuda") as pair:
        yield pair


async def test_cuda_generation_matches_the_reference_model(cuda_engine, model_dir, ref):
    engine, client = cuda_engine
    answer = await asyncio.wait_for(client.generate(PAYLOAD), 60)
    assert answer["output_ids"] == ref.greedy(model_dir, PROMPT, 8)
    served = [e[0] for e in answer["meta_info"]["output_token_logprobs"]]
    assert served == pytest.approx(ref.teacher_forced_logprobs(model_dir, PROMPT, answer["output_ids"]), abs=1e-3)


async def test_releasing_weights_frees_gpu_memory_and_resume_restores_them(cuda_engine):
    engine, client = cuda_engine
    before = await asyncio.wait_for(client.generate(PAYLOAD), 60)
    held = torch.cuda.memory_allocated()
    await asyncio.wait_for(client.release_memory_occupation(), 60)
    assert torch.cuda.memory_allocated() < held
    assert all(p.device.type == "cpu" for p in engine.runner.model.parameters())
    await asyncio.wait_for(client.resume_memory_occupation(), 60)
    assert all(p.device.type == "cuda" for p in engine.runner.model.parameters())
    after = await asyncio.wait_for(client.generate(PAYLOAD), 60)
    assert after["output_ids"] == before["output_ids"]


async def test_gloo_broadcast_lands_in_gpu_parameters(cuda_engine, other_weights_dir, ref):
    engine, client = cuda_engine
    transport = BroadcastWeightTransport([engine.url], backend="gloo", timeout_s=60)
    try:
        await asyncio.wait_for(asyncio.to_thread(transport.update, ref.make_model(seed=1).named_parameters(), "g1"), 120)
    finally:
        await asyncio.wait_for(asyncio.to_thread(transport.close), 60)
    answer = await asyncio.wait_for(client.generate(PAYLOAD), 60)
    assert answer["output_ids"] == ref.greedy(other_weights_dir, PROMPT, 8)
    assert answer["meta_info"]["weight_version"] == "g1"


@pytest.mark.multi_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs the trainer and the engine on different GPUs")
async def test_nccl_broadcast_from_gpu0_updates_an_engine_on_gpu1(model_dir, other_weights_dir, ref):
    engine = EmbeddedEngine(str(model_dir), device="cuda:1", dtype="float32")
    await asyncio.wait_for(engine.start(), 120)
    client = SGLangClient(engine.url, timeout_s=60)
    transport = BroadcastWeightTransport([engine.url], backend="nccl", timeout_s=60)
    try:
        new_params = [(n, p.cuda(0)) for n, p in ref.make_model(seed=1).named_parameters()]
        await asyncio.wait_for(asyncio.to_thread(transport.update, new_params, "n1"), 180)
        answer = await asyncio.wait_for(client.generate(PAYLOAD), 60)
        assert answer["output_ids"] == ref.greedy(other_weights_dir, PROMPT, 8)
        assert answer["meta_info"]["weight_version"] == "n1"
    finally:
        await asyncio.wait_for(asyncio.to_thread(transport.close), 60)
        await client.close()
        await asyncio.wait_for(engine.stop(), 60)


async def test_cuda_tensors_reach_an_engine_process_by_ipc_handles_naming_the_gpu_by_uuid(model_dir, other_weights_dir, ref):
    from rl_sglang.launcher import launch_engine
    from rl_sglang.weight_sync import TensorWeightTransport

    process = launch_engine("embedded", str(model_dir), sglang_args={"device": "cuda", "dtype": "float32"})
    client = SGLangClient(process.url, timeout_s=60)
    transport = TensorWeightTransport([process.url], timeout_s=60)
    try:
        await asyncio.to_thread(process.wait_until_healthy, 180)
        params = [(n, p.detach().cuda()) for n, p in ref.make_model(seed=1).named_parameters()]
        await asyncio.wait_for(asyncio.to_thread(transport.update, params, "ipc1"), 120)
        answer = await asyncio.wait_for(client.generate(PAYLOAD), 60)
        assert answer["output_ids"] == ref.greedy(other_weights_dir, PROMPT, 8)
        assert answer["meta_info"]["weight_version"] == "ipc1"
    finally:
        await asyncio.to_thread(transport.close)
        await client.close()
        await asyncio.to_thread(process.terminate)


async def test_cuda_graph_decode_with_requests_joining_matches_the_reference_model(cuda_engine, model_dir, ref):
    """Decode runs under captured CUDA graphs (Triton attention over the paged pool); batches of
    several sizes (padded to their bucket) and a prefix shared by samples give the reference output."""
    engine, client = cuda_engine
    assert engine.runner.graphs is not None and engine.runner.use_decode_kernel
    prompts = [[5, 9, 14, 3], [7, 8], [20, 21, 22, 23, 24, 25, 26], [11], [5, 9, 14, 3]]
    tasks = []
    for i, prompt in enumerate(prompts):
        payload = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 10 + 5 * i, "ignore_eos": True}, "return_logprob": True}
        tasks.append(asyncio.create_task(client.generate(payload)))
        await asyncio.sleep(0.05)  # each joins a running batch
    answers = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    for prompt, answer in zip(prompts, answers):
        assert answer["output_ids"] == ref.greedy(model_dir, prompt, len(answer["output_ids"]))
        served = [e[0] for e in answer["meta_info"]["output_token_logprobs"]]
        assert served == pytest.approx(ref.teacher_forced_logprobs(model_dir, prompt, answer["output_ids"]), abs=1e-3)
    await asyncio.wait_for(client.release_memory_occupation(), 60)
    assert engine.runner.graphs is None and engine.runner.pool is None
    await asyncio.wait_for(client.resume_memory_occupation(), 60)
    assert engine.runner.graphs is not None  # recaptured over the new pool and weights
    again = await asyncio.wait_for(client.generate(PAYLOAD), 60)
    assert again["output_ids"] == ref.greedy(model_dir, PROMPT, 8)


def test_the_decode_kernel_in_bf16_on_cuda_equals_sdpa_over_the_gathered_cache():
    from rl_sglang.embedded.decode_kernel import decode_attention

    torch.manual_seed(0)
    batch, heads, kv_heads, dim, slots = 48, 16, 8, 128, 40000
    k = torch.randn(slots + 1, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(slots + 1, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    lens = torch.randint(1, 700, (batch,), device="cuda", dtype=torch.int32)
    table = torch.zeros(batch + 1, 1024, dtype=torch.int32, device="cuda")
    for i in range(batch):
        table[i + 1, : lens[i]] = (torch.randperm(slots, device="cuda")[: lens[i]] + 1).int()
    rows = torch.arange(1, batch + 1, dtype=torch.int32, device="cuda")
    out = decode_attention(q, k, v, table, rows, lens, None)
    for i in range(batch):
        idx = table[i + 1, : lens[i]].long()
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[i][:, None].float(), k[idx].transpose(0, 1).float(), v[idx].transpose(0, 1).float(), enable_gqa=True
        )[:, 0]
        assert (out[i].float() - expected).abs().max().item() < 2e-2


async def test_a_whole_rollout_sent_at_once_runs_as_one_batch_not_in_waves(model_dir):
    """The sync loop's shape (32 prompts x 8 samples, 64 new tokens) with rows for all of it, as rl-train now
    gives the engine: the decode batch averages above the 64 rows of the engine's own default (waves of 64 cannot)."""
    engine = EmbeddedEngine(str(model_dir), device="cuda", dtype="bfloat16", seed=0, max_running_requests=256)
    await asyncio.wait_for(engine.start(), 180)
    client = SGLangClient(engine.url, timeout_s=120)
    try:
        prompts = [[3 + p % 40, 4 + p % 7, 5, 6 + p % 11] for p in range(32)]
        params = {"temperature": 1.0, "max_new_tokens": 64, "ignore_eos": True}
        before = (await client.get_server_info())["internal_states"][0]
        answers = await asyncio.wait_for(asyncio.gather(*(
            client.generate({"input_ids": prompts[i // 8], "sampling_params": params, "return_logprob": True}) for i in range(256)
        )), 120)  # fmt: skip
        after = (await client.get_server_info())["internal_states"][0]
    finally:
        await client.close()
        await asyncio.wait_for(engine.stop(), 60)
    assert all(len(a["output_ids"]) == 64 for a in answers)
    steps, rows = after["decode_steps"] - before["decode_steps"], after["decode_rows"] - before["decode_rows"]
    assert rows == 256 * 63
    assert rows / steps > 64, f"{steps} decode steps for 256 requests: the batch ran in waves or ramped up slowly"
    assert after["prefill_steps"] - before["prefill_steps"] <= 32
