"""`rl-convert`: Hugging Face <-> Megatron torch_dist, and a trained checkpoint of either backend -> Hugging Face.

    rl-convert --hf-checkpoint HF --save OUT        HF -> Megatron torch_dist (model only, any later TP/PP layout)
    rl-convert --hf-checkpoint HF --load CKPT --save-hf OUT
        CKPT (a torch_dist folder, an FSDP or Megatron checkpoint of rl-train/rl-sft: the --save folder, one of
        its rollout_<k>/step_<k> folders or their policy/) -> HF folder (config.json, tokenizer files of HF,
        model.safetensors); HF gives the architecture and tokenizer.

Runs as one process; under torchrun (RANK/WORLD_SIZE set) every rank takes part and rank 0 writes.
Flags are parsed before torch is imported; bad input is named before a model is built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Mapping, Sequence

from pydantic import model_validator

from rl_apps.cli import parse_config
from rl_apps.train import InputError, exit_on_failure
from rl_core.config import Section

if TYPE_CHECKING:
    from rl_core.protocols import TrainingBackend
    from rl_megatron import MegatronBackend


class ConvertConfig(Section):
    help_section: ClassVar[str] = "checkpoints"

    hf_checkpoint: Path | None = None
    """Hugging Face model folder: the weights to convert (with --save), else the architecture and tokenizer."""
    load: Path | None = None
    """Checkpoint to write as a Hugging Face folder (with --save-hf)."""
    save: Path | None = None
    """Write --hf-checkpoint's weights here as a Megatron torch_dist checkpoint (slime's convert_hf_to_torch_dist)."""
    save_hf: Path | None = None
    """Write --load's policy here as a Hugging Face folder (slime's convert_torch_dist_to_hf)."""
    train_device: Literal["auto", "cpu", "cuda"] = "cpu"
    """Where the model is built for the conversion."""

    @model_validator(mode="after")
    def _one_direction(self) -> ConvertConfig:
        if self.hf_checkpoint is None:
            raise ValueError("missing required flag: --hf-checkpoint")
        to_megatron = self.save is not None and self.load is None and self.save_hf is None
        to_hf = self.load is not None and self.save_hf is not None and self.save is None
        if not (to_megatron or to_hf):
            raise ValueError(
                "give either --save (HF -> Megatron torch_dist) or --load with --save-hf (checkpoint -> HF), not "
                + (" ".join(f"--{n.replace('_', '-')}" for n in ("load", "save", "save_hf") if getattr(self, n)) or "neither")
            )
        return self

    @property
    def hf_folder(self) -> Path:
        """--hf-checkpoint, which the validator requires."""
        assert self.hf_checkpoint is not None, "ConvertConfig's validator requires --hf-checkpoint"
        return self.hf_checkpoint


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(ConvertConfig, argv, "rl-convert", __doc__.splitlines()[0])
    exit_on_failure("rl-convert", lambda: run(config))


def checkpoint_folder(load: Path) -> tuple[Path, Literal["fsdp", "megatron"]]:
    """The model checkpoint under --load and the backend that wrote it (a Megatron dist_checkpointing folder
    has metadata.json; torch.distributed.checkpoint's FSDP one only .metadata)."""
    folder = Path(load)
    if (folder / "latest").is_file():
        folder = folder / (folder / "latest").read_text().strip()
    if (folder / "policy").is_dir():
        folder = folder / "policy"
    if (folder / "metadata.json").is_file():
        return folder, "megatron"
    if (folder / ".metadata").is_file():
        return folder, "fsdp"
    raise InputError(
        f"--load {load}: no checkpoint in {folder} (neither a Megatron torch_dist metadata.json nor an FSDP .metadata)"
    )


def _param_dtype(hf_checkpoint: Path) -> str:
    """The compute dtype that holds the HF weights exactly: bfloat16 for a bfloat16 model, else float32."""
    config = json.loads((hf_checkpoint / "config.json").read_text())
    return "bfloat16" if (config.get("dtype") or config.get("torch_dtype")) == "bfloat16" else "float32"


def check_inputs(config: ConvertConfig) -> Literal["fsdp", "megatron"]:
    hf = Path(config.hf_folder)
    if not (hf / "config.json").is_file():
        raise InputError(f"--hf-checkpoint {hf}: no config.json in that folder")
    if config.load is None:
        if not any(hf.glob("*.safetensors")):
            raise InputError(f"--hf-checkpoint {hf}: no *.safetensors weights to convert")
        kind: Literal["fsdp", "megatron"] = "megatron"
    else:
        _, kind = checkpoint_folder(config.load)
    if kind == "megatron":
        from rl_megatron import MegatronConfig, check_config, read_hf_config

        try:
            check_config(MegatronConfig(model_path=hf), read_hf_config(hf), world_size=int(os.environ.get("WORLD_SIZE", "1")))
        except ValueError as e:
            raise InputError(f"--hf-checkpoint {hf}: {e}") from None
    return kind


def run(config: ConvertConfig) -> Path:
    """Convert; returns the folder written."""
    kind = check_inputs(config)
    hf = Path(config.hf_folder)
    common = dict(model_path=hf, device=config.train_device, param_dtype=_param_dtype(hf))
    if config.load is None:
        assert config.save is not None, "ConvertConfig's validator requires --save without --load"
        megatron = _megatron_backend(common)
        try:
            megatron.save(str(config.save), with_optimizer=False)
        finally:
            megatron.close()
        out = Path(config.save)
    else:
        from rl_apps.hf_export import save_hf

        assert config.save_hf is not None, "ConvertConfig's validator requires --save-hf with --load"
        if kind == "megatron":
            backend: TrainingBackend = _megatron_backend(common)
        else:
            from rl_fsdp import FSDPConfig
            from rl_fsdp import build_backend as build_fsdp

            backend = build_fsdp(FSDPConfig(**{**common, "param_dtype": "float32"}))
        try:
            backend.load(str(checkpoint_folder(config.load)[0]))
            save_hf(backend, config.save_hf, hf, writer=int(os.environ.get("RANK", "0")) == backend.result_rank)
        finally:
            backend.close()
        out = Path(config.save_hf)
    print(f"rl-convert: wrote {out}", flush=True)
    return out


def _megatron_backend(common: Mapping[str, object]) -> MegatronBackend:
    from rl_megatron import MegatronConfig, build_backend

    # A converted or trained checkpoint may come from another layout; its optimizer is of no use here.
    return build_backend(MegatronConfig(**common, no_load_optim=True))


if __name__ == "__main__":
    main()
