"""`FSDPBackend`: rl-core's TrainingBackend on FSDP2, one optimizer step per global batch."""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from rl_core.algorithms.policy_loss import LossDenominators, policy_loss
from rl_core.train_batch import TrainBatch

from rl_fsdp.checkpoint import load_training_state, save_training_state
from rl_fsdp.config import FSDPConfig
from rl_fsdp.distributed import join_world
from rl_fsdp.log_probs import response_log_probs
from rl_core.micro_batches import MicroBatch, rank_micro_batches, validate_batch
from rl_fsdp.model_loading import enable_activation_checkpointing, load_hf_model, shard_model, tied_aliases
from rl_fsdp.training import clip_and_step, gather_per_token, make_optimizer, sum_over_ranks
from rl_fsdp.weights import gather_named_weights, write_hf_checkpoint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class FSDPBackend:
    """A Hugging Face causal LM sharded over every rank of the default process group.

    Every rank is handed the same global batch and trains on samples rank::world_size; all public
    methods are collective.
    """

    def __init__(self, config: FSDPConfig) -> None:
        self.config = config
        self._world = join_world(config.device)
        self.device, self.rank, self.world_size = self._world.device, self._world.rank, self._world.size
        mesh = self._world.mesh

        model = load_hf_model(config.model_path, config.seed)
        model.config.use_cache = False
        self.hf_config = model.config
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.tied_aliases = tied_aliases(model)
        reference = copy.deepcopy(model).requires_grad_(False).eval() if config.keeps_reference else None
        if config.gradient_checkpointing:
            enable_activation_checkpointing(model)
        param_dtype = _DTYPES[config.param_dtype]
        self.model = shard_model(model, mesh, param_dtype)
        self.reference = shard_model(reference, mesh, param_dtype) if reference is not None else None
        self.optimizer = make_optimizer(self.model, config)

    def _micro_batches(self, batch: TrainBatch) -> list[MicroBatch]:
        validate_batch(batch, self.vocab_size)
        return rank_micro_batches(batch, self.rank, self.world_size, self.config.micro_batch_size, self.device)

    def compute_log_probs(self, batch: TrainBatch) -> list[torch.Tensor]:
        """Current-policy log-probs of every sample's response tokens (float32, CPU), on every rank."""
        return self._gather_log_probs(self.model, batch)

    def compute_ref_log_probs(self, batch: TrainBatch) -> list[torch.Tensor]:
        """Reference-model log-probs of every sample's response tokens (float32, CPU), on every rank; the
        loop folds the KL to them into the rewards (--kl-coef)."""
        if self.reference is None:
            raise ValueError(
                "compute_ref_log_probs needs the reference model, but this backend keeps none:"
                " set FSDPConfig.ref_model=True"
            )
        return self._gather_log_probs(self.reference, batch)

    def _gather_log_probs(self, model: torch.nn.Module, batch: TrainBatch) -> list[torch.Tensor]:
        model.eval()
        temperature = self.config.rollout_temperature
        forward = lambda mb: response_log_probs(model, mb, temperature, with_entropy=False)[0]  # noqa: E731
        return gather_per_token(batch, self._micro_batches(batch), forward, self.device, self.world_size)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on the global batch; returns global-batch means of the loss terms and, when the
        batch has rollout log-probs, of the train/rollout mismatch metrics (tis, ois, ...)."""
        if self.config.use_rollout_logprobs and batch.rollout_log_probs is None:
            raise ValueError("use_rollout_logprobs is set but the TrainBatch has no rollout_log_probs")
        if self.config.loss.use_tis and batch.rollout_log_probs is None:
            raise ValueError("loss.use_tis is set but the TrainBatch has no rollout_log_probs to weight by")
        micro_batches = self._micro_batches(batch)
        denominators = LossDenominators(
            num_tokens=float(sum(sum(mask) for mask in batch.loss_masks)), num_samples=float(len(batch))
        )
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        self.model.train()
        for mb in micro_batches:
            metrics = self._backward_micro_batch(mb, denominators)
            for key, value in metrics.items():
                sums[key] += value.float()
        result = sum_over_ranks(sums, self.world_size)
        result.update(clip_and_step(self.model, self.optimizer, self.config.clip_grad))
        return result

    def _backward_micro_batch(self, mb: MicroBatch, denominators: LossDenominators) -> dict[str, torch.Tensor]:
        """Forward, loss (this micro-batch's share of the global loss), backward; returns summable metrics."""
        temperature = self.config.rollout_temperature
        log_probs, entropy = response_log_probs(
            self.model, mb, temperature, with_entropy=True, entropy_grad=self.config.loss.entropy_coef != 0
        )
        # The old policy: the batch's, taken before the rollout's first step when the rollout is split
        # into several steps; else the engine's with use_rollout_logprobs; else this forward's, which is
        # the pre-update ("recomputed") policy since the weights do not change inside train_step.
        if mb.old_log_probs is not None:
            old_log_probs = mb.old_log_probs
        elif self.config.use_rollout_logprobs:
            old_log_probs = mb.rollout_log_probs
        else:
            old_log_probs = log_probs.detach()
        ref_log_probs = None
        if self.config.loss.use_kl_loss:
            with torch.no_grad():
                ref_log_probs, _ = response_log_probs(self.reference, mb, temperature, with_entropy=False)
        # Tokens outside the loss mask carry 0 in every log-prob, so no exp() there can overflow into NaN.
        on = mb.loss_mask > 0
        zero = lambda t: torch.where(on, t, torch.zeros_like(t))  # noqa: E731
        loss, metrics = policy_loss(
            self.config.loss,
            log_probs=zero(log_probs),
            old_log_probs=zero(old_log_probs),
            advantages=mb.advantages,
            mask=mb.loss_mask,
            denominators=denominators,
            ref_log_probs=None if ref_log_probs is None else zero(ref_log_probs),
            entropy=entropy,
            rollout_log_probs=None if mb.rollout_log_probs is None else zero(mb.rollout_log_probs),
        )
        # The loss is this rank's share of the global-batch loss, so the single-process gradient is the
        # sum over ranks; FSDP averages instead (a sum-only divide factor needs PREMUL_SUM, which gloo
        # lacks), so scale by the world size.
        (loss * self.world_size).backward()
        return metrics

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, full tensor) for every state-dict entry, on this rank's device (collective).

        Tied weights appear under both names (e.g. `model.embed_tokens.weight` and `lm_head.weight`),
        exactly as the unwrapped model's `state_dict()` lists them.
        """
        return gather_named_weights(self.model)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a Hugging Face checkpoint (config, float32 safetensors, tokenizer files) from rank 0 (collective)."""
        directory = Path(directory)
        state = {}
        for name, tensor in self.named_weights():
            if self.rank == 0 and name not in self.tied_aliases:
                state[name] = tensor.cpu().contiguous()
        if self.rank == 0:
            write_hf_checkpoint(directory, state, self.hf_config, self.config.model_path)
        dist.barrier()

    def save_checkpoint(self, directory: str | Path) -> None:
        """Model and optimizer state of every rank into `directory`, to resume training from (collective)."""
        save_training_state(self.model, self.optimizer, directory)

    def load_checkpoint(self, directory: str | Path) -> None:
        """Resume from a `save_checkpoint` directory (collective). The reference model stays the initial one."""
        load_training_state(self.model, self.optimizer, directory)

    def close(self) -> None:
        """Free the model and optimizer; destroy the process group if this backend created it."""
        del self.model, self.reference, self.optimizer
        self._world.leave()
