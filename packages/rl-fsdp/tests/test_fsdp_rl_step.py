"""rl-core's RL step through the FSDP backend equals the same GRPO update computed on the plain HF model."""

import random

import torch
from transformers import AutoModelForCausalLM

from rl_core.config import RLStepConfig
from rl_core.protocols import TrainingBackend
from rl_core.rl_step import rl_step
from rl_core.sample import Sample
from rl_fsdp import FSDPConfig, build_backend

VOCAB = 64  # the tiny models of conftest.py


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


def test_the_rl_step_through_fsdp_equals_a_plain_pytorch_grpo_step(llama_dir):
    samples = scored_samples(groups=2, group_size=3, seed=0)
    backend = build_backend(FSDPConfig(model_path=llama_dir, optimizer="sgd", lr=0.5, clip_grad=0.0, micro_batch_size=2))
    try:
        assert isinstance(backend, TrainingBackend)
        rl_step(RLStepConfig(rollout_batch_size=2, n_samples_per_prompt=3), samples, backend)
        got = {name: t.cpu().clone() for name, t in backend.weights()}
    finally:
        backend.close()

    # Independent computation: at ratio 1 the PPO surrogate's gradient is REINFORCE's, -sum(A grad log p) / tokens.
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64)
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64).view(-1, 3)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).flatten()
    tokens = sum(s.response_length for s in samples)
    loss = torch.zeros((), dtype=torch.float64)
    for sample, advantage in zip(samples, advantages):
        ids, n = torch.tensor([sample.tokens]), sample.response_length
        log_probs = torch.log_softmax(model(ids).logits[0, -n - 1 : -1], -1).gather(1, ids[0, -n:, None])
        loss = loss - advantage * log_probs.sum() / tokens
    loss.backward()
    with torch.no_grad():
        for name, param in model.named_parameters():
            torch.testing.assert_close(got[name].double(), param - 0.5 * param.grad, atol=2e-5, rtol=1e-4)
