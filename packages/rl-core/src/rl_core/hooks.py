"""User hooks named by import path, as slime's `--*-path` flags name them (`pkg.module.function`)."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def load_function(path: str, *, flag: str = "hook") -> Callable[..., Any]:
    """The callable at `pkg.module.name` (or `pkg.module:name`); errors name the flag and the path."""
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(f"{flag} {path!r}: expected 'package.module.function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{flag} {path!r}: cannot import {module_name!r} ({e})") from None
    target = getattr(module, attr, None)
    if not callable(target):
        raise ValueError(f"{flag} {path!r}: {module_name!r} has no callable {attr!r}")
    return target
