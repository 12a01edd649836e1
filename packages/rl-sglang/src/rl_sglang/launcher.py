"""Start a rollout engine as a subprocess: real SGLang (`sglang.launch_server`) or the embedded one.

Imports neither torch nor SGLang: SGLang is only probed (`importlib.util.find_spec`) when asked for,
because it pins its own torch and is not a dependency of this package.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal

from rl_sglang.sglang_flags import check_sglang_args
from rl_sglang.version import SGLANG_VERSION_CODED_AGAINST

logger = logging.getLogger(__name__)

# The embedded engine's own flags (SGLang's names; `seed` is its older spelling of `random_seed`);
# other `--sglang-*` settings have no meaning there.
EMBEDDED_FLAGS = (
    "device", "dtype", "max_running_requests", "random_seed", "seed", "mem_fraction_static", "max_total_tokens",
    "context_length", "chunked_prefill_size", "cuda_graph_max_bs", "disable_cuda_graph", "disable_radix_cache",
    "enable_torch_compile", "torch_compile_max_bs",
    "disable_overlap_schedule", "enable_overlap_schedule",
)
_STDERR_TAIL_CHARS = 4000


def _flag_args(args: dict[str, Any]) -> list[str]:
    """{"mem_fraction_static": 0.8, "enable_memory_saver": True} → ["--mem-fraction-static", "0.8",
    "--enable-memory-saver"]; False and None are dropped, lists become several values."""
    argv: list[str] = []
    for key, value in args.items():
        if not key or not key.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"engine argument name {key!r} is not a flag name")
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv.extend([flag, *(str(v) for v in value)])
        else:
            argv.extend([flag, str(value)])
    return argv


def build_sglang_argv(
    model_path: str, host: str, port: int, sglang_args: dict[str, Any] | None = None, *, python: str | None = None
) -> list[str]:
    """argv for `python -m sglang.launch_server`; every setting must be a flag of the pinned
    SGLang's parser (`check_sglang_args`), so a stale name fails here, not in the engine process. `python` is
    the interpreter of an environment of SGLang's own (SGLang pins its torch), this one by default."""
    check_sglang_args(sglang_args or {})
    argv = [python or sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path)]
    argv += ["--host", host, "--port", str(port)]
    return argv + _flag_args(sglang_args or {})


def build_embedded_argv(model_path: str, host: str, port: int, embedded_args: dict[str, Any] | None = None) -> list[str]:
    """argv for `python -m rl_sglang.embedded`; `embedded_args` may hold device, dtype,
    max_running_requests, random_seed (or seed) (anything else raises ValueError naming it)."""
    embedded_args = dict(embedded_args or {})
    unknown = sorted(set(embedded_args) - set(EMBEDDED_FLAGS))
    if unknown:
        raise ValueError(f"embedded engine has no flag --{unknown[0].replace('_', '-')}")
    if "seed" in embedded_args:
        seed = embedded_args.pop("seed")
        embedded_args.setdefault("random_seed", seed)
    argv = [sys.executable, "-m", "rl_sglang.embedded", "--model-path", str(model_path)]
    argv += ["--host", host, "--port", str(port)]
    return argv + _flag_args(embedded_args)


def sglang_available(python: str | None = None) -> bool:
    """Whether `python` (default: this interpreter) can import sglang."""
    if python is None or Path(python).resolve() == Path(sys.executable).resolve():
        return importlib.util.find_spec("sglang") is not None
    try:
        found = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('sglang') is not None)"],
                               capture_output=True, text=True, timeout=60)
    except OSError:
        return False
    return found.stdout.strip() == "True"


WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1"}
"""Bind addresses that listen on every interface, and where a process on the same machine reaches them."""


def local_host(bind_host: str) -> str:
    """Where a process on the engine's own machine connects to a server bound to `bind_host`."""
    return WILDCARD_HOSTS.get(bind_host, bind_host)


def http_url(host: str, port: int) -> str:
    """`http://host:port`, with an IPv6 host in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EngineProcess:
    """A launched engine subprocess (its own session, so terminate() reaches SGLang's children)."""

    def __init__(self, argv: list[str], url: str, env: dict[str, str]):
        self.argv = argv
        self.url = url
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=self._stderr, start_new_session=True
        )

    def stderr_tail(self, chars: int = _STDERR_TAIL_CHARS) -> str:
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - chars))
        return self._stderr.read().decode("utf-8", errors="replace")

    def wait_until_healthy(self, timeout_s: float = 600.0, poll_s: float = 0.25) -> None:
        """Poll GET /health until 200; raise if the process dies (with its stderr tail) or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"engine {self.argv[2]} exited with code {code} before becoming healthy; stderr tail:\n"
                    f"{self.stderr_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(poll_s)
        raise TimeoutError(f"engine at {self.url} not healthy after {timeout_s}s; stderr tail:\n{self.stderr_tail()}")

    def terminate(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the engine's process group, SIGKILL it if it lingers."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout_s)
        self._stderr.close()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()


def launch_engine(
    kind: Literal["sglang", "embedded"],
    model_path: str,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    sglang_args: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    python: str | None = None,
    advertise_host: str | None = None,
) -> EngineProcess:
    """Start an engine bound to `host` (SGLang's --host). For kind "embedded", `sglang_args` keys it understands
    (device, dtype, max_running_requests, random_seed) are passed on and the SGLang-only rest is logged and
    skipped, so one set of `--sglang-*` flags serves both kinds. `python` runs SGLang from an environment of its
    own. The process's `url` carries `advertise_host` (the address other machines reach this one at: needed
    when `host` is a wildcard such as 0.0.0.0), else `host` (loopback for a wildcard)."""
    args = dict(sglang_args or {})
    if "host" in args:  # --sglang-host: SGLang's name for the address the engine binds
        host = str(args.pop("host"))
    port = free_port(host) if port is None else port
    child_env = dict(os.environ if env is None else env)
    if kind == "sglang":
        if not sglang_available(python):
            raise ImportError(
                f"kind='sglang' needs SGLang (coded against sglang=={SGLANG_VERSION_CODED_AGAINST}), which "
                f"{python or sys.executable} cannot import; install it (or point --engine-python at its environment's"
                " python) or use kind='embedded'"
            )
        argv = build_sglang_argv(model_path, host, port, args, python=python)
    elif kind == "embedded":
        skipped = sorted(set(args) - set(EMBEDDED_FLAGS))
        if skipped:
            logger.warning("embedded engine ignores SGLang-only settings: %s", ", ".join(skipped))
        argv = build_embedded_argv(model_path, host, port, {k: v for k, v in args.items() if k in EMBEDDED_FLAGS})
        if args.get("device", "auto") == "cpu":
            # One thread per engine process: torch's default (a thread per core) competes with the trainer
            # and other engines on the same cores and was measured 7-10x slower; Ray sets the same for its workers.
            child_env.setdefault("OMP_NUM_THREADS", "1")
        # The child imports the same rl_sglang as this process, installed or not.
        package_root = str(Path(__file__).resolve().parent.parent)
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, child_env.get("PYTHONPATH")) if p)
    else:
        raise ValueError(f"kind must be 'sglang' or 'embedded', got {kind!r}")
    return EngineProcess(argv, http_url(advertise_host or local_host(host), port), child_env)
