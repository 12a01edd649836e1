import pytest
import torch
from transformers import AutoModelForCausalLM

from rl_core.losses import PolicyLoss
from rl_fsdp import FSDPBackend, FSDPConfig


@pytest.mark.parametrize("model_fixture", ["llama_dir", "tied_dir"])
def test_named_weights_are_the_hf_state_dict_and_load_strictly(request, make_batch, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    backend = FSDPBackend(FSDPConfig(model_path=model_dir, lr=1e-2, param_dtype="float32"))
    try:
        backend.train_step(make_batch(3), PolicyLoss())
        weights = {name: t.cpu() for name, t in backend.weights()}
        log_probs = backend.forward(make_batch(3, seed=9))
    finally:
        backend.close()
    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert list(weights) == list(fresh.state_dict())
    assert all(not isinstance(t, torch.distributed.tensor.DTensor) for t in weights.values())
    fresh.load_state_dict(weights, strict=True)
    if model_fixture == "tied_dir":
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
        torch.testing.assert_close(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    # The loaded weights are the trained ones: same log-probs as the backend.
    batch = make_batch(3, seed=9)
    with torch.no_grad():
        for tokens, n, expected in zip(batch.tokens, batch.response_lengths, log_probs):
            logits = fresh(torch.tensor([tokens])).logits[0, :-1]
            got = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[-n:, 0]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_fixture", ["llama_dir", "tied_dir"])
def test_save_pretrained_round_trips_through_from_pretrained(request, tmp_path, make_batch, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    (model_dir / "tokenizer_config.json").write_text("{}")
    backend = FSDPBackend(FSDPConfig(model_path=model_dir, lr=1e-2, param_dtype="float32"))
    try:
        backend.train_step(make_batch(3), PolicyLoss())
        weights = {name: t.cpu().clone() for name, t in backend.weights()}
        backend.save_pretrained(tmp_path / "checkpoint")
    finally:
        backend.close()
    assert (tmp_path / "checkpoint" / "tokenizer_config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    assert loaded.dtype == torch.float32
    state = loaded.state_dict()
    assert list(state) == list(weights)
    for name, tensor in weights.items():
        torch.testing.assert_close(state[name], tensor, atol=0, rtol=0)
    # And a backend resumes from the checkpoint with the same weights.
    resumed = FSDPBackend(FSDPConfig(model_path=tmp_path / "checkpoint", param_dtype="float32"))
    try:
        for name, tensor in resumed.weights():
            torch.testing.assert_close(tensor.cpu(), weights[name], atol=0, rtol=0)
    finally:
        resumed.close()
