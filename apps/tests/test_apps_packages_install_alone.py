"""Each package installs into a fresh venv with only its own dependencies, and its tests pass there.

There every test module is collected (so each import it makes is checked against the package's declared
dependencies) and the quick tests run; the `slow` ones run in the workspace suite on the same code, and
running them twice cost CI about three minutes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# package -> the sibling packages it depends on
PACKAGES = {
    "rl-router": [],
    "rl-rewards": [],
    "rl-core": [],
    "rl-sglang": [],
    "rl-fsdp": ["rl-core"],
    "rl-megatron": ["rl-core"],
}
TORCH_FREE = {"rl-router", "rl-rewards"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv"),
]


def sh(*cmd, cwd=None, timeout=1500):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "UV_PROJECT", "PYTHONPATH"))}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.parametrize("package", list(PACKAGES))
def test_package_tests_pass_with_only_its_dependencies(package, tmp_path):
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    sh("uv", "venv", "--quiet", "--python", sys.executable, str(venv))
    siblings = [str(REPO / "packages" / dep) for dep in PACKAGES[package]]
    sh("uv", "pip", "install", "--quiet", "--python", str(python), *siblings, f"{REPO / 'packages' / package}[test]")
    if package in TORCH_FREE:
        sh(str(python), "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)")
    # Run from the package folder so its own pytest configuration applies.
    sh(str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu and not multi_gpu and not sglang and not slow", "tests",
       cwd=REPO / "packages" / package)
