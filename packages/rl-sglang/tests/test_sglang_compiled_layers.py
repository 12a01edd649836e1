"""`--enable-torch-compile`: the decoder layers compiled once for every layer and decode batch size,
with the engine's attention as one opaque op, against the eager layers of the same engine."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from transformers import AutoModelForCausalLM, Qwen3Config

from rl_sglang import conformance
from rl_sglang.embedded.__main__ import options_from_args, parse_args
from rl_sglang.embedded.model_runner import ModelRunner
from rl_sglang.embedded.options import EngineOptions
from rl_sglang.launcher import build_embedded_argv

PROMPTS = [[3, 4, 5], [7, 8], [9, 10, 11, 12], [13], [1, 2], [5], [6, 7, 8]]


def _config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.5, tie_word_embeddings=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config()).save_pretrained(folder)
    return folder


class CountingBackend:
    """aot_eager (the graph traced through AOTAutograd, run eagerly) that keeps every graph it is given."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)


def _decode_logprobs(runner: ModelRunner, batch_sizes: list[int]) -> list[torch.Tensor]:
    """Prefill PROMPTS, then one decode step per batch size (the first rows) with fixed next tokens, as the
    scheduler feeds them; the log-softmax of each step's logits."""
    pool = runner.pool
    rows = [pool.take_row() for _ in PROMPTS]
    slots = pool.allocator.alloc(sum(len(p) for p in PROMPTS))
    for row, prompt, taken in zip(rows, PROMPTS, slots.split([len(p) for p in PROMPTS])):
        pool.assign(torch.tensor([row] * len(prompt)), torch.arange(len(prompt)), taken)
    runner.extend(rows, [0] * len(rows), PROMPTS, slots, [], [])
    positions = [len(p) for p in PROMPTS]
    last = [p[-1] for p in PROMPTS]
    out = []
    with torch.inference_mode():
        for n in batch_sizes:
            logits = runner._decode_logits(rows[:n], positions[:n], last[:n], pool.allocator.alloc(n))
            out.append(torch.log_softmax(logits.double(), dim=-1))
            positions[:n] = [p + 1 for p in positions[:n]]
            last[:n] = [(t * 7 + 3) % 64 for t in last[:n]]  # the same next tokens for every runner compared
    return out


def test_compiled_decode_layers_equal_the_eager_ones_with_one_graph_for_all_layers_and_batch_sizes(qwen3_dir, caplog):
    torch._dynamo.reset()
    backend = CountingBackend()
    options = EngineOptions(max_total_tokens=2048, enable_torch_compile=True, torch_compile_max_bs=6)
    with caplog.at_level(logging.INFO, logger="rl_sglang.embedded.model_runner"):
        compiled = ModelRunner(str(qwen3_dir), device="cpu", options=options, compile_backend=backend)
    assert any("torch.compile of 2 decoder layers for decode batches 2..6" in r.message for r in caplog.records)
    assert len(backend.graphs) == 1  # compiled at start, before any request
    eager = ModelRunner(str(qwen3_dir), device="cpu", options=EngineOptions(max_total_tokens=2048))
    sizes = [6, 5, 2, 4, 1, 7]  # 1 and 7 (> --torch-compile-max-bs) run the eager layers
    try:
        got, expected = _decode_logprobs(compiled, sizes), _decode_logprobs(eager, sizes)
        for g, e in zip(got, expected):
            assert (g - e).abs().max().item() < 1e-5
        assert len(backend.graphs) == 1  # the same graph served both layers and batches 2..6
        targets = {node.target for node in backend.graphs[0].graph.nodes}
        assert torch.ops.rl_sglang.layer_attention.default in targets  # attention is one opaque op in it
    finally:
        torch._dynamo.reset()


def test_the_compile_flags_reach_the_engine_and_bad_values_are_refused():
    args = parse_args(["--model-path", "m", "--port", "1", "--enable-torch-compile", "--torch-compile-max-bs", "64"])
    options = options_from_args(args)
    assert options.enable_torch_compile and options.torch_compile_max_bs == 64
    argv = build_embedded_argv("m", "127.0.0.1", 1, {"enable_torch_compile": True, "torch_compile_max_bs": 64})
    assert argv[-3:] == ["--enable-torch-compile", "--torch-compile-max-bs", "64"]  # --sglang-* passed on, not skipped
    assert conformance.argv_problems(argv[3:]) == []  # SGLang's own flag names and arities
    with pytest.raises(ValueError, match="--torch-compile-max-bs 8 has no effect without --enable-torch-compile"):
        EngineOptions(torch_compile_max_bs=8)
    with pytest.raises(ValueError, match="--torch-compile-max-bs must be >= 2, got 1"):
        EngineOptions(enable_torch_compile=True, torch_compile_max_bs=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_compiled_layers_under_cuda_graphs_decode_as_the_eager_engine(qwen3_dir):
    torch._dynamo.reset()
    common = dict(max_total_tokens=4096, cuda_graph_max_bs=8)
    compiled = ModelRunner(str(qwen3_dir), device="cuda", dtype="bfloat16", max_running_requests=16,
                           options=EngineOptions(**common, enable_torch_compile=True, torch_compile_max_bs=4))  # fmt: skip
    eager = ModelRunner(str(qwen3_dir), device="cuda", dtype="bfloat16", max_running_requests=16,
                        options=EngineOptions(**common, disable_cuda_graph=True))  # fmt: skip
    assert compiled.graphs is not None and compiled.compile_seconds is not None
    sizes = [4, 3, 2, 6, 1]  # graph buckets 4 and 2 compiled; 6 (bucket 8) and 1 eager layers
    for got, expected in zip(_decode_logprobs(compiled, sizes), _decode_logprobs(eager, sizes)):
        # the rounding of one bf16 forward: this model's bf16 and fp32 probabilities differ by up to 0.018
        assert (got.exp() - expected.exp()).abs().max().item() < 0.05
        top = expected.argmax(-1, keepdim=True)
        assert (got.gather(1, top) - expected.gather(1, top)).abs().max().item() < 0.1
    torch._dynamo.reset()
