"""The Megatron backend against independent computations, on CPU ranks with gloo.

- one rank against a plain PyTorch step on the Hugging Face model (log-probs, one GRPO step through rl_step);
- TP=2 (with sequence parallelism), PP=2, CP=2 and DP=2 (distributed optimizer) against one rank;
- weights exported under TP=2 / PP=2 against the HF-named weights of the same step;
- dist_checkpointing save/load, on the same layout and on another one.

Ranks are forked from a forkserver that has imported megatron-core once (see `run_ranks`); every
distributed run has a deadline.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import rl_megatron.backend  # noqa: F401  (megatron-core's training stack, imported before ranks fork)
from rl_core.config import RLStepConfig
from rl_core.losses import TrainLoss, ValueLoss
from rl_core.micro_batches import batch_denominators, loss_inputs, make_micro_batch
from rl_core.protocols import StepBackend, TrainingBackend
from rl_core.rl_step import rl_step
from rl_core.sample import Sample
from rl_core.train_batch import TrainBatch
from rl_megatron import MegatronConfig, build_backend

sys.path.insert(0, str(Path(__file__).parent))  # megatron_ranks beside this file, importable by the ranks too
from megatron_ranks import run_ranks  # noqa: E402

TEMPERATURE = 0.8
RL_CONFIG = RLStepConfig(rollout_batch_size=2, n_samples_per_prompt=4)


# --- forked ranks ---------------------------------------------------------------------------------------


# --- tiny models and a rollout ----------------------------------------------------------------------------

_TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-6)


def _randomized(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    """Every weight random (norm scales too), so a swapped or transposed tensor cannot go unnoticed; routers
    10x larger, so that no token's k-th and (k+1)-th experts are near a tie (float error must not
    reroute a token between the two implementations)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            fill = 0.5 + torch.rand(param.shape, generator=gen) if "norm" in name else 0.1 * torch.randn(param.shape, generator=gen)
            param.copy_(fill * (10.0 if name.endswith("mlp.gate.weight") else 1.0))
    return model.eval()


def checkpoint_state(model: PreTrainedModel, directory: Path) -> dict[str, torch.Tensor]:
    """The model's tensors under the names its checkpoint (and an SGLang engine) uses: transformers keeps
    MoE experts stacked in memory and writes one tensor per expert, so read back what it saves."""
    from safetensors.torch import load_file

    model.save_pretrained(directory)
    state = load_file(directory / "model.safetensors")
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


MODELS = {
    "qwen3": lambda: Qwen3ForCausalLM._from_config(
        Qwen3Config(**_TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
        attn_implementation="eager",
    ),
    "qwen2": lambda: Qwen2ForCausalLM._from_config(
        Qwen2Config(**_TINY, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), attn_implementation="eager"
    ),
    "llama": lambda: LlamaForCausalLM._from_config(
        LlamaConfig(**_TINY, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True), attn_implementation="eager"
    ),
    # 4 experts, top-2, renormalised weights (Qwen3-30B-A3B's routing), every layer sparse.
    "qwen3_moe": lambda: Qwen3MoeForCausalLM._from_config(
        Qwen3MoeConfig(**_TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, norm_topk_prob=True, tie_word_embeddings=False),
        attn_implementation="eager",
    ),
    # Softmax weights not renormalised, and layer 0 a dense MLP (mlp_only_layers).
    "qwen3_moe_unnormalised": lambda: Qwen3MoeForCausalLM._from_config(
        Qwen3MoeConfig(**_TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, norm_topk_prob=False, mlp_only_layers=[0], tie_word_embeddings=False),
        attn_implementation="eager",
    ),
    "mixtral": lambda: MixtralForCausalLM._from_config(
        MixtralConfig(**{**_TINY, "intermediate_size": 32}, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                      num_experts_per_tok=2, tie_word_embeddings=True),
        attn_implementation="eager",
    ),
}
MOE = ("mixtral", "qwen3_moe", "qwen3_moe_unnormalised")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each tiny model saved as config.json + model.safetensors (randomised weights)."""
    dirs = {}
    for k, (name, make) in enumerate(MODELS.items()):
        directory = tmp_path_factory.mktemp(name)
        _randomized(make(), seed=k).save_pretrained(directory)
        dirs[name] = directory
    return dirs


def scored_samples(vocab: int = 96, groups: int = 2, group_size: int = 4) -> list[Sample]:
    """Prompts and responses of different lengths (so padding and CP chunks are exercised), rewards 0..3."""
    rng = random.Random(0)
    samples = []
    for g in range(groups):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(3, 6))]
        for k in range(group_size):
            response = [rng.randrange(vocab) for _ in range(rng.randint(2, 7))]
            samples.append(
                Sample(
                    index=g * group_size + k, group_index=g, prompt="p", tokens=prompt + response,
                    response_length=len(response), loss_mask=[1] * (len(response) - 1) + [0], reward=float(rng.randint(0, 3)),
                )
            )
    return samples


def _batch(samples: list[Sample]) -> TrainBatch:
    return TrainBatch.from_samples(samples, [[0.0] * s.response_length for s in samples])


def _config(model_dir: Path, **overrides: Any) -> MegatronConfig:
    settings: dict[str, Any] = dict(
        model_path=model_dir, device="cpu", rollout_temperature=TEMPERATURE, optimizer="sgd", lr=0.5, clip_grad=0.0, micro_batch_size=2
    )
    return MegatronConfig(**{**settings, **overrides})


def _forward_and_step(rank: int, config: MegatronConfig, offload: bool = False, rl_config: RLStepConfig = RL_CONFIG) -> dict[str, Any]:
    """Log-probs, one GRPO step through rl_step, and the exported weights (every rank iterates them);
    with `offload`, the backend gives its memory away and takes it back between the forward and the step."""
    backend = build_backend(config)
    samples = scored_samples()
    log_probs = backend.forward(_batch(samples))
    if offload:
        backend.offload()
        assert all(p.untyped_storage().nbytes() == 0 for p in backend.gpt.parameters())
        with pytest.raises(RuntimeError, match="call onload"):
            backend.forward(_batch(samples))
        backend.onload()
    metrics = rl_step(rl_config, samples, backend)
    weights = {name: tensor.clone() for name, tensor in backend.weights()}
    protocol = isinstance(backend, TrainingBackend) and isinstance(backend, StepBackend)
    backend.close()
    return {"log_probs": log_probs, "metrics": metrics[-1], "weights": weights, "protocol": protocol}


# --- the plain PyTorch reference ---------------------------------------------------------------------------


class PlainHFBackend:
    """The same StepBackend methods on the Hugging Face model in one process: one micro-batch, a torch optimizer."""

    result_rank = 0

    def __init__(self, model: PreTrainedModel, optimizer: torch.optim.Optimizer, clip_grad: float) -> None:
        self.model = model
        self.optimizer = optimizer
        self.clip_grad = clip_grad

    def _log_probs(self, batch: TrainBatch) -> tuple[Any, torch.Tensor, torch.Tensor]:
        mb = make_micro_batch(batch, list(range(len(batch))), torch.device("cpu"))
        logits = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits.float() / TEMPERATURE
        log_softmax = torch.log_softmax(logits, -1).gather(1, mb.response_positions[..., None].expand(-1, -1, logits.shape[-1]))
        picked = log_softmax.gather(-1, mb.response_tokens[..., None])[..., 0]
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
        return mb, torch.where(mb.response_valid, picked, torch.zeros_like(picked)), entropy

    def forward(self, batch: TrainBatch, model: str = "policy") -> list[torch.Tensor]:
        with torch.no_grad():
            _, log_probs, _ = self._log_probs(batch)
        return [log_probs[i, :n].clone() for i, n in enumerate(batch.response_lengths)]

    def train_step(self, batch: TrainBatch, loss: TrainLoss) -> dict[str, float]:
        mb, log_probs, entropy = self._log_probs(batch)
        entropy = entropy if loss.entropy_grad else entropy.detach()
        value, metrics = loss(loss_inputs(mb, batch_denominators(batch), log_probs=log_probs, entropy=entropy))
        value.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad()
        return {**{k: float(v) for k, v in metrics.items()}, "grad_norm": float(grad_norm)}


def _assert_weights_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def routing_margin(model: PreTrainedModel, batch: TrainBatch) -> float:
    """The smallest gap, over real tokens and MoE layers, between a token's k-th and (k+1)-th router logit."""
    mb = make_micro_batch(batch, list(range(len(batch))), torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, output_router_logits=True).router_logits
    k, valid = model.config.num_experts_per_tok, mb.attention_mask.reshape(-1).bool()
    top = torch.cat([layer[valid] for layer in logits]).topk(k + 1, dim=-1).values
    return float((top[:, k - 1] - top[:, k]).min())


@pytest.fixture(scope="module")
def hf_reference(model_dirs, tmp_path_factory):
    """Per family: the HF model's log-probs of the rollout, and its metrics and weights after the same
    GRPO step (SGD), computed with plain PyTorch."""
    cache: dict[str, dict[str, Any]] = {}

    def compute(family: str) -> dict[str, Any]:
        if family not in cache:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_dirs[family], dtype=torch.float32, attn_implementation="eager")
            initial = {k: v.clone() for k, v in model.state_dict().items()}
            plain = PlainHFBackend(model, torch.optim.SGD(model.parameters(), lr=0.5), clip_grad=0.0)
            samples = scored_samples()
            if family in MOE:
                assert routing_margin(model, _batch(samples)) > 1e-3, "near-tied experts: routing could differ by float error"
            log_probs = plain.forward(_batch(samples))
            metrics = rl_step(RL_CONFIG, samples, plain)[-1]
            if family in MOE:
                weights = checkpoint_state(model, tmp_path_factory.mktemp(f"{family}-stepped"))
                initial = checkpoint_state(AutoModelForCausalLM.from_pretrained(model_dirs[family]), tmp_path_factory.mktemp(family))
            else:
                weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            moved = max(float((weights[k] - initial[k]).abs().max()) for k in weights)
            assert moved > 1e-3, "the reference step barely moved the weights; the comparison would be vacuous"
            cache[family] = {"log_probs": log_probs, "metrics": metrics, "weights": weights}
        return cache[family]

    return compute


def _assert_matches(result: dict[str, Any], reference: dict[str, Any]) -> None:
    for actual, expected in zip(result["log_probs"], reference["log_probs"], strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    metrics, expected_metrics = result["metrics"], reference["metrics"]
    assert metrics["train/pg_loss"] == pytest.approx(expected_metrics["train/pg_loss"], rel=1e-5, abs=1e-7)
    _assert_weights_close(result["weights"], reference["weights"])
    assert metrics["train/grad_norm"] == pytest.approx(expected_metrics["train/grad_norm"], rel=1e-5)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_one_rank_gives_the_hf_log_probs_and_the_plain_pytorch_grpo_step(family, model_dirs, hf_reference):
    [result] = run_ranks(1, _forward_and_step, _config(model_dirs[family]))
    assert result["protocol"]
    _assert_matches(result, hf_reference(family))


LAYOUTS = {
    "tp2-sequence-parallel": ("qwen3", dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    "tp2": ("qwen2", dict(tensor_model_parallel_size=2)),
    "pp2-tied-embeddings": ("llama", dict(pipeline_model_parallel_size=2, micro_batch_size=1)),
    "pp2": ("qwen3", dict(pipeline_model_parallel_size=2)),
    "cp2": ("qwen3", dict(context_parallel_size=2)),
    "dp2": ("qwen2", dict(micro_batch_size=1)),
    # Two experts per rank (and data parallel for the rest); tokens reach them all-to-all.
    "ep2": ("qwen3_moe", dict(expert_model_parallel_size=2)),
    # Experts split like the dense MLP (expert-TP = TP), and the whole MoE model over two stages.
    "tp2-moe-sequence-parallel": ("mixtral", dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    "pp2-moe": ("qwen3_moe_unnormalised", dict(pipeline_model_parallel_size=2)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_rank_layouts_give_the_one_process_log_probs_step_and_hf_weights(layout, model_dirs, hf_reference):
    family, overrides = LAYOUTS[layout]
    results = run_ranks(2, _forward_and_step, _config(model_dirs[family], **overrides))
    for result in results:  # results are complete on every rank, not only on result_rank
        _assert_matches(result, hf_reference(family))


def test_log_probs_in_chunks_with_an_entropy_bonus_give_the_plain_pytorch_step_under_tp2_with_sequence_parallelism(model_dirs, hf_reference):
    from transformers import AutoModelForCausalLM

    rl_config = RL_CONFIG.model_copy(update={"entropy_coef": 0.5})
    model = AutoModelForCausalLM.from_pretrained(model_dirs["qwen3"], dtype=torch.float32, attn_implementation="eager")
    plain = PlainHFBackend(model, torch.optim.SGD(model.parameters(), lr=0.5), clip_grad=0.0)
    log_probs = plain.forward(_batch(scored_samples()))
    expected = {"log_probs": log_probs, "metrics": rl_step(rl_config, scored_samples(), plain)[-1],
                "weights": {k: v.detach() for k, v in model.state_dict().items()}}
    without = hf_reference("qwen3")["metrics"]["train/grad_norm"]
    assert expected["metrics"]["train/grad_norm"] != pytest.approx(without, rel=1e-3), "the entropy bonus must change the step"
    # Micro-batches of 2 samples hold 4 to 14 response tokens: chunks of 3, the last one shorter.
    config = _config(model_dirs["qwen3"], tensor_model_parallel_size=2, sequence_parallel=True, log_probs_chunk_size=3)
    for result in run_ranks(2, _forward_and_step, config, False, rl_config):
        _assert_matches(result, expected)


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_activation_recompute_gives_the_same_step(granularity, model_dirs, hf_reference):
    [result] = run_ranks(1, _forward_and_step, _config(model_dirs["qwen3"], recompute_granularity=granularity))
    _assert_matches(result, hf_reference("qwen3"))


class RouterLossHFBackend(PlainHFBackend):
    """PlainHFBackend whose step adds the router losses, written out from their papers: per MoE layer the
    Switch Transformer load-balancing loss E * sum_e f_e * P_e (f_e: the share of top-k slots that go to
    expert e, P_e: its mean router probability) and the ST-MoE z-loss mean(logsumexp(logits)^2), over
    the real tokens of each group of samples that one data-parallel rank holds, each group weighted by
    its share of the batch's tokens."""

    def __init__(self, *args: Any, aux_coeff: float, z_coeff: float, groups: list[list[int]]) -> None:
        super().__init__(*args)
        self.aux_coeff, self.z_coeff, self.groups = aux_coeff, z_coeff, groups

    def _router_loss(self, batch: TrainBatch) -> torch.Tensor:
        config, total, loss = self.model.config, sum(len(t) for t in batch.tokens), torch.zeros(())
        for group in self.groups:
            mb = make_micro_batch(batch, group, torch.device("cpu"))
            valid = mb.attention_mask.reshape(-1).bool()
            out = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, output_router_logits=True)
            for logits in out.router_logits:
                logits = logits[valid].float()
                probs, tokens = logits.softmax(-1), logits.shape[0]
                chosen = torch.zeros_like(probs).scatter(1, probs.topk(config.num_experts_per_tok, -1).indices, 1.0)
                f = chosen.sum(0) / (tokens * config.num_experts_per_tok)
                balance = config.num_experts * (f * probs.mean(0)).sum()
                z = logits.logsumexp(-1).square().mean()
                loss = loss + (tokens / total) * (self.aux_coeff * balance + self.z_coeff * z)
        return loss

    def train_step(self, batch: TrainBatch, loss: TrainLoss) -> dict[str, float]:
        self._router_loss(batch).backward()  # gradients add up with the policy loss's in the parent step
        return super().train_step(batch, loss)


def test_router_load_balancing_and_z_losses_under_expert_parallelism_equal_their_formulas(model_dirs, hf_reference, tmp_path):
    from transformers import AutoModelForCausalLM

    settings = dict(expert_model_parallel_size=2, micro_batch_size=4, moe_aux_loss_coeff=0.5, moe_z_loss_coeff=0.01)
    results = run_ranks(2, _forward_and_step, _config(model_dirs["qwen3_moe"], **settings))
    model = AutoModelForCausalLM.from_pretrained(model_dirs["qwen3_moe"], dtype=torch.float32, attn_implementation="eager")
    # Data-parallel rank d holds samples d::2, one micro-batch each.
    plain = RouterLossHFBackend(model, torch.optim.SGD(model.parameters(), lr=0.5), 0.0, aux_coeff=0.5, z_coeff=0.01,
                                groups=[list(range(0, 8, 2)), list(range(1, 8, 2))])
    metrics = rl_step(RL_CONFIG, scored_samples(), plain)[-1]
    without = hf_reference("qwen3_moe")["metrics"]["train/grad_norm"]
    assert metrics["train/grad_norm"] != pytest.approx(without, rel=1e-3), "the router losses must change the step"
    expected = checkpoint_state(model, tmp_path)
    for result in results:
        assert result["metrics"]["train/grad_norm"] == pytest.approx(metrics["train/grad_norm"], rel=1e-5)
        _assert_weights_close(result["weights"], expected)


def _fsdp_forward_and_step(rank: int, model_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    from rl_fsdp import FSDPConfig
    from rl_fsdp import build_backend as build_fsdp

    backend = build_fsdp(FSDPConfig(model_path=model_dir, device="cpu", rollout_temperature=TEMPERATURE, **settings))
    samples = scored_samples()
    log_probs = backend.forward(_batch(samples))
    metrics = rl_step(RL_CONFIG, samples, backend)
    weights = {name: tensor.cpu().clone() for name, tensor in backend.weights()}
    backend.close()
    return {"log_probs": log_probs, "metrics": metrics[-1], "weights": weights}


def test_megatron_under_tp2_and_fsdp_over_two_ranks_take_the_same_rl_step(model_dirs):
    pytest.importorskip("rl_fsdp")
    settings = dict(optimizer="adam", lr=1e-3, clip_grad=0.05, micro_batch_size=2)
    [fsdp, _] = run_ranks(2, _fsdp_forward_and_step, model_dirs["qwen3"], settings)
    [megatron, _] = run_ranks(2, _forward_and_step, _config(model_dirs["qwen3"], tensor_model_parallel_size=2, **settings))
    assert fsdp["metrics"]["train/grad_norm"] > 0.05, "the clip bound must bite, else Adam hides a gradient scale error"
    _assert_matches(megatron, fsdp)


def test_offload_and_onload_between_forward_and_step_change_nothing(model_dirs, hf_reference):
    [result] = run_ranks(1, _forward_and_step, _config(model_dirs["qwen3"], ref_model=True), True)
    _assert_matches(result, hf_reference("qwen3"))


def test_dropout_changes_the_train_step_but_not_the_forward_log_probs(model_dirs, hf_reference):
    config = _config(model_dirs["qwen3"], hidden_dropout=0.3, attention_dropout=0.3)
    [result] = run_ranks(1, _forward_and_step, config)
    reference = hf_reference("qwen3")
    for actual, expected in zip(result["log_probs"], reference["log_probs"], strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert result["metrics"]["train/grad_norm"] != pytest.approx(reference["metrics"]["train/grad_norm"], rel=1e-3)


def test_adam_with_clipping_under_the_distributed_optimizer_equals_torch_adamw(model_dirs):
    from transformers import AutoModelForCausalLM

    settings = dict(optimizer="adam", lr=1e-3, clip_grad=0.05, adam_beta2=0.99, lr_warmup_iters=2)
    results = run_ranks(2, _forward_and_step, _config(model_dirs["qwen2"], use_distributed_optimizer=True, **settings))
    model = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"], dtype=torch.float32, attn_implementation="eager")
    # Step 1 of a 2-step warm-up runs at half the rate.
    adam = torch.optim.AdamW(model.parameters(), lr=0.5e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    metrics = rl_step(RL_CONFIG, scored_samples(), PlainHFBackend(model, adam, clip_grad=0.05))[-1]
    assert metrics["train/grad_norm"] > 0.05, "the clip bound must bite for this test to check clipping"
    for result in results:
        assert result["metrics"]["train/lr"] == pytest.approx(0.5e-3)
        assert result["metrics"]["train/grad_norm"] == pytest.approx(metrics["train/grad_norm"], rel=1e-5)
        _assert_weights_close(result["weights"], {k: v.detach() for k, v in model.state_dict().items()})


def _critic_batch() -> TrainBatch:
    samples = scored_samples()
    gen = torch.Generator().manual_seed(3)
    returns = [torch.randn(s.response_length, generator=gen).tolist() for s in samples]
    return TrainBatch.from_samples(
        samples, [[0.0] * s.response_length for s in samples], returns=returns, values=[[0.0] * s.response_length for s in samples]
    )


def _critic_steps(rank: int, config: MegatronConfig) -> dict[str, Any]:
    """Two value-loss steps (the head starts at zero, so the body moves only in the second), then values."""
    backend = build_backend(config)
    batch = _critic_batch()
    metrics = [backend.train_step(batch, ValueLoss()) for _ in range(2)]
    values = backend.forward(batch)
    weights = {n: t.clone() for n, t in backend.weights()}
    backend.close()
    return {"metrics": metrics, "values": values, "weights": weights}


@pytest.mark.parametrize("layout", ["one-rank", "tp2-sequence-parallel", "cp2"])
def test_a_value_head_critic_trains_as_an_hf_body_with_a_zero_linear_head(layout, model_dirs):
    from transformers import AutoModelForCausalLM

    overrides = {"one-rank": {}, "tp2-sequence-parallel": dict(tensor_model_parallel_size=2, sequence_parallel=True),
                 "cp2": dict(context_parallel_size=2)}[layout]
    results = run_ranks(1 if layout == "one-rank" else 2, _critic_steps, _config(model_dirs["llama"], head="value", lr=0.1, **overrides))

    body = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32, attn_implementation="eager").model
    head = torch.nn.Linear(body.config.hidden_size, 1)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    params = [*body.parameters(), *head.parameters()]
    sgd = torch.optim.SGD(params, lr=0.1)
    batch = _critic_batch()
    mb = make_micro_batch(batch, list(range(len(batch))), torch.device("cpu"))

    def values() -> torch.Tensor:
        hidden = body(input_ids=mb.input_ids, attention_mask=mb.attention_mask).last_hidden_state
        v = head(hidden)[..., 0].gather(1, mb.response_positions)
        return torch.where(mb.response_valid, v, torch.zeros_like(v))

    grad_norms = []
    for _ in range(2):
        value, _ = ValueLoss()(loss_inputs(mb, batch_denominators(batch), values=values()))
        value.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, float("inf"))))
        sgd.step()
        sgd.zero_grad()
    with torch.no_grad():
        expected_values = values()
    expected = {f"model.{k}": v for k, v in body.state_dict().items()}
    expected.update({"model.embed_tokens.weight": body.embed_tokens.weight.detach(), "lm_head.weight": body.embed_tokens.weight.detach()})
    expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    expected.update({"value_head.weight": head.weight.detach(), "value_head.bias": head.bias.detach()})
    assert float(expected_values.abs().max()) > 1e-3
    for result in results:
        assert [m["grad_norm"] for m in result["metrics"]] == pytest.approx(grad_norms, rel=1e-5)
        for i, v in enumerate(result["values"]):
            torch.testing.assert_close(v, expected_values[i, : batch.response_lengths[i]], atol=1e-5, rtol=1e-5)
        _assert_weights_close({k: v for k, v in result["weights"].items() if k != "lm_head.weight"}, expected)


def _save_resume(rank: int, save_config: MegatronConfig, directory: Path) -> dict[str, Any]:
    """Step, save, step again; then a fresh backend loads the save and takes the second step again."""
    samples = scored_samples()
    backend = build_backend(save_config)
    rl_step(RL_CONFIG, samples, backend)
    saved = {n: t.clone() for n, t in backend.weights()}
    backend.save(directory)
    rl_step(RL_CONFIG, samples, backend)
    continued = {n: t.clone() for n, t in backend.weights()}
    backend.close()

    resumed = build_backend(save_config)
    resumed.load(directory)
    reloaded = {n: t.clone() for n, t in resumed.weights()}
    rl_step(RL_CONFIG, samples, resumed)
    result = {"saved": saved, "reloaded": reloaded, "continued": continued, "resumed": {n: t.clone() for n, t in resumed.weights()}}
    resumed.close()
    return result


def _load_elsewhere(rank: int, config: MegatronConfig, directory: Path) -> dict[str, torch.Tensor]:
    backend = build_backend(config)
    try:
        backend.load(directory)
        return {n: t.clone() for n, t in backend.weights()}
    finally:
        backend.close()


def test_checkpoint_resumes_model_and_optimizer_and_loads_the_model_under_another_layout(model_dirs, tmp_path):
    adam = dict(optimizer="adam", lr=1e-3, use_distributed_optimizer=True, micro_batch_size=1)
    config = _config(model_dirs["qwen3"], **adam)
    results = run_ranks(2, _save_resume, config, tmp_path / "ckpt")
    for result in results:
        _assert_weights_close(result["reloaded"], result["saved"], atol=0.0)
        # Adam's moments and the step count came back: the resumed second step equals the uninterrupted one.
        _assert_weights_close(result["resumed"], result["continued"], atol=0.0)

    other = _config(model_dirs["qwen3"], tensor_model_parallel_size=2, optimizer="adam")
    with pytest.raises(AssertionError, match="--no-load-optim"):
        run_ranks(2, _load_elsewhere, other, tmp_path / "ckpt")
    for weights in run_ranks(2, _load_elsewhere, other.model_copy(update={"no_load_optim": True}), tmp_path / "ckpt"):
        _assert_weights_close(weights, results[0]["saved"], atol=0.0)


def _weights_only(rank: int, config: MegatronConfig) -> dict[str, torch.Tensor]:
    backend = build_backend(config)
    weights = {n: t.clone() for n, t in backend.weights()}
    backend.close()
    return weights


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_a_config_without_weights_starts_from_the_hf_models_seeded_init(family, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_config = MODELS[family]().config
    hf_config.save_pretrained(tmp_path / "config")
    [weights] = run_ranks(1, _weights_only, _config(tmp_path / "config", seed=7))
    torch.manual_seed(7)
    # The experts, stacked in the HF model's memory, come out one tensor per expert as its checkpoint names them.
    expected = checkpoint_state(AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32), tmp_path / "saved")
    _assert_weights_close(weights, expected, atol=0.0)


# --- bad input, refused before any process group exists ------------------------------------------------------

from rl_megatron import check_config, read_hf_config  # noqa: E402


@pytest.mark.parametrize(
    ("overrides", "world_size", "message"),
    [
        (dict(tensor_model_parallel_size=3), None, "--tensor-model-parallel-size=3: does not divide num_attention_heads=4"),
        (dict(tensor_model_parallel_size=4), None, "--tensor-model-parallel-size=4: does not divide num_key_value_heads=2"),
        (dict(pipeline_model_parallel_size=3), None, "--pipeline-model-parallel-size=3: is larger than num_hidden_layers=2"),
        (dict(tensor_model_parallel_size=2), 3, r"\(TP=2 x PP=1 x CP=1\) does not divide the 3 training ranks"),
    ],
)
def test_parallel_sizes_that_do_not_split_the_model_are_refused_naming_the_flag(overrides, world_size, message, model_dirs):
    config = _config(model_dirs["qwen3"], **overrides)
    with pytest.raises(ValueError, match=message):
        check_config(config, read_hf_config(config.model_path), world_size=world_size)


@pytest.mark.parametrize(
    ("family", "overrides", "world_size", "message"),
    [
        ("qwen3", dict(expert_model_parallel_size=2, moe_aux_loss_coeff=0.1),
         None, "--expert-model-parallel-size, --moe-aux-loss-coeff: MoE flag.* is a dense model"),
        ("qwen3_moe", dict(expert_model_parallel_size=3), None, "--expert-model-parallel-size=3: does not divide num_experts=4"),
        ("qwen3_moe", dict(expert_tensor_parallel_size=3), None, "--expert-tensor-parallel-size=3: does not divide the experts' intermediate size 32"),
        ("qwen3_moe", dict(expert_model_parallel_size=4), 2, r"\(EP=4 x ETP=1\) does not divide the 2 ranks of a pipeline stage"),
    ],
)
def test_expert_layouts_that_do_not_split_the_model_are_refused_naming_the_flag(family, overrides, world_size, message, model_dirs):
    config = _config(model_dirs[family], **overrides)
    with pytest.raises(ValueError, match=message):
        check_config(config, read_hf_config(config.model_path), world_size=world_size)


def test_a_model_family_without_a_mapping_is_refused_naming_its_model_type(model_dirs, tmp_path):
    from transformers import MistralConfig

    MistralConfig(**_TINY, num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    config = _config(tmp_path)
    with pytest.raises(ValueError, match="model_type 'mistral' cannot be built"):
        check_config(config, read_hf_config(tmp_path))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(sequence_parallel=True), "sequence_parallel=True needs tensor_model_parallel_size > 1"),
        (dict(attention_softmax_in_fp32=False), "always accumulate the softmax in float32"),
        (dict(transformer_impl="transformer_engine"), "needs TransformerEngine, which is not installed"),
        (dict(recompute_method="block"), "recompute_granularity is not"),
        (dict(moe_grouped_gemm=True), "moe_grouped_gemm=True needs transformer_impl='transformer_engine'"),
        (dict(expert_model_parallel_size=2, moe_token_dispatcher_type="allgather"), "needs the same token count on every expert-parallel rank"),
    ],
)
def test_flags_the_backend_cannot_honour_are_refused_with_the_reason(overrides, message, model_dirs):
    with pytest.raises(ValueError, match=message):
        _config(model_dirs["qwen3"], **overrides)
