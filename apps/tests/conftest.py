import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> Path:
    """A tiny random model, its character tokenizer and the addition prompts, made locally."""
    from rl_apps.quickstart import build_model, make_addition_data

    root = tmp_path_factory.mktemp("task")
    build_model(root / "model", "tiny", seed=0)
    make_addition_data(root / "train.jsonl", max_operand=4, seed=0, copies=1)
    return root


@pytest.fixture
def run_cli():
    """Runs rl-train's main() in-process and returns (exit code, stderr text)."""
    import contextlib
    import io

    from rl_apps.train import main

    def run(argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
                if isinstance(e.code, str):
                    err.write(e.code)
        return code, err.getvalue()

    return run


sys.dont_write_bytecode = True
