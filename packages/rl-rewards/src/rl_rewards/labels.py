"""Reading the `label` field: one reference answer or a list of acceptable ones."""

from __future__ import annotations

from typing import Any


def label_alternatives(label: Any, grader_name: str) -> list[str]:
    """Acceptable reference answers as strings; a missing or empty label is bad input, not a wrong answer."""
    alternatives = list(label) if isinstance(label, (list, tuple)) else [label]
    texts = [str(item).strip() for item in alternatives if item is not None]
    texts = [text for text in texts if text]
    if not texts:
        raise ValueError(f"{grader_name} reward: label {label!r} has no reference answer")
    return texts
