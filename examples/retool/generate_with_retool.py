"""Tool-integrated reasoning in the style of ReTool: the policy writes Python, a sandbox runs it, the policy
reads the output and answers.

Run it with rl-train on the shipped problems:

    rl-train ... --prompt-data examples/retool/problems.jsonl \
                 --custom-generate-function-path examples/retool/generate_with_retool.py:generate \
                 --custom-rm-path examples/retool/generate_with_retool.py:reward_func --max-turns 4

Each turn the policy writes until its first `</code>` or `</answer>`. `<code>...</code>` is run by
rl-rewards' sandbox (the one the `code` reward uses: a child process with its own network namespace where
the machine allows one, memory/CPU/file-size limits and a timeout), as a notebook cell: the value of a
last bare expression is printed; an error prints its last traceback line. The output joins the response
as `<interpreter>...</interpreter>` with loss mask 0 (the policy did not write it). `<answer>...</answer>`
ends the episode; the reward is 1 when it equals the label as a number. The turn loop is the search
example's (examples/search_r1/generate_with_search.py), through `generate_turn` and `append_observation`.
"""

from __future__ import annotations

import asyncio
import re

from rl_apps.slime_api import GenerateState, Sample, append_observation, generate_turn
from rl_rewards.sandbox import SandboxLimits, run_python_sandboxed

DEFAULT_MAX_TURNS = 4  # when the run gives no --max-turns
LIMITS = SandboxLimits(timeout_s=3.0, memory_mb=256, max_output_bytes=4096)
MAX_OUTPUT_CHARS = 200  # what the policy is shown of a long output
FORMAT_SCORE = 0.1
PROMPT = "solve with python: <code>expression</code>, then <answer>number</answer>. problem: {problem} "
INVALID = " invalid action. use <code>python</code> or <answer>number</answer>. "
CLOSING_TAGS = ("</code>", "</answer>")
ACTION = re.compile(r"<(code|answer)>(.*?)</\1>", re.DOTALL)

# Runs in the sandbox: the policy's code arrives on stdin, so it is never pasted into a program's text.
NOTEBOOK_CELL = """
import ast, sys, traceback
source = sys.stdin.read()
try:
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    scope = {"__name__": "__main__"}
    exec(compile(tree, "<code>", "exec"), scope)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "<code>", "eval"), scope)
        if value is not None:
            print(repr(value))
except BaseException as error:
    print(traceback.format_exception_only(type(error), error)[-1].strip())
"""


def run_code(code: str) -> str:
    """What the interpreter shows for `code` (blocking: a sandboxed child process)."""
    result = run_python_sandboxed(NOTEBOOK_CELL, stdin=code, limits=LIMITS)
    if result.timed_out:
        return f"timeout: the code ran over {LIMITS.timeout_s:g} s"
    output = (result.stdout or result.stderr).strip()
    if result.returncode != 0 and not output:
        output = f"the interpreter died (exit {result.returncode}), e.g. out of memory"
    return output[:MAX_OUTPUT_CHARS] or "no output"


def interpreter(code: str) -> str:
    return f" <interpreter>{run_code(code)}</interpreter> "


async def generate(args, sample: Sample, sampling_params) -> Sample:
    if args.partial_rollout:
        raise ValueError("generate_with_retool does not continue partial samples: run without --partial-rollout")
    max_turns = getattr(args, "max_turns", None) or DEFAULT_MAX_TURNS
    tokenizer = GenerateState(args).tokenizer
    sample.tokens = tokenizer(PROMPT.format(problem=sample.prompt), add_special_tokens=False)["input_ids"]
    for turn in range(max_turns):
        # The policy writes until its first closing tag; its tokens join the response with their log-probs.
        written = await generate_turn(args, sample, sampling_params, stop=CLOSING_TAGS)
        if written is None:
            return sample  # aborted, or no room left in --rollout-max-context-len
        action = ACTION.search(written.text)
        if action is not None and action.group(1) == "answer":
            sample.metadata["answer"] = action.group(2)
            sample.status = Sample.Status.COMPLETED
            return sample
        if written.finish_reason == "length" or turn + 1 == max_turns:
            break  # out of tokens mid-action, or out of turns
        # The sandbox blocks for up to its timeout: off the event loop, which serves the other samples.
        observation = await asyncio.to_thread(interpreter, action.group(2)) if action is not None else INVALID
        if not append_observation(args, sample, observation):
            return sample  # TRUNCATED: the output filled --rollout-max-context-len
    sample.status = Sample.Status.TRUNCATED  # out of turns or tokens before an answer
    return sample


def answer_score(answer: str | None, label: str) -> float:
    """1 when the answer is the label's number, FORMAT_SCORE for another answer, 0 for none."""
    if answer is None:
        return 0.0
    try:
        return 1.0 if float(answer.replace(",", "").strip()) == float(label) else FORMAT_SCORE
    except ValueError:
        return FORMAT_SCORE


async def reward_func(args, sample: Sample, **kwargs) -> float:
    """Grades the episode's final `<answer>` action, which `generate` kept in the sample's metadata."""
    return answer_score(sample.metadata.get("answer"), sample.label)
