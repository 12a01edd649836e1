"""`ModelRunner`: the Hugging Face model behind the embedded engine, the engine's KV pool, its
forward passes (prefill chunks and decode steps, decode under CUDA graphs) and its weights. Every
method that touches the model or the pool runs on the engine's single model thread, so a weight
change always lands between two forward passes."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from rl_sglang.embedded.attention import ATTN_IMPLEMENTATION, BATCH_KWARG, ForwardBatch, build_extend_groups
from rl_sglang.embedded.checkpoint_names import WeightTargets
from rl_sglang.embedded.compiled_layers import DEFAULT_MAX_BS, CompiledLayers
from rl_sglang.embedded.cuda_graphs import DecodeGraphs, capture_sizes
from rl_sglang.embedded.decode_kernel import triton_available
from rl_sglang.embedded.fused_ops import fuse_rms_norms
from rl_sglang.embedded.kv_cache import KVLayout, KVPool, pool_tokens
from rl_sglang.embedded.lora import LoraAdapter, ServedLora
from rl_sglang.embedded.options import EngineOptions
from rl_sglang.embedded.prefix_cache import PrefixCache
from rl_sglang.embedded.sampling import SamplingBatch, SamplingParams, sample
from rl_sglang.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

MEMORY_TAGS = ("weights", "kv_cache")
MAX_TABLE_BYTES = 4 << 30


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
    def __init__(
        self,
        model_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        seed: int = 0,
        max_running_requests: int = 64,
        options: EngineOptions | None = None,
        compile_backend: str | Callable[..., Any] = "inductor",
    ):
        """`compile_backend`: torch.compile's backend for `--enable-torch-compile` (tests pass a cheap one)."""
        self.model_path = str(model_path)
        self.options = options or EngineOptions()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_running_requests = max_running_requests
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=self.dtype, attn_implementation=ATTN_IMPLEMENTATION
        ).to(self.device).eval()  # type: ignore[arg-type]  # mypy reads transformers' @wraps(Module.to) as unbound
        self.tokenizer = _load_tokenizer(self.model_path)
        self.eos_token_ids = _eos_token_ids(self.model, self.tokenizer)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        model_context = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self.context_length = self.options.context_length or model_context
        if KVPool.table_bytes(max_running_requests, self.context_length) > MAX_TABLE_BYTES:
            raise ValueError(
                f"context length {self.context_length} x {max_running_requests} running requests makes a request-to-token "
                "table over 4 GiB; pass a smaller --context-length or --max-running-requests"
            )
        if self.context_length > model_context:
            logger.warning("--context-length %d exceeds the model's max_position_embeddings %d", self.context_length, model_context)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.weight_version = "default"
        self._sampling: tuple[object, SamplingBatch | None] = (None, None)
        self.weight_generation = 0  # bumped by every weight change: cached prefixes are stale then
        self.released_tags: set[str] = set()
        self.adapter: LoraAdapter | None = None
        """The LoRA adapter served (one at a time; its factors are those of `_lora`), or None: the base is served."""
        self._lora: ServedLora | None = None  # kept, with zero B, after an unload: the next load refills it
        self._targets: WeightTargets | None = None
        self.layout = KVLayout.of(self.model.config, self.dtype)
        self.use_decode_kernel = self.device.type == "cuda" and triton_available()
        ignored = _ignored_here(self.options, self.device, self.use_decode_kernel)
        if ignored:
            logger.warning("ignored on %s: %s", self.device.type, ", ".join(ignored))
        if self.use_decode_kernel:
            logger.info("fused %d RMSNorm modules into one-kernel forwards", fuse_rms_norms(self.model))
        self.compiled: CompiledLayers | None = None
        """The decoder layers' compiled forwards (--enable-torch-compile), used by decode steps they apply to."""
        self.compile_seconds: float | None = None
        if self.options.enable_torch_compile:
            self.compiled = CompiledLayers(self.model, self.options.torch_compile_max_bs or DEFAULT_MAX_BS, compile_backend)
        self.fused_sampling = True
        """Sample with the one-kernel sampler where it applies (`sampling.fused_sampler_applies`); a bench knob."""
        self.pool: KVPool | None = None
        self.prefix_cache: PrefixCache | None = None
        self.graphs: DecodeGraphs | None = None
        self._pool_tokens: int | None = None
        self._build_cache()

    # ---- the KV cache and the CUDA graphs -----------------------------------------------------

    def _build_cache(self) -> None:
        if self._pool_tokens is None:  # sized once: a resumed pool gets the same slots
            self._pool_tokens = pool_tokens(
                self.layout,
                self.device,
                mem_fraction_static=self.options.mem_fraction_static,
                max_total_tokens=self.options.max_total_tokens,
                reserved_bytes=KVPool.table_bytes(self.max_running_requests, self.context_length),
            )
        tokens = self._pool_tokens
        self.pool = KVPool(self.layout, tokens, self.max_running_requests, self.context_length, self.device)
        self.prefix_cache = PrefixCache(self.pool.allocator, enabled=not self.options.disable_radix_cache)
        self._probe()
        if self.compiled is not None and self.compile_seconds is None:
            self._compile_layers()
        self._capture_graphs()

    @torch.inference_mode()
    def _compile_layers(self) -> None:
        """Compile the layers with one decode step on the sink row (before any graph is captured, so the
        graphs record the compiled kernels), at the largest odd batch they serve: inductor tunes its kernels
        for the batch it is compiled at, and an odd size is none of the model's own (even) sizes, which
        would otherwise be taken for the same dimension."""
        assert self.compiled is not None
        most = self.compiled.max_bs
        n = max(2, most if most % 2 else most - 1)
        started = time.monotonic()
        try:
            self._decode_logits([0] * n, [0] * n, [0] * n, torch.zeros(n, dtype=torch.int64))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as exc:
            raise RuntimeError(f"--enable-torch-compile: compiling the decoder layers failed ({exc}); run without it") from exc
        self.compile_seconds = time.monotonic() - started
        logger.info(
            "torch.compile of %d decoder layers for decode batches 2..%d took %.1f s",
            self.compiled.layers, self.compiled.max_bs, self.compile_seconds,
        )  # fmt: skip

    def _capture_graphs(self) -> None:
        if self.use_decode_kernel and not self.options.disable_cuda_graph:
            max_bs = self.options.cuda_graph_max_bs or min(self.max_running_requests, 512)
            try:
                self.graphs = DecodeGraphs(self._decode_forward, capture_sizes(max_bs), self.device)
            except Exception:  # an architecture whose forward cannot be captured still serves, eagerly
                logger.exception("CUDA graph capture failed; decoding eagerly")
                self.graphs = None

    def close(self) -> None:
        """Let the KV pool and the graphs go (an engine stopped in a process that goes on)."""
        self._drop_cache()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _drop_cache(self) -> None:
        self.graphs = None
        self.prefix_cache = None
        self.pool = None

    @torch.inference_mode()
    def _probe(self) -> None:
        """One prefill and one decode step through the engine's attention on the sink row, so an
        architecture this attention cannot serve fails at start, not on the first request."""
        slots = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._extend_logits([0], [0], [[0, 0]], slots, [0])
        self._decode_logits([0], [2], [0], torch.zeros(1, dtype=torch.int64))

    # ---- generation ---------------------------------------------------------------------------

    @torch.inference_mode()
    def extend(
        self,
        rows: list[int],
        prefix_lens: list[int],
        chunks: list[list[int]],
        slots: torch.Tensor,
        sample_at: list[int],
        params: list[SamplingParams],
        table_writes: Sequence[tuple[int, torch.Tensor]] = (),
    ) -> tuple[list[int], list[float]]:
        """Prefill `chunks[i]` (the tokens after the first `prefix_lens[i]` cached ones) of table rows
        `rows`, writing their K/V to `slots`; sample one token for each batch index in `sample_at`
        (rows whose prompt is now complete) with `params` (one each). `table_writes` (row, slots)
        first point rows at the prefix-cache slots they share."""
        assert self.pool is not None, "generation runs only while the KV pool exists"
        for row, shared in table_writes:
            self.pool.req_to_token[row, : len(shared)] = shared.to(self.device, non_blocking=True).to(torch.int32)
        if not sample_at:
            self._extend_logits(rows, prefix_lens, chunks, slots, [])
            return [], []
        logits = self._extend_logits(rows, prefix_lens, chunks, slots, sample_at)
        tokens, logprobs = sample(logits, SamplingBatch(params, self.device), self.generator, self.fused_sampling)
        return self._to_host(tokens, logprobs)

    def _to_host(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> tuple[list[int], list[float]]:
        """The sampled tokens and log-probs as lists; on CUDA through pinned memory and an event wait,
        which lets go of the GIL while the GPU finishes (the event loop keeps serving meanwhile)."""
        if self.device.type != "cuda":
            return tokens.tolist(), logprobs.tolist()
        host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host_logprobs = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True)
        host_tokens.copy_(tokens, non_blocking=True)
        host_logprobs.copy_(logprobs, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return host_tokens.tolist(), host_logprobs.tolist()

    @torch.inference_mode()
    def decode(
        self,
        rows: list[int],
        positions: list[int],
        last_tokens: list[int],
        slots: torch.Tensor,
        params: list[SamplingParams],
        batch_key: object = None,
    ) -> tuple[list[int], list[float]]:
        """One token for each row: `last_tokens[i]` goes in at `positions[i]` (its K/V to `slots[i]`).
        Steps with the same `batch_key` (same requests, same order) reuse one `SamplingBatch`."""
        logits = self._decode_logits(rows, positions, last_tokens, slots)
        if batch_key is None or self._sampling[0] != batch_key:
            self._sampling = (batch_key, SamplingBatch(params, self.device))
        assert self._sampling[1] is not None, "set above on the first step"
        tokens, logprobs = sample(logits, self._sampling[1], self.generator, self.fused_sampling)
        return self._to_host(tokens, logprobs)

    def _compiled_for(self, batch_size: int) -> bool:
        """Whether a decode step of `batch_size` rows runs the compiled layers (not with a LoRA adapter's
        hooks in the layers: they are not part of the compiled graph)."""
        return self.compiled is not None and self._lora is None and self.compiled.applies(batch_size)

    def _extend_logits(self, rows, prefix_lens, chunks, slots, sample_at, decode_step: bool = False) -> torch.Tensor:
        assert self.pool is not None, "generation runs only while the KV pool exists"
        q_lens = [len(c) for c in chunks]
        ids = [t for c in chunks for t in c]
        positions = [p + j for p, q in zip(prefix_lens, q_lens) for j in range(q)]
        row_of = [r for r, q in zip(rows, q_lens) for _ in range(q)]
        ends, offset = [], 0
        for q in q_lens:
            offset += q
            ends.append(offset - 1)
        keep = [ends[i] for i in sample_at] or [len(ids) - 1]
        host = torch.tensor([ids, positions, row_of], dtype=torch.int64)
        ids_d, pos_d, row_d = host.to(self.device, non_blocking=True)
        slots_d = slots.to(self.device, non_blocking=True)
        self.pool.req_to_token[row_d, pos_d] = slots_d.to(torch.int32)
        groups = build_extend_groups(self.pool, rows, prefix_lens, q_lens, self.device)
        compiled = decode_step and self._compiled_for(len(rows))
        batch = ForwardBatch(self.pool, slots_d, fused=self.use_decode_kernel, groups=groups, compiled_layers=compiled)
        keep_d = torch.tensor(keep, dtype=torch.int64).to(self.device, non_blocking=True)
        out = self.model(
            input_ids=ids_d[None], position_ids=pos_d[None], use_cache=False, logits_to_keep=keep_d, **{BATCH_KWARG: batch}
        )
        return out.logits[0]

    def _decode_logits(self, rows, positions, last_tokens, slots) -> torch.Tensor:
        if not self.use_decode_kernel:  # the gather + SDPA path, one query per row
            return self._extend_logits(rows, positions, [[t] for t in last_tokens], slots, list(range(len(rows))), decode_step=True)
        host = torch.cat([torch.tensor([last_tokens, positions, rows], dtype=torch.int64), slots.view(1, -1)])
        if self.graphs is not None and len(rows) <= self.graphs.max_bs:
            return self.graphs.replay(host)
        ids, pos, row, slot = host.to(self.device, non_blocking=True)
        return self._decode_forward(ids, pos, row.to(torch.int32), (pos + 1).to(torch.int32), slot)

    def _decode_forward(self, ids, positions, rows, seq_lens, slots) -> torch.Tensor:
        """The decode step as a pure function of device tensors (what a CUDA graph captures)."""
        assert self.pool is not None, "generation runs only while the KV pool exists"
        self.pool.req_to_token[rows.long(), positions] = slots.to(torch.int32)
        compiled = self._compiled_for(ids.shape[0])
        batch = ForwardBatch(self.pool, slots, decode=True, fused=True, rows=rows, seq_lens=seq_lens, compiled_layers=compiled)
        out = self.model(input_ids=ids[None], position_ids=positions[None], use_cache=False, **{BATCH_KWARG: batch})
        return out.logits[0]

    def decode_text(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)  # type: ignore[return-value]  # one id list: one str

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

    def _weight_targets(self) -> WeightTargets:
        """Built once and kept (walking the model costs milliseconds, and each update bucket asks twice);
        dropped when the model's tensors become other objects (`release`/`resume` move them)."""
        if self._targets is None:
            self._targets = WeightTargets(self.model, self._named_tensors())
        return self._targets

    def check_weights(self, items: Iterable[tuple[str, tuple[int, ...]]]) -> str | None:
        """A message naming the first tensor whose name is unknown or whose shape differs, else None. Names
        are the model's in-memory ones or checkpoint ones (one expert's matrix of a stacked MoE layer)."""
        targets = self._weight_targets()
        for name, shape in items:
            target = targets.get(name)
            if target is None:
                return f"unknown weight name {name!r} (not a parameter of the served model)"
            if target.shape != tuple(shape):
                where = "" if target.name == name else f" at {target.describe()}"
                return f"shape mismatch for {name!r}: sent {list(shape)}, model has {list(target.shape)}{where}"
        return None

    @torch.inference_mode()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str | None) -> None:
        """Copy already-checked tensors into the live parameters (or their expert slices) and bump the weight
        version. With an adapter loaded they are the new base: the adapter stays applied beside them."""
        targets = self._weight_targets()
        views, sources = [], []
        for name, tensor in named_tensors:
            target = targets.get(name)
            assert target is not None, f"{name!r} was checked before loading"
            view = target.view()
            views.append(view)
            sources.append(tensor.to(device=view.device, dtype=view.dtype))
        if views:
            torch._foreach_copy_(views, sources)  # one launch per group of like tensors, not one per tensor
        if self.device.type == "cuda":  # a sender may reuse memory handed over by handle once this answers
            torch.cuda.current_stream(self.device).synchronize()
        if weight_version is not None:
            self.weight_version = weight_version
        self.weight_generation += 1

    def set_weight_version(self, weight_version: str) -> None:
        self.weight_version = weight_version

    # ---- LoRA ---------------------------------------------------------------------------------

    def check_adapter(self, adapter: LoraAdapter) -> str | None:
        """A message naming the first adapted weight this model lacks, has in another shape or holds in a
        layer other than a linear one (the adapter's path is x -> A -> B beside that layer), else None."""
        named = self._weight_targets().named
        for name, (a, b) in adapter.pairs.items():
            target = named.get(name)
            if target is None:
                return f"adapter {adapter.name!r}: {name!r} is not a weight of the served model"
            shape = (a.shape[1], b.shape[0]) if adapter.fan_in_fan_out else (b.shape[0], a.shape[1])
            if tuple(target.shape) != shape:
                return f"adapter {adapter.name!r}: B @ A for {name!r} is {list(shape)}, the model's weight is {list(target.shape)}"
            module = self.model.get_submodule(name.removesuffix(".weight"))
            if not (isinstance(module, torch.nn.Linear) or adapter.fan_in_fan_out and type(module).__name__ == "Conv1D"):
                return f"adapter {adapter.name!r}: {name!r} belongs to a {type(module).__name__}, not a linear layer"
        return None

    def load_adapter(self, adapter: LoraAdapter) -> None:
        """Serve an already-checked adapter (none may be loaded): refill the hooks of the one before when it
        has the same targets, shapes and scale, else hook the model anew and capture the decode graphs again
        (they replay the hooks they were captured with)."""
        assert self.adapter is None, "unload the current adapter first"
        if self._lora is not None and self._lora.fits(adapter):
            self._lora.fill(adapter)
        else:
            if self._lora is not None:
                self._lora.remove()
            self._lora = ServedLora(self.model, adapter)
            if self.compiled is not None:
                logger.warning("LoRA adapter %s: decode steps run the eager layers from now on (--enable-torch-compile)", adapter.name)
            if self.graphs is not None:
                self.graphs = None
                self._capture_graphs()
        self.adapter = LoraAdapter(adapter.name, adapter.source, adapter.scaling, self._lora.pairs, adapter.fan_in_fan_out)
        self.weight_generation += 1
        logger.info("LoRA adapter %s applied to %d weights", adapter.name, len(adapter.pairs))

    def unload_adapter(self) -> None:
        """Serve the base weights again (the hooks stay, adding zeros, for the next load to refill)."""
        assert self._lora is not None, "no adapter is loaded"
        self._lora.clear()
        self.adapter = None
        self.weight_generation += 1

    # ---- memory -------------------------------------------------------------------------------

    def release(self, tags: Iterable[str]) -> None:
        """Free the accelerator memory of `tags`. Weights move to host memory (the only place they can
        survive until resume); the KV pool (emptied by the scheduler before this runs) and the CUDA
        graphs, which point at both, are dropped and rebuilt at resume."""
        tags = set(tags)
        self._targets = None
        if "kv_cache" in tags:
            self._drop_cache()
        if "weights" in tags and "weights" not in self.released_tags and self.device.type == "cuda":
            self.graphs = None
            self.model.to("cpu")
            self._move_adapter(torch.device("cpu"))
        self.released_tags |= tags
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _move_adapter(self, device: torch.device) -> None:
        """The adapter's factors follow the model's weights."""
        if self._lora is not None:
            self._lora.to(device)
            if self.adapter is not None:
                self.adapter.pairs = self._lora.pairs

    def resume(self, tags: Iterable[str]) -> None:
        tags = set(tags)
        self._targets = None
        if "weights" in tags and "weights" in self.released_tags and self.device.type == "cuda":
            self.model.to(self.device)
            self._move_adapter(self.device)
        self.released_tags -= tags
        if "weights" in self.released_tags:
            return
        if self.pool is None and "kv_cache" not in self.released_tags:
            self._build_cache()
        elif self.pool is not None and self.graphs is None:
            self._capture_graphs()


def _ignored_here(options: EngineOptions, device: torch.device, graphs_possible: bool) -> list[str]:
    """The flags given that mean nothing on this device (no GPU memory to share, no CUDA graphs)."""
    ignored = []
    if device.type == "cuda" and options.disable_overlap_schedule:
        ignored.append("--disable-overlap-schedule (decode steps run serially on CUDA already; --enable-overlap-schedule overlaps them)")
    if device.type != "cuda" and options.enable_overlap_schedule:
        ignored.append("--enable-overlap-schedule (a CPU engine overlaps decode steps already)")
    if device.type != "cuda" and options.mem_fraction_static is not None:
        ignored.append(f"--mem-fraction-static {options.mem_fraction_static} (the pool is sized by --max-total-tokens)")
    if not graphs_possible:
        if options.cuda_graph_max_bs is not None:
            ignored.append(f"--cuda-graph-max-bs {options.cuda_graph_max_bs} (no CUDA graphs without CUDA and Triton)")
        if options.disable_cuda_graph:
            ignored.append("--disable-cuda-graph (no CUDA graphs without CUDA and Triton)")
    return ignored


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
