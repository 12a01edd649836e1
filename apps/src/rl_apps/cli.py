"""Flags from pydantic fields: one flag per field, help from its docstring, grouped by the section that
declares it; parsed before torch is imported. Errors are one line naming the flags as typed."""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, NoReturn, Sequence, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)
PASSTHROUGH_PREFIX = "--sglang-"
SECTIONS = ("data", "rollout", "algorithm", "trainer", "engines", "rewards", "eval", "checkpoints", "logging", "other")
"""The order of `--help`'s groups; a Section class names its own with `help_section`."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def section_of(model: type[BaseModel], name: str) -> str:
    """The `help_section` of the class in `model`'s MRO that declares field `name`."""
    for cls in model.__mro__:
        if name in cls.__dict__.get("__annotations__", {}):
            return cls.__dict__.get("help_section", "other")
    return "other"


def field_help(model: type[BaseModel], name: str) -> str:
    """The help line of a field: its docstring, then (required) or its default."""
    field = model.model_fields[name]
    text = with_flag_names((field.description or "").strip(), list(model.model_fields))
    if name in getattr(model, "required_flags", ()):
        return f"{text} (required)".strip()
    default = field.get_default(call_default_factory=True)
    if default is not None and not isinstance(default, (dict, list)):
        text += f" (default: {default})"
    return text


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and a pointer to --help, no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser(model: type[BaseModel], prog: str, description: str) -> argparse.ArgumentParser:
    required = " ".join(f"{_flag(n)} {n.split('_')[-1].upper()}" for n in getattr(model, "required_flags", ()))
    parser = _Parser(prog=prog, description=description, allow_abbrev=False,
                     usage=f"%(prog)s {required} [FLAG VALUE ...]  (flags marked (required) below must be given)")
    groups = {s: parser.add_argument_group(s) for s in SECTIONS}
    for name, field in model.model_fields.items():
        if name == "sglang_args":
            continue
        annotation = _strip_optional(field.annotation)
        kwargs: dict[str, Any] = {"help": field_help(model, name).replace("%", "%%"), "dest": name,
                                  "default": argparse.SUPPRESS}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif typing.get_origin(annotation) is list:
            (item,) = typing.get_args(annotation)
            kwargs.update(nargs="+", type=item)
        elif typing.get_origin(annotation) is dict or annotation is dict:
            kwargs.update(type=_json_object, metavar="JSON")
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
        elif annotation is Path:
            kwargs["type"] = Path
        groups[section_of(model, name)].add_argument(_flag(name), **kwargs)
    for group in groups.values():  # argparse shows empty groups' titles too
        if not group._group_actions:
            parser._action_groups.remove(group)
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


def unknown_flag_message(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> str:
    """One line: each unknown flag with the closest known ones."""
    known = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    parts = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=2, cutoff=0.8) or difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        parts.append(f"{flag}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return f"unknown flag{'s' if len(parts) > 1 else ''} {', '.join(parts)}"


def with_flag_names(message: str, names: Sequence[str]) -> str:
    """`rollout_batch_size` -> `--rollout-batch-size` for every field name (with an underscore) in `message`."""
    multiword = sorted((n for n in names if "_" in n), key=len, reverse=True)
    if not multiword:
        return message
    pattern = re.compile(r"(?<![\w\-.])(" + "|".join(map(re.escape, multiword)) + r")(?![\w])")
    return pattern.sub(lambda m: _flag(m.group(1)), message)


def parse_config(model: type[M], argv: Sequence[str] | None, prog: str, description: str) -> M:
    """Parse flags into `model`; an unknown flag, a bad value or a bad combination exits with status 2
    and names the flags as typed."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(model, prog, description)
    rest, passthrough = split_passthrough(argv)
    namespace, unknown = parser.parse_known_args(rest)
    flags = [a for a in unknown if a.startswith("-")]
    if flags:
        from rl_sglang.sglang_flags import is_slime_router_flag, router_flag_refusal

        router_flags = [f for f in flags if is_slime_router_flag(f)]
        parser.error(router_flag_refusal(router_flags[0]) if router_flags else unknown_flag_message(parser, flags))
    if unknown:
        parser.error(f"unexpected value(s) {' '.join(unknown)}: every value follows its flag")
    values = vars(namespace)
    if passthrough:
        values["sglang_args"] = passthrough
    try:
        return model.model_validate(values)
    except ValidationError as e:
        names = list(model.model_fields)
        lines = []
        for err in e.errors():
            where = " ".join(_flag(str(p)) for p in err["loc"])
            message = with_flag_names(err["msg"].removeprefix("Value error, "), names)
            lines.append(f"{where}: {message}" if where else message)
        parser.error("invalid configuration: " + "; ".join(lines) if len(lines) > 1 else lines[0])
