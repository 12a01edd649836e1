"""Every seam of the framework, one Protocol each; packages meet here and nowhere else.

rl-router and rl-rewards do not import this module: they satisfy these Protocols by shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Iterable,
    Iterator,
    Literal,
    Mapping,
    NotRequired,
    Protocol,
    Sequence,
    TypedDict,
    runtime_checkable,
)

if TYPE_CHECKING:
    import torch

    from rl_core.generation import GenerateAnswer, GenerateRequest
    from rl_core.losses import TrainLoss
    from rl_core.sample import Sample
    from rl_core.train_batch import TrainBatch


@runtime_checkable
class GenerateFn(Protocol):
    """One generation call, whoever answers it: an engine, or the router in front of several
    (rl_sglang.generation.SGLangGenerate maps it onto SGLang's /generate)."""

    async def __call__(self, request: GenerateRequest) -> GenerateAnswer: ...


@runtime_checkable
class CustomGenerateFn(Protocol):
    """slime's `--custom-generate-function-path`: generates one sample to the end, however many engine calls
    and tool calls that takes. `args` is the run's configuration under slime's field names (plus
    `sglang_router_ip`/`sglang_router_port`, an HTTP endpoint speaking SGLang's /generate)."""

    async def __call__(self, args: Any, sample: Sample, sampling_params: dict[str, Any]) -> Sample | list[Sample]: ...


@runtime_checkable
class RolloutEngine(Protocol):
    """Something that answers SGLang `/generate` payloads and aborts requests: an SGLang server, the
    embedded engine, or the router in front of several of them."""

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Send one SGLang `/generate` payload (`input_ids`, `sampling_params`, `return_logprob`, `rid`)."""
        ...

    async def abort(self, rid: str | None = None) -> None:
        """Stop one request, or all of them when `rid` is None; aborted requests return partial output."""
        ...


ForwardModel = Literal["policy", "reference"]


@runtime_checkable
class StepBackend(Protocol):
    """What the RL step (`rl_core.rl_step`) needs of a trained model: forward passes and optimizer steps.

    A backend spread over several ranks is driven by calling each method on every rank with the same
    arguments (they are collectives). Results are complete on the rank `result_rank` names (the
    result-rank contract); other ranks may return partial or empty results. FSDP returns them on every
    rank; Megatron under pipeline parallelism only on the last stage.
    """

    @property
    def result_rank(self) -> int:
        """The rank of this backend's process group whose return values are the results."""
        ...

    def forward(self, batch: TrainBatch, model: ForwardModel = "policy") -> list[torch.Tensor]:
        """One float32 CPU tensor per sample over its response tokens: log-probs under softmax(logits /
        rollout temperature) for an LM head (of the reference model with model="reference"), values for
        a value head."""
        ...

    def train_step(self, batch: TrainBatch, loss: TrainLoss) -> dict[str, float]:
        """One optimizer step of `loss` over the global batch (split into micro-batches inside); returns
        global-batch metrics (the loss's, plus grad_norm and lr)."""
        ...


@runtime_checkable
class TrainingBackend(StepBackend, Protocol):
    """A trained model as the loop drives it: the RL step's two methods, and what the loop does between
    steps (weights to the engines, checkpoints, giving the GPU to a colocated engine, shutdown)."""

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full (unsharded) weights under Hugging Face names, one tensor at a time, on this rank's device.
        A collective: every rank iterates it to the end; tied weights appear under each of their names."""
        ...

    def save(self, directory: str | Path) -> None:
        """Model and optimizer state (every rank its own shards) into `directory`, to resume from."""
        ...

    def load(self, directory: str | Path) -> None:
        """Resume from a `save` directory; the reference model stays the initial one."""
        ...

    def offload(self) -> None:
        """Move parameters, gradients and optimizer state off the accelerator (a colocated engine runs)."""
        ...

    def onload(self) -> None:
        """Bring back what `offload` moved, before the next forward or train_step."""
        ...

    def close(self) -> None:
        """Free the model and leave the process group if this backend joined it."""
        ...


@runtime_checkable
class AdapterBackend(TrainingBackend, Protocol):
    """A backend training a LoRA adapter, which it can hand out alone (peft's names and config)."""

    def adapter_weights(self) -> Iterator[tuple[str, torch.Tensor]]: ...

    def adapter_config(self) -> dict[str, Any]: ...


class RewardInput(TypedDict):
    """What a reward function sees of one sample."""

    prompt: str
    response: str
    label: Any
    metadata: dict[str, Any]
    sample: NotRequired[Sample]
    """The whole sample, for reward functions in slime's signature `reward_func(args, sample)`."""


@runtime_checkable
class RewardModel(Protocol):
    """Scores a batch of responses; never raises for one bad sample: it gives a defined reward and reports
    the failure, so that the loop can stop a run whose rewards are mostly errors."""

    @property
    def last_failed(self) -> Sequence[int]:
        """Indices of the latest batch's items whose grading failed (raised, timed out, returned no number)."""
        ...

    @property
    def last_errors(self) -> Sequence[str]:
        """Messages of the latest batch's failures ('item i: TypeError: ...'), the first few at least."""
        ...

    async def score_batch(self, items: Sequence[RewardInput]) -> list[float]: ...


@runtime_checkable
class DataSource(Protocol):
    """Hands out prompt groups and can resume where it stopped."""

    def get_samples(self, num_prompts: int) -> list[list[Sample]]:
        """`num_prompts` groups, each of `n_samples_per_prompt` fresh PENDING samples of one prompt."""
        ...

    def add_samples(self, groups: list[list[Sample]], *, partial: bool = False) -> None:
        """Take back groups that were not used (aborted, filtered) so they can be served again; with
        `partial` their tokens so far are kept, to be continued (partial rollout)."""
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


@runtime_checkable
class AdapterWeightTransport(WeightTransport, Protocol):
    """A transport that can also send a LoRA adapter alone (SGLang's LoRA routes)."""

    def update_adapter(self, lora_name: str, config: dict[str, Any], named_tensors: Iterable[tuple[str, torch.Tensor]],
                       weight_version: str) -> None: ...
