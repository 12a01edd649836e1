"""User hooks named by import path, as slime's `--*-path` flags name them: `pkg.module.function`,
`pkg.module:function`, or `path/to/file.py:function` (the same forms every `*-path` flag takes)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

FORMS = "'package.module:function', 'package.module.function' or 'path/to/file.py:function'"


def is_file_spec(path: str) -> bool:
    """Whether `path` names a Python file (`file.py:name`, or a target with a path separator)."""
    target = path.rpartition(":")[0]
    return target.endswith(".py") or "/" in target or "\\" in target


def _load_file(file: str, path: str, flag: str) -> ModuleType:
    resolved = Path(file).expanduser().resolve()
    if not resolved.is_file():
        raise ValueError(f"{flag} {path!r}: file {str(resolved)!r} does not exist")
    name = f"rl_core_hook_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ValueError(f"{flag} {path!r}: {str(resolved)!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ValueError(f"{flag} {path!r}: executing {str(resolved)!r} failed: {e!r}") from None
    return module


def load_function(path: str, *, flag: str = "hook") -> Callable[..., Any]:
    """The callable `path` names (see the module docstring); errors name the flag and the path."""
    if is_file_spec(path):
        file, _, attr = path.rpartition(":")
        if not attr:
            raise ValueError(f"{flag} {path!r}: expected {FORMS}")
        module = _load_file(file, path, flag)
        module_name = file
    else:
        module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
        if not sep or not module_name or not attr:
            raise ValueError(f"{flag} {path!r}: expected {FORMS}")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"{flag} {path!r}: cannot import {module_name!r} ({e})") from None
    target = getattr(module, attr, None)
    if not callable(target):
        raise ValueError(f"{flag} {path!r}: {module_name!r} has no callable {attr!r}")
    return target
