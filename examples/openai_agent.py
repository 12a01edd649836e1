"""An agent written against the OpenAI client, trained through the chat endpoint without changing it.

Run it with rl-train (the quickstart's model and prompts "a+b="):

    rl-train ... --custom-generate-function-path examples/openai_agent.py:generate

`solve` is ordinary OpenAI-client agent code: it offers an `add` tool, runs the tool calls the model asks
for, and tells the model to try again when its answer is wrong, for up to MAX_TURNS calls. It knows
nothing of training. `generate` (slime's custom generate signature) points the client at the run's
OpenAI-compatible endpoint under a fresh session id (in the base URL), lets the agent run, then fetches the
session's trajectory: the exact tokens the engine was sent and sampled, loss mask 1 only on sampled tokens
(the tool results, the "try again" messages and the chat template's tokens are 0), and the engine's
log-probs. Nothing is re-tokenised. Needs the `openai` package. See docs/agents.md.
"""

import json
import uuid

from openai import AsyncOpenAI

from rl_apps.slime_api import Sample
from rl_core.trajectory import apply_trajectory
from rl_sglang.chat import pop_session

MAX_TURNS = 3  # when the run gives no --max-turns
TOOLS = [{
    "type": "function",
    "function": {
        "name": "add",
        "description": "The sum of two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]},
    },
}]
RETRY = "wrong, try again."


def run_tool(call) -> str:
    """The agent's tool; a bad call gets an error message back, as agent harnesses do."""
    try:
        args = json.loads(call.function.arguments)
        return str(int(args["a"]) + int(args["b"])) if call.function.name == "add" else f"no tool {call.function.name}"
    except (ValueError, KeyError, TypeError) as e:
        return f"error: {e}"


async def solve(client: AsyncOpenAI, question: str | list[dict], answer: str, max_turns: int = MAX_TURNS,
                **request) -> list[dict]:
    """The agent: plain OpenAI chat-completions code (what a user already has)."""
    messages = list(question) if isinstance(question, list) else [{"role": "user", "content": question}]
    for _ in range(max_turns):
        response = await client.chat.completions.create(model="policy", messages=messages, tools=TOOLS, **request)
        choice = response.choices[0]
        messages.append(choice.message.model_dump(exclude_none=True))
        if choice.message.tool_calls:
            for call in choice.message.tool_calls:
                messages.append({"role": "tool", "tool_call_id": call.id, "content": run_tool(call)})
        elif choice.finish_reason == "abort" or (choice.message.content or "").strip() == answer:
            break
        else:
            messages.append({"role": "user", "content": RETRY})
    return messages


async def generate(args, sample: Sample, sampling_params) -> Sample:
    """slime's custom generate function: run the agent in its own session, train on what it recorded."""
    endpoint = f"http://{args.sglang_router_ip}:{args.sglang_router_port}"
    session_id = uuid.uuid4().hex
    client = AsyncOpenAI(base_url=f"{endpoint}/sessions/{session_id}/v1", api_key="unused", max_retries=0)
    # The run's sampling settings, in OpenAI's fields (SGLang's extras through extra_body).
    request = dict(temperature=sampling_params["temperature"], top_p=sampling_params["top_p"],
                   max_tokens=sampling_params["max_new_tokens"],
                   extra_body={k: sampling_params[k] for k in ("top_k", "stop_token_ids") if k in sampling_params})
    try:
        await solve(client, sample.prompt, str(sample.label), getattr(args, "max_turns", None) or MAX_TURNS, **request)
    finally:
        await client.close()
    (trajectory,) = await pop_session(f"{endpoint}/v1", session_id)  # one conversation per session
    return apply_trajectory(sample, trajectory)
