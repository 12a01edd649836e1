"""Two agents, one policy: a solver drafts an answer, a reviser reads the draft and writes the final one.
Both roles are the same model served by the same engines, and both are trained.

Run it with rl-train as the whole rollout (here on the quickstart's "a+b=" prompts):

    rl-train ... --rollout-function-path examples/multi_agent/rollout_with_two_roles.py:generate_rollout \
                 --custom-rm-path examples/multi_agent/rollout_with_two_roles.py:reward_func

A rollout takes --rollout-batch-size prompt groups from the data source. Every solver sample is one engine
call on the solver's prompt; then each draft goes into a reviser prompt, and the reviser samples form a
second group per prompt (one revision per draft). The rollout returns the solver groups and the reviser
groups, 2 x --rollout-batch-size groups of --n-samples-per-prompt: GRPO normalises each role's rewards
within its own group. The samples come back without rewards, so the reward function grades them; each
carries its role in `metadata["role"]`. In evaluation only the revisions (the system's answers) count.
Only the imports differ from slime's API.
"""

from __future__ import annotations

import asyncio
import re

from rl_apps.slime_api import GenerateState, Sample, post

SOLVER = "solve: {question} answer: "
REVISER = "question: {question} draft: {draft} better answer: "
REVISION_INDEX_OFFSET = 1 << 40  # the data source numbers samples from 0: revisions get numbers of their own


async def one_call(args, sample: Sample, text: str, sampling_params: dict) -> Sample:
    """`sample` generated as one engine call on the prompt `text`."""
    state = GenerateState(args)
    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
    sample.tokens = state.tokenizer(text, add_special_tokens=False)["input_ids"]
    output = await post(url, {"input_ids": sample.tokens, "sampling_params": sampling_params, "return_logprob": True})
    meta = output["meta_info"]
    entries = meta["output_token_logprobs"]
    sample.append_response_tokens(args, tokens=[e[1] for e in entries], log_probs=[e[0] for e in entries],
                                  meta_info=meta, text=output["text"])
    finish = meta["finish_reason"]["type"]
    sample.status = {"stop": Sample.Status.COMPLETED, "length": Sample.Status.TRUNCATED}.get(finish, Sample.Status.ABORTED)
    return sample


def revision_of(draft: Sample) -> Sample:
    """A new sample for the reviser: same prompt group, question and label, its own index."""
    return Sample(group_index=draft.group_index, index=draft.index + REVISION_INDEX_OFFSET, prompt=draft.prompt,
                  label=draft.label, metadata={**draft.metadata, "role": "reviser", "draft_index": draft.index})


async def generate_rollout(args, rollout_id: int, data_source, evaluation: bool = False) -> list[list[Sample]]:
    if args.partial_rollout:
        raise ValueError("rollout_with_two_roles does not continue partial samples: run without --partial-rollout")
    params = dict(GenerateState(args).sampling_params)
    groups = data_source.get_samples(len(data_source.rows) if evaluation else args.rollout_batch_size)
    drafts = [s for group in groups for s in group]
    for draft in drafts:
        draft.metadata["role"] = "solver"
    await asyncio.gather(*(one_call(args, d, SOLVER.format(question=d.prompt), params) for d in drafts))
    revisions = [[revision_of(d) for d in group] for group in groups]
    await asyncio.gather(*(
        one_call(args, r, REVISER.format(question=d.prompt, draft=d.response.strip()), params)
        for group, revised in zip(groups, revisions) for d, r in zip(group, revised)
    ))
    return revisions if evaluation else groups + revisions


def answer_score(text: str, label: str) -> float:
    """1 for the right number first; else half the share of digits in the text (graded credit that an
    untrained policy can climb: answers should at least be numbers)."""
    found = re.search(r"-?\d+", text)
    if found and found.group() == str(label).strip():
        return 1.0
    stripped = text.strip()
    return 0.5 * sum(c.isdigit() for c in stripped) / len(stripped) if stripped else 0.0


async def reward_func(args, sample: Sample, **kwargs) -> float:
    """The same grade for both roles: a revision that fixes a wrong draft earns what a right draft earns."""
    return answer_score(sample.response, sample.label)
