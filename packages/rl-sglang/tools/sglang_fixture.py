"""Write the SGLang API fixture the conformance tests check against, from the pinned SGLang wheel.

The wheel is read as text with `ast` (nothing is imported, so none of SGLang's dependencies are
needed). Re-run when the pin moves:

    pip download sglang==0.5.23 --no-deps -d /tmp/sglang_wheel
    uv run --frozen python packages/rl-sglang/tools/sglang_fixture.py /tmp/sglang_wheel/sglang-0.5.23-*.whl

then bump `SGLANG_VERSION_CODED_AGAINST` (rl_sglang/version.py) and run the rl-sglang tests.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

HTTP_SERVER = "sglang/srt/entrypoints/http_server.py"
IO_STRUCT = "sglang/srt/managers/io_struct.py"
SERVER_ARGS = "sglang/srt/server_args.py"
ARG_FIELDS = "sglang/srt/arg_groups/fields/"
SCHEDULER_WEIGHTS = "sglang/srt/managers/scheduler_components/weight_updater.py"
RUNNER_WEIGHTS = "sglang/srt/model_executor/model_runner_components/weight_updater.py"
COMMON = "sglang/srt/utils/common.py"
SAMPLING = "sglang/srt/sampling/sampling_params.py"
VERSION = "sglang/_version.py"
OUT = Path(__file__).resolve().parents[1] / "src" / "rl_sglang" / "sglang_api.json"
ROUTE_DECORATORS = {"get": ["GET"], "post": ["POST"], "put": ["PUT"], "delete": ["DELETE"]}


def read_wheel(path: Path) -> dict[str, str]:
    with zipfile.ZipFile(path) as wheel:
        return {n: wheel.read(n).decode() for n in wheel.namelist() if n.startswith("sglang/") and n.endswith(".py")}


def _strip_annotated(node: ast.expr) -> ast.expr:
    """`Annotated[X, ...]` → X (SGLang wraps validators and CLI metadata this way)."""
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in ("Annotated", "A"):
        if isinstance(node.slice, ast.Tuple):
            return _strip_annotated(node.slice.elts[0])
    return node


def _annotated_meta(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in ("Annotated", "A"):
        if isinstance(node.slice, ast.Tuple):
            return list(node.slice.elts[1:])
    return []


# ---- routes -------------------------------------------------------------------------------------


def routes(source: str) -> dict[str, Any]:
    """Every `@app.<method>(path)` / `@app.api_route(path, methods=...)` with the type of its body."""
    found: dict[str, Any] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)):
                continue
            if not (isinstance(deco.func.value, ast.Name) and deco.func.value.id == "app"):
                continue
            kind = deco.func.attr
            if not deco.args or not isinstance(deco.args[0], ast.Constant) or not isinstance(deco.args[0].value, str):
                continue  # paths computed from the environment (ollama, vertex)
            path = deco.args[0].value
            if kind == "api_route":
                methods = next(
                    [e.value for e in kw.value.elts] for kw in deco.keywords if kw.arg == "methods"
                )
            elif kind in ROUTE_DECORATORS:
                methods = ROUTE_DECORATORS[kind]
            else:
                continue
            entry = found.setdefault(path, {"methods": [], "body": None, "query": {}})
            entry["methods"] = sorted(set(entry["methods"]) | set(methods))
            body, query = _route_params(node)
            entry["body"] = entry["body"] or body
            entry["query"].update(query)
    return dict(sorted(found.items()))


def _route_params(fn: ast.AsyncFunctionDef | ast.FunctionDef) -> tuple[str | None, dict[str, str]]:
    body, query = None, {}
    args = fn.args.args
    defaults = [None] * (len(args) - len(fn.args.defaults)) + list(fn.args.defaults)
    for arg, default in zip(args, defaults):
        if arg.annotation is None or arg.arg == "request":
            continue
        annotation = ast.unparse(_strip_annotated(arg.annotation))
        if isinstance(default, ast.Call) and isinstance(default.func, ast.Name) and default.func.id == "Query":
            query[arg.arg] = annotation
        elif annotation not in ("Request", "fastapi.Request", "str"):
            body = annotation.removeprefix("Optional[").removesuffix("]")
    return body, query


# ---- request structures ---------------------------------------------------------------------


def structs(source: str) -> dict[str, Any]:
    """Fields (type, required, default) of every class in io_struct, bases' fields first."""
    tree = ast.parse(source)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out: dict[str, Any] = {}

    def fields_of(name: str) -> dict[str, Any]:
        node = classes[name]
        fields: dict[str, Any] = {}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                fields.update(fields_of(base.id))
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                if stmt.target.id.startswith("_"):
                    continue
                fields[stmt.target.id] = _field(stmt.annotation, stmt.value)
        return fields

    for name in classes:
        out[name] = fields_of(name)
    return out


def _field(annotation: ast.expr, value: ast.expr | None) -> dict[str, Any]:
    default: Any = None
    required = value is None
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field":
        kw = {k.arg: k.value for k in value.keywords}
        required = "default" not in kw and "default_factory" not in kw
        value = kw.get("default")
    if value is not None:
        try:
            default = ast.literal_eval(value)
        except ValueError:
            default = ast.unparse(value)
    return {"type": ast.unparse(_strip_annotated(annotation)), "required": required, "default": default}


# ---- CLI flags ---------------------------------------------------------------------------------


def flags(files: dict[str, str]) -> dict[str, Any]:
    """`launch_server`'s flags: the `A[T, help | Arg(...)]` fields of every namespace class (the way
    `add_cli_args_from_dataclass` registers them) plus the explicit `parser.add_argument` calls."""
    out: dict[str, Any] = {}
    for path in sorted(p for p in files if p.startswith(ARG_FIELDS)):
        for cls in ast.parse(files[path]).body:
            if not isinstance(cls, ast.ClassDef) or not _has_ns_path(cls):
                continue
            for stmt in cls.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    _namespace_flag(out, stmt)
    add_cli_args = next(
        n for n in ast.walk(ast.parse(files[SERVER_ARGS])) if isinstance(n, ast.FunctionDef) and n.name == "add_cli_args"
    )
    for call in ast.walk(add_cli_args):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument":
            names = [a.value for a in call.args if isinstance(a, ast.Constant)]
            kw = {k.arg: k.value for k in call.keywords}
            action = kw.get("action")
            takes = "none" if isinstance(action, ast.Constant) and action.value == "store_true" else "one"
            if isinstance(action, ast.Name) and "StoreTrue" in action.id:
                takes = "none"
            dest = kw["dest"].value if "dest" in kw else names[0].lstrip("-").replace("-", "_")
            type_name = kw["type"].id if isinstance(kw.get("type"), ast.Name) else "str"
            for flag in names:
                out[flag] = {"dest": dest, "takes": takes, "type": type_name if takes != "none" else "bool", "choices": None}
    for flag in ("-h", "--help"):  # argparse's own
        out[flag] = {"dest": "help", "takes": "none", "type": "bool", "choices": None}
    return dict(sorted(out.items()))


def _has_ns_path(cls: ast.ClassDef) -> bool:
    return any(
        isinstance(s, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_NS_PATH" for t in s.targets)
        for s in cls.body
    )


def _namespace_flag(out: dict[str, Any], stmt: ast.AnnAssign) -> None:
    meta = _annotated_meta(stmt.annotation)
    arg: dict[str, ast.expr] | None = None
    for item in meta:
        if isinstance(item, ast.Call) and isinstance(item.func, ast.Name) and item.func.id == "Arg":
            arg = {k.arg: k.value for k in item.keywords}
            break
        if isinstance(item, (ast.Constant, ast.JoinedStr, ast.BinOp)):
            arg = {}
            break
    if arg is None:
        return  # no CLI metadata: not a flag
    if "no_cli" in arg and isinstance(arg["no_cli"], ast.Constant) and arg["no_cli"].value:
        return
    field = stmt.target.id
    cli_name = arg["cli_name"].value if "cli_name" in arg else "--" + field.replace("_", "-")
    aliases = [e.value for e in arg["aliases"].elts] if "aliases" in arg else []
    inner = _strip_annotated(stmt.annotation)
    inner = _unwrap_optional(inner)
    takes, type_name, choices = "one", _scalar_name(inner), None
    negated = []
    if "action" in arg:
        action = arg["action"]
        if isinstance(action, ast.Attribute) and action.attr == "BooleanOptionalAction":
            takes, type_name = "none", "bool"
            negated = ["--no-" + name.removeprefix("--") for name in [cli_name, *aliases]]
        elif "action_kwargs" in arg and isinstance(arg["action_kwargs"], ast.Dict):
            kwargs = {k.value: v for k, v in zip(arg["action_kwargs"].keys, arg["action_kwargs"].values)}
            if isinstance(kwargs.get("nargs"), ast.Constant) and kwargs["nargs"].value in ("+", "*"):
                takes = "list"
    elif _is_subscript(inner, "Literal"):
        elts = inner.slice.elts if isinstance(inner.slice, ast.Tuple) else [inner.slice]
        choices = [ast.literal_eval(e) for e in elts]
        type_name = next((type(c).__name__ for c in choices if c is not None), "str")
    elif _is_subscript(inner, "List", "list") and "type_parser" not in arg:
        takes, type_name = "list", _scalar_name(inner.slice)
    elif isinstance(inner, ast.Name) and inner.id == "bool":
        takes, type_name = "none", "bool"
    if "choices" in arg and isinstance(arg["choices"], ast.List):
        try:
            choices = [ast.literal_eval(e) for e in arg["choices"].elts]
        except ValueError:
            choices = None
    if "nargs" in arg and isinstance(arg["nargs"], ast.Constant) and arg["nargs"].value in ("+", "*"):
        takes = "list"
    if "type_parser" in arg:
        type_name = "str"
    for flag in [cli_name, *aliases, *negated]:
        out[flag] = {"dest": field, "takes": takes, "type": type_name, "choices": choices}


def _is_subscript(node: ast.expr, *names: str) -> bool:
    return isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in names


def _unwrap_optional(node: ast.expr) -> ast.expr:
    if _is_subscript(node, "Optional"):
        return node.slice
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        sides = [s for s in (node.left, node.right) if not (isinstance(s, ast.Constant) and s.value is None)]
        if len(sides) == 1:
            return sides[0]
    return node


def _scalar_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name) and node.id in ("int", "float", "str", "bool"):
        return node.id
    return "str"


# ---- weight-update sessions and the process-group rendezvous ---------------------------------


def session_routes(source: str, known_routes: dict[str, Any]) -> list[str]:
    """Scheduler handlers that refuse to run unless `begin_weight_update` opened a session."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            for stmt in node.body:
                if isinstance(stmt, ast.If) and ast.unparse(stmt.test) == "self._session is None":
                    route = "/" + node.name
                    if route in known_routes:
                        out.append(route)
    return sorted(out)


def process_group(files: dict[str, str]) -> dict[str, Any]:
    """The engine side of /init_weights_update_group: SGLang's helper (its source, to be run by the
    rendezvous test) and how the engine picks its rank and init method."""
    common = ast.parse(files[COMMON])
    helper = next(n for n in common.body if isinstance(n, ast.FunctionDef) and n.name == "init_custom_process_group")
    runner = ast.parse(files[RUNNER_WEIGHTS])
    init = next(n for n in ast.walk(runner) if isinstance(n, ast.FunctionDef) and n.name == "init_weights_update_group")
    rank = next(
        ast.unparse(s.value) for s in ast.walk(init)
        if isinstance(s, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "rank" for t in s.targets)
    )
    call = next(
        c for c in ast.walk(init)
        if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id == "init_custom_process_group"
    )
    return {
        "helper_source": ast.get_source_segment(files[COMMON], helper),
        "engine_rank": rank,
        "helper_call": {k.arg: ast.unparse(k.value) for k in call.keywords},
    }


def unpickler_allow_list(source: str) -> list[list[str]]:
    """The (module, name) globals SGLang's `SafeUnpickler` admits in /update_weights_from_tensor
    entries (`MultiprocessingSerializer.deserialize`)."""
    unpickler = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == "SafeUnpickler")
    allowed = next(
        s.value for s in unpickler.body
        if isinstance(s, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "ALLOWED_GLOBALS" for t in s.targets)
    )
    return sorted([list(pair) for pair in ast.literal_eval(allowed)])


def version(source: str) -> str:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets):
            value = node.value
            while isinstance(value, ast.NamedExpr | ast.Assign):
                value = value.value
            if isinstance(value, ast.Constant):
                return value.value
    raise ValueError("no __version__ in sglang/_version.py")


def build(files: dict[str, str]) -> dict[str, Any]:
    route_table = routes(files[HTTP_SERVER])
    sessions = session_routes(files[SCHEDULER_WEIGHTS], route_table)
    for path in sessions:
        route_table[path]["needs_session"] = True
    all_structs = structs(files[IO_STRUCT])
    bodies = {entry["body"] for entry in route_table.values() if entry["body"]}
    # /generate's `sampling_params` dict is built into this class: unknown keys are refused
    all_structs["SamplingParams"] = structs(files[SAMPLING])["SamplingParams"]
    bodies.add("SamplingParams")
    return {
        "sglang_version": version(files[VERSION]),
        "routes": route_table,
        "structs": {name: fields for name, fields in all_structs.items() if name in bodies},
        "flags": flags(files),
        "session_routes": sessions,
        "process_group": process_group(files),
        "tensor_payload_globals": unpickler_allow_list(files[COMMON]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="the sglang wheel (pip download sglang==X --no-deps)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    fixture = build(read_wheel(args.wheel))
    args.out.write_text(json.dumps(fixture, indent=1, sort_keys=False) + "\n")
    print(
        f"sglang {fixture['sglang_version']}: {len(fixture['routes'])} routes, {len(fixture['structs'])} request "
        f"structures, {len(fixture['flags'])} flags, session routes {fixture['session_routes']} -> {args.out}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
