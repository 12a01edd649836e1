import pytest

from rl_core.hooks import load_function


def test_a_hook_loads_from_a_module_path_a_colon_path_or_a_python_file(tmp_path):
    from rl_core.data_source import pop_first

    assert load_function("rl_core.data_source.pop_first") is pop_first
    assert load_function("rl_core.data_source:pop_first") is pop_first
    hook = tmp_path / "hook.py"
    hook.write_text("def last(buffer, n):\n    return [len(buffer) - 1][:n]\n")
    loaded = load_function(f"{hook}:last", flag="--buffer-filter-path")
    assert loaded([[0], [1], [2]], 1) == [2]
    assert load_function(f"{hook}:last") is loaded  # the file runs once


def test_a_bad_hook_names_the_flag_and_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"--buffer-filter-path 'missing.py:f': no file .*"):
        load_function("missing.py:f", flag="--buffer-filter-path")
    hook = tmp_path / "hook.py"
    hook.write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"has no callable 'x'"):
        load_function(f"{hook}:x", flag="--buffer-filter-path")
    with pytest.raises(ValueError, match=r"expected 'package.module.function' or 'path/to/file.py:function'"):
        load_function("nodots", flag="--buffer-filter-path")
