"""A router middleware for fault_tolerance.py: at the KILL_AT-th generate request it SIGKILLs one embedded engine
of this run (the oldest process serving KILL_MODEL, started after KILL_SINCE), holds that request until a
replacement answers /model_info with loaded weights (plus KILL_SETTLE_S for the router's health check to readmit
it), and logs every answer (request number, engine, weight version) to KILL_LOG, the kill to KILL_LOG + ".kill".
Settings come from the environment, which rl-train's processes inherit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request

import psutil

AT = int(os.environ.get("KILL_AT", "0"))
MODEL = os.environ.get("KILL_MODEL", "")
SINCE = float(os.environ.get("KILL_SINCE", "0"))
LOG = os.environ.get("KILL_LOG", "served.jsonl")
SETTLE_S = float(os.environ.get("KILL_SETTLE_S", "2.0"))


def engines(since: float) -> dict[int, list[str]]:
    """pid -> argv of this run's engine processes (not the workers they fork)."""
    found = {}
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        argv = proc.info["cmdline"] or []
        line = " ".join(argv)
        if "rl_sglang.embedded" in line and MODEL in line and proc.info["create_time"] >= since:
            found[proc.pid] = argv
    return {pid: argv for pid, argv in found.items() if psutil.Process(pid).ppid() not in found}


def loaded(port: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/model_info", timeout=2) as answer:
            return json.loads(answer.read()).get("weight_version") not in (None, "0")
    except OSError:
        return False


class KillOneEngine:
    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, request, call_next):
        self.count += 1
        if self.count == AT:
            victim = min(engines(SINCE))
            killed_at = time.time()
            os.kill(victim, signal.SIGKILL)
            back_after = None
            while time.time() < killed_at + 180:
                ports = [argv[argv.index("--port") + 1] for argv in engines(killed_at).values() if "--port" in argv]
                if ports and await asyncio.to_thread(loaded, ports[0]):
                    back_after = time.time() - killed_at
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(SETTLE_S)
            with open(LOG + ".kill", "w") as f:
                json.dump({"request": self.count, "pid": victim, "back_with_weights_after_s": back_after}, f)
        response = await call_next(request)
        with open(LOG, "a") as f:
            f.write(json.dumps({"n": self.count, "engine": request.engine,
                                "version": (response.get("meta_info") or {}).get("weight_version")}) + "\n")
        return response
