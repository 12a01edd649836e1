"""Pulls the final answer out of a model response: `\\boxed{...}`, "The answer is X", else the last number.

Only the tail of a response is read (`MAX_SCAN_CHARS`), so a multi-megabyte or deliberately nested
response costs linear time on a few thousand characters at most. A response that opens a box anywhere
is answered by its last complete box or not at all: an unclosed `\\boxed{` (a truncated answer, or a
run of thousands of them) never falls back to the answer phrase or the last number in the text.
"""

from __future__ import annotations

import re

MAX_SCAN_CHARS = 4096
"""Final answers sit at the end of a response; reading only the tail bounds the work on hostile input."""

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_MAX_BOX_ATTEMPTS = 16
"""Unclosed boxes are skipped backwards; bounding the attempts keeps a box-spamming response linear."""
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is\b|:)\s*[:=]?\s*(?P<answer>[^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"(?:-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+)(?:\s*\\?%)?")


def response_tail(text: str) -> str:
    """The last `MAX_SCAN_CHARS` characters of `text`, where final answers live."""
    return text[-MAX_SCAN_CHARS:]


def _braced_content(text: str, open_index: int) -> str | None:
    """Content of the brace group opening at `open_index`, or None when it never closes."""
    depth = 0
    for index in range(open_index, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`), nested braces kept."""
    text = response_tail(text)
    search_end = len(text)
    for _ in range(_MAX_BOX_ATTEMPTS):
        start = max(text.rfind(command, 0, search_end) for command in _BOX_COMMANDS)
        if start < 0:
            return None
        command = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
        after = start + len(command)
        if text.startswith("{", after):
            content = _braced_content(text, after)
            if content is not None:
                return content.strip()
        elif text.startswith(" ", after):
            bare = text[after:].strip().split("$")[0].split()
            if bare:
                return bare[0]
        search_end = start
    return None


def answer_phrase(text: str) -> str | None:
    """What follows the last "The answer is" / "Final answer:" on its line, trailing full stop dropped."""
    matches = list(_ANSWER_PHRASE.finditer(response_tail(text)))
    if not matches:
        return None
    answer = matches[-1].group("answer").strip().strip("*").rstrip(". ").strip("*").strip()
    if len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$":
        answer = answer.strip("$").strip()
    return answer or None


def last_number(text: str) -> str | None:
    """The last number in the text (integers, decimals, `1,000`, simple `a/b` fractions, a trailing `%`)."""
    matches = _NUMBER.findall(response_tail(text))
    if not matches:
        return None
    return matches[-1].replace(" ", "").rstrip(",")


def opens_a_box(text: str) -> bool:
    """Whether `text` uses `\\boxed` or `\\fbox` anywhere (a substring scan: linear even on megabytes)."""
    return any(command in text for command in _BOX_COMMANDS)


def extract_math_answer(response: str) -> str | None:
    """The response's final answer: the last complete box when it opens one (None if none closes), else
    the answer phrase, else the last number."""
    if opens_a_box(response):
        return last_boxed(response) or None
    return answer_phrase(response) or last_number(response)
