"""rl-convert between Hugging Face and Megatron torch_dist, and rl-sft through the Megatron backend, in this
process (world size 1 over gloo; megatron-core is imported once for the file)."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rl_apps import convert, sft
from rl_apps.metrics import read_metrics

pytestmark = pytest.mark.timeout(300)
TOY = Path(__file__).parent / "data" / "sft_toy.jsonl"


def without_weights(model_dir: Path, out: Path) -> Path:
    """The model's config and tokenizer alone: a conversion from it can only take its weights from the checkpoint."""
    out.mkdir()
    for path in model_dir.iterdir():
        if not path.name.endswith(".safetensors"):
            shutil.copy2(path, out / path.name)
    return out


def test_hf_to_torch_dist_and_back_is_bit_exact(tiny_task, tmp_path):
    model = tiny_task / "model"
    convert.main(["--hf-checkpoint", str(model), "--save", str(tmp_path / "torch_dist")])
    assert (tmp_path / "torch_dist" / "metadata.json").is_file()
    origin = without_weights(model, tmp_path / "origin")
    convert.main(["--hf-checkpoint", str(origin), "--load", str(tmp_path / "torch_dist"), "--save-hf", str(tmp_path / "hf")])
    original, back = load_file(model / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert original.keys() == back.keys()
    for name in original:
        assert back[name].dtype == original[name].dtype and torch.equal(back[name], original[name]), name
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == (model / "tokenizer.json").read_text()


def test_rl_sft_trains_through_megatron_and_its_checkpoint_converts_to_the_weights_it_exported(tiny_task, tmp_path):
    model = tiny_task / "model"
    sft.main(["--hf-checkpoint", str(model), "--prompt-data", str(TOY), "--train-backend", "megatron",
              "--global-batch-size", "12", "--micro-batch-size", "6", "--lr", "3e-3", "--train-device", "cpu",
              "--output-dir", str(tmp_path / "run"), "--no-use-tensorboard", "--save", str(tmp_path / "ckpt"),
              "--save-hf", str(tmp_path / "hf")])
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    origin = without_weights(model, tmp_path / "origin")
    convert.main(["--hf-checkpoint", str(origin), "--load", str(tmp_path / "ckpt"), "--save-hf", str(tmp_path / "conv")])
    exported, converted = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "conv" / "model.safetensors")
    initial = load_file(model / "model.safetensors")
    assert exported.keys() == converted.keys() == initial.keys()
    assert all(torch.equal(exported[k], converted[k]) for k in exported)
    assert not torch.equal(exported["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
