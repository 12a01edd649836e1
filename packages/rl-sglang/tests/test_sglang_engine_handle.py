"""EngineHandle serves a trainer that runs each rollout in an event loop of its own (asyncio.run per rollout)."""

import asyncio
import gc
import warnings

from rl_core.generation import GenerateRequest
from rl_sglang.engine_handle import EngineHandle


def test_each_event_loops_http_client_is_closed_when_that_loop_ends_and_none_is_left_unclosed(model_dir, ref):
    reports: list[str] = []
    sessions = []

    async def rollout(engine: EngineHandle, index: int) -> list[int]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: reports.append(context["message"]))
        request = GenerateRequest([5, 9, 14], {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}, f"r{index}-")
        answer = await engine.generate(request)
        sessions.append(engine._client._sessions[loop])
        return answer.output_ids

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with EngineHandle(model_dir, device="cpu", sglang_args={"max_running_requests": 2}, startup_timeout_s=180) as engine:
            outputs = [asyncio.run(rollout(engine, i)) for i in range(3)]
            assert engine._client._sessions == {}  # every loop's session went with its loop
        gc.collect()
    assert outputs == [ref.greedy(model_dir, [5, 9, 14], 4)] * 3
    assert len({id(s) for s in sessions}) == 3 and all(s.closed for s in sessions)
    assert [r for r in reports if "Unclosed" in r] == []
    assert [str(w.message) for w in caught if "Unclosed" in str(w.message)] == []
