"""The packed-attention op (`rl_fsdp::packed_attention`) against per-sample SDPA in float64, and inside a
compiled decoder layer: one graph, no recompilation when the packed length changes, the eager results."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import AutoModelForCausalLM

from rl_core.micro_batches import make_micro_batch
from rl_core.train_batch import TrainBatch
from rl_fsdp.log_probs import model_inputs
from rl_fsdp.model_loading import enable_activation_checkpointing, mark_tokens_dynamic
from rl_fsdp.packed_attention import packed_samples, use_packed_attention


def packed_row(lengths: list[int]):
    """A packed micro-batch of samples of these lengths (what opens their layout)."""
    batch = TrainBatch(tokens=[[1] * n for n in lengths], response_lengths=[1] * len(lengths),
                       loss_masks=[[1]] * len(lengths), advantages=[[0.0]] * len(lengths))
    return make_micro_batch(batch, list(range(len(lengths))), torch.device("cpu"), pack=True)


def qkv(tokens: int, query_heads: int = 4, kv_heads: int = 2, dim: int = 8):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, h, tokens, dim, generator=gen, dtype=torch.float64, requires_grad=True)
            for h in (query_heads, kv_heads, kv_heads)]


def per_sample_sdpa(query, key, value, lengths, scaling):
    """[1, N, Hq, D]: each sample alone through causal SDPA."""
    outs, start = [], 0
    for n in lengths:
        piece = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(query[:, :, piece], key[:, :, piece], value[:, :, piece],
                                                   is_causal=True, scale=scaling, enable_gqa=True))
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2)


def test_the_op_and_its_gradients_equal_per_sample_sdpa_in_float64():
    lengths = [3, 3, 5, 2, 2, 4]  # runs of equal lengths beside different ones
    query, key, value = qkv(sum(lengths))
    weights = torch.randn(1, sum(lengths), 4, 8, dtype=torch.float64)
    with packed_samples(packed_row(lengths)):
        got = torch.ops.rl_fsdp.packed_attention(query, key, value, 0.3, None)
        got_grads = torch.autograd.grad((got * weights).sum(), (query, key, value))
    want = per_sample_sdpa(query, key, value, lengths, 0.3)
    want_grads = torch.autograd.grad((want * weights).sum(), (query, key, value))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_the_op_passes_gradcheck_and_torch_librarys_opcheck():
    lengths = [2, 3]
    query, key, value = qkv(sum(lengths), query_heads=2, kv_heads=1, dim=3)
    with packed_samples(packed_row(lengths)):
        assert torch.autograd.gradcheck(lambda q, k, v: torch.ops.rl_fsdp.packed_attention(q, k, v, None, None),
                                        (query, key, value))
        # Schema, fake (meta) implementation against the real one, autograd registration, AOT tracing.
        torch.library.opcheck(torch.ops.rl_fsdp.packed_attention.default, (query, key, value, None, None))


def test_a_backward_pass_outside_the_packed_layout_is_refused():
    query, key, value = qkv(5)
    with packed_samples(packed_row([2, 3])):
        out = torch.ops.rl_fsdp.packed_attention(query, key, value, None, None)
    with pytest.raises(RuntimeError, match="no packed layout is open"):
        out.sum().backward()


def test_a_model_with_attention_dropout_is_refused(tied_dir):
    model = AutoModelForCausalLM.from_pretrained(tied_dir, dtype=torch.float64, attention_dropout=0.1)
    with pytest.raises(ValueError, match="attention_dropout"):
        use_packed_attention(model)


def forward_backward(model, mb):
    """Logits and every parameter's gradient of a packed forward and backward pass."""
    model.zero_grad()
    with packed_samples(mb):
        logits = model(**model_inputs(mb)).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("recompute", [False, True])
def test_compiled_decoder_layers_are_one_graph_for_every_packed_length_and_equal_eager(tied_dir, make_batch, recompute):
    model = AutoModelForCausalLM.from_pretrained(tied_dir, dtype=torch.float64)
    use_packed_attention(model)
    if recompute:  # the backward pass runs each layer's forward (and the op) again
        enable_activation_checkpointing(model)
    model.train()
    batch = make_batch(5, seed=3)
    micro_batches = [make_micro_batch(batch, indices, torch.device("cpu"), pack=True) for indices in ([0, 1, 2], [3, 4])]
    assert micro_batches[0].input_ids.shape[1] != micro_batches[1].input_ids.shape[1]
    # Then one sample padded (no layout open): a [1, L] row as the packed graph takes, which must not reuse it.
    micro_batches.append(make_micro_batch(batch, [2], torch.device("cpu")))
    eager = [forward_backward(model, mb) for mb in micro_batches]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # dynamo and AOT autograd (the op's fake and backward), no codegen
    for layer in model.model.layers:
        layer.forward = torch.compile(layer.forward, backend=counter)
        layer.register_forward_pre_hook(mark_tokens_dynamic, with_kwargs=True)
    try:
        compiled = [forward_backward(model, mb) for mb in micro_batches]
    finally:
        torch._dynamo.reset()
    # One frame for both packed lengths: no graph break in a layer (it would add resume frames), no recompilation
    # for the second length (the token dimension was dynamic from the start), the layers share it; one more for
    # the padded row.
    assert counter.frame_count == 2
    for (want_logits, want_grads), (got_logits, got_grads) in zip(eager, compiled):
        torch.testing.assert_close(got_logits, want_logits, atol=1e-12, rtol=0)
        for got, want in zip(got_grads, want_grads):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_sharding_compiled_layers_lets_dynamo_keep_every_variant_a_process_compiles(tied_dir):
    """Grad mode x checkpointing x packed-or-padded rows, for each model sharing the layer's code: eight variants,
    dynamo's default limit, were reached by one process of the GPU tests, and the rest ran eagerly."""
    from rl_fsdp.distributed import join_world
    from rl_fsdp.model_loading import RECOMPILE_LIMIT, shard_model

    world = join_world("cpu")
    try:
        with torch._dynamo.config.patch(recompile_limit=8):  # restored on exit, for the tests after this one
            shard_model(AutoModelForCausalLM.from_pretrained(tied_dir), world.mesh, torch.float32, compile_layers=True)
            assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT >= 2 * 2 * 2 * 3
    finally:
        world.leave()
