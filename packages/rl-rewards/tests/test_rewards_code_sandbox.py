"""The `code` reward: sandboxed runs with timeouts, memory limits, no network, and no surviving children."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from rl_rewards import build_reward
from rl_rewards.code_grader import CodeGrader, extract_program, outputs_match, parse_code_tests
from rl_rewards.sandbox import (
    NETWORK_ISOLATION_AUDIT_HOOK,
    SandboxLimits,
    network_isolation,
    run_python_sandboxed,
)

ADD_TESTS = {
    "tests": [
        {"input": "1 2\n", "output": "3\n"},
        {"input": "10 -4\n", "output": "6"},
        {"input": "0 0\n", "output": "0\n"},
        {"input": "5 5\n", "output": "10\n"},
    ]
}
FAST = {"timeout_s": 2.0, "memory_mb": 256}
ISOLATIONS = sorted({network_isolation(), NETWORK_ISOLATION_AUDIT_HOOK})
"""Every test that matters for containment runs under the mechanism in force and under the fallback."""


def _fenced(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}\n```\nDone."


def _grade(response: str, label, **options) -> float:
    return CodeGrader(**{**FAST, **options})(prompt="", response=response, label=label, metadata={})


def test_rewards_code_network_isolation_names_a_known_mechanism() -> None:
    assert network_isolation() in ("netns", "user-netns", NETWORK_ISOLATION_AUDIT_HOOK)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("a, b = map(int, input().split())\nprint(a + b)", 1.0),
        ("a, b = map(int, input().split())\nprint(a + b if a != 5 else 0)", 0.75),
        ("a, b = map(int, input().split())\nprint(max(a, b) * 2)", 0.5),
        ("print(3)", 0.25),
        ("a, b = map(int, input().split())\nprint(a - b)", 0.25),
        ("raise SystemExit(1)", 0.0),
        ("this is not python", 0.0),
    ],
)
def test_rewards_code_reward_is_the_fraction_of_stdio_tests_passed(code: str, expected: float) -> None:
    assert _grade(_fenced(code), ADD_TESTS) == pytest.approx(expected)


def test_rewards_code_assert_tests_are_run_after_the_program() -> None:
    label = {"tests": ["assert square(3) == 9", {"assert": "assert square(-2) == 4"}, "assert square(0) == 1"]}
    assert _grade(_fenced("def square(x):\n    return x * x"), label) == pytest.approx(2 / 3)
    assert _grade(_fenced("def square(x):\n    return x + x"), label) == pytest.approx(0.0)


def test_rewards_code_accepts_apps_style_json_string_labels_and_unfenced_programs() -> None:
    label = json.dumps({"inputs": ["2\n", "7\n"], "outputs": ["4\n", "14\n"]})
    assert _grade("n = int(input())\nprint(n * 2)", label) == 1.0


def test_rewards_code_a_program_that_loops_forever_is_killed_at_the_timeout() -> None:
    started = time.monotonic()
    assert _grade(_fenced("while True:\n    pass"), {"tests": ["pass", "pass"]}, timeout_s=0.5) == 0.0
    assert time.monotonic() - started < 4.0


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_rewards_code_a_program_that_allocates_without_limit_hits_the_memory_limit(isolation: str) -> None:
    started = time.monotonic()
    hog = "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024 * 1024))"
    result = run_python_sandboxed(hog, limits=SandboxLimits(timeout_s=10.0, memory_mb=256), isolation=isolation)
    assert time.monotonic() - started < 5.0
    assert not result.timed_out and result.returncode != 0
    assert "MemoryError" in result.stderr


@pytest.fixture
def listening_port():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    accepted: list[object] = []
    stop = threading.Event()

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            accepted.append(connection)

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join(timeout=2)
    server.close()


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_rewards_code_a_program_cannot_reach_a_loopback_server(listening_port, isolation: str) -> None:
    port, accepted = listening_port
    probe = socket.create_connection(("127.0.0.1", port), timeout=2)  # the server is really there
    probe.close()
    connect = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    result = run_python_sandboxed(connect, limits=SandboxLimits(timeout_s=5.0), isolation=isolation)
    assert result.returncode != 0 and "connected" not in result.stdout
    assert ("PermissionError" if isolation == NETWORK_ISOLATION_AUDIT_HOOK else "OSError") in result.stderr
    time.sleep(0.3)
    assert len(accepted) == 1


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_rewards_code_a_forked_child_that_outlives_the_program_is_killed(tmp_path: Path, isolation: str) -> None:
    marker = tmp_path / "heartbeat"
    orphan = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    while True:\n"
        f"        with open({str(marker)!r}, 'a') as f:\n"
        "            f.write('.')\n"
        "        time.sleep(0.05)\n"
        "time.sleep(0.3)\n"
        "print('parent done')\n"
    )
    result = run_python_sandboxed(orphan, limits=SandboxLimits(timeout_s=5.0), isolation=isolation)
    assert result.succeeded and result.stdout.strip() == "parent done"
    assert marker.exists()
    size_after_run = marker.stat().st_size
    time.sleep(0.5)
    assert marker.stat().st_size == size_after_run


def test_rewards_code_runs_in_a_scratch_dir_with_a_clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RL_REWARDS_SECRET", "do-not-leak")
    result = run_python_sandboxed("import os\nprint(os.getcwd())\nprint(sorted(os.environ))\nprint(os.listdir('.'))")
    cwd, env_keys, listing = result.stdout.splitlines()
    assert cwd != os.getcwd() and "rl-rewards-sandbox-" in cwd
    assert "RL_REWARDS_SECRET" not in env_keys and listing == "[]"
    assert not Path(cwd).exists()


def test_rewards_code_output_beyond_the_cap_is_cut() -> None:
    result = run_python_sandboxed("print('x' * 100000)", limits=SandboxLimits(max_output_bytes=1000))
    assert len(result.stdout) <= 1000


def test_rewards_code_the_total_budget_fails_the_tests_not_reached() -> None:
    slow = _fenced("import time\ntime.sleep(0.6)")
    assert _grade(slow, {"tests": ["pass"] * 5}, timeout_s=2.0, max_total_s=1.0) == pytest.approx(2 / 5)


def test_rewards_code_extracts_the_last_python_block() -> None:
    response = "```text\nnot code\n```\n```python\nprint(1)\n```\n```py\nprint(2)\n```"
    assert extract_program(response).strip() == "print(2)"
    assert extract_program("```\nprint(3)\n```").strip() == "print(3)"
    assert extract_program("print(4)") == "print(4)"


def test_rewards_code_output_comparison_ignores_trailing_whitespace_only() -> None:
    assert outputs_match("1 2  \n3\n\n", "1 2\n3")
    assert not outputs_match("1  2\n3", "1 2\n3")
    assert not outputs_match("3\n1 2", "1 2\n3")


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("not json", "not JSON"),
        ([1, 2], "must be a dict"),
        ({}, "no tests"),
        ({"tests": [{"input": "1"}]}, r"tests\[0\] needs 'output'"),
        ({"tests": [3]}, r"tests\[0\] must be a dict"),
        ({"inputs": ["1"], "outputs": []}, "1 inputs but 0 outputs"),
    ],
)
def test_rewards_code_malformed_labels_are_errors_naming_the_field(label, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_code_tests(label)


def test_rewards_code_is_built_by_rm_type_and_scored_by_the_hub() -> None:
    hub = build_reward("code", None, grader_options={"timeout_s": 2.0}, timeout_s=20.0)
    items = [
        {"prompt": "", "response": _fenced("print(int(input()) + 1)"), "label": {"inputs": ["1"], "outputs": ["2"]}, "metadata": {}},
        {"prompt": "", "response": _fenced("print(0)"), "label": {"inputs": ["1"], "outputs": ["2"]}, "metadata": {}},
    ]
    assert hub.score_batch_sync(items) == [1.0, 0.0]
    assert hub.stats == {"scored": 2, "errors": 0, "timeouts": 0}
