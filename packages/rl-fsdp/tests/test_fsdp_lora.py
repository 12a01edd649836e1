"""LoRA on the FSDP backend, each behaviour against plain peft + PyTorch on the same tiny model."""

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from rl_core.algorithms.policy_loss import PolicyLossConfig
from rl_core.config import RLStepConfig
from rl_core.losses import PolicyLoss
from rl_core.rl_step import rl_step
from rl_core.sample import Sample
from rl_core.train_batch import TrainBatch
from rl_fsdp import FSDPBackend, FSDPConfig

VOCAB = 64  # the tiny models of conftest.py


def saved_adapter(model_dir: Path, out: Path, targets: list[str] | str = "all-linear", seed: int = 7) -> Path:
    """A PEFT adapter of rank 4 on `model_dir`, with A and B both random (B is zero at peft's init, which
    would hide anything that ignores the adapter), written by peft's save_pretrained."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(out)
    return out


def peft_reference(model_dir: Path, adapter: Path, dtype=torch.float64) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter, is_trainable=True).to(dtype)


def sequence_log_probs(model: nn.Module, tokens: list[int], n: int) -> torch.Tensor:
    ids = torch.tensor([tokens])
    return torch.log_softmax(model(ids).logits[0, -n - 1 : -1].double(), -1).gather(1, ids[0, -n:, None])[:, 0]


def scored_samples(groups: int, group_size: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for g in range(groups):
        prompt = [rng.randrange(VOCAB) for _ in range(4)]
        for k in range(group_size):
            response = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 4))]
            samples.append(Sample(index=g * group_size + k, tokens=prompt + response, response_length=len(response),
                                  loss_mask=[1] * len(response), reward=float(rng.randint(0, 2))))
    return samples


def full_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor().detach().clone() for name, p in module.named_parameters()}


def test_a_lora_grpo_step_trains_only_the_adapters_and_equals_the_same_step_in_plain_peft(llama_dir, tmp_path):
    adapter = saved_adapter(llama_dir, tmp_path / "adapter")
    samples = scored_samples(groups=2, group_size=3, seed=0)
    config = FSDPConfig(model_path=llama_dir, lora_adapter_path=adapter, optimizer="sgd", lr=0.5, clip_grad=0.0,
                        micro_batch_size=2)
    assert (config.lora_rank, config.lora_alpha) == (4, 8)  # taken from the adapter's config
    backend = FSDPBackend(config)
    try:
        before = full_parameters(backend.model)
        rl_step(RLStepConfig(rollout_batch_size=2, n_samples_per_prompt=3), samples, backend)
        after = full_parameters(backend.model)
        got = {name: t.cpu().clone() for name, t in backend.adapter_weights()}
        merged = {name: t.cpu().clone() for name, t in backend.weights()}
    finally:
        backend.close()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".lora_A." in name or ".lora_B." in name for name in changed)

    # Independent computation: at ratio 1 the surrogate's gradient is REINFORCE's, -sum(A grad log p) / tokens.
    model = peft_reference(llama_dir, adapter)
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64).view(-1, 3)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).flatten()
    tokens = sum(s.response_length for s in samples)
    loss = sum(-a * sequence_log_probs(model, s.tokens, s.response_length).sum() / tokens for s, a in zip(samples, advantages))
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param -= 0.5 * param.grad
    want = {name.replace(".default.", "."): p for name, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name].double(), tensor, atol=1e-5, rtol=0)
    # The engines' weights are peft's merge of the updated adapter into the untouched base.
    plain = model.merge_and_unload().state_dict()
    assert list(merged) == list(plain)
    for name, tensor in plain.items():
        torch.testing.assert_close(merged[name].double(), tensor, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_fixture", ["llama_dir", "tied_dir"])
def test_merged_weights_are_peft_merge_and_unload_under_the_hf_names(request, tmp_path, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    adapter = saved_adapter(model_dir, tmp_path / "adapter", targets=["q_proj", "v_proj", "down_proj"])
    backend = FSDPBackend(FSDPConfig(model_path=model_dir, lora_adapter_path=adapter))
    try:
        merged = {name: t.cpu().clone() for name, t in backend.weights()}
    finally:
        backend.close()
    plain = peft_reference(model_dir, adapter, torch.float32).merge_and_unload()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    assert list(merged) == list(plain.state_dict()) == list(base)  # no lora_ names, tied aliases kept
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0)
        assert torch.equal(merged[name], base[name]) == (not name.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")))


def test_the_kl_reference_is_the_base_with_adapters_off_and_holds_no_second_copy(llama_dir, make_batch, tmp_path):
    adapter = saved_adapter(llama_dir, tmp_path / "adapter")
    batch = make_batch(4, seed=3)
    kl = PolicyLoss(PolicyLossConfig(use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="k1"))
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, lora_adapter_path=adapter, ref_model=True, lr=1e-2))
    try:
        reference = backend.forward(batch, model="reference")
        policy = backend.forward(batch)
        metrics = backend.train_step(batch, kl)
        reference_after = backend.forward(batch, model="reference")
        held = [p for m in vars(backend).values() if isinstance(m, nn.Module) for p in m.parameters()]
        optimized = {id(p) for group in backend.optimizer.param_groups for p in group["params"]}
        adapters = {id(p) for name, p in backend.model.named_parameters() if "lora_" in name}
    finally:
        backend.close()

    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    peft = peft_reference(llama_dir, adapter)
    masked_kl, masked, largest = 0.0, 0, 0.0
    with torch.no_grad():
        for tokens, n, mask, ref, pol, ref_after in zip(batch.tokens, batch.response_lengths, batch.loss_masks,
                                                        reference, policy, reference_after):
            want_ref = sequence_log_probs(base, tokens, n).float()
            torch.testing.assert_close(ref, want_ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(ref_after, want_ref, atol=1e-5, rtol=0)  # training moved the adapters only
            torch.testing.assert_close(pol, sequence_log_probs(peft, tokens, n).float(), atol=1e-5, rtol=0)
            masked_kl += float(((pol - ref) * torch.tensor(mask)).sum())
            masked += sum(mask)
            largest = max(largest, float((pol - ref).abs().max()))
    assert largest > 0.05  # the adapters matter, so the checks above tell policy from base
    assert metrics["kl_loss"] == pytest.approx(masked_kl / masked, abs=1e-5)

    base_numel = sum(p.numel() for p in base.parameters())
    adapter_numel = sum(t.numel() for t in load_file(adapter / "adapter_model.safetensors").values())
    assert sum(p.numel() for p in held) == base_numel + adapter_numel  # one copy of the base, not two
    assert optimized == adapters


def test_a_lora_checkpoint_holds_only_the_adapters_and_adam_state_and_resumes_the_same_next_step(
    llama_dir, make_batch, tmp_path
):
    config = FSDPConfig(model_path=llama_dir, lora_rank=4, lr=1e-2)
    first, second = make_batch(4, seed=1), make_batch(4, seed=2)
    trained, resumed = FSDPBackend(config), FSDPBackend(config.model_copy(update={"seed": 99}))  # other init of A
    try:
        trained.train_step(first, PolicyLoss())
        trained.save(tmp_path / "ckpt")
        resumed.load(tmp_path / "ckpt")
        for name, tensor in trained.adapter_weights():
            torch.testing.assert_close(dict(resumed.adapter_weights())[name], tensor, atol=0, rtol=0)
        trained.train_step(second, PolicyLoss())
        resumed.train_step(second, PolicyLoss())
        want = dict(trained.weights())
        for name, tensor in resumed.weights():
            torch.testing.assert_close(tensor, want[name], atol=1e-6, rtol=0)
    finally:
        trained.close()
        resumed.close()
    saved = dcp.FileSystemReader(str(tmp_path / "ckpt")).read_metadata().state_dict_metadata
    model_keys = [key for key in saved if key.startswith("model.")]
    assert model_keys and all(".lora_A." in key or ".lora_B." in key for key in model_keys)
    assert any(key.startswith("optimizer.state.") and key.endswith("exp_avg") for key in saved)


def test_save_adapter_writes_what_peft_and_lora_adapter_path_load(llama_dir, make_batch, tmp_path):
    batch = make_batch(3, seed=4)
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, lora_rank=4, lora_alpha=32, lora_target_modules=["q_proj", "up_proj"],
                                     lr=5e-2))
    try:
        backend.train_step(batch, PolicyLoss())
        backend.save_adapter(tmp_path / "adapter")
        log_probs = backend.forward(batch)
    finally:
        backend.close()
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], sorted(saved["target_modules"])) == (4, 32, ["q_proj", "up_proj"])
    peft = peft_reference(llama_dir, tmp_path / "adapter")
    resumed = FSDPBackend(FSDPConfig(model_path=llama_dir, lora_adapter_path=tmp_path / "adapter"))
    try:
        again = resumed.forward(batch)
    finally:
        resumed.close()
    with torch.no_grad():
        for tokens, n, got, second in zip(batch.tokens, batch.response_lengths, log_probs, again):
            torch.testing.assert_close(got, sequence_log_probs(peft, tokens, n).float(), atol=1e-5, rtol=0)
            torch.testing.assert_close(second, got, atol=1e-6, rtol=0)


def test_adapter_weights_and_config_are_what_peft_saves(llama_dir, tmp_path):
    adapter = saved_adapter(llama_dir, tmp_path / "adapter", targets=["k_proj", "o_proj"])
    backend = FSDPBackend(FSDPConfig(model_path=llama_dir, lora_adapter_path=adapter))
    try:
        tensors = {name: t.cpu() for name, t in backend.adapter_weights()}
        config = backend.adapter_config()
    finally:
        backend.close()
    saved = load_file(adapter / "adapter_model.safetensors")
    assert tensors.keys() == saved.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(tensors[name], tensor, atol=0, rtol=0)
    on_disk = json.loads((adapter / "adapter_config.json").read_text())
    assert json.loads(json.dumps(config)) == config  # JSON types only
    normalized = lambda c: {**c, "target_modules": sorted(c["target_modules"]), "inference_mode": None}  # noqa: E731
    assert normalized({key: config[key] for key in on_disk}) == normalized(on_disk)  # peft marks a saved one inference-only


def test_lora_settings_are_refused_where_they_cannot_apply(llama_dir, tied_dir, tmp_path):
    with pytest.raises(ValueError, match="lora_alpha set but lora_rank is 0"):
        FSDPConfig(model_path=llama_dir, lora_alpha=32)
    with pytest.raises(ValueError, match="value-head backend"):
        FSDPConfig(model_path=llama_dir, head="value", lora_rank=4)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        FSDPConfig(model_path=llama_dir, lora_adapter_path=tmp_path)
    adapter = saved_adapter(llama_dir, tmp_path / "adapter")
    with pytest.raises(ValueError, match="lora_rank=8 contradicts r=4"):
        FSDPConfig(model_path=llama_dir, lora_adapter_path=adapter, lora_rank=8)
    with pytest.raises(ValueError, match="not_a_layer.*not found"):
        FSDPBackend(FSDPConfig(model_path=llama_dir, lora_rank=4, lora_target_modules=["not_a_layer"]))
    with pytest.raises(ValueError, match="lm_head.*tied to the embeddings"):
        FSDPBackend(FSDPConfig(model_path=tied_dir, lora_rank=4, lora_target_modules=["q_proj", "lm_head"]))


@pytest.mark.slow
def test_two_lora_ranks_give_the_same_kl_step_and_merged_weights_as_one(run_two_ranks, tied_dir, make_batch, tmp_path):
    adapter = saved_adapter(tied_dir, tmp_path / "adapter")
    loss = PolicyLossConfig(use_kl_loss=True, kl_loss_coef=0.1)
    config = dict(model_path=str(tied_dir), lora_adapter_path=str(adapter), ref_model=True, optimizer="sgd", lr=0.5,
                  micro_batch_size=2)
    batch = make_batch(5, seed=8)
    result, weights = run_two_ranks(Path(__file__).with_name("_fsdp_worker.py"),
                                    config | {"loss": dataclasses.asdict(loss), "use_rollout_logprobs": False}, batch)
    one = FSDPBackend(FSDPConfig(**config))
    try:
        log_probs = one.forward(batch)
        metrics = one.train_step(batch, PolicyLoss(loss))
        expected = {name: t.cpu().clone() for name, t in one.weights()}
    finally:
        one.close()
    for got, want in zip(result["log_probs"], log_probs):
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-6, rtol=0)
    assert sorted(weights) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-5, rtol=0)
    for key in ("loss", "kl_loss", "grad_norm"):
        assert result["metrics"][key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), key


def bandit(backend: FSDPBackend, steps: int) -> float:
    """GRPO on one prompt whose 64 samples are every token once, reward 1 for token 7 only; p(7) at the end."""
    samples = lambda: [Sample(index=k, tokens=[1, 2, 3, 4, k], response_length=1, loss_mask=[1], reward=float(k == 7))  # noqa: E731
                       for k in range(VOCAB)]
    for _ in range(steps):
        rl_step(RLStepConfig(rollout_batch_size=1, n_samples_per_prompt=VOCAB), samples(), backend)
    probe = TrainBatch(tokens=[[1, 2, 3, 4, 7]], response_lengths=[1], loss_masks=[[1]], advantages=[[0.0]])
    return float(backend.forward(probe)[0].exp())


def tied_logit_cap(model_dir: Path, token: int) -> float:
    """The largest p(token) any hidden state can give when the tied embeddings E and the final RMSNorm's
    weight w stay frozen: |h| <= sqrt(d) max|w|, so l_j - l_t >= -|h| |e_j - e_t| for every other j."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    embeddings = model.get_input_embeddings().weight.detach()
    radius = embeddings.shape[1] ** 0.5 * float(model.model.norm.weight.detach().abs().max())
    gaps = (embeddings - embeddings[token]).norm(dim=1)
    return float(1.0 / torch.exp(-radius * gaps).sum())  # the j = t term is exp(0) = 1


def test_lora_learns_a_bandit_with_the_lm_head_trainable_and_cannot_on_a_random_tied_model(llama_dir, tied_dir):
    """Why LoRA does not learn the quickstart on its random tied model: with the embeddings (also the output
    layer) and the final norm frozen, the logits are capped near uniform; full fine-tuning moves them, and
    LoRA learns once the output layer has an adapter (an untied model, --lora-target-modules all-linear lm_head)."""
    steps, lr = 5, 5e-2
    results = {}
    for name, config in {
        "lora, untied, all-linear + lm_head": FSDPConfig(model_path=llama_dir, lora_rank=4, lora_alpha=8, lr=lr, micro_batch_size=VOCAB,
                                                         lora_target_modules=["all-linear", "lm_head"]),
        "lora, tied, all-linear": FSDPConfig(model_path=tied_dir, lora_rank=4, lora_alpha=8, lr=lr, micro_batch_size=VOCAB),
        "full fine-tuning, tied": FSDPConfig(model_path=tied_dir, lr=lr, micro_batch_size=VOCAB),
    }.items():
        backend = FSDPBackend(config)
        try:
            if "lm_head" in name:
                assert "lm_head" in {n.split(".")[-1] for n in backend.model.peft_config["default"].target_modules}
            results[name] = bandit(backend, steps)
        finally:
            backend.close()
    cap = tied_logit_cap(tied_dir, 7)
    assert cap < 0.1  # near uniform (1/64): the tied random model cannot put mass on one token
    assert results["lora, tied, all-linear"] <= cap
    assert results["lora, untied, all-linear + lm_head"] > 0.5, results
    assert results["full fine-tuning, tied"] > 0.5, results
