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


ENGINE_RECORDER = '''
import json

class Recorder:
    """Router middleware: every engine call's input tokens, sampled tokens and log-probs, one JSON line each."""

    async def __call__(self, request, call_next):
        answer = await call_next(request)
        with open({path!r}, "a") as f:
            f.write(json.dumps({{"input_ids": request.payload.get("input_ids"), "output_ids": answer.get("output_ids"),
                                "log_probs": [e[0] for e in answer["meta_info"].get("output_token_logprobs") or []]}}) + "\\n")
        return answer
'''


def loss_mask_runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, mask value) of each run of equal loss-mask values."""
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((start, i, mask[start]))
            start = i
    return runs


class RecordedRun:
    """A finished rl-train run: its config, metric rows, the samples of each rollout as they went to training,
    and every engine call as rl-router's middleware saw it (by the input tokens it was sent)."""

    def __init__(self, config, rows: list[dict], rollouts: list[list[dict]], calls: dict[tuple[int, ...], list[dict]]):
        self.config, self.rows, self.rollouts, self.calls = config, rows, rollouts, calls

    def policy_turn(self, sample: dict, start: int, end: int, whole: bool = False) -> dict:
        """The response tokens [start, end) are a prefix (with `whole`: all) of what one engine call, sent
        exactly the tokens before them, sampled, with the engine's log-probs; returns that call."""
        tokens, prompt_length = sample["tokens"], len(sample["tokens"]) - sample["response_length"]
        turn = tokens[prompt_length + start:prompt_length + end]
        log_probs = sample["rollout_log_probs"][start:end]
        # The samples of a group send the same first context; batched differently, their log-probs of the
        # same token may differ in the last bits: the turn's call is the one with its tokens and log-probs.
        matching = [c for c in self.calls.get(tuple(tokens[:prompt_length + start]), [])
                    if (c["output_ids"] if whole else c["output_ids"][:len(turn)]) == turn
                    and c["log_probs"][:len(turn)] == log_probs]
        assert matching, "a trained turn that no engine call sampled with these log-probs"
        assert all(lp < 0 for lp in log_probs)
        return matching[0]

    def turns(self, sample: dict, whole: bool = False) -> list[tuple[int, int, int]]:
        """The sample's loss-mask runs (start, end, mask), checked: it opens with the policy's tokens, each
        mask-1 run was sampled by an engine call (`policy_turn`) and each mask-0 run has log-prob 0."""
        runs = loss_mask_runs(sample["loss_mask"])
        assert runs and runs[0][2] == 1 and len(sample["rollout_log_probs"]) == sample["response_length"]
        for start, end, mask in runs:
            if mask == 1:
                self.policy_turn(sample, start, end, whole)
            else:
                assert all(lp == 0.0 for lp in sample["rollout_log_probs"][start:end])
        return runs


@pytest.fixture
def recorded_run(tiny_run_config, tmp_path):
    """`recorded_run(**overrides)`: a 2-rollout run of `tiny_run_config` with every rollout's samples saved and
    a router middleware recording every engine call; returns its RecordedRun."""
    import json

    from rl_apps.metrics import read_metrics
    from rl_apps.train import run

    def train(**overrides) -> RecordedRun:
        calls_file, recorder = tmp_path / "engine_calls.jsonl", tmp_path / "recorder.py"
        recorder.write_text(ENGINE_RECORDER.format(path=str(calls_file)))
        debug = tmp_path / "rollouts" / "rollout_{rollout_id}.jsonl"
        config = tiny_run_config(tmp_path / "run", **{"num_rollout": 2, **overrides}, save_debug_rollout_data=str(debug),
                                 router_middleware_paths=[f"{recorder}:Recorder"], use_tensorboard=False,
                                 save_reward_curve=False)
        rows = read_metrics(run(config))
        rollouts = [[json.loads(line) for line in (tmp_path / "rollouts" / f"rollout_{i}.jsonl").read_text().splitlines()]
                    for i in range(config.num_rollout)]
        calls: dict[tuple[int, ...], list[dict]] = {}
        for line in calls_file.read_text().splitlines():
            call = json.loads(line)
            calls.setdefault(tuple(call["input_ids"]), []).append(call)
        return RecordedRun(config, rows, rollouts, calls)

    return train


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
