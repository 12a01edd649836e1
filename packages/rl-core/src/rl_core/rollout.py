"""Turning PENDING samples into scored ones through any RolloutEngine and RewardModel."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Sequence

from rl_core.dynamic_sampling import DynamicSamplingStats, sort_groups
from rl_core.protocols import DataSource, RewardInput, RewardModel, RolloutEngine, SampleFilter
from rl_core.sample import Sample, SampleStatus

_FINISH_STATUS = {"stop": SampleStatus.COMPLETED, "length": SampleStatus.TRUNCATED, "abort": SampleStatus.ABORTED}


def generate_payload(sample: Sample, sampling_params: dict[str, Any]) -> dict[str, Any]:
    """The SGLang `/generate` payload for one sample's prompt tokens. The rid ends in a fixed-length
    random suffix after a dash, so no rid is a prefix of another (SGLang aborts every request
    whose rid starts with the one named: `sample-1` would also stop `sample-10`)."""
    return {
        "input_ids": list(sample.tokens),
        "sampling_params": dict(sampling_params),
        "return_logprob": True,
        "rid": f"sample-{sample.index}-{uuid.uuid4().hex}",
    }


def apply_generate_output(sample: Sample, output: dict[str, Any]) -> Sample:
    """Record an SGLang `/generate` answer on the sample: response tokens, text, log-probs, status."""
    meta = output.get("meta_info") or {}
    output_ids = list(output.get("output_ids") or [])
    logprobs = meta.get("output_token_logprobs")
    if logprobs is not None and len(logprobs) != len(output_ids):
        raise ValueError(
            f"sample {sample.index}: engine returned {len(output_ids)} tokens but {len(logprobs)} log-probs"
        )
    finish = (meta.get("finish_reason") or {}).get("type", "stop")
    sample.tokens = list(sample.tokens) + output_ids
    sample.response_length = len(output_ids)
    sample.response = output.get("text", "")
    sample.rollout_log_probs = [float(entry[0]) for entry in logprobs] if logprobs is not None else None
    sample.loss_mask = [1] * len(output_ids)
    sample.weight_version = None if meta.get("weight_version") is None else str(meta["weight_version"])
    sample.status = _FINISH_STATUS.get(finish, SampleStatus.COMPLETED)
    if not output_ids and sample.status is not SampleStatus.ABORTED:
        sample.status = SampleStatus.ABORTED  # nothing to train on
    return sample


async def generate_samples(engine: RolloutEngine, samples: Sequence[Sample], sampling_params: dict[str, Any]) -> list[Sample]:
    """Generate every sample concurrently (the engines batch them)."""
    outputs = await asyncio.gather(*(engine.generate(generate_payload(s, sampling_params)) for s in samples))
    return [apply_generate_output(s, o) for s, o in zip(samples, outputs)]


async def score_samples(reward_model: RewardModel, samples: Sequence[Sample]) -> list[Sample]:
    items = [
        RewardInput(
            prompt=s.prompt if isinstance(s.prompt, str) else str(s.prompt),
            response=s.response,
            label=s.label,
            metadata=s.metadata,
        )
        for s in samples
    ]
    for sample, reward in zip(samples, await reward_model.score_batch(items)):
        sample.reward = float(reward)
    return list(samples)


async def generate_groups(
    engine: RolloutEngine,
    reward_model: RewardModel,
    data_source: DataSource,
    *,
    num_groups: int,
    sampling_params: dict[str, Any],
    over_sampling_batch_size: int | None = None,
    sample_filter: SampleFilter | None = None,
    max_rounds: int = 32,
) -> tuple[list[list[Sample]], DynamicSamplingStats]:
    """Generate and score prompt groups until `num_groups` of them pass `sample_filter` (dynamic sampling).

    Each round takes `over_sampling_batch_size` groups (default `num_groups`) from the data source; groups
    that pass after the target is reached go back to it. Fails after `max_rounds` rounds, when the filter
    refuses nearly everything (e.g. every reward 0), instead of sampling forever.
    """
    per_round = over_sampling_batch_size or num_groups
    if per_round < num_groups:
        raise ValueError(f"over_sampling_batch_size ({per_round}) is smaller than the {num_groups} groups wanted")
    stats = DynamicSamplingStats()
    while len(stats.kept) < num_groups:
        if stats.rounds == max_rounds:
            raise RuntimeError(
                f"dynamic sampling kept {len(stats.kept)} of {num_groups} groups after {max_rounds} rounds"
                f" ({stats.dropped_groups} of {stats.generated_groups} groups dropped by the filter)"
            )
        groups = data_source.get_samples(per_round)
        samples = [s for g in groups for s in g]
        await generate_samples(engine, samples, sampling_params)
        await score_samples(reward_model, samples)
        surplus = sort_groups(groups, sample_filter, num_groups, stats)
        if surplus:
            data_source.add_samples(surplus)
    return stats.kept, stats
