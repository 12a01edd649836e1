"""`TrainerGroup`: one training backend spread over Ray actors, driven as a single `StepBackend`.

Every call goes to every rank (the backend's methods are collectives) and the answer is read from the
backend's result rank, never assumed to be rank 0's: under pipeline parallelism only the last stage
holds log-probs and losses. The group also clocks its forward and train calls per phase (`clock`), for
the loop's perf/* figures.
"""

from __future__ import annotations

import time
from typing import Any

from rl_apps.perf import PhaseClock


class TrainerGroup:
    def __init__(self, actors: list[Any], role: str = "actor") -> None:
        import ray

        self.actors = actors
        self.role = role
        """slime's name of the model the ranks train ("actor" or "critic"): the prefix of its phases."""
        self.clock = PhaseClock()
        self.result_rank: int = ray.get(actors[0].result_rank.remote())

    def _on_every_rank(self, method: str, *args: Any) -> list[Any]:
        import ray

        # Calls to one actor run in submission order, so every rank meets the collectives in the same order.
        return ray.get([getattr(actor, method).remote(*args) for actor in self.actors])

    def forward(self, batch: Any, model: str = "policy") -> list[Any]:
        started = time.perf_counter()
        out = self._on_every_rank("forward", batch, model)[self.result_rank]
        phase = "ref_log_probs" if model == "reference" else "log_probs" if self.role == "actor" else f"{self.role}_values"
        self.clock.record(phase, started, batch)
        return out

    def train_step(self, batch: Any, loss: Any) -> dict[str, float]:
        started = time.perf_counter()
        out = self._on_every_rank("train_step", batch, loss)[self.result_rank]
        self.clock.record(f"{self.role}_train", started, batch)
        return out

    def peak_memory(self) -> int | None:
        """The largest rank's peak CUDA memory allocated since the last call (None on the CPU)."""
        peaks = [p for p in self._on_every_rank("peak_memory") if p is not None]
        return max(peaks) if peaks else None

    def save(self, directory: str) -> None:
        self._on_every_rank("save", directory)

    def load(self, directory: str) -> None:
        self._on_every_rank("load", directory)

    def save_hf(self, directory: str) -> None:
        """The policy as a Hugging Face folder, written by the result rank."""
        self._on_every_rank("save_hf", directory)

    def offload(self, offloaded: bool) -> None:
        """Parameters, gradients and optimizer state off the GPU (True) or back on it (False), every rank."""
        self._on_every_rank("offload", offloaded)

    def push_weights(self, engine_urls: list[str], weight_version: str) -> None:
        """Every rank gathers, the result rank sends to the engines."""
        self._on_every_rank("update_weights", engine_urls, weight_version)
