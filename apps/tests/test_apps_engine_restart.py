"""Engines that die come back: the engine's actor restarts the process, loads the current weights, the router readmits it."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request

import pytest

KILLER = '''
import asyncio, json, os, signal, time, urllib.request
import psutil

def _engines(model, since):
    """This run's engines (started after `since`; other tests' engines share the model), not the workers they fork."""
    ours = {{p.pid: p.info["cmdline"] for p in psutil.process_iter(["cmdline", "create_time"])
            if "rl_sglang.embedded" in " ".join(p.info["cmdline"] or []) and model in " ".join(p.info["cmdline"] or [])
            and p.info["create_time"] >= since}}
    return {{pid: cmd for pid, cmd in ours.items() if psutil.Process(pid).ppid() not in ours}}

def _answers(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{{port}}/model_info", timeout=2) as r:
            return json.loads(r.read()).get("weight_version") not in (None, "0")
    except OSError:
        return False

class KillOneEngine:
    """At the {at}th generate request: SIGKILL one embedded engine of this run, then hold that request until the
    replacement answers with loaded weights and the router's health check had time to readmit it, so the rollouts
    after it meet the restarted engine however slow this machine is. Logs who answered what."""

    def __init__(self):
        self.count = 0

    async def __call__(self, request, call_next):
        self.count += 1
        if self.count == {at}:
            killed_at = time.time()
            os.kill(min(_engines({model!r}, {since})), signal.SIGKILL)
            deadline = killed_at + 120
            while time.time() < deadline:
                fresh = _engines({model!r}, killed_at)
                ports = [cmd[cmd.index("--port") + 1] for cmd in fresh.values() if "--port" in cmd]
                if ports and await asyncio.to_thread(_answers, ports[0]):
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(2.0)
        response = await call_next(request)
        with open({log!r}, "a") as f:
            f.write(json.dumps({{"n": self.count, "engine": request.engine,
                                "version": (response.get("meta_info") or {{}}).get("weight_version")}}) + "\\n")
        return response
'''


@pytest.mark.slow
def test_a_killed_engine_is_restarted_with_the_current_weights_and_every_sample_is_trained_on_once(
        tiny_run_config, tiny_task, tmp_path):
    from rl_apps.metrics import read_metrics
    from rl_apps.train import run, train_loop
    from rl_core.debug_data import load_rollout

    per_rollout = 4 * 4
    log = tmp_path / "served.jsonl"
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(at=per_rollout + 5, model=str(tiny_task / "model"), log=str(log), since=time.time()))
    config = tiny_run_config(
        tmp_path / "run", num_rollout=4, rollout_num_engines=2, use_fault_tolerance=True,
        update_weight_transport="disk", rollout_health_check_interval=0.3, rollout_health_check_timeout=5.0,
        rollout_health_check_first_wait=0.5, router_middleware_paths=[f"{killer}:KillOneEngine"],
        save_debug_rollout_data=str(tmp_path / "debug" / "rollout_{rollout_id}.jsonl"), use_tensorboard=False,
    )
    seen: dict[str, list] = {}

    def loop_then_ask_the_engines(config, parts, sink, eval_sink):
        import ray

        train_loop(config, parts, sink, eval_sink)
        seen["restarts"] = ray.get([e.restart_count.remote() for e in parts.engines])
        seen["versions"] = [json.loads(urllib.request.urlopen(url + "/model_info", timeout=10).read())["weight_version"]
                            for url in parts.engine_urls]

    rows = read_metrics(run(config, loop=loop_then_ask_the_engines))
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # training went on
    restarted = seen["restarts"].index(1)
    assert sorted(seen["restarts"]) == [0, 1] and rows[-1]["engines/restarts"] == 1.0
    # every sample of every rollout, the one in flight at the kill included, trained on exactly once
    for rollout_id in range(4):
        samples = load_rollout(tmp_path / "debug" / "rollout_{rollout_id}.jsonl", rollout_id)
        assert sorted(s.index for s in samples) == list(range(rollout_id * per_rollout, (rollout_id + 1) * per_rollout))
        assert all(s.response_length > 0 for s in samples)
        if rollout_id > 0:  # the sync loop generates rollout k with policy version k
            assert {s.weight_version for s in samples} == {str(rollout_id)}
    # the restarted engine went back into rotation and answered with the current version
    served = [json.loads(line) for line in log.read_text().splitlines()]
    after = [s for s in served if s["n"] > per_rollout * 2 and s["engine"] == f"engine{restarted}"]
    assert after and {s["version"] for s in after} <= {"2", "3"}
    assert seen["versions"] == ["4", "4"]
    assert rows[-1][f"router/engine/engine{restarted}/in_rotation"] == 1.0 and rows[-1]["router/readmissions"] >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _ask(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    answer = await reader.read()
    writer.close()
    return answer


def test_the_forwarder_holds_connections_while_the_engine_restarts_and_delivers_them_to_the_new_one():
    from rl_apps.engine_supervision import HoldingForwarder

    async def echo(tag: bytes, reader, writer):
        writer.write(tag + await reader.read())
        await writer.drain()
        writer.close()

    async def scenario():
        old_port, new_port = _free_port(), _free_port()
        old = await asyncio.start_server(lambda r, w: echo(b"old:", r, w), "127.0.0.1", old_port)
        new = await asyncio.start_server(lambda r, w: echo(b"new:", r, w), "127.0.0.1", new_port)
        forwarder = HoldingForwarder(_free_port(), hold_s=5.0)
        try:
            forwarder.open(old_port)
            assert await _ask(forwarder.port, b"a") == b"old:a"
            forwarder.hold()
            held = asyncio.ensure_future(_ask(forwarder.port, b"b"))
            await asyncio.sleep(0.3)
            assert not held.done()  # waits instead of failing
            forwarder.open(new_port)
            assert await asyncio.wait_for(held, 5) == b"new:b"
        finally:
            forwarder.close()
            old.close()
            new.close()

    asyncio.run(scenario())


def test_newest_weights_picks_the_latest_complete_version(tmp_path):
    from rl_apps.engine_supervision import newest_weights

    assert newest_weights(tmp_path / "none") is None
    for name, complete in [("weights_2", True), ("weights_10", True), ("weights_11", False), ("weights_x", True)]:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "model.safetensors.index.json").write_text("{}")
    assert newest_weights(tmp_path) == (tmp_path / "weights_10", "10")


@pytest.mark.parametrize(("flags", "message"), [
    (dict(rollout_max_engine_restarts=2), "rollout_max_engine_restarts is set but --use-fault-tolerance is off"),
    (dict(use_fault_tolerance=True, rollout_max_engine_restarts=2), "needs --update-weight-transport disk"),
    (dict(rollout_health_check_first_wait=5.0), "--use-fault-tolerance is off"),
])
def test_restart_flags_that_cannot_act_are_refused(tiny_task, flags, message):
    from pydantic import ValidationError

    from rl_apps.train_config import TrainConfig

    with pytest.raises(ValidationError, match=message):
        TrainConfig(hf_checkpoint=tiny_task / "model", prompt_data=tiny_task / "train.jsonl", rm_type="math", **flags)
