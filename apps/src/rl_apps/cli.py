"""Flags from pydantic fields: one flag per field, help from its docstring; parsed before torch is imported."""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)
PASSTHROUGH_PREFIX = "--sglang-"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def build_parser(model: type[BaseModel], prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    for name, field in model.model_fields.items():
        if name == "sglang_args":
            continue
        annotation = _strip_optional(field.annotation)
        default = field.get_default(call_default_factory=True)
        help_text = (field.description or "").replace("%", "%%")
        if default is not None and not isinstance(default, (dict, list)):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"help": help_text, "dest": name, "default": argparse.SUPPRESS}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif typing.get_origin(annotation) is list:
            (item,) = typing.get_args(annotation)
            kwargs.update(nargs="+", type=item)
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
        elif annotation is Path:
            kwargs["type"] = Path
        parser.add_argument(_flag(name), **kwargs)
    parser.epilog = f"Flags {PASSTHROUGH_PREFIX}X VALUE are handed to SGLang as --X VALUE."
    return parser


def _passthrough_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Separate `--sglang-X [VALUE]` flags (a flag with no value is True) from the rest."""
    rest: list[str] = []
    passthrough: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith(PASSTHROUGH_PREFIX):
            key, eq, value = arg[len(PASSTHROUGH_PREFIX) :].partition("=")
            key = key.replace("-", "_")
            if eq:
                passthrough[key] = _passthrough_value(value)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                passthrough[key] = _passthrough_value(args[i + 1])
                i += 1
            else:
                passthrough[key] = True
        else:
            rest.append(arg)
        i += 1
    return rest, passthrough


def parse_config(model: type[M], argv: Sequence[str] | None, prog: str, description: str) -> M:
    """Parse flags into `model`; any invalid value or combination exits with status 2 and names the flags."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(model, prog, description)
    rest, passthrough = split_passthrough(argv)
    values = vars(parser.parse_args(rest))
    if passthrough:
        values["sglang_args"] = passthrough
    try:
        return model.model_validate(values)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = " ".join(_flag(str(p)) for p in err["loc"]) or "flags"
            lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
        parser.error("invalid configuration:\n  " + "\n  ".join(lines))
        raise  # parser.error exits; this keeps type checkers content
