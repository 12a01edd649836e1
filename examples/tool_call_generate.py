"""A two-turn tool-calling rollout written as a slime custom generate function, and a slime-signature reward.

Run it with rl-train (the quickstart's model and prompts "a+b="):

    rl-train ... --custom-generate-function-path examples/tool_call_generate.py:generate \
                 --custom-rm-path examples/tool_call_generate.py:reward_func

Turn 1: the policy writes a few tokens. Then a calculator tool answers with the sum, and those tool tokens
join the response with loss mask 0 (the policy did not sample them, so they are not trained on). Turn 2:
the policy answers, seeing the tool's output in its context. `generate_turn` is one call to `/generate`
(slime's `post` with `return_logprob`, the sampled tokens appended with their log-probs);
`append_observation` tokenises the tool's text and appends it with loss mask 0.
"""

from rl_apps.slime_api import GenerateState, Sample, append_observation, generate_turn

TURN_TOKENS = 2


def calculator(prompt: str) -> str:
    """The tool: evaluates "a+b=" prompts."""
    left, _, right = prompt.rstrip("=").partition("+")
    return f" {int(left) + int(right)} " if left.strip().isdigit() and right.strip().isdigit() else " ? "


async def generate(args, sample: Sample, sampling_params) -> Sample:
    sample.tokens = GenerateState(args).tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
    for turn in range(2):
        # The engine's sampled tokens join the response with their log-probs (loss mask 1).
        written = await generate_turn(args, sample, {**sampling_params, "max_new_tokens": TURN_TOKENS})
        if written is None:
            return sample  # aborted, or no room left in --rollout-max-context-len
        if turn == 0 and not append_observation(args, sample, calculator(sample.prompt)):  # loss mask 0, log-prob 0
            return sample  # TRUNCATED: the tool's answer filled --rollout-max-context-len
    sample.status = Sample.Status.TRUNCATED if written.finish_reason == "length" else Sample.Status.COMPLETED
    return sample


async def reward_func(args, sample: Sample, **kwargs) -> float:
    """1 when the last turn's text holds the right sum, else the share of digits in it (graded credit)."""
    answer = sample.response[-TURN_TOKENS:]
    if answer.strip() == str(sample.label):
        return 1.0
    return sum(c.isdigit() for c in answer) / (2 * TURN_TOKENS)
