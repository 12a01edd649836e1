"""Every seam of the framework, one Protocol each; packages meet here and nowhere else.

rl-router and rl-rewards do not import this module: they satisfy these Protocols by shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol, Sequence, TypedDict, runtime_checkable

if TYPE_CHECKING:
    import torch

    from rl_core.sample import Sample
    from rl_core.train_batch import TrainBatch


@runtime_checkable
class RolloutEngine(Protocol):
    """Something that answers SGLang `/generate` payloads: an SGLang server, the embedded engine,
    or the router in front of several of them."""

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Send one SGLang `/generate` payload (`input_ids`, `sampling_params`, `return_logprob`, `rid`)."""
        ...

    async def abort(self, rid: str | None = None) -> None:
        """Stop one request, or all of them when `rid` is None; aborted requests return partial output."""
        ...


@runtime_checkable
class TrainingBackend(Protocol):
    """A policy model that can take an optimisation step and hand out its weights."""

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """Train on one global batch (split into micro-batches inside); returns metrics."""
        ...

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """Full (unsharded) weights under Hugging Face names, for the engines."""
        ...


class RewardInput(TypedDict):
    """What a reward function sees of one sample."""

    prompt: str
    response: str
    label: Any
    metadata: dict[str, Any]


@runtime_checkable
class RewardModel(Protocol):
    """Scores a batch of responses; never raises for one bad sample (it gives a defined reward and counts it)."""

    async def score_batch(self, items: Sequence[RewardInput]) -> list[float]: ...


@runtime_checkable
class DataSource(Protocol):
    """Hands out prompt groups and can resume where it stopped."""

    def get_samples(self, num_prompts: int) -> list[list[Sample]]:
        """`num_prompts` groups, each of `n_samples_per_prompt` fresh PENDING samples of one prompt."""
        ...

    def add_samples(self, groups: list[list[Sample]]) -> None:
        """Take back groups that were not used (aborted, filtered) so they can be served again."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class SampleFilter(Protocol):
    """Decides whether a finished group is worth training on (dynamic sampling)."""

    def __call__(self, group: Sequence[Sample]) -> bool: ...


@runtime_checkable
class BufferFilter(Protocol):
    """Chooses which buffered groups a data source serves next (slime's --buffer-filter-path)."""

    def __call__(self, buffer: Sequence[list[Sample]], num_groups: int) -> list[int]:
        """Indices into `buffer` of at most `num_groups` distinct groups, in serving order."""
        ...


@runtime_checkable
class WeightTransport(Protocol):
    """Moves the trainer's weights into every engine after an optimizer step."""

    def update(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> None: ...

    def close(self) -> None: ...
