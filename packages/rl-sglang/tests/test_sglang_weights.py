"""Weight updates: from disk (route and DiskWeightTransport), by broadcast (BroadcastWeightTransport) and by
tensor handles (TensorWeightTransport), the last two inside weight-update sessions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rl_sglang.errors import EngineError
from rl_sglang.weight_sync import (
    BroadcastWeightTransport,
    DiskWeightTransport,
    TensorWeightTransport,
)
from rl_sglang.weight_sync.common import _buckets

PROMPT = [5, 9, 14, 3]
PAYLOAD = {
    "input_ids": PROMPT,
    "sampling_params": {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True},
    "return_logprob": True,
}


def _logprobs(answer: dict) -> list[float]:
    return [entry[0] for entry in answer["meta_info"]["output_token_logprobs"]]


async def _assert_serves(client, model_dir: Path, ref, weight_version: str) -> dict:
    """The served greedy output and its log-probs are those of the model saved at `model_dir`."""
    answer = await asyncio.wait_for(client.generate(PAYLOAD), 60)
    assert answer["output_ids"] == ref.greedy(model_dir, PROMPT, 10)
    assert _logprobs(answer) == pytest.approx(ref.teacher_forced_logprobs(model_dir, PROMPT, answer["output_ids"]), abs=1e-4)
    assert answer["meta_info"]["weight_version"] == weight_version
    return answer


async def test_update_weights_from_disk_switches_outputs_logprobs_and_weight_version(client, model_dir, other_weights_dir, ref):
    before = await _assert_serves(client, model_dir, ref, "default")
    answer = await asyncio.wait_for(client.update_weights_from_disk(str(other_weights_dir), weight_version="step-1"), 60)
    assert answer["success"] is True
    after = await _assert_serves(client, other_weights_dir, ref, "step-1")
    assert _logprobs(after) != pytest.approx(_logprobs(before), abs=1e-3)
    assert (await asyncio.wait_for(client.get_model_info(), 10))["weight_version"] == "step-1"


@pytest.mark.parametrize(
    ("tensors", "named"),
    [
        ({"model.layers.0.not_a_weight": torch.zeros(3)}, "model.layers.0.not_a_weight"),
        ({"lm_head.weight": torch.zeros(5, 5)}, "lm_head.weight"),
    ],
)
async def test_update_weights_from_disk_with_bad_tensors_answers_failure_naming_the_tensor(client, tmp_path, model_dir, ref, tensors, named):
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(EngineError) as caught:
        await asyncio.wait_for(client.update_weights_from_disk(str(tmp_path), weight_version="bad"), 60)
    assert caught.value.body["success"] is False
    assert named in caught.value.body["message"]
    await _assert_serves(client, model_dir, ref, "default")  # nothing was applied


async def test_update_weights_from_disk_of_an_empty_folder_fails_clearly(client, tmp_path):
    with pytest.raises(EngineError) as caught:
        await asyncio.wait_for(client.update_weights_from_disk(str(tmp_path)), 60)
    assert "no *.safetensors" in caught.value.body["message"]


async def test_disk_transport_shards_loads_and_keeps_only_the_newest_version(client, engine, tmp_path, model_dir, other_weights_dir, ref):
    new_model = ref.make_model(seed=1)  # the weights saved in other_weights_dir
    transport = DiskWeightTransport([engine.url], tmp_path / "sync", bucket_bytes=16 << 10)
    try:
        await asyncio.wait_for(asyncio.to_thread(transport.update, new_model.named_parameters(), "v1"), 120)
        folders = sorted(p.name for p in (tmp_path / "sync").iterdir())
        assert folders == ["weights_v1"]
        assert len(list((tmp_path / "sync" / "weights_v1").glob("*.safetensors"))) > 1  # bucketed
        await _assert_serves(client, other_weights_dir, ref, "v1")

        old_model = ref.make_model(seed=0)
        await asyncio.wait_for(asyncio.to_thread(transport.update, old_model.named_parameters(), "v2"), 120)
        assert sorted(p.name for p in (tmp_path / "sync").iterdir()) == ["weights_v2"]
        await _assert_serves(client, model_dir, ref, "v2")
    finally:
        await asyncio.to_thread(transport.close)


async def test_broadcast_transport_updates_served_weights(client, engine, model_dir, other_weights_dir, ref):
    await _assert_serves(client, model_dir, ref, "default")
    transport = BroadcastWeightTransport([engine.url], backend="gloo", bucket_bytes=16 << 10, timeout_s=60)
    try:
        new_model = ref.make_model(seed=1)
        await asyncio.wait_for(asyncio.to_thread(transport.update, new_model.named_parameters(), "b1"), 120)
        await _assert_serves(client, other_weights_dir, ref, "b1")
        old_model = ref.make_model(seed=0)
        await asyncio.wait_for(asyncio.to_thread(transport.update, old_model.named_parameters(), "b2"), 120)
        await _assert_serves(client, model_dir, ref, "b2")
    finally:
        await asyncio.wait_for(asyncio.to_thread(transport.close), 60)
    assert engine.weights.groups == {}


async def test_broadcast_of_an_unknown_tensor_fails_naming_it_and_leaves_the_group_usable(client, engine, model_dir, other_weights_dir, ref):
    transport = BroadcastWeightTransport([engine.url], backend="gloo", timeout_s=60)
    try:
        bad = [("model.norm.weight", torch.ones(32)), ("not.a.weight", torch.ones(2, 2))]
        with pytest.raises(EngineError, match="not.a.weight"):
            await asyncio.wait_for(asyncio.to_thread(transport.update, bad, "bad"), 120)
        await _assert_serves(client, model_dir, ref, "default")
        new_model = ref.make_model(seed=1)
        await asyncio.wait_for(asyncio.to_thread(transport.update, new_model.named_parameters(), "b1"), 120)
        await _assert_serves(client, other_weights_dir, ref, "b1")
    finally:
        await asyncio.wait_for(asyncio.to_thread(transport.close), 60)


@pytest.mark.parametrize("load_format", ["flattened_bucket", None, "direct"])
async def test_tensor_transport_hands_weights_over_by_handle_and_they_are_served(client, engine, model_dir, other_weights_dir, ref, load_format):
    transport = TensorWeightTransport([engine.url], bucket_bytes=16 << 10, load_format=load_format, timeout_s=60)
    try:
        await asyncio.wait_for(asyncio.to_thread(transport.update, ref.make_model(seed=1).named_parameters(), "t1"), 120)
        await _assert_serves(client, other_weights_dir, ref, "t1")
        await asyncio.wait_for(asyncio.to_thread(transport.update, ref.make_model(seed=0).named_parameters(), "t2"), 120)
        await _assert_serves(client, model_dir, ref, "t2")
    finally:
        await asyncio.to_thread(transport.close)
    assert engine.weights.session_open is False


async def test_tensor_transport_sends_tied_weights_once_in_the_engines_dtype(client, engine):
    embed = torch.randn(64, 32)
    named = [("model.embed_tokens.weight", embed.double()), ("lm_head.weight", None), ("model.norm.weight", torch.ones(32, dtype=torch.float64))]
    named[1] = ("lm_head.weight", named[0][1])  # tied: the same tensor under two names
    sent: list[list[str]] = []
    transport = TensorWeightTransport([engine.url], timeout_s=60)
    original = transport._prepare_bucket

    def spy(bucket, layouts, *args, **kwargs):
        sent.append([name for name, _ in bucket])
        assert layouts == [(1, torch.float32)]  # read from /server_info
        return original(bucket, layouts, *args, **kwargs)

    transport._prepare_bucket = spy
    try:
        await asyncio.wait_for(asyncio.to_thread(transport.update, named, "tied"), 60)
    finally:
        await asyncio.to_thread(transport.close)
    assert sent == [["model.embed_tokens.weight", "model.norm.weight"]]
    served = dict(engine.runner.model.named_parameters())
    assert served["model.embed_tokens.weight"].dtype == torch.float32
    assert torch.equal(served["model.embed_tokens.weight"], embed.double().float())


async def test_weight_updates_from_a_trainer_are_refused_outside_a_session_as_sglang_does(client, engine):
    with pytest.raises(EngineError) as caught:
        await asyncio.wait_for(client.update_weights_from_distributed(["model.norm.weight"], ["float32"], [[32]], "g"), 10)
    assert caught.value.status == 400 and "between begin_weight_update() and end_weight_update()" in caught.value.body["message"]
    with pytest.raises(EngineError, match="between begin_weight_update"):
        await asyncio.wait_for(client.update_weights_from_tensor(["eA=="]), 10)
    with pytest.raises(EngineError, match="no weight-update session is open"):
        await asyncio.wait_for(client.end_weight_update(), 10)
    await asyncio.wait_for(client.begin_weight_update(), 10)
    with pytest.raises(EngineError, match="already open"):
        await asyncio.wait_for(client.begin_weight_update(), 10)
    with pytest.raises(EngineError, match="cannot read serialized_named_tensors"):
        await asyncio.wait_for(client.update_weights_from_tensor(["eA=="]), 10)  # a session, but not a payload
    await asyncio.wait_for(client.end_weight_update(), 10)


async def test_an_update_waits_for_requests_in_flight_which_finish_on_the_old_weights(client, engine, model_dir, ref):
    payload = {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 200, "ignore_eos": True}, "return_logprob": True}
    running = asyncio.create_task(client.generate(payload))
    for _ in range(2000):
        request = next(iter(engine._in_flight.values()), None)
        if request is not None and len(request.output_ids) >= 3:
            break
        await asyncio.sleep(0.005)
    transport = TensorWeightTransport([engine.url], timeout_s=60)
    assert not running.done()
    try:
        await asyncio.wait_for(asyncio.to_thread(transport.update, ref.make_model(seed=1).named_parameters(), "later"), 120)
        assert running.done()  # the update waited for it
    finally:
        await asyncio.to_thread(transport.close)
    answer = await asyncio.wait_for(running, 60)
    assert answer["output_ids"] == ref.greedy(model_dir, PROMPT, 200)  # all tokens from the old weights
    assert answer["meta_info"]["weight_version"] == "default"


async def test_broadcast_of_flattened_buckets_updates_served_weights(client, engine, other_weights_dir, ref):
    transport = BroadcastWeightTransport([engine.url], backend="gloo", bucket_bytes=16 << 10, load_format="flattened_bucket", timeout_s=60)
    try:
        await asyncio.wait_for(asyncio.to_thread(transport.update, ref.make_model(seed=1).named_parameters(), "f1"), 120)
        await _assert_serves(client, other_weights_dir, ref, "f1")
    finally:
        await asyncio.wait_for(asyncio.to_thread(transport.close), 60)


def test_buckets_are_sized_in_the_dtype_the_engines_get():
    named = [(f"w{i}", torch.zeros(256)) for i in range(6)] + [("steps", torch.zeros(256, dtype=torch.int32))]
    as_is = [[n for n, _ in b] for b in _buckets(named, 2048)]
    in_bf16 = [[n for n, _ in b] for b in _buckets(named, 2048, sent_dtypes=[torch.bfloat16])]
    assert as_is == [["w0", "w1"], ["w2", "w3"], ["w4", "w5"], ["steps"]]  # 1 KiB each in float32
    assert in_bf16 == [["w0", "w1", "w2", "w3"], ["w4", "w5", "steps"]]  # floats at 512 B, the int32 at 1 KiB
    # An engine that takes the tensors as they are counts them as they are.
    assert [[n for n, _ in b] for b in _buckets(named, 2048, sent_dtypes=[torch.bfloat16, None])] == as_is
