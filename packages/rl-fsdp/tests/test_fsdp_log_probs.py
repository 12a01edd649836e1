import pytest
import torch
from transformers import AutoModelForCausalLM

from rl_core.losses import PolicyLoss
from rl_core.train_batch import TrainBatch
from rl_fsdp import FSDPBackend, FSDPConfig


def reference_log_probs(model_dir, batch, temperature):
    """Each sample alone through the plain HF model in float64: log_softmax(logits / T), gather."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for tokens, n in zip(batch.tokens, batch.response_lengths):
            logits = model(torch.tensor([tokens])).logits[0].double() / temperature
            log_probs = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
            out.append(log_probs[-n:])
    return out


@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_log_probs_equal_a_plain_hugging_face_forward_per_sample(llama_dir, make_batch, micro_batch_size):
    batch = make_batch(5, seed=1)
    config = FSDPConfig(model_path=llama_dir, param_dtype="float32", micro_batch_size=micro_batch_size, rollout_temperature=0.7)
    backend = FSDPBackend(config)
    try:
        got = backend.forward(batch)
    finally:
        backend.close()
    expected = reference_log_probs(llama_dir, batch, 0.7)
    assert [len(g) for g in got] == batch.response_lengths
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-5)


def test_a_token_outside_the_vocabulary_is_refused_naming_the_sample(llama_dir, make_batch):
    good = make_batch(3)
    tokens = [list(t) for t in good.tokens]
    tokens[2][1] = 64
    bad = TrainBatch(tokens=tokens, response_lengths=good.response_lengths, loss_masks=good.loss_masks, advantages=good.advantages)
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, param_dtype="float32"))
    try:
        with pytest.raises(ValueError, match=r"sample 2: token id 64 at position 1 is outside the model's vocabulary \(0\.\.63\)"):
            backend.train_step(bad, PolicyLoss())
        with pytest.raises(ValueError, match="sample 2"):
            backend.forward(bad)
    finally:
        backend.close()


def test_a_response_with_no_prompt_token_is_refused(llama_dir):
    batch = TrainBatch(tokens=[[1, 2, 3]], response_lengths=[3], loss_masks=[[1, 1, 1]], advantages=[[1.0] * 3])
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, param_dtype="float32"))
    try:
        with pytest.raises(ValueError, match="sample 0: response_length 3 leaves no prompt token"):
            backend.forward(batch)
    finally:
        backend.close()


def test_config_only_directory_gives_the_same_random_init_for_the_same_seed(tmp_path, llama_dir, make_batch):
    config_dir = tmp_path / "config_only"
    config_dir.mkdir()
    (config_dir / "config.json").write_text((llama_dir / "config.json").read_text())
    batch = make_batch(2)
    runs = []
    for seed in (3, 3, 4):
        backend = FSDPBackend(FSDPConfig(model_path=config_dir, seed=seed, param_dtype="float32"))
        runs.append(backend.forward(batch))
        backend.close()
    torch.testing.assert_close(runs[0], runs[1])
    assert not torch.allclose(runs[0][0], runs[2][0])
