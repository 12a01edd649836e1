import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def ray_temp_dir():
    """Every `ray.init` writes a session folder (logs, sockets, spilled objects: hundreds of MB) under the
    system temp dir and never removes it: point Ray (and the rl-train processes tests start) at a folder
    of this test run and remove it at the end. Short on purpose: Ray's Unix sockets live under it."""
    previous = os.environ.get("RAY_TMPDIR")
    path = tempfile.mkdtemp(prefix="rl-ray-")
    os.environ["RAY_TMPDIR"] = path
    try:
        yield Path(path)
    finally:
        if "ray" in sys.modules:  # a failed test may have left Ray running
            sys.modules["ray"].shutdown()
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(ray_temp_dir):
    """One Ray cluster for the whole session: every run after it joins it (placed_parts and rl-sft start
    Ray only where none is up, and stop only what they started) instead of starting and stopping its own,
    which costs 10-40 s a run on 2 cores. Each run still places its own parts in a placement group of its
    own and frees it at the end. 4 CPUs: the largest placement a test asks (2 trainer ranks, 2 engines)."""
    import ray

    from rl_apps.cluster import _workers_use_this_interpreter

    _workers_use_this_interpreter()
    if not ray.is_initialized():
        ray.init(num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _slow_tests_share_the_ray_cluster(request):
    """Tests marked slow (the end-to-end runs) start the shared cluster on first use; quick tests never
    pay for it."""
    if request.node.get_closest_marker("slow"):
        request.getfixturevalue("ray_cluster")


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> Path:
    """A tiny random model, its character tokenizer and the addition prompts, made locally."""
    from rl_apps.quickstart import build_model, make_addition_data

    root = tmp_path_factory.mktemp("task")
    build_model(root / "model", "tiny", seed=0)
    make_addition_data(root / "train.jsonl", max_operand=4, seed=0, copies=1)
    return root


DIGIT_REWARD = """
def score(*, prompt, response, label, metadata):
    # Graded credit so that a random model's samples differ and GRPO has something to learn from.
    return sum(c.isdigit() for c in response) / 3
"""


@pytest.fixture
def config(tiny_task):
    """A TrainConfig builder for the tiny task: its model, prompts and the math grader, unless a flag says otherwise."""
    from rl_apps.train_config import TrainConfig

    def build(**flags):
        values = dict(hf_checkpoint=tiny_task / "model", prompt_data=tiny_task / "train.jsonl", rm_type="math")
        return TrainConfig(**{**values, **flags})

    return build


@pytest.fixture
def tiny_run_config(tiny_task):
    """`build(out, config_class=TrainConfig, **overrides)`: a 3-rollout CPU run over `tiny_task` (4 prompts x 4
    samples, 3 response tokens, a graded digit reward), writing to `out`."""
    from rl_apps.train_config import TrainConfig

    def build(out, config_class=TrainConfig, **overrides):
        reward_file = out.parent / "digit_reward.py"
        reward_file.write_text(DIGIT_REWARD)
        values = dict(
            hf_checkpoint=tiny_task / "model",
            prompt_data=tiny_task / "train.jsonl",
            custom_rm_path=f"{reward_file}:score",
            rollout_batch_size=4,
            n_samples_per_prompt=4,
            rollout_max_response_len=3,
            num_rollout=3,
            lr=1e-3,
            micro_batch_size=4,
            output_dir=out,
            rollout_device="cpu",
            train_device="cpu",
            use_tensorboard=True,
        )
        values.update(overrides)
        return config_class(**values)

    return build


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
