"""rl-sft on the shipped toy set (tests/data/sft_toy.jsonl: chat additions, some multi-turn, some with a system
turn) with the FSDP backend in this process; rl-convert of its checkpoint; bad input refused up front."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rl_apps import convert, sft
from rl_apps.metrics import read_metrics

TOY = Path(__file__).parent / "data" / "sft_toy.jsonl"


def assistant_nll(model_dir: Path) -> float:
    """Token-mean NLL of the toy set's assistant tokens under a plain Hugging Face forward pass."""
    from transformers import AutoModelForCausalLM

    from rl_core.sft_data import load_sft_examples
    from rl_sglang.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in load_sft_examples(TOY, load_tokenizer(model_dir)):
            ids = torch.tensor([e.tokens])
            log_probs = torch.log_softmax(model(ids).logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
            mask = torch.tensor(e.loss_mask, dtype=torch.float64)
            total -= float((log_probs[-e.response_length :] * mask).sum())
            count += int(mask.sum())
    return total / count


def flags(tiny_task, out, *extra):
    return ["--hf-checkpoint", str(tiny_task / "model"), "--prompt-data", str(TOY), "--global-batch-size", "12",
            "--micro-batch-size", "12", "--lr", "3e-3", "--train-device", "cpu", "--output-dir", str(out),
            "--no-use-tensorboard", *map(str, extra)]


def test_rl_sft_lowers_the_loss_and_its_checkpoint_converts_to_the_weights_it_exported(tiny_task, tmp_path):
    ckpt, hf = tmp_path / "ckpt", tmp_path / "hf"
    sft.main(flags(tiny_task, tmp_path / "run", "--num-epoch", 2, "--rollout-shuffle", "--save", ckpt,
                   "--save-interval", 3, "--save-hf", f"{hf}/step_{{rollout_id}}"))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(6))  # 36 rows / 12 per step x 2 epochs
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.5
    # Measured apart from the trainer: the exported model's NLL of the assistant tokens fell.
    before, after = assistant_nll(tiny_task / "model"), assistant_nll(hf / "step_5")
    assert after < before - 0.5
    assert (ckpt / "latest").read_text().strip() == "step_000005" and (hf / "step_2" / "config.json").is_file()

    convert.main(["--hf-checkpoint", str(tiny_task / "model"), "--load", str(ckpt), "--save-hf", str(tmp_path / "conv")])
    exported, converted = load_file(hf / "step_5" / "model.safetensors"), load_file(tmp_path / "conv" / "model.safetensors")
    assert exported.keys() == converted.keys() == load_file(tiny_task / "model" / "model.safetensors").keys()
    assert all(torch.equal(exported[k], converted[k]) for k in exported)

    # Resumed from step 2 (Adam state and step count included), the run ends on the same weights.
    shutil.rmtree(ckpt / "step_000005")
    (ckpt / "latest").write_text("step_000002\n")
    sft.main(flags(tiny_task, tmp_path / "resumed", "--num-epoch", 2, "--rollout-shuffle", "--load", ckpt,
                   "--save-hf", tmp_path / "resumed_hf"))
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == [3, 4, 5]
    resumed = load_file(tmp_path / "resumed_hf" / "model.safetensors")
    for name in exported:
        torch.testing.assert_close(resumed[name], exported[name], rtol=0, atol=1e-6)


def test_bad_rows_and_flags_are_refused_before_training(tiny_task, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(TOY.read_text().splitlines()[0] + "\n" + '{"messages": [{"role": "user", "content": "1"}]}\n')
    with pytest.raises(SystemExit, match=rf"rl-sft: error: {bad}:2: 'messages' has no assistant message"):
        sft.main(flags(tiny_task, tmp_path / "run", "--prompt-data", bad))
    with pytest.raises(SystemExit):
        sft.main(flags(tiny_task, tmp_path / "run", "--tensor-model-parallel-size", 2))
    assert "--tensor-model-parallel-size: megatron-core flag(s), which need --train-backend megatron" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--load .*: no checkpoint in"):
        convert.main(["--hf-checkpoint", str(tiny_task / "model"), "--load", str(tmp_path), "--save-hf", str(tmp_path / "o")])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("module, flag", [("rl_apps.sft", "--num-epoch"), ("rl_apps.convert", "--save-hf")])
def test_help_answers_without_importing_torch(module, flag):
    import subprocess
    import sys

    code = (f"import sys, runpy; sys.argv=['x','--help']\ntry:\n runpy.run_module({module!r}, run_name='__main__')\n"
            "except SystemExit: pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert flag in out.stdout and out.stdout.strip().endswith("False")


def test_rl_train_takes_slimes_loss_type_and_refuses_policy_loss_flags_beside_sft_loss(tiny_task, run_cli):
    from rl_apps.train_config import TrainConfig

    base = ["--hf-checkpoint", str(tiny_task / "model"), "--prompt-data", str(tiny_task / "train.jsonl"), "--rm-type", "math"]
    code, err = run_cli(base + ["--loss-type", "sft_loss", "--use-kl-loss", "--kl-loss-coef", "0.1"])
    assert code == 2 and "--use-kl-loss, --kl-loss-coef: shape advantages or the policy loss" in err
    config = TrainConfig(hf_checkpoint=tiny_task / "model", prompt_data=tiny_task / "train.jsonl", rm_type="math",
                         loss_type="sft_loss")
    assert type(config.sft_loss()).__name__ == "SFTLoss" and not config.backend_config("policy").ref_model
