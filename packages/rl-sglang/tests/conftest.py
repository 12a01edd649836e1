"""Tiny local models (no downloads) and an in-process embedded engine for the rl-sglang tests."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Split
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from rl_sglang.client import SGLangClient
from rl_sglang.embedded import EmbeddedEngine

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?0123456789"
EOS_ID = 1
VOCAB = 64
CONTEXT = 512
STEP_TIMEOUT_S = 60.0


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=0,
        eos_token_id=EOS_ID,
        pad_token_id=0,
        initializer_range=0.5,  # peaked distributions: greedy choices far from ties
        tie_word_embeddings=False,
    )


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32).eval()


def save_tokenizer(folder: Path) -> None:
    vocab = {"<s>": 0, "</s>": EOS_ID, "<unk>": 2}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    assert len(vocab) <= VOCAB
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    wrapped.save_pretrained(folder)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model(seed=0).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def other_weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, different weights: the 'trained' model of the weight-update tests."""
    folder = tmp_path_factory.mktemp("tiny-llama-v2")
    make_model(seed=1).save_pretrained(folder)
    return folder


def teacher_forced_logprobs(model_path: Path, prompt: list[int], output: list[int], temperature: float = 1.0) -> list[float]:
    """Independent reference: one unbatched forward over prompt+output, no KV cache."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    log_probs = torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, dim=-1)
    return log_probs.gather(1, torch.tensor(output)[:, None]).squeeze(1).tolist()


def greedy_reference(model_path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Independent reference: greedy decoding by full re-forward each step (no cache, no padding)."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


async def bounded(awaitable: Any, timeout_s: float = STEP_TIMEOUT_S) -> Any:
    return await asyncio.wait_for(awaitable, timeout_s)


@contextlib.asynccontextmanager
async def serving(model_dir: Path, **engine_kwargs: Any) -> AsyncIterator[tuple[EmbeddedEngine, SGLangClient]]:
    """An embedded engine started over `model_dir` (on the CPU in float32 unless told) and a client of it, both
    closed on leaving."""
    engine = EmbeddedEngine(str(model_dir), **{"device": "cpu", "dtype": "float32", "seed": 0, **engine_kwargs})
    await bounded(engine.start(), 2 * STEP_TIMEOUT_S)
    client = SGLangClient(engine.url, timeout_s=STEP_TIMEOUT_S)
    try:
        yield engine, client
    finally:
        await client.close()
        await bounded(engine.stop())


@pytest.fixture
async def engine(model_dir: Path) -> AsyncIterator[EmbeddedEngine]:
    engine = EmbeddedEngine(str(model_dir), device="cpu", dtype="float32", max_running_requests=8, seed=0)
    await bounded(engine.start())
    try:
        yield engine
    finally:
        await bounded(engine.stop())


@pytest.fixture
async def client(engine: EmbeddedEngine) -> AsyncIterator[SGLangClient]:
    client = SGLangClient(engine.url, timeout_s=STEP_TIMEOUT_S)
    try:
        yield client
    finally:
        await client.close()


class Reference:
    """The helpers above, handed to tests as a fixture (conftest modules are not importable under
    --import-mode=importlib)."""

    eos_id = EOS_ID
    context = CONTEXT
    teacher_forced_logprobs = staticmethod(teacher_forced_logprobs)
    greedy = staticmethod(greedy_reference)
    make_model = staticmethod(make_model)
    serving = staticmethod(serving)


@pytest.fixture(scope="session")
def ref() -> Reference:
    return Reference()
