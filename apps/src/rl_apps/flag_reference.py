"""Writes docs/flags.md, the flag reference, from the config models: `python -m rl_apps.flag_reference [OUT]`.

A test compares the file with this output, so the reference cannot go stale."""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from rl_apps.cli import PASSTHROUGH_PREFIX, SECTIONS, _flag, _strip_optional, field_help, section_of


def _kind(annotation: Any) -> str:
    annotation = _strip_optional(annotation)
    if annotation is bool:
        return "on/off"
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return f"{_kind(typing.get_args(annotation)[0])} ..."
    if typing.get_origin(annotation) is dict:
        return "JSON object"
    return {int: "int", float: "float", str: "text", Path: "path"}.get(annotation, str(annotation))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rows(model: type[BaseModel], names: list[str]) -> list[str]:
    rows = []
    for name in names:
        field = model.model_fields[name]
        flag = f"`{_flag(name)}`" + (f" / `--no-{name.replace('_', '-')}`" if _strip_optional(field.annotation) is bool else "")
        rows.append(f"| {flag} | {_kind(field.annotation)} | {_cell(field_help(model, name))} |")
    return rows


def render() -> str:
    from rl_apps.eval import EvalAppConfig
    from rl_apps.train_async import AsyncTrainConfig
    from rl_apps.train_config import TrainConfig

    lines = [
        "# Flag reference",
        "",
        "Generated from the config models by `uv run --frozen python -m rl_apps.flag_reference docs/flags.md`;",
        "a test fails when this file is stale. `rl-train --help` prints the same text. Flags keep slime's names;",
        f"any `{PASSTHROUGH_PREFIX}X VALUE` is handed to SGLang as `--X VALUE`.",
        "",
        "`rl-train-async` takes the same flags (it refuses `--colocate`); `rl-eval` takes them too, does not need",
        "`--prompt-data`, and adds the ones listed at the end.",
        "",
    ]
    names = [n for n in TrainConfig.model_fields if n != "sglang_args"]
    for section in SECTIONS:
        in_section = [n for n in names if section_of(TrainConfig, n) == section]
        if not in_section:
            continue
        lines += [f"## {section}", "", "| flag | value | what it does |", "|---|---|---|", *_rows(TrainConfig, in_section), ""]
    for model, prog in ((AsyncTrainConfig, "rl-train-async"), (EvalAppConfig, "rl-eval")):
        extra = [n for n in model.model_fields if n not in TrainConfig.model_fields]
        if extra:
            lines += [f"## {prog} only", "", "| flag | value | what it does |", "|---|---|---|", *_rows(model, extra), ""]
    return "\n".join(lines)


def main() -> None:
    text = render()
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
