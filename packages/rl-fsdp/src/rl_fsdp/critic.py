"""`FSDPCritic`: PPO's value model on FSDP2, the policy's causal LM body with a scalar value head."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from rl_core.algorithms.policy_loss import LossDenominators
from rl_core.algorithms.value_loss import value_loss
from rl_core.train_batch import TrainBatch
from torch import nn

from rl_fsdp.checkpoint import load_training_state, save_training_state
from rl_fsdp.config import CriticConfig
from rl_fsdp.distributed import join_world
from rl_core.micro_batches import MicroBatch, rank_micro_batches, validate_batch
from rl_fsdp.model_loading import enable_activation_checkpointing, load_hf_model, shard_model
from rl_fsdp.training import clip_and_step, gather_per_token, make_optimizer, sum_over_ranks

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ValueModel(nn.Module):
    """A causal LM's transformer body (no LM head) and a Linear(hidden, 1) head: one value per position.

    The head starts at zero, so every value is 0 before the first update whatever the body: GAE then
    begins as plain discounted returns instead of noise from a random projection.
    """

    def __init__(self, body: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.body = body
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.body(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        # A sum over the size-1 dim rather than squeeze: FSDP2 warns about root outputs that are views.
        return self.value_head(hidden).sum(dim=-1, dtype=torch.float32)


def response_values(model: ValueModel, mb: MicroBatch) -> torch.Tensor:
    """Values [B, T] of the states before each response token (the position whose logits predict it, as
    for log-probs); padding slots hold 0."""
    values = model(mb.input_ids, mb.attention_mask, mb.position_ids).gather(1, mb.response_positions)
    return torch.where(mb.response_valid, values, torch.zeros_like(values))


class FSDPCritic:
    """The value model sharded over every rank of the default process group.

    Every rank is handed the same global batch and trains on samples rank::world_size; all public methods
    are collective. Gradients are those of one process with the whole batch, however it is split.
    """

    def __init__(self, config: CriticConfig) -> None:
        self.config = config
        self._world = join_world(config.device)
        self.device, self.rank, self.world_size = self._world.device, self._world.rank, self._world.size
        mesh = self._world.mesh

        causal_lm = load_hf_model(config.model_path, config.seed)
        causal_lm.config.use_cache = False
        self.vocab_size = causal_lm.get_input_embeddings().weight.shape[0]
        layer_classes = set(causal_lm._no_split_modules or ())
        if config.gradient_checkpointing:
            enable_activation_checkpointing(causal_lm)
        model = ValueModel(causal_lm.base_model, causal_lm.config.hidden_size)
        del causal_lm
        self.model = shard_model(model, mesh, _DTYPES[config.param_dtype], layer_classes)
        self.optimizer = make_optimizer(self.model, config)

    def _micro_batches(self, batch: TrainBatch) -> list[MicroBatch]:
        validate_batch(batch, self.vocab_size)
        return rank_micro_batches(batch, self.rank, self.world_size, self.config.micro_batch_size, self.device)

    def compute_values(self, batch: TrainBatch) -> list[torch.Tensor]:
        """Value of every sample's response tokens (float32, CPU), on every rank."""
        self.model.eval()
        forward = lambda mb: response_values(self.model, mb)  # noqa: E731
        return gather_per_token(batch, self._micro_batches(batch), forward, self.device, self.world_size)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step of the clipped value loss towards `batch.returns`, clipped around
        `batch.values`; returns value_loss, value_clipfrac (global-batch aggregates), grad_norm, lr."""
        if batch.returns is None or batch.values is None:
            missing = " and ".join(name for name in ("returns", "values") if getattr(batch, name) is None)
            raise ValueError(f"the critic's train_step needs TrainBatch.returns and .values; this batch has no {missing}")
        micro_batches = self._micro_batches(batch)
        denominators = LossDenominators(
            num_tokens=float(sum(sum(mask) for mask in batch.loss_masks)), num_samples=float(len(batch))
        )
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        self.model.train()
        for mb in micro_batches:
            loss, metrics = value_loss(
                values=response_values(self.model, mb),
                old_values=mb.values,
                returns=mb.returns,
                mask=mb.loss_mask,
                denominators=denominators,
                value_clip=self.config.value_clip,
                aggregation=self.config.aggregation,
                aggregation_constant=self.config.aggregation_constant,
            )
            # This rank's share of the global loss; FSDP averages gradients over ranks, so scale to a sum.
            (loss * self.world_size).backward()
            for key, value in metrics.items():
                sums[key] += value.float()
        result = sum_over_ranks(sums, self.world_size)
        result.update(clip_and_step(self.model, self.optimizer, self.config.clip_grad))
        return result

    def save_checkpoint(self, directory: str | Path) -> None:
        """Value model and optimizer state of every rank into `directory` (collective)."""
        save_training_state(self.model, self.optimizer, directory)

    def load_checkpoint(self, directory: str | Path) -> None:
        """Resume from a `save_checkpoint` directory (collective)."""
        load_training_state(self.model, self.optimizer, directory)

    def close(self) -> None:
        """Free the model and optimizer; destroy the process group if this critic created it."""
        del self.model, self.optimizer
        self._world.leave()
