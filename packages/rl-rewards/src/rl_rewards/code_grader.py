"""The `code` reward: run the response's program against the label's tests in the sandbox.

Label forms (a dict, or the same as a JSON string):
- `{"tests": [{"input": "...", "output": "..."}, {"assert": "assert f(1) == 2"}, "assert f(2) == 3"]}`:
  stdin/stdout tests and assert-style test code, mixed freely;
- `{"inputs": [...], "outputs": [...]}` (APPS style), `{"asserts": [...]}`, `{"test_code": "..."}` (one test).
Each test is one sandboxed run; reward = fraction of tests passed. A stdin/stdout test passes when the
output equals the expected one line by line, trailing whitespace and trailing blank lines ignored; an
assert test passes when the program followed by the test code exits with status 0.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from rl_rewards.sandbox import SandboxLimits, run_python_sandboxed

_FENCE = re.compile(r"```[ \t]*(?P<lang>[A-Za-z0-9_+-]*)[^\n]*\n(?P<body>.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3"}


@dataclass(frozen=True)
class CodeTest:
    """One test: stdin/stdout (`expected_output` set) or assert-style (`test_code` set)."""

    stdin: str = ""
    expected_output: str | None = None
    test_code: str | None = None


def extract_program(response: str) -> str:
    """The last ```python block; else the last untagged ``` block; else the whole response."""
    blocks = list(_FENCE.finditer(response))
    for wanted in (lambda lang: lang.lower() in _PYTHON_TAGS, lambda lang: lang == ""):
        chosen = [block for block in blocks if wanted(block.group("lang"))]
        if chosen:
            return chosen[-1].group("body")
    return response


def _text_field(value: Any, where: str) -> str:
    if isinstance(value, (list, tuple)):
        value = "\n".join(str(part) for part in value)
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"code reward: label field {where} must be text, got {type(value).__name__}")
    return str(value)


def _parse_test(entry: Any, where: str) -> CodeTest:
    if isinstance(entry, str):
        return CodeTest(test_code=entry)
    if not isinstance(entry, dict):
        raise ValueError(f"code reward: label field {where} must be a dict or assert code, got {type(entry).__name__}")
    for key in ("assert", "code", "test_code"):
        if key in entry:
            return CodeTest(test_code=_text_field(entry[key], f"{where}.{key}"))
    if "output" not in entry:
        raise ValueError(f"code reward: label field {where} needs 'output' (with 'input') or 'assert'")
    return CodeTest(
        stdin=_text_field(entry.get("input", ""), f"{where}.input"),
        expected_output=_text_field(entry["output"], f"{where}.output"),
    )


def parse_code_tests(label: Any) -> list[CodeTest]:
    """The tests a label describes; malformed labels raise naming the field."""
    if isinstance(label, str):
        try:
            label = json.loads(label)
        except json.JSONDecodeError as error:
            raise ValueError(f"code reward: label is a string but not JSON: {error}") from error
    if not isinstance(label, dict):
        raise ValueError(f"code reward: label must be a dict of tests, got {type(label).__name__}")
    tests: list[CodeTest] = []
    for index, entry in enumerate(label.get("tests") or []):
        tests.append(_parse_test(entry, f"tests[{index}]"))
    if "inputs" in label or "outputs" in label:
        inputs, outputs = label.get("inputs") or [], label.get("outputs") or []
        if len(inputs) != len(outputs):
            raise ValueError(f"code reward: label has {len(inputs)} inputs but {len(outputs)} outputs")
        for index, (stdin, output) in enumerate(zip(inputs, outputs)):
            tests.append(
                CodeTest(stdin=_text_field(stdin, f"inputs[{index}]"), expected_output=_text_field(output, f"outputs[{index}]"))
            )
    for index, code in enumerate(label.get("asserts") or []):
        tests.append(CodeTest(test_code=_text_field(code, f"asserts[{index}]")))
    if label.get("test_code"):
        tests.append(CodeTest(test_code=_text_field(label["test_code"], "test_code")))
    if not tests:
        raise ValueError(f"code reward: label has no tests (keys: {sorted(label)})")
    return tests


def _normalized_lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def outputs_match(actual: str, expected: str) -> bool:
    """Line-by-line equality, trailing whitespace and trailing blank lines ignored."""
    return _normalized_lines(actual) == _normalized_lines(expected)


class CodeGrader:
    """Sandboxed test runner; `max_total_s` bounds one sample's runs (tests not reached count as failed)."""

    def __init__(
        self,
        *,
        timeout_s: float = 5.0,
        memory_mb: int = 512,
        max_output_bytes: int = 1 << 20,
        max_total_s: float = 30.0,
        isolation: str | None = None,
    ) -> None:
        self.limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes)
        self.max_total_s = max_total_s
        self.isolation = isolation

    def test_results(self, response: str, label: Any) -> list[bool]:
        """Pass/fail for each of the label's tests, in order."""
        tests = parse_code_tests(label)
        program = extract_program(response or "")
        deadline = time.monotonic() + self.max_total_s
        results = []
        for test in tests:
            if time.monotonic() >= deadline:
                results.append(False)
                continue
            if test.test_code is not None:
                run = run_python_sandboxed(f"{program}\n\n{test.test_code}\n", "", self.limits, isolation=self.isolation)
                results.append(run.succeeded)
            else:
                run = run_python_sandboxed(program, test.stdin, self.limits, isolation=self.isolation)
                results.append(run.succeeded and outputs_match(run.stdout, test.expected_output or ""))
        return results

    def __call__(self, *, prompt: str, response: str, label: Any, metadata: dict[str, Any]) -> float:
        results = self.test_results(response, label)
        return sum(results) / len(results)
