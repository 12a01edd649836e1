"""Turning PENDING samples into scored ones: a sample generator (one engine call through a `GenerateFn`,
or a user's custom generate function) and a `RewardModel`."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Awaitable, Callable, NamedTuple, Sequence

from rl_core.dynamic_sampling import DynamicSamplingStats, sort_groups
from rl_core.generation import GenerateRequest
from rl_core.protocols import CustomGenerateFn, DataSource, GenerateFn, RewardInput, RewardModel, SampleFilter
from rl_core.sample import Sample, SampleStatus

SampleGenerator = Callable[[Sample], Awaitable["Sample | list[Sample]"]]
"""Generates one PENDING sample to the end (one engine call, or a whole multi-turn trajectory)."""


def request_id(sample: Sample) -> str:
    """A request id unique to this call and never a prefix of another (SGLang aborts by prefix):
    `sample-1-<12 hex>` cannot begin `sample-10-<12 hex>`."""
    return f"sample-{sample.index}-{uuid.uuid4().hex[:12]}"


def default_generator(
    generate: GenerateFn,
    sampling_params: dict[str, Any],
    *,
    max_context_len: int | None = None,
    mask_offpolicy: bool = False,
) -> SampleGenerator:
    """One engine call from the sample's tokens (the prompt, plus any response so far), recorded as one turn.

    A sample continued after a partial rollout asks only for the new tokens its budget has left, and with
    `mask_offpolicy` (--mask-offpolicy-in-partial-rollout) the tokens an older policy sampled leave the loss
    mask. With `max_context_len` (--rollout-max-context-len) it asks for no more tokens than fit; a sample
    with no room left is TRUNCATED without a call."""

    async def generate_sample(sample: Sample) -> Sample:
        params = dict(sampling_params)
        if sample.response_length:
            if mask_offpolicy:
                sample.loss_mask = [0] * sample.response_length
            budget = int(params.get("max_new_tokens", 1 << 30)) - sample.response_length
            if budget <= 0:
                sample.status = SampleStatus.TRUNCATED
                return sample
            params["max_new_tokens"] = budget
        if max_context_len is not None:
            room = max_context_len - len(sample.tokens)
            if room <= 0:
                sample.status = SampleStatus.TRUNCATED
                return sample
            params["max_new_tokens"] = min(int(params.get("max_new_tokens", room)), room)
        request = GenerateRequest(input_ids=list(sample.tokens), sampling_params=params, request_id=request_id(sample))
        (await generate(request)).append_to(sample)
        if sample.response_length == 0:
            sample.status = SampleStatus.ABORTED  # nothing to train on
        return sample

    return generate_sample


def custom_generator(function: CustomGenerateFn, args: Any, sampling_params: dict[str, Any]) -> SampleGenerator:
    """slime's `--custom-generate-function-path`: `await function(args, sample, sampling_params)`."""

    async def generate_sample(sample: Sample) -> Sample | list[Sample]:
        return await function(args, sample, dict(sampling_params))

    return generate_sample


async def generate_samples(generator: SampleGenerator, samples: Sequence[Sample]) -> list[Sample]:
    """Generate every sample concurrently (the engines batch them); each comes back in its place."""
    outputs = await asyncio.gather(*(generator(s) for s in samples))
    done = []
    for sample, output in zip(samples, outputs):
        if isinstance(output, list):
            if len(output) != 1:
                raise ValueError(
                    f"the generate function returned {len(output)} samples for sample {sample.index}; several"
                    " training samples per generated sample are not supported yet: return one Sample"
                )
            output = output[0]
        if not isinstance(output, Sample):
            raise TypeError(f"the generate function returned {type(output).__name__} for sample {sample.index}, not a Sample")
        done.append(output)
    return done


class RewardFailure(RuntimeError):
    """Too many samples of a batch failed to grade: their error rewards would be trained on as if real."""


def check_reward_failures(reward_model: RewardModel, samples: Sequence[Sample], max_error_ratio: float) -> None:
    """Raise `RewardFailure` when every sample of the batch failed to grade, or more than `max_error_ratio`
    of them; the message quotes the first failure (its first line) and names its sample."""
    failed = list(reward_model.last_failed)
    if not failed or (len(failed) < len(samples) and len(failed) <= max_error_ratio * len(samples)):
        return
    first = samples[failed[0]]
    message = next(iter(reward_model.last_errors), "no message").split(": ", 1)[-1].splitlines()[0]
    if len(failed) == len(samples):
        share = f"every one of the {len(samples)} samples failed to grade"
    else:
        share = (f"{len(failed)} of the {len(samples)} samples ({len(failed) / len(samples):.0%}) failed to grade,"
                 f" more than --max-reward-error-ratio {max_error_ratio}")
    raise RewardFailure(f"{share}; the first, sample {first.index} (prompt {str(first.prompt)[:60]!r}): {message}")


async def score_samples(
    reward_model: RewardModel, samples: Sequence[Sample], *, max_error_ratio: float = 1.0
) -> list[Sample]:
    """Grade every sample; see `check_reward_failures` for when a batch of failures stops the run."""
    items = [
        RewardInput(
            prompt=s.prompt if isinstance(s.prompt, str) else str(s.prompt),
            response=s.response,
            label=s.label,
            metadata=s.metadata,
            sample=s,
        )
        for s in samples
    ]
    for sample, reward in zip(samples, await reward_model.score_batch(items)):
        sample.reward = float(reward)
    check_reward_failures(reward_model, samples, max_error_ratio)
    return list(samples)


def regroup(groups: Sequence[Sequence[Sample]], samples: Sequence[Sample]) -> list[list[Sample]]:
    """`samples` (flat, in group order) cut back into the shape of `groups`."""
    out, start = [], 0
    for group in groups:
        out.append(list(samples[start : start + len(group)]))
        start += len(group)
    return out


async def generate_groups(
    generator: SampleGenerator,
    reward_model: RewardModel,
    data_source: DataSource,
    *,
    num_groups: int,
    over_sampling_batch_size: int | None = None,
    sample_filter: SampleFilter | None = None,
    max_rounds: int = 32,
    max_error_ratio: float = 1.0,
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
        groups = regroup(groups, await generate_samples(generator, [s for g in groups for s in g]))
        samples = [s for g in groups for s in g]
        await score_samples(reward_model, samples, max_error_ratio=max_error_ratio)
        surplus = sort_groups(groups, sample_filter, num_groups, stats)
        if surplus:
            data_source.add_samples(surplus)
    return stats.kept, stats


class RolloutResult(NamedTuple):
    groups: list[list[Sample]]
    """The groups to train on, in group order."""
    dropped: list[list[Sample]]
    """Groups a dynamic-sampling filter refused."""
    metrics: dict[str, float]
    timing: dict[str, float]


async def default_rollout(
    generator: SampleGenerator,
    reward_model: RewardModel,
    data_source: DataSource,
    *,
    num_groups: int,
    over_sampling_batch_size: int | None = None,
    sample_filter: SampleFilter | None = None,
    max_error_ratio: float = 1.0,
    abort: Callable[[], Awaitable[Any]] | None = None,
) -> RolloutResult:
    """The rollout slime's `--rollout-function-path` replaces: `num_groups` prompt groups generated and
    scored (in over-sampled rounds when a dynamic-sampling filter is set). With `abort` (partial rollout,
    slime's --partial-rollout) the groups are streamed instead: see `partial_rollout`."""
    start = time.perf_counter()
    if abort is not None:
        return await partial_rollout(
            generator, reward_model, data_source, abort, num_groups=num_groups,
            over_sampling_batch_size=over_sampling_batch_size or num_groups, sample_filter=sample_filter,
            max_error_ratio=max_error_ratio,
        )
    if sample_filter is None and over_sampling_batch_size is None:
        groups = data_source.get_samples(num_groups)
        groups = regroup(groups, await generate_samples(generator, [s for g in groups for s in g]))
        generated = time.perf_counter()
        await score_samples(reward_model, [s for g in groups for s in g], max_error_ratio=max_error_ratio)
        return RolloutResult(groups, [], {}, {"generate": generated - start, "reward": time.perf_counter() - generated})
    groups, stats = await generate_groups(
        generator, reward_model, data_source, num_groups=num_groups, over_sampling_batch_size=over_sampling_batch_size,
        sample_filter=sample_filter, max_error_ratio=max_error_ratio,
    )
    return RolloutResult(groups, stats.dropped, stats.metrics(), {"generate_and_reward": time.perf_counter() - start})


async def partial_rollout(
    generator: SampleGenerator,
    reward_model: RewardModel,
    data_source: DataSource,
    abort: Callable[[], Awaitable[Any]],
    *,
    num_groups: int,
    over_sampling_batch_size: int,
    sample_filter: SampleFilter | None = None,
    max_error_ratio: float = 1.0,
) -> RolloutResult:
    """slime's partial rollout (APRIL): `over_sampling_batch_size` groups generate at once; each group is
    graded as soon as all its samples are done; once `num_groups` groups are kept, `abort()` stops what is
    still generating, and those groups go back to the data source with their tokens so far, to be
    continued (not regenerated) in a later rollout, by the policy of that time."""
    start = time.perf_counter()
    groups = data_source.get_samples(over_sampling_batch_size)
    kept: list[list[Sample]] = []
    dropped: list[list[Sample]] = []
    enough = asyncio.Event()

    async def run_group(group: list[Sample]) -> list[Sample]:
        done = await generate_samples(generator, group)
        if enough.is_set() or any(s.status is SampleStatus.ABORTED for s in done):
            return done
        await score_samples(reward_model, done, max_error_ratio=max_error_ratio)
        if enough.is_set():
            return done
        if sample_filter is not None and not sample_filter(done):
            dropped.append(done)
        else:
            kept.append(done)
            if len(kept) == num_groups:
                enough.set()
        return done

    tasks = [asyncio.ensure_future(run_group(g)) for g in groups]
    waiter: asyncio.Future[Any] = asyncio.ensure_future(enough.wait())
    everything: asyncio.Future[Any] = asyncio.gather(*tasks)
    await asyncio.wait([waiter, everything], return_when=asyncio.FIRST_COMPLETED)
    if enough.is_set():
        await abort()
    finished = await asyncio.gather(*tasks)
    waiter.cancel()
    if len(kept) < num_groups:
        raise RuntimeError(
            f"partial rollout kept {len(kept)} of {num_groups} groups from {len(groups)} generated"
            f" ({len(dropped)} dropped by the filter): raise --over-sampling-batch-size"
        )
    kept_ids = {id(g) for g in kept} | {id(g) for g in dropped}
    unfinished = [g for g in finished if id(g) not in kept_ids]
    if unfinished:
        data_source.add_samples(unfinished, partial=True)
    kept.sort(key=lambda g: g[0].index if g[0].index is not None else 0)
    metrics = {"rollout/partial/continued_groups": float(len(unfinished)), "rollout/partial/dropped_groups": float(len(dropped))}
    return RolloutResult(kept, dropped, metrics, {"generate_and_reward": time.perf_counter() - start})
