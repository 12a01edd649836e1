"""`ModelRunner`: the Hugging Face model behind the embedded engine, its batched KV-cache steps and
its weights. Every method that touches the model runs on the engine's single model thread, so a
weight change always lands between two forward passes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedTokenizerBase

from rl_sglang.tokenizer import load_tokenizer
from rl_sglang.embedded.sampling import SamplingParams, sample

logger = logging.getLogger(__name__)

MEMORY_TAGS = ("weights", "kv_cache")


@dataclass
class BatchState:
    """The KV cache and bookkeeping of one running batch (left padded)."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [B, T]
    next_positions: torch.Tensor  # [B]
    last_tokens: torch.Tensor  # [B]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' or 'torch.bfloat16' → torch.bfloat16 (the spelling SGLang accepts on the wire)."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class ModelRunner:
    def __init__(self, model_path: str, *, device: str = "auto", dtype: str = "auto", seed: int = 0):
        self.model_path = str(model_path)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype).to(self.device).eval()
        self.tokenizer = _load_tokenizer(self.model_path)
        self.eos_token_ids = _eos_token_ids(self.model, self.tokenizer)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.weight_version = "default"
        self.released_tags: set[str] = set()

    # ---- generation ---------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self, prompts: list[list[int]], params: list[SamplingParams]
    ) -> tuple[BatchState, list[int], list[float]]:
        """Run the left-padded prompts, sample each row's first token."""
        width = max(len(p) for p in prompts)
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        tokens, logprobs = sample(out.logits[:, -1, :], params, self.generator)
        state = BatchState(out.past_key_values, attention_mask, position_ids[:, -1] + 1, tokens)
        return state, tokens.tolist(), logprobs.tolist()

    @torch.inference_mode()
    def decode(
        self, state: BatchState, keep_rows: list[int], params: list[SamplingParams]
    ) -> tuple[list[int], list[float]]:
        """Drop finished rows (`keep_rows` are the survivors), then one token for each kept row."""
        if len(keep_rows) != state.attention_mask.shape[0]:
            index = torch.tensor(keep_rows, device=self.device)
            state.cache.batch_select_indices(index)
            state.attention_mask = state.attention_mask[index]
            state.next_positions = state.next_positions[index]
            state.last_tokens = state.last_tokens[index]
        ones = torch.ones(len(keep_rows), 1, dtype=state.attention_mask.dtype, device=self.device)
        state.attention_mask = torch.cat([state.attention_mask, ones], dim=1)
        out = self.model(
            input_ids=state.last_tokens[:, None],
            attention_mask=state.attention_mask,
            position_ids=state.next_positions[:, None],
            past_key_values=state.cache,
            use_cache=True,
        )
        tokens, logprobs = sample(out.logits[:, -1, :], params, self.generator)
        state.cache = out.past_key_values
        state.next_positions = state.next_positions + 1
        state.last_tokens = tokens
        return tokens.tolist(), logprobs.tolist()

    def decode_text(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def encode_text(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"text: the model at {self.model_path} has no tokenizer; send input_ids")
        return list(self.tokenizer.encode(text))

    # ---- weights ------------------------------------------------------------------------------

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters(remove_duplicate=False))
        persistent = set(self.model.state_dict().keys())
        named.update((n, b) for n, b in self.model.named_buffers(remove_duplicate=False) if n in persistent)
        return named

    def check_weights(self, items: Iterable[tuple[str, tuple[int, ...]]]) -> str | None:
        """A message naming the first tensor whose name is unknown or whose shape differs, else None."""
        named = self._named_tensors()
        for name, shape in items:
            target = named.get(name)
            if target is None:
                return f"unknown weight name {name!r} (not a parameter of the served model)"
            if tuple(target.shape) != tuple(shape):
                return f"shape mismatch for {name!r}: sent {list(shape)}, model has {list(target.shape)}"
        return None

    @torch.inference_mode()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str | None) -> None:
        """Copy already-checked tensors into the live parameters and bump the weight version."""
        named = self._named_tensors()
        for name, tensor in named_tensors:
            target = named[name]
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
        if weight_version is not None:
            self.weight_version = weight_version
        logger.info("weights updated, weight_version=%s", self.weight_version)

    # ---- memory -------------------------------------------------------------------------------

    def release(self, tags: Iterable[str]) -> None:
        """Free the accelerator memory of `tags`. Weights move to host memory (the only place they can
        survive until resume); the KV cache is already dropped by the scheduler before this runs."""
        tags = set(tags)
        if "weights" in tags and "weights" not in self.released_tags and self.device.type == "cuda":
            self.model.to("cpu")
        self.released_tags |= tags
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume(self, tags: Iterable[str]) -> None:
        tags = set(tags)
        if "weights" in tags and "weights" in self.released_tags and self.device.type == "cuda":
            self.model.to(self.device)
        self.released_tags -= tags


def _load_tokenizer(model_path: str) -> PreTrainedTokenizerBase | None:
    folder = Path(model_path)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return load_tokenizer(model_path)


def _eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> frozenset[int]:
    ids: set[int] = set()
    sources = [getattr(model, "generation_config", None), model.config]
    for source in sources:
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
