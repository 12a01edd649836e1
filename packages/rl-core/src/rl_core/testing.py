"""A training backend small enough for users' tests and ours (as pydantic-ai's TestModel): real log-probs,
real losses, real gradients and a real optimizer, in one process with no model files and no process group.

    from rl_core.testing import BigramBackend
    policy = BigramBackend(vocab_size=16)
    metrics = rl_step(config, samples, policy)
"""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch import nn

from rl_core.losses import TrainLoss
from rl_core.lr_schedule import learning_rate
from rl_core.micro_batches import MicroBatch, batch_denominators, loss_inputs, rank_micro_batches, validate_batch
from rl_core.protocols import ForwardModel, TrainingBackend
from rl_core.train_batch import TrainBatch


class BigramModel(nn.Module):
    """Next-token logits (and a value) looked up from the previous token: one table row per token id."""

    def __init__(self, vocab_size: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=generator) * 0.1)
        self.value = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, vocab] logits and [B, T] values at the positions that predict each response token."""
        previous = mb.input_ids.gather(1, mb.response_positions)
        return self.logits[previous], self.value[previous]


class BigramBackend:
    """`rl_core.protocols.TrainingBackend` over a `BigramModel`, on the CPU, world size 1."""

    result_rank = 0

    def __init__(
        self,
        vocab_size: int,
        *,
        head: Literal["lm", "value"] = "lm",
        lr: float = 0.1,
        optimizer: Literal["adam", "sgd"] = "adam",
        rollout_temperature: float = 1.0,
        micro_batch_size: int = 2,
        ref_model: bool = False,
        seed: int = 0,
    ) -> None:
        self.vocab_size = vocab_size
        self.head = head
        self.lr = lr
        self.rollout_temperature = rollout_temperature
        self.micro_batch_size = micro_batch_size
        self.model = BigramModel(vocab_size, seed)
        self.reference = copy.deepcopy(self.model).requires_grad_(False) if ref_model else None
        params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
        self.steps = 0
        self.offloaded: dict[str, torch.Tensor] | None = None
        """The parameters while offloaded; the model holds none then, and forward/train_step refuse."""

    def _micro_batches(self, batch: TrainBatch) -> list[MicroBatch]:
        if self.offloaded is not None:
            raise RuntimeError("BigramBackend is offloaded: call onload() before forward or train_step")
        validate_batch(batch, self.vocab_size)
        return rank_micro_batches(batch, 0, 1, self.micro_batch_size, torch.device("cpu"))

    def _outputs(self, model: BigramModel, mb: MicroBatch, needs: frozenset[str], entropy_grad: bool) -> dict[str, torch.Tensor]:
        logits, values = model(mb)
        scaled = logits / self.rollout_temperature
        log_softmax = torch.log_softmax(scaled, dim=-1)
        out: dict[str, torch.Tensor] = {}
        if "log_probs" in needs:
            picked = log_softmax.gather(-1, mb.response_tokens.unsqueeze(-1)).squeeze(-1)
            out["log_probs"] = torch.where(mb.response_valid, picked, torch.zeros_like(picked))
        if "entropy" in needs:
            entropy = -(log_softmax.exp() * log_softmax).sum(-1)
            out["entropy"] = entropy if entropy_grad else entropy.detach()
        if "values" in needs:
            out["values"] = torch.where(mb.response_valid, values, torch.zeros_like(values))
        return out

    def forward(self, batch: TrainBatch, model: ForwardModel = "policy") -> list[torch.Tensor]:
        if model == "reference" and self.reference is None:
            raise ValueError("forward(model='reference') needs ref_model=True")
        net = self.reference if model == "reference" else self.model
        assert net is not None
        what = "values" if self.head == "value" else "log_probs"
        result: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        with torch.no_grad():
            for mb in self._micro_batches(batch):
                out = self._outputs(net, mb, frozenset({what}), False)[what]
                for row, i in enumerate(mb.sample_indices):
                    result[i] = out[row, : batch.response_lengths[i]].float().clone()
        return result

    def train_step(self, batch: TrainBatch, loss: TrainLoss) -> dict[str, float]:
        if self.head == "value" and not loss.needs <= {"values"}:
            raise ValueError(f"a value-head backend cannot compute {sorted(loss.needs - {'values'})}")
        if self.head == "lm" and "values" in loss.needs:
            raise ValueError("an LM-head backend has no values; build the critic with head='value'")
        denominators = batch_denominators(batch)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(()))
        for mb in self._micro_batches(batch):
            outputs = self._outputs(self.model, mb, loss.needs, loss.entropy_grad)
            if "ref_log_probs" in loss.needs:
                if self.reference is None:
                    raise ValueError(f"{type(loss).__name__} needs the reference model; build with ref_model=True")
                with torch.no_grad():
                    outputs["ref_log_probs"] = self._outputs(self.reference, mb, frozenset({"log_probs"}), False)["log_probs"]
            value, metrics = loss(loss_inputs(mb, denominators, **outputs))
            value.backward()
            for key, metric in metrics.items():
                sums[key] += metric.float()
        self.steps += 1
        rate = learning_rate(self.steps, lr=self.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**{k: float(v) for k, v in sums.items()}, "grad_norm": float(grad_norm), "lr": rate}

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.model.state_dict().items()

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save(
            {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "steps": self.steps},
            Path(directory) / "bigram.pt",
        )

    def load(self, directory: str | Path) -> None:
        state = torch.load(Path(directory) / "bigram.pt", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]

    def offload(self) -> None:
        self.offloaded = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.data = torch.empty(0)

    def onload(self) -> None:
        if self.offloaded is None:
            return
        for name, p in self.model.named_parameters():
            p.data = self.offloaded[name]
        self.offloaded = None

    def close(self) -> None:
        del self.model, self.reference, self.optimizer


def _conforms(backend: BigramBackend) -> TrainingBackend:
    """Never called: the type checker proves here that the fake meets the Protocol it stands in for."""
    return backend
