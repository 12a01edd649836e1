"""Load a middleware named by import path, so configs can add their own without code changes."""

from __future__ import annotations

import importlib
from typing import Any

from rl_router.protocols import Middleware


def load_middleware(spec: str, **kwargs: Any) -> Middleware:
    """`"package.module:ClassName"` -> an instance (classes are called with `kwargs`; other callables are
    returned as they are, e.g. a middleware function or an instance)."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"middleware spec {spec!r} must look like 'package.module:ClassName'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"middleware spec {spec!r}: cannot import module {module_name!r}: {exc}") from exc
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
