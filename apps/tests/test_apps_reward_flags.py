"""The reward flags reach `build_reward`: isolation, memory limit, remote URL, eval reward key; bad pairs are refused."""

import os
import resource
import subprocess
import sys

import pytest

from rl_apps.train_config import TrainConfig
from rl_rewards import IsolatedGrader, RemoteRewardModel, build_reward, default_registry

LIMIT_REPORTER = """
import os, resource

def report(*, prompt, response, label, metadata):
    return {"pid": float(os.getpid()), "memory_limit": float(resource.getrlimit(resource.RLIMIT_AS)[0])}
"""


def _config(**overrides) -> TrainConfig:
    values = dict(hf_checkpoint="model", prompt_data="train.jsonl", rm_type="math")
    values.update(overrides)
    return TrainConfig(**values)


def _error(run_cli, task, *flags: str) -> str:
    args = ["--hf-checkpoint", str(task / "model"), "--prompt-data", str(task / "train.jsonl"), *flags]
    code, err = run_cli(args)
    assert code == 2, err
    return err


def test_rm_type_help_lists_every_registered_grader():
    out = subprocess.run([sys.executable, "-m", "rl_apps.train", "--help"], capture_output=True, text=True, timeout=60)
    help_text = " ".join(out.stdout.split())
    start = help_text.index("--rm-type RM_TYPE ")
    rm_type_help = help_text[start : help_text.index("--custom-rm-path", start)]
    assert len(default_registry.names()) >= 9
    for name in default_registry.names():
        assert name in rm_type_help


def test_reward_isolation_flags_grade_in_a_worker_under_the_memory_limit(tmp_path):
    reward_file = tmp_path / "limits.py"
    reward_file.write_text(LIMIT_REPORTER)
    config = _config(rm_type=None, custom_rm_path=f"{reward_file}:report", reward_key="pid", reward_isolation=True,
                     reward_memory_limit_mb=300, reward_num_workers=1, reward_timeout=30.0)
    hub = build_reward(config.rm_type, config.custom_rm_path, **config.reward_options())
    try:
        assert isinstance(hub.grader, IsolatedGrader) and hub.timeout_s == 30.0 and hub.grader.timeout_s == 30.0
        [pid] = hub.score_batch_sync([{"prompt": "", "response": "x", "label": "y", "metadata": {}}])
        assert pid != os.getpid()
        assert hub.last_components[0]["memory_limit"] == 300 * 2**20
        assert resource.getrlimit(resource.RLIMIT_AS)[0] != 300 * 2**20
    finally:
        hub.grader.close()


def test_without_reward_isolation_the_grader_runs_in_process():
    config = _config()
    hub = build_reward(config.rm_type, config.custom_rm_path, **config.reward_options())
    assert not isinstance(hub.grader, IsolatedGrader)
    assert hub.score_batch_sync([{"prompt": "", "response": r"\boxed{e^{i\pi}}", "label": "-1", "metadata": {}}]) == [1.0]


def test_rm_url_reaches_the_remote_grader():
    config = _config(rm_type="remote", rm_url="http://127.0.0.1:9/score")
    hub = build_reward(config.rm_type, config.custom_rm_path, **config.reward_options())
    assert isinstance(hub.grader, RemoteRewardModel) and hub.grader.url == "http://127.0.0.1:9/score"


def test_rm_url_without_remote_and_remote_without_rm_url_are_refused(tiny_task, run_cli):
    err = _error(run_cli, tiny_task, "--rm-type", "math", "--rm-url", "http://127.0.0.1:9/score")
    assert "--rm-url" in err and "--rm-type remote" in err and "math" in err
    err = _error(run_cli, tiny_task, "--rm-type", "remote")
    assert "--rm-type remote needs --rm-url" in err


def test_worker_sizes_without_reward_isolation_are_refused(tiny_task, run_cli):
    for flag, value in (("--reward-memory-limit-mb", "512"), ("--reward-num-workers", "3")):
        err = _error(run_cli, tiny_task, "--rm-type", "math", flag, value)
        assert flag in err and "--reward-isolation" in err


def test_reward_isolation_of_a_grader_that_cannot_be_isolated_names_both_flags(tiny_task, run_cli):
    err = _error(run_cli, tiny_task, "--rm-type", "exact_match", "--reward-isolation")
    assert "--reward-isolation" in err and "--rm-type exact_match" in err and "math" in err


def test_eval_reward_key_picks_another_component_of_the_same_grader(tmp_path):
    reward_file = tmp_path / "parts.py"
    reward_file.write_text("def parts(*, prompt, response, label, metadata):\n    return {'score': 0.25, 'acc': 1.0}\n")
    config = _config(rm_type=None, custom_rm_path=f"{reward_file}:parts", reward_key="score", eval_reward_key="acc")
    train_hub = build_reward(config.rm_type, config.custom_rm_path, **config.reward_options())
    eval_hub = train_hub.with_reward_key(config.eval_reward_key or config.reward_key)
    item = {"prompt": "", "response": "x", "label": "y", "metadata": {}}
    assert train_hub.score_batch_sync([item]) == [0.25] and eval_hub.score_batch_sync([item]) == [1.0]
    assert eval_hub.grader is train_hub.grader and eval_hub.timeout_s == train_hub.timeout_s


@pytest.mark.parametrize(("response_len", "eval_len", "expected"), [(256, None, 625.6), (256, 32768, 3876.8), (8192, 16, 1419.2)])
def test_request_timeout_default_grows_with_the_longest_response_allowed(response_len, eval_len, expected):
    config = _config(rollout_max_response_len=response_len, eval_max_response_len=eval_len)
    assert config.rollout_request_timeout_s() == pytest.approx(expected)
    assert _config(rollout_request_timeout=42.0).rollout_request_timeout_s() == 42.0
