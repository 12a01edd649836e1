"""slime's resource flags: the bundles asked of Ray, the engine count they imply, and what is refused (no cluster needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rl_apps.placement import PlacementError, check_fits, plan_placement


def total(bundles, kind):
    return sum(b.get(kind, 0.0) for b in bundles)


def test_engines_follow_rollout_num_gpus_over_gpus_per_engine_and_each_bundle_holds_an_engines_gpus(config):
    cfg = config(engine_type="sglang", actor_num_nodes=2, actor_num_gpus_per_node=4, rollout_num_gpus=8,
                 rollout_num_gpus_per_engine=2, global_batch_size=64)
    assert (cfg.rollout_num_engines, cfg.actor_world_size()) == (4, 8)
    plan = plan_placement(cfg, on_gpu=True)
    assert [p.resources["num_gpus"] for p in plan.engines] == [2] * 4
    assert [plan.bundles[p.bundle]["GPU"] for p in plan.engines] == [2.0] * 4
    assert [plan.bundles[p.bundle]["GPU"] for p in plan.trainers] == [1.0] * 8
    # trainer GPUs plus engine GPUs, each bundle used by exactly one part
    assert total(plan.bundles, "GPU") == 8 + 8
    assert sorted(p.bundle for p in plan.trainers + plan.engines) == list(range(len(plan.bundles)))


def test_the_engine_count_defaults_as_slime_and_rollout_num_engines_still_works(config):
    assert config().rollout_num_engines == 1
    assert config(rollout_num_engines=3).rollout_num_gpus == 3
    assert config(rollout_num_gpus=2).rollout_num_engines == 2
    # --colocate: one engine per trainer GPU unless told otherwise (slime sets rollout_num_gpus so)
    assert config(colocate=True, actor_num_gpus_per_node=4, global_batch_size=64).rollout_num_engines == 4
    # --sglang-tp-size sets the GPUs per engine when --rollout-num-gpus-per-engine is not given
    cfg = config(engine_type="sglang", rollout_num_gpus=4, sglang_args={"tp_size": 2})
    assert (cfg.rollout_num_gpus_per_engine, cfg.rollout_num_engines) == (2, 2)


def test_colocated_parts_share_one_gpu_bundle_each_and_their_shares_add_up_to_one(config):
    cfg = config(colocate=True, actor_num_gpus_per_node=2, rollout_num_gpus=3, advantage_estimator="ppo",
                 global_batch_size=64)
    plan = plan_placement(cfg, on_gpu=True)
    assert len(plan.bundles) == 3 and all(b["GPU"] == 1.0 for b in plan.bundles)
    for i in range(3):
        on_bundle = [p for p in plan.trainers + plan.engines + plan.critics if p.bundle == i]
        assert sum(p.resources["num_gpus"] for p in on_bundle) == pytest.approx(1.0, abs=1e-3)
        assert plan.bundles[i]["CPU"] == len(on_bundle)
    assert [p.bundle for p in plan.critics] == [0, 1]


def test_on_cpu_every_part_is_one_process_with_one_cpu(config):
    cfg = config(actor_num_nodes=2, actor_num_gpus_per_node=2, rollout_num_engines=2, advantage_estimator="ppo",
                 critic_num_nodes=2, critic_num_gpus_per_node=2)
    plan = plan_placement(cfg, on_gpu=False)
    assert (len(plan.trainers), len(plan.engines), len(plan.critics)) == (4, 2, 4)
    assert plan.bundles == [{"CPU": 1.0}] * 10
    assert plan_placement(cfg, on_gpu=False, trainers=False).bundles == [{"CPU": 1.0}] * 2


@pytest.mark.parametrize(("flags", "message"), [
    (dict(engine_type="sglang", rollout_num_gpus=5, rollout_num_gpus_per_engine=2),
     r"rollout_num_gpus \(5\) is not a multiple of rollout_num_gpus_per_engine \(2\); nearest that work: 4 or 6"),
    (dict(rollout_num_gpus=2, rollout_num_engines=3), r"rollout_num_engines \(3\) disagrees .* = 2"),
    (dict(rollout_num_gpus_per_engine=2), r"needs --engine-type sglang: the embedded engine runs on one device"),
    (dict(engine_type="sglang", rollout_num_gpus_per_engine=16), r"exceeds num_gpus_per_node \(8\)"),
    (dict(engine_type="sglang", rollout_num_gpus_per_engine=2, colocate=True), r"with --colocate is not supported"),
    (dict(engine_type="sglang", rollout_num_gpus_per_engine=2, sglang_args={"tp_size": 4}), r"--sglang-tp-size 4 differs"),
    (dict(rollout_num_gpus=0), r"external engines only\) is not supported"),
    (dict(critic_num_nodes=1), r"trains no critic"),
    (dict(advantage_estimator="ppo", critic_num_gpus_per_node=2),
     r"critic_num_gpus_per_node \(2\) must equal actor_num_gpus_per_node \(1\)"),
])
def test_resource_requests_this_project_cannot_place_are_refused_with_the_reason(config, flags, message):
    with pytest.raises(ValidationError, match=message):
        config(**flags)


def test_a_request_larger_than_the_cluster_is_refused_naming_what_was_asked_and_what_ray_has(config):
    plan = plan_placement(config(engine_type="sglang", actor_num_gpus_per_node=4, rollout_num_gpus=4,
                                 rollout_num_gpus_per_engine=4, global_batch_size=64), on_gpu=True)
    one_node = [{"CPU": 16.0, "GPU": 8.0}]
    check_fits(plan, one_node)  # 4 trainer GPUs + one 4-GPU engine: fits
    with pytest.raises(PlacementError, match=r"need 8 GPU but the cluster has 4.*Ray has node 0: 16 CPU, 4 GPU"):
        check_fits(plan, [{"CPU": 16.0, "GPU": 4.0}])
    # enough GPUs in all, but no node can hold the 4-GPU engine's bundle
    with pytest.raises(PlacementError, match=r"no node can hold a bundle of \{'CPU': 1.0, 'GPU': 4.0\}.*node 3: 4 CPU, 2 GPU"):
        check_fits(plan, [{"CPU": 4.0, "GPU": 2.0}] * 4)
    with pytest.raises(PlacementError, match=r"need 3 CPU but the cluster has 2"):
        check_fits(plan_placement(config(rollout_num_engines=2), on_gpu=False), [{"CPU": 2.0}])


def test_each_embedded_engine_gets_rows_for_its_share_of_a_rollout_unless_the_flag_says_otherwise(config):
    from rl_apps.train_config import EMBEDDED_ENGINE_DEFAULT_ROWS, MAX_EMBEDDED_ROWS

    rows = lambda cfg: cfg.sglang_args.get("max_running_requests")  # noqa: E731
    # the loop's rollout: 32 prompts x 8 samples in flight at once, all on one engine
    assert rows(config(rollout_batch_size=32, n_samples_per_prompt=8)) == 32 * 8
    # over-sampled rounds send more; several engines split them (rounded up)
    assert rows(config(rollout_batch_size=32, over_sampling_batch_size=48, n_samples_per_prompt=8)) == 48 * 8
    assert rows(config(rollout_batch_size=32, n_samples_per_prompt=8, rollout_num_engines=3)) == -(-(32 * 8) // 3)
    # never fewer than the engine's own default, never more than the cap
    assert rows(config(rollout_batch_size=2, n_samples_per_prompt=2)) == EMBEDDED_ENGINE_DEFAULT_ROWS
    assert rows(config(rollout_batch_size=4096, n_samples_per_prompt=8)) == MAX_EMBEDDED_ROWS
    # the user's --sglang-max-running-requests wins; SGLang sizes its own
    assert rows(config(rollout_batch_size=32, n_samples_per_prompt=8, sglang_args={"max_running_requests": 16})) == 16
    assert rows(config(engine_type="sglang", rollout_batch_size=32, n_samples_per_prompt=8)) is None
