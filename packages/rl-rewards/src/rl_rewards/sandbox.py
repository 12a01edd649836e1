"""Runs an untrusted Python program in a child process, never in the trainer's.

The child gets: its own session and process group (the whole group is SIGKILLed when the run ends, so
forked children cannot outlive it), a fresh network namespace where `unshare` allows it (as root, or
through a user namespace otherwise; a PID namespace comes with it, so even a child that escapes the
process group with `setsid` dies with the sandbox), `RLIMIT_AS` / `RLIMIT_CPU` / `RLIMIT_FSIZE` limits,
a scratch temp dir as cwd, a clean environment, and a wall-clock timeout.

Where no namespace can be made, an audit hook in the child refuses socket creation and process spawning
instead (`NETWORK_ISOLATION_AUDIT_HOOK`); that is weaker (a C extension could bypass it), which is why the
namespace is preferred. `network_isolation()` says which one is in force.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

NETWORK_ISOLATION_NETNS = "netns"
NETWORK_ISOLATION_USER_NETNS = "user-netns"
NETWORK_ISOLATION_AUDIT_HOOK = "audit-hook"
_UNSHARE_FLAGS = {
    NETWORK_ISOLATION_NETNS: ["--net", "--pid", "--fork", "--kill-child"],
    NETWORK_ISOLATION_USER_NETNS: ["--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"],
}
_CLEAN_ENV_KEYS = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}

_CHILD_BOOT = """
import resource, sys
memory, file_size, cpu, audit_hook, program = sys.argv[1:6]
resource.setrlimit(resource.RLIMIT_AS, (int(memory), int(memory)))
resource.setrlimit(resource.RLIMIT_FSIZE, (int(file_size), int(file_size)))
resource.setrlimit(resource.RLIMIT_CPU, (int(cpu), int(cpu)))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if audit_hook == "1":
    blocked = frozenset({
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "ctypes.dlopen",
    })
    def refuse(event, args, blocked=blocked):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
    sys.addaudithook(refuse)
del resource, memory, file_size, cpu, audit_hook
sys.argv = [program]
import runpy
runpy.run_path(program, run_name="__main__")
"""
"""Runs inside the child: limits first, then the optional audit hook, then the program as `__main__`."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits; `max_output_bytes` caps each of stdout and stderr (and any file the program writes)."""

    timeout_s: float = 5.0
    memory_mb: int = 512
    max_output_bytes: int = 1 << 20


@dataclass(frozen=True)
class SandboxResult:
    """What one run left behind; `returncode` is None when the run was killed at its timeout."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _unshare_works(flags: tuple[str, ...]) -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        completed = subprocess.run(
            [unshare, *flags, "--", sys.executable, "-c", "pass"],
            capture_output=True,
            timeout=30,
            env=dict(_CLEAN_ENV_KEYS),
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return completed.returncode == 0


@functools.lru_cache(maxsize=1)
def network_isolation() -> str:
    """The strongest mechanism that works on this machine, probed once per process."""
    for mode in (NETWORK_ISOLATION_NETNS, NETWORK_ISOLATION_USER_NETNS):
        if _unshare_works(tuple(_UNSHARE_FLAGS[mode])):
            return mode
    return NETWORK_ISOLATION_AUDIT_HOOK


def _read_capped(path: Path, limit: int) -> str:
    with open(path, "rb") as handle:
        return handle.read(limit).decode("utf-8", errors="replace")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python_sandboxed(
    source: str,
    stdin: str = "",
    limits: SandboxLimits = SandboxLimits(),
    *,
    isolation: str | None = None,
) -> SandboxResult:
    """Run `source` as `__main__` in a sandboxed child with `stdin` as its input.

    `isolation` forces a mechanism (`netns`, `user-netns`, `audit-hook`); None picks `network_isolation()`.
    """
    mode = isolation or network_isolation()
    if mode not in (*_UNSHARE_FLAGS, NETWORK_ISOLATION_AUDIT_HOOK):
        raise ValueError(f"isolation {mode!r} is not one of netns, user-netns, audit-hook")
    memory_bytes = limits.memory_mb * 1024 * 1024
    cpu_seconds = int(limits.timeout_s) + 1
    with tempfile.TemporaryDirectory(prefix="rl-rewards-sandbox-") as scratch_text:
        scratch = Path(scratch_text)
        workdir = scratch / "work"
        workdir.mkdir()
        program = scratch / "program.py"
        program.write_text(source, encoding="utf-8")
        (scratch / "stdin").write_text(stdin, encoding="utf-8")
        command = [
            sys.executable,
            "-I",
            "-c",
            _CHILD_BOOT,
            str(memory_bytes),
            str(limits.max_output_bytes),
            str(cpu_seconds),
            "1" if mode == NETWORK_ISOLATION_AUDIT_HOOK else "0",
            str(program),
        ]
        if mode in _UNSHARE_FLAGS:
            command = [shutil.which("unshare") or "unshare", *_UNSHARE_FLAGS[mode], "--", *command]
        env = {**_CLEAN_ENV_KEYS, "HOME": str(workdir), "TMPDIR": str(workdir)}
        with open(scratch / "stdin", "rb") as stdin_file, open(scratch / "stdout", "wb") as stdout_file, open(
            scratch / "stderr", "wb"
        ) as stderr_file:
            process = subprocess.Popen(
                command,
                stdin=stdin_file,
                stdout=stdout_file,
                stderr=stderr_file,
                cwd=workdir,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
            try:
                returncode: int | None = process.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                returncode, timed_out = None, True
            finally:
                _kill_group(process)
                process.wait()
        return SandboxResult(
            returncode=returncode,
            stdout=_read_capped(scratch / "stdout", limits.max_output_bytes),
            stderr=_read_capped(scratch / "stderr", limits.max_output_bytes),
            timed_out=timed_out,
        )
