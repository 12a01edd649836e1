from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "flags.md"


def test_the_flag_reference_in_docs_is_what_the_config_models_generate_and_lists_every_flag():
    from rl_apps.flag_reference import render
    from rl_apps.train_config import TrainConfig

    if not REFERENCE.is_file():
        pytest.skip("docs/ is not part of this install")
    text = render()
    assert REFERENCE.read_text() == text, "docs/flags.md is stale: uv run --frozen python -m rl_apps.flag_reference docs/flags.md"
    for name in TrainConfig.model_fields:
        if name != "sglang_args":
            assert f"`--{name.replace('_', '-')}`" in text
