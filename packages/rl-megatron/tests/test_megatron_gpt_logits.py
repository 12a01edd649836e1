"""The mapping is checked against megatron-core itself: a GPTModel (local layer spec) on CPU must give the
same logits as the Hugging Face model it was mapped from, and the reverse.

megatron-core 0.16 runs this forward on CPU with three accommodations, none of which touch the maths:
- `RotaryEmbedding.get_emb` moves `inv_freq` to `torch.cuda.current_device()` unconditionally, so that
  call is pointed at "cpu" for the duration of the test;
- its default causal mask is built with `device="cuda"`, so the causal mask is passed in explicitly;
- attention dropout runs under the CUDA RNG tracker's `fork()`, so the inference tracker (a no-op fork)
  is installed; dropout is 0 anyway.
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.random import initialize_rng_tracker
from megatron.core.transformer.transformer_config import TransformerConfig

from rl_megatron import TransformerShape, hf_to_megatron, megatron_to_hf

SEQ_LEN = 9


@pytest.fixture(scope="module")
def model_parallel_world_of_one():
    created = not dist.is_initialized()
    if created:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    yield
    initialize_rng_tracker(force_reset=True)
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


@pytest.fixture
def cpu_rotary(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")


def _rope_theta(hf_config) -> float:
    rope_parameters = getattr(hf_config, "rope_parameters", None)
    return rope_parameters["rope_theta"] if rope_parameters else hf_config.rope_theta


def _megatron_gpt(hf_config, shape: TransformerShape) -> GPTModel:
    config = TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_key_value_heads,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=shape.vocab_size,
        max_sequence_length=64,
        position_embedding_type="rope",
        rotary_base=_rope_theta(hf_config),
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
    ).eval()


def _load_mcore(model: GPTModel, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == []
    assert all(name.endswith("_extra_state") for name in missing), missing


def _mcore_logits(model: GPTModel, input_ids: torch.Tensor) -> torch.Tensor:
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq).expand(batch, seq)
    causal_mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)[None, None]  # True = masked out
    with torch.no_grad():
        return model(input_ids=input_ids, position_ids=position_ids, attention_mask=causal_mask)


def _hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _input_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("model_fixture", ["qwen2_model", "llama_model"])
def test_megatron_gpt_with_mapped_hf_weights_gives_hf_logits(
    model_fixture, request, model_parallel_world_of_one, cpu_rotary
):
    hf_model = request.getfixturevalue(model_fixture)
    shape = TransformerShape.from_hf_config(hf_model.config)
    mcore_model = _megatron_gpt(hf_model.config, shape)
    _load_mcore(mcore_model, hf_to_megatron(hf_model.state_dict(), shape))

    input_ids = _input_ids(shape.vocab_size)
    expected = _hf_logits(hf_model, input_ids)
    assert expected.std() > 0.1  # a real signal, not near-constant logits
    torch.testing.assert_close(_mcore_logits(mcore_model, input_ids), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_fixture", ["qwen2_model", "llama_model"])
def test_hf_model_with_weights_exported_from_megatron_gives_megatron_logits(
    model_fixture, request, model_parallel_world_of_one, cpu_rotary
):
    hf_model = request.getfixturevalue(model_fixture)
    shape = TransformerShape.from_hf_config(hf_model.config)
    torch.manual_seed(3)
    mcore_model = _megatron_gpt(hf_model.config, shape)  # megatron's own random init
    with torch.no_grad():
        for param in mcore_model.parameters():
            param.add_(0.1 * torch.randn_like(param))  # norm scales and qkv bias are constant at init

    missing, unexpected = hf_model.load_state_dict(megatron_to_hf(mcore_model.state_dict(), shape), strict=False)
    assert (missing, unexpected) == (["lm_head.weight"] if shape.tie_word_embeddings else [], [])
    if shape.tie_word_embeddings:
        assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()

    input_ids = _input_ids(shape.vocab_size)
    torch.testing.assert_close(
        _hf_logits(hf_model, input_ids), _mcore_logits(mcore_model, input_ids), atol=1e-4, rtol=1e-4
    )
