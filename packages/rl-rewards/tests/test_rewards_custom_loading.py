"""load_custom_reward and build_reward: both spec forms, and an error naming the spec for each failure."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from rl_rewards import RewardHub, RewardRegistry, build_reward, load_custom_reward

GRADER_SOURCE = textwrap.dedent(
    """
    NOT_CALLABLE = 3

    def length_reward(*, prompt, response, label, metadata):
        return float(len(response))

    class Scores:
        @staticmethod
        def double(*, prompt, response, label, metadata):
            return 2.0 * label
    """
)


@pytest.fixture
def grader_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(GRADER_SOURCE)
    return path


@pytest.fixture
def grader_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    package = tmp_path / "site" / "rewardpkg_for_tests"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "graders.py").write_text(GRADER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield "rewardpkg_for_tests.graders"
    for name in [name for name in sys.modules if name.startswith("rewardpkg_for_tests")]:
        del sys.modules[name]


def test_rewards_loads_a_function_from_a_file_path(grader_file: Path) -> None:
    grader = load_custom_reward(f"{grader_file}:length_reward")
    assert grader(prompt="", response="abcd", label=None, metadata={}) == 4.0


def test_rewards_loads_a_function_from_a_module_path(grader_package: str) -> None:
    grader = load_custom_reward(f"{grader_package}:length_reward")
    assert grader(prompt="", response="abc", label=None, metadata={}) == 3.0


def test_rewards_follows_a_dotted_attribute_path(grader_package: str) -> None:
    grader = load_custom_reward(f"{grader_package}:Scores.double")
    assert grader(prompt="", response="", label=1.5, metadata={}) == 3.0


def test_rewards_reports_a_missing_file_naming_the_spec(tmp_path: Path) -> None:
    spec = f"{tmp_path}/absent.py:fn"
    with pytest.raises(FileNotFoundError, match="absent.py") as error:
        load_custom_reward(spec)
    assert spec in str(error.value)


def test_rewards_reports_a_missing_module_naming_the_spec() -> None:
    with pytest.raises(ImportError, match="no_such_reward_module_xyz") as error:
        load_custom_reward("no_such_reward_module_xyz.sub:fn")
    assert "'no_such_reward_module_xyz.sub:fn'" in str(error.value)


def test_rewards_reports_a_missing_attribute_naming_the_spec(grader_file: Path) -> None:
    with pytest.raises(AttributeError, match="missing_fn") as error:
        load_custom_reward(f"{grader_file}:missing_fn")
    assert str(grader_file) in str(error.value)


def test_rewards_reports_a_missing_attribute_in_a_module(grader_package: str) -> None:
    with pytest.raises(AttributeError, match=rf"{grader_package}:nope"):
        load_custom_reward(f"{grader_package}:nope")


def test_rewards_reports_a_non_callable_attribute_naming_the_spec(grader_file: Path) -> None:
    with pytest.raises(TypeError, match="NOT_CALLABLE.*int, not callable"):
        load_custom_reward(f"{grader_file}:NOT_CALLABLE")


@pytest.mark.parametrize("spec", ["no_colon_here", ":fn", "module:"])
def test_rewards_rejects_a_malformed_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="package.module:function"):
        load_custom_reward(spec)


def test_rewards_reports_a_file_that_fails_to_execute(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('import-time failure')\n")
    with pytest.raises(ImportError, match="import-time failure") as error:
        load_custom_reward(f"{path}:fn")
    assert "broken.py:fn" in str(error.value)


def test_rewards_build_reward_wraps_a_registered_type_in_a_hub() -> None:
    hub = build_reward("math", None, concurrency=4, timeout_s=5.0)
    assert isinstance(hub, RewardHub) and hub.concurrency == 4
    items = [{"prompt": "", "response": r"\boxed{4}", "label": "4", "metadata": {}}]
    assert hub.score_batch_sync(items) == [1.0]


def test_rewards_build_reward_loads_a_custom_path(grader_file: Path) -> None:
    hub = build_reward(None, f"{grader_file}:length_reward")
    items = [{"prompt": "", "response": "ab", "label": None, "metadata": {}}]
    assert hub.score_batch_sync(items) == [2.0]


@pytest.mark.parametrize(("rm_type", "custom"), [(None, None), ("math", "x.py:fn")])
def test_rewards_build_reward_needs_exactly_one_source_and_names_both_flags(rm_type, custom) -> None:
    with pytest.raises(ValueError, match="--rm-type.*--custom-rm-path"):
        build_reward(rm_type, custom)


def test_rewards_build_reward_lists_registered_names_for_an_unknown_type() -> None:
    with pytest.raises(ValueError, match="'nope'.*code, dapo, deepscaler, exact_match, f1, ifeval, math, multiple_choice, remote"):
        build_reward("nope", None)


def test_rewards_registry_registers_a_factory_once() -> None:
    registry = RewardRegistry()

    @registry.register("constant")
    def constant_factory(value: float = 1.0):
        return lambda **_: value

    assert registry.create("constant", value=0.3)(prompt="", response="", label=None, metadata={}) == 0.3
    assert "constant" in registry and registry.names() == ["constant"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register("constant")(constant_factory)
    assert build_reward("constant", None, registry=registry).score_batch_sync(
        [{"prompt": "", "response": "", "label": None, "metadata": {}}]
    ) == [1.0]
