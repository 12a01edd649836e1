"""`FSDPBackend`: rl-core's TrainingBackend on FSDP2, one optimizer step per global batch."""

from __future__ import annotations

import contextlib
import copy
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from peft import PeftModel
from torch import nn

from rl_core.losses import TrainLoss
from rl_core.micro_batches import MicroBatch, batch_denominators, loss_inputs, planned_micro_batches, validate_batch
from rl_core.protocols import ForwardModel
from rl_core.train_batch import TrainBatch
from rl_fsdp.checkpoint import load_training_state, save_training_state
from rl_fsdp.config import FSDPConfig
from rl_fsdp.distributed import join_world
from rl_fsdp.log_probs import response_log_probs
from rl_fsdp.lora import adapter_config, adapter_weights, merged_weights, wrap_with_lora, write_adapter
from rl_fsdp.model_loading import enable_activation_checkpointing, load_hf_model, shard_model, tied_aliases
from rl_fsdp.packed_attention import packed_samples, use_packed_attention
from rl_fsdp.training import clip_and_step, gather_per_token, make_optimizer, sum_over_ranks
from rl_fsdp.value_head import ValueModel, response_values
from rl_fsdp.weights import gather_named_weights, write_hf_checkpoint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_STEPS_FILE = "backend_steps.json"


class FSDPBackend:
    """A Hugging Face causal LM (head "lm") or its body with a value head (head "value", PPO's critic),
    sharded over every rank of the default process group.

    Every rank is handed the same global batch and trains on samples rank::world_size; all public
    methods are collective, and every rank returns the full results (result_rank 0).

    With LoRA (config.lora_rank or lora_adapter_path) the model is wrapped by peft before sharding: only
    the adapters are trained and held by the optimizer, the reference is the same model with adapters off,
    and `weights()` yields the merged weights under the base model's names.
    """

    result_rank = 0

    def __init__(self, config: FSDPConfig) -> None:
        self.config = config
        causal_lm = load_hf_model(config.model_path, config.seed)
        causal_lm.config.use_cache = False
        if config.use_dynamic_batch_size:
            use_packed_attention(causal_lm)
        self.hf_config = causal_lm.config
        embedding_weight = causal_lm.get_input_embeddings().weight
        assert isinstance(embedding_weight, torch.Tensor), "a Hugging Face input embedding holds one weight tensor"
        self.vocab_size = embedding_weight.shape[0]
        self.tied_aliases = tied_aliases(causal_lm) if config.head == "lm" else {}
        self.lora = config.uses_lora
        copy_reference = config.ref_model and not self.lora
        reference = copy.deepcopy(causal_lm).requires_grad_(False).eval() if copy_reference else None
        layer_classes = set(causal_lm._no_split_modules or ())
        if config.gradient_checkpointing:
            enable_activation_checkpointing(causal_lm)
        model: nn.Module = causal_lm
        if self.lora:
            model = wrap_with_lora(causal_lm, config)
        if config.head == "value":
            model = ValueModel(causal_lm.base_model, causal_lm.config.hidden_size)
            del causal_lm
        # Joined once the model is built, so that a model or adapter that fails to load leaves no process group.
        self._world = join_world(config.device)
        self.device, self.rank, self.world_size = self._world.device, self._world.rank, self._world.size
        mesh = self._world.mesh
        param_dtype = _DTYPES[config.param_dtype]
        self.compiled = config.torch_compile and self.device.type == "cuda"
        """Decoder layers and log-probs through torch.compile (CUDA only: on a CPU it needs a C++ toolchain and
        buys little)."""
        self.model = shard_model(model, mesh, param_dtype, layer_classes, self.compiled)
        self.reference = (
            shard_model(reference, mesh, param_dtype, layer_classes, self.compiled) if reference is not None else None
        )
        self.optimizer = make_optimizer(self.model, config)
        self.steps = 0
        """Optimizer steps taken, which the learning-rate schedule reads; kept in checkpoints."""

    @contextlib.contextmanager
    def _reference(self) -> Iterator[nn.Module]:
        """The KL reference: the frozen copy, or with LoRA the policy's own modules with adapters off."""
        if self.reference is not None:
            yield self.reference
            return
        with self._peft().disable_adapter():
            yield self.model

    def _peft(self) -> PeftModel:
        """The policy as peft wrapped it: without a reference copy, and for the adapter, it is a LoRA one."""
        assert isinstance(self.model, PeftModel), "only a LoRA policy (a PeftModel) serves as its own reference"
        return self.model

    def _micro_batches(self, batch: TrainBatch, training: bool) -> list[MicroBatch]:
        validate_batch(batch, self.vocab_size)
        return planned_micro_batches(batch, self.rank, self.world_size, self.config.batching(training), self.device)

    def forward(self, batch: TrainBatch, model: ForwardModel = "policy") -> list[torch.Tensor]:
        """Log-probs of every sample's response tokens (values, for a value head), float32 on the CPU."""
        if model == "reference" and not self.config.ref_model:
            raise ValueError("forward(model='reference') needs the reference model: build the backend with ref_model=True")
        with self._reference() if model == "reference" else contextlib.nullcontext(self.model) as net:
            net.eval()
            if self.config.head == "value":
                compute = lambda mb: response_values(net, mb)  # noqa: E731
            else:
                temperature = self.config.rollout_temperature
                chunk = self.config.log_probs_chunk_size
                compiled = self.compiled
                compute = lambda mb: response_log_probs(  # noqa: E731
                    net, mb, temperature, False, chunk_size=chunk, compiled=compiled
                )[0]
            return gather_per_token(batch, self._micro_batches(batch, training=False), compute, self.device, self.world_size)

    def train_step(self, batch: TrainBatch, loss: TrainLoss) -> dict[str, float]:
        """One optimizer step of `loss` on the global batch; returns its global-batch metrics, grad_norm, lr."""
        self._check_loss(loss)
        micro_batches = self._micro_batches(batch, training=True)
        denominators = batch_denominators(batch)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        self.model.train()
        for mb in micro_batches:
            # Open through the backward pass too, which recomputes checkpointed layers' packed attention.
            with packed_samples(mb):
                value, metrics = loss(loss_inputs(mb, denominators, **self._outputs(mb, loss)))
                # The loss is this rank's share of the global-batch loss, so the single-process gradient is
                # the sum over ranks; FSDP averages instead (a sum-only divide factor needs PREMUL_SUM, which
                # gloo lacks), so scale by the world size.
                (value * self.world_size).backward()
            for key, metric in metrics.items():
                sums[key] += metric.float()
        result = sum_over_ranks(sums, self.world_size)
        self.steps += 1
        result.update(clip_and_step(self.model, self.optimizer, self.config, self.steps))
        return result

    def _check_loss(self, loss: TrainLoss) -> None:
        if self.config.head == "value" and loss.needs - {"values"}:
            raise ValueError(f"{type(loss).__name__} needs {sorted(loss.needs)}, but this backend has a value head")
        if self.config.head == "lm" and "values" in loss.needs:
            raise ValueError(f"{type(loss).__name__} needs values: train it on a backend with head='value'")
        if "ref_log_probs" in loss.needs and not self.config.ref_model:
            raise ValueError(f"{type(loss).__name__} needs the reference model: build the backend with ref_model=True")

    def _outputs(self, mb: MicroBatch, loss: TrainLoss) -> dict[str, torch.Tensor | None]:
        """The forward outputs `loss.needs` for one micro-batch, with gradients where they are trained."""
        if self.config.head == "value":
            return {"values": response_values(self.model, mb)}
        temperature, chunk = self.config.rollout_temperature, self.config.log_probs_chunk_size
        log_probs, entropy = response_log_probs(
            self.model, mb, temperature, "entropy" in loss.needs, entropy_grad=loss.entropy_grad, chunk_size=chunk,
            compiled=self.compiled,
        )
        outputs: dict[str, torch.Tensor | None] = {"log_probs": log_probs, "entropy": entropy}
        if "ref_log_probs" in loss.needs:
            with torch.no_grad(), self._reference() as reference:
                outputs["ref_log_probs"], _ = response_log_probs(
                    reference, mb, temperature, False, chunk_size=chunk, compiled=self.compiled
                )
        return outputs

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, full tensor) for every state-dict entry, on this rank's device (collective).

        Tied weights appear under both names (e.g. `model.embed_tokens.weight` and `lm_head.weight`),
        exactly as the unwrapped model's `state_dict()` lists them. With LoRA: the base model's names, each
        adapted weight merged (W + scale * B @ A), no adapter tensors.
        """
        return merged_weights(self.model) if self.lora else gather_named_weights(self.model)

    def adapter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """With LoRA: the adapter tensors alone under PEFT's names (those of adapter_model.safetensors), on
        this rank's device (collective); with `adapter_config()`, what an engine that keeps the base and
        loads adapters takes (SGLang's /load_lora_adapter_from_tensors)."""
        if not self.lora:
            raise ValueError("adapter_weights() needs LoRA: build the backend with lora_rank > 0 or lora_adapter_path")
        return adapter_weights(self.model)

    def adapter_config(self) -> dict[str, Any]:
        """With LoRA: the adapter's PEFT config, as adapter_config.json holds it."""
        if not self.lora:
            raise ValueError("adapter_config() needs LoRA: build the backend with lora_rank > 0 or lora_adapter_path")
        return adapter_config(self._peft())

    def save_adapter(self, directory: str | Path) -> None:
        """With LoRA: a PEFT adapter folder from rank 0 (collective), which `lora_adapter_path` and
        `PeftModel.from_pretrained` read."""
        tensors = {name: tensor.cpu().contiguous() for name, tensor in self.adapter_weights()}
        if self.rank == 0:
            write_adapter(Path(directory), tensors, self.adapter_config())
        dist.barrier()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a Hugging Face checkpoint (config, float32 safetensors, tokenizer files) from rank 0 (collective)."""
        directory = Path(directory)
        state = {}
        for name, tensor in self.weights():
            if self.rank == 0 and name not in self.tied_aliases:
                state[name] = tensor.cpu().contiguous()
        if self.rank == 0:
            write_hf_checkpoint(directory, state, self.hf_config, self.config.model_path)
        dist.barrier()

    def save(self, directory: str | Path) -> None:
        """Model and optimizer state of every rank into `directory`, to resume training from (collective)."""
        save_training_state(self.model, self.optimizer, directory)
        if self.rank == 0:
            (Path(directory) / _STEPS_FILE).write_text(json.dumps({"steps": self.steps}))

    def load(self, directory: str | Path) -> None:
        """Resume from a `save` directory (collective). The reference model stays the initial one."""
        load_training_state(self.model, self.optimizer, directory)
        steps_file = Path(directory) / _STEPS_FILE
        self.steps = json.loads(steps_file.read_text())["steps"] if steps_file.is_file() else 0

    def offload(self) -> None:
        """Parameters and optimizer state to the CPU, so a colocated engine can use the GPU memory."""
        self._move(torch.device("cpu"))

    def onload(self) -> None:
        self._move(self.device)

    def _move(self, device: torch.device) -> None:
        if self.device.type == "cpu":
            return  # nothing lives on an accelerator
        for module in (self.model, self.reference):
            if module is not None:
                module.to(device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                # Adam keeps its step counts on the CPU whatever the parameters' device.
                if key != "step" and isinstance(value, torch.Tensor) and value.device != device:
                    state[key] = value.to(device, non_blocking=True)
        if device.type == "cpu":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Free the model and optimizer; destroy the process group if this backend created it."""
        del self.model, self.reference, self.optimizer
        self._world.leave()


def build_backend(config: FSDPConfig) -> FSDPBackend:
    """The factory `--train-backend fsdp` selects."""
    return FSDPBackend(config)
