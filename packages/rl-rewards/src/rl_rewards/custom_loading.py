"""Loads a user's reward function from `package.module:function` or `path/to/file.py:function`."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _load_file(path_text: str, spec: str) -> ModuleType:
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"custom reward {spec!r}: file {str(path)!r} does not exist")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"rl_rewards_custom_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"custom reward {spec!r}: {str(path)!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ImportError(f"custom reward {spec!r}: executing {str(path)!r} failed: {error!r}") from error
    return module


def _load_module(module_name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"custom reward {spec!r}: cannot import module {module_name!r}: {error}") from error


def load_custom_reward(spec: str) -> Callable[..., Any]:
    """The callable named by `spec` (`package.module:function` or `path/to/file.py:function`).

    Dotted attribute paths (`module:Class.method`) are followed; every failure names the spec.
    """
    target, separator, attribute_path = spec.rpartition(":")
    if not separator or not target or not attribute_path:
        raise ValueError(f"custom reward {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    module = _load_file(target, spec) if _is_file_spec(target) else _load_module(target, spec)
    found: Any = module
    for attribute in attribute_path.split("."):
        if not hasattr(found, attribute):
            raise AttributeError(f"custom reward {spec!r}: {target!r} has no attribute {attribute_path!r}")
        found = getattr(found, attribute)
    if not callable(found):
        raise TypeError(f"custom reward {spec!r}: {attribute_path!r} is a {type(found).__name__}, not callable")
    return found
