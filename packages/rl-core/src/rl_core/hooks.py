"""User hooks named by path, as slime's `--*-path` flags name them: `pkg.module.function`,
`pkg.module:function` or `path/to/file.py:function`."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable


def is_file_spec(path: str) -> bool:
    """Whether `path` names a Python file (`file.py:name`, or a target with a path separator)."""
    target = path.rpartition(":")[0]
    return target.endswith(".py") or "/" in target or "\\" in target


def _load_file(file: str, path: str, flag: str) -> Any:
    location = Path(file).expanduser().resolve()
    if not location.is_file():
        raise ValueError(f"{flag} {path!r}: no file {str(location)!r}")
    name = f"rl_hook_{location.stem}_{hashlib.sha1(str(location).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, location)
    if spec is None or spec.loader is None:
        raise ValueError(f"{flag} {path!r}: {str(location)!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ValueError(f"{flag} {path!r}: running {str(location)!r} failed: {e!r}") from e
    return module


def load_function(path: str, *, flag: str = "hook") -> Callable[..., Any]:
    """The callable at `path`; every failure raises ValueError naming the flag and the path."""
    module_name, sep, attr = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(f"{flag} {path!r}: expected 'package.module.function' or 'path/to/file.py:function'")
    if is_file_spec(path):
        module = _load_file(module_name, path, flag)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"{flag} {path!r}: cannot import {module_name!r} ({e})") from None
    target = getattr(module, attr, None)
    if not callable(target):
        raise ValueError(f"{flag} {path!r}: {module_name!r} has no callable {attr!r}")
    return target
