"""A two-turn tool-calling rollout written as a slime custom generate function, and a slime-signature reward.

Run it with rl-train (the quickstart's model and prompts "a+b="):

    rl-train ... --custom-generate-function-path examples/tool_call_generate.py:generate \
                 --custom-rm-path examples/tool_call_generate.py:reward_func

Turn 1: the policy writes a few tokens. Then a calculator tool answers with the sum, and those tool tokens
join the response with loss mask 0 (the policy did not sample them, so they are not trained on). Turn 2:
the policy answers, seeing the tool's output in its context. Only the imports differ from slime's API
(`slime.utils.types`, `slime.utils.http_utils`, `slime.rollout.sglang_rollout`).
"""

from rl_apps.slime_api import GenerateState, Sample, post

TURN_TOKENS = 2


def calculator(prompt: str) -> str:
    """The tool: evaluates "a+b=" prompts."""
    left, _, right = prompt.rstrip("=").partition("+")
    return f" {int(left) + int(right)} " if left.strip().isdigit() and right.strip().isdigit() else " ? "


async def generate(args, sample: Sample, sampling_params) -> Sample:
    state = GenerateState(args)
    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
    sample.tokens = state.tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
    for turn in range(2):
        payload = {
            "input_ids": sample.tokens,
            "sampling_params": {**sampling_params, "max_new_tokens": TURN_TOKENS},
            "return_logprob": True,
        }
        output = await post(url, payload)
        meta = output["meta_info"]
        if meta["finish_reason"]["type"] == "abort":
            sample.status = Sample.Status.ABORTED
            return sample
        # Exactly the tokens the engine sampled, with their log-probs: never re-tokenise the text.
        tokens = [entry[1] for entry in meta["output_token_logprobs"]]
        log_probs = [entry[0] for entry in meta["output_token_logprobs"]]
        sample.append_response_tokens(args, tokens=tokens, log_probs=log_probs, trainable=True, meta_info=meta,
                                      text=output["text"])
        if turn == 0:
            observation = calculator(sample.prompt)
            observation_ids = state.tokenizer(observation, add_special_tokens=False)["input_ids"]
            sample.append_response_tokens(args, tokens=observation_ids, trainable=False, text=observation)
    sample.status = Sample.Status.TRUNCATED if meta["finish_reason"]["type"] == "length" else Sample.Status.COMPLETED
    return sample


async def reward_func(args, sample: Sample, **kwargs) -> float:
    """1 when the last turn's text holds the right sum, else the share of digits in it (graded credit)."""
    answer = sample.response[-TURN_TOKENS:]
    if answer.strip() == str(sample.label):
        return 1.0
    return sum(c.isdigit() for c in answer) / (2 * TURN_TOKENS)
