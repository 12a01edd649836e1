"""Check a call or a launch argv against the pinned SGLang's API fixture, without SGLang.

`call_problems` names what SGLang would refuse or, worse, silently ignore: an unknown route or
method, a field its request structure lacks (SGLang drops unknown fields without a word), a value of
the wrong JSON type, a missing required field, a session route outside a weight-update session.
`argv_problems` does the same for a `sglang.launch_server` command line. Both return a list of
messages; empty means conforming.
"""

from __future__ import annotations

import ast
import functools
from typing import Any

from rl_sglang.api_fixture import launch_server_flags, sglang_api

_SCALARS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "bytes": (str,)}  # bytes travel as base64


def call_problems(method: str, route: str, payload: Any, *, in_session: bool = False) -> list[str]:
    api = sglang_api()
    spec = api["routes"].get(route)
    where = f"{method} {route}"
    if spec is None:
        return [f"{where}: no such route in sglang=={api['sglang_version']}"]
    problems = []
    if method not in spec["methods"]:
        problems.append(f"{where}: route takes {spec['methods']}")
    if spec.get("needs_session") and not in_session:
        problems.append(f"{where}: SGLang refuses it outside /begin_weight_update ... /end_weight_update")
    if spec["body"] is None:
        if payload not in (None, {}):
            problems.append(f"{where}: takes no body, got {payload!r}")
        return problems
    problems += struct_problems(spec["body"], payload or {}, where)
    if route == "/generate" and isinstance((payload or {}).get("sampling_params"), dict):
        problems += struct_problems("SamplingParams", payload["sampling_params"], f"{where} sampling_params")
    return problems


def struct_problems(struct: str, payload: dict[str, Any], where: str) -> list[str]:
    fields = sglang_api()["structs"][struct]
    if not isinstance(payload, dict):
        return [f"{where}: body must be a JSON object, got {type(payload).__name__}"]
    problems = [f"{where}: field {name!r} is not in SGLang's {struct}" for name in payload if name not in fields]
    problems += [f"{where}: required field {name!r} missing" for name, f in fields.items() if f["required"] and name not in payload]
    for name, value in payload.items():
        if name in fields and not value_fits(fields[name]["type"], value):
            problems.append(f"{where}: field {name!r}={_short(value)} does not fit {fields[name]['type']}")
    return problems


def value_fits(type_text: str, value: Any) -> bool:
    """Whether a JSON value can be read as the annotated type; names the fixture does not resolve
    (SGLang's own aliases and classes) accept any value."""
    return _fits(_parse(type_text), value)


@functools.cache
def _parse(type_text: str) -> ast.expr:
    return ast.parse(type_text, mode="eval").body


def _fits(node: ast.expr, value: Any) -> bool:
    if isinstance(node, ast.Constant) and node.value is None:
        return value is None
    if isinstance(node, ast.Name):
        if node.id in ("Any", "object"):
            return True
        if node.id in _SCALARS:
            if isinstance(value, bool) and node.id != "bool":
                return False
            return isinstance(value, _SCALARS[node.id])
        if node.id in ("dict", "Dict"):
            return isinstance(value, dict)
        if node.id in ("list", "List"):
            return isinstance(value, list)
        return True  # an SGLang alias or class the fixture does not expand
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _fits(node.left, value) or _fits(node.right, value)
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        outer, args = node.value.id, node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if outer == "Optional":
            return value is None or _fits(args[0], value)
        if outer == "Union":
            return any(_fits(a, value) for a in args)
        if outer in ("List", "list", "Set", "set", "Sequence", "Tuple", "tuple"):
            if not isinstance(value, list):
                return False
            if outer in ("Tuple", "tuple") and not (len(args) == 2 and isinstance(args[1], ast.Constant)):
                return len(args) == len(value) and all(_fits(a, v) for a, v in zip(args, value))
            return all(_fits(args[0], v) for v in value)
        if outer in ("Dict", "dict", "Mapping"):
            return isinstance(value, dict) and all(_fits(args[1], v) for v in value.values())
        if outer == "Literal":
            return value in [ast.literal_eval(a) for a in args]
    return True


def argv_problems(argv: list[str]) -> list[str]:
    """Flags of `python -m sglang.launch_server ...` (everything after the module name): each an
    exact flag name of the pinned parser with the number of values it takes."""
    flags = launch_server_flags()
    if "sglang.launch_server" in argv:
        argv = argv[argv.index("sglang.launch_server") + 1 :]
    problems, i = [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        spec = flags.get(flag)
        values = []
        i += 1
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if spec is None:
            problems.append(f"{flag}: not a flag of sglang=={sglang_api()['sglang_version']} launch_server")
            continue
        count = len(values) + ("=" in argv[i - len(values) - 1])
        wanted = {"none": count == 0, "one": count == 1, "list": count >= 1}[spec["takes"]]
        if not wanted:
            problems.append(f"{flag}: takes {spec['takes']} value(s), got {values}")
        for item in values:
            if spec["type"] in ("int", "float") and not _number(spec["type"], item):
                problems.append(f"{flag}: {item!r} is not {spec['type']}")
    return problems


def _number(kind: str, text: str) -> bool:
    try:
        (int if kind == "int" else float)(text)
    except ValueError:
        return False
    return True


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."
