"""Launcher argv, subprocess engines, and the light-import promise of the client module."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rl_sglang import conformance
from rl_sglang.client import SGLangClient
from rl_sglang.launcher import (
    build_embedded_argv,
    build_sglang_argv,
    http_url,
    launch_engine,
    sglang_available,
)
from rl_sglang.sglang_flags import (
    check_sglang_args,
    is_slime_router_flag,
    router_flag_refusal,
)
from rl_sglang.version import SGLANG_VERSION_CODED_AGAINST

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_sglang_argv_turns_a_settings_dict_into_launch_server_flags():
    argv = build_sglang_argv(
        "/models/qwen",
        "127.0.0.1",
        30000,
        {"mem_fraction_static": 0.8, "tp_size": 2, "enable_memory_saver": True, "disable_radix_cache": False, "log_level": None},
    )
    assert argv == [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", "/models/qwen", "--host", "127.0.0.1", "--port", "30000",
        "--mem-fraction-static", "0.8", "--tp-size", "2", "--enable-memory-saver",
    ]  # fmt: skip


def test_sglang_argv_repeats_list_values_and_refuses_names_sglang_does_not_have():
    argv = build_sglang_argv("/m", "127.0.0.1", 1, {"cuda_graph_bs_decode": [1, 2, 4]})
    assert argv[-4:] == ["--cuda-graph-bs-decode", "1", "2", "4"]
    with pytest.raises(ValueError, match="no flag --tp size; rm"):
        build_sglang_argv("/m", "127.0.0.1", 1, {"tp size; rm": 1})
    # 0.5.23 split --cuda-graph-bs; its parser would exit on the now ambiguous prefix
    with pytest.raises(ValueError, match="--sglang-cuda-graph-bs:.*did you mean.*--sglang-cuda-graph-bs-decode"):
        build_sglang_argv("/m", "127.0.0.1", 1, {"cuda_graph_bs": [1, 2, 4]})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"seed": 1}, "--sglang-seed: .* no flag --seed; did you mean --sglang-random-seed"),
        ({"mem_fraction": 0.8}, "did you mean --sglang-mem-fraction-static"),
        ({"router_policy": "cache_aware"}, "--sglang-router-policy: .*rl-router"),
        ({"port": 30001}, "--sglang-port: the launcher sets --port itself"),
        ({"enable_memory_saver": 3}, "--sglang-enable-memory-saver is a switch"),
        ({"tp_size": "two"}, "--sglang-tp-size takes an integer"),
        ({"tp_size": [1, 2]}, "--sglang-tp-size takes one value"),
        ({"mem_fraction_static": True}, "--sglang-mem-fraction-static needs a value"),
    ],
)
def test_check_sglang_args_names_the_bad_flag_and_what_to_write(args, message):
    with pytest.raises(ValueError, match=message):
        check_sglang_args(args)


def test_check_sglang_args_accepts_real_flags_of_the_pinned_parser():
    check_sglang_args(
        {"mem_fraction_static": 0.8, "tp_size": 2, "enable_memory_saver": True, "random_seed": 3,
         "cuda_graph_bs_prefill": [1, 2], "dtype": "bfloat16", "enable_lora": True, "max_lora_rank": 16,
         "no_enable_tf32_matmul": True}
    )  # fmt: skip


def test_slime_router_flags_are_recognised_and_refused_with_what_rl_router_does_instead():
    for flag in ("--use-slime-router", "--slime-router-middleware-paths", "--sglang-router-ip=0.0.0.0", "--sglang-router-port"):
        assert is_slime_router_flag(flag)
        assert router_flag_refusal(flag).startswith(flag.split("=")[0] + ":") and "--router-policy" in router_flag_refusal(flag)
    assert not is_slime_router_flag("--router-policy")  # our own flag
    assert not is_slime_router_flag("--sglang-mem-fraction-static")


def test_embedded_argv_accepts_only_its_own_flags():
    argv = build_embedded_argv("/m", "127.0.0.1", 8000, {"device": "cpu", "max_running_requests": 4, "seed": 7})
    assert argv == [
        sys.executable, "-m", "rl_sglang.embedded", "--model-path", "/m", "--host", "127.0.0.1", "--port", "8000",
        "--device", "cpu", "--max-running-requests", "4", "--random-seed", "7",
    ]  # fmt: skip
    assert conformance.argv_problems(argv[3:]) == []  # SGLang's own names, so one set of flags serves both
    with pytest.raises(ValueError, match="--tp-size"):
        build_embedded_argv("/m", "127.0.0.1", 8000, {"tp_size": 2})


@pytest.mark.skipif(sglang_available(), reason="SGLang is installed here")
def test_kind_sglang_without_sglang_raises_an_import_error_naming_the_version():
    with pytest.raises(ImportError) as caught:
        launch_engine("sglang", "/models/qwen")
    assert SGLANG_VERSION_CODED_AGAINST in str(caught.value)
    assert "embedded" in str(caught.value)


def test_sglang_can_run_from_an_environment_of_its_own(tmp_path):
    fake = tmp_path / "venv" / "bin"
    (fake / "sglang").mkdir(parents=True)
    (fake / "sglang" / "__init__.py").write_text("")
    python = tmp_path / "python"  # an interpreter whose path holds an importable `sglang`
    python.write_text(f"#!/bin/sh\nPYTHONPATH={fake} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    assert sglang_available(str(python)) and not sglang_available(str(tmp_path / "missing"))
    argv = build_sglang_argv("/m", "127.0.0.1", 1, python=str(python))
    assert argv[:3] == [str(python), "-m", "sglang.launch_server"]
    with pytest.raises(ImportError, match=r"missing cannot import"):
        launch_engine("sglang", "/m", python=str(tmp_path / "missing"))


@pytest.mark.slow
async def test_an_embedded_engine_launched_as_a_subprocess_becomes_healthy_and_generates(model_dir):
    process = launch_engine(
        "embedded", str(model_dir), sglang_args={"device": "cpu", "dtype": "float32", "mem_fraction_static": 0.8}
    )
    client = SGLangClient(process.url, timeout_s=60)
    try:
        await asyncio.to_thread(process.wait_until_healthy, 120)
        assert await asyncio.wait_for(client.is_healthy(), 30)
        answer = await asyncio.wait_for(
            client.generate({"input_ids": [5, 6, 7], "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}}),
            60,
        )
        assert answer["meta_info"]["completion_tokens"] == 4
    finally:
        await client.close()
        await asyncio.to_thread(process.terminate)
    assert process.process.returncode is not None


def test_an_engine_that_dies_before_healthy_reports_its_stderr(tmp_path):
    process = launch_engine("embedded", str(tmp_path / "no-such-model"))
    try:
        with pytest.raises(RuntimeError, match="exited with code") as caught:
            process.wait_until_healthy(120)
        assert "no-such-model" in str(caught.value)
    finally:
        process.terminate()


def test_the_client_module_imports_without_torch_or_transformers():
    code = (
        "import json, sys; import rl_sglang.client, rl_sglang.launcher; "
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'sglang') if m in sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_sglang_host_is_the_address_the_engine_binds_and_a_wildcard_is_advertised_as_given_or_as_loopback(tmp_path):
    fake = tmp_path / "venv" / "bin"
    (fake / "sglang").mkdir(parents=True)
    (fake / "sglang" / "__init__.py").write_text("")
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={fake} exec {sys.executable} \"$@\"\n")  # finds `sglang`, exits at once
    python.chmod(0o755)
    for advertise, host in (("10.0.0.7", "10.0.0.7"), (None, "127.0.0.1")):
        process = launch_engine("sglang", "/m", python=str(python), sglang_args={"host": "0.0.0.0", "tp_size": 1},
                                advertise_host=advertise)
        try:
            assert process.argv.count("--host") == 1 and process.argv[process.argv.index("--host") + 1] == "0.0.0.0"
            assert process.url == f"http://{host}:{process.argv[process.argv.index('--port') + 1]}"
        finally:
            process.terminate()
    check_sglang_args({"host": "0.0.0.0"})  # SGLang's --host, accepted as --sglang-host
    assert http_url("::1", 5) == "http://[::1]:5" and http_url("10.0.0.7", 5) == "http://10.0.0.7:5"
