"""Load a middleware named by import path or file, so configs can add their own without code changes."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from rl_router.protocols import Middleware


def load_middleware(spec: str, **kwargs: Any) -> Middleware:
    """`"package.module:ClassName"` or `"path/to/file.py:ClassName"` -> an instance (classes are called
    with `kwargs`; other callables are returned as they are, e.g. a middleware function or an instance)."""
    module_name, sep, attr_path = spec.rpartition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(
            f"middleware spec {spec!r} must look like 'package.module:ClassName' or 'path/to/file.py:ClassName'"
        )
    target: Any = _import_file(module_name, spec) if module_name.endswith(".py") else _import(module_name, spec)
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ImportError(f"middleware spec {spec!r}: {module_name!r} has no attribute {attr_path!r}") from None
    if isinstance(target, type):
        try:
            target = target(**kwargs)
        except TypeError as exc:
            raise TypeError(f"middleware spec {spec!r}: cannot construct {attr_path}: {exc}") from exc
    elif kwargs:
        raise TypeError(f"middleware spec {spec!r} names an object, not a class; it takes no arguments")
    if not callable(target):
        raise TypeError(f"middleware spec {spec!r} is not callable as a middleware: {target!r}")
    return target


def _import(module_name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"middleware spec {spec!r}: cannot import module {module_name!r}: {exc}") from exc


def _import_file(file_name: str, spec: str) -> ModuleType:
    """Run a middleware file once per process under a name derived from its absolute path."""
    path = Path(file_name).expanduser().resolve()
    if not path.is_file():
        raise ImportError(f"middleware spec {spec!r}: no file {str(path)!r}")
    module_name = f"rl_router_middleware_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"middleware spec {spec!r}: {str(path)!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ImportError(f"middleware spec {spec!r}: running {str(path)!r} failed: {exc!r}") from exc
    return module
