"""Starting torch.distributed from the env:// variables, as both training backends do."""

import pytest
import torch
import torch.distributed as dist

from rl_core.distributed import init_process_group_from_env, resolve_device

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    yield monkeypatch
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_lone_process_gets_a_gloo_group_of_one_and_a_second_start_leaves_it_alone(clean_env):
    device = resolve_device("cpu")
    assert device == torch.device("cpu")
    assert init_process_group_from_env(device) is True
    assert (dist.get_backend(), dist.get_world_size(), dist.get_rank()) == ("gloo", 1, 0)
    summed = torch.tensor([2.0, 3.0])
    dist.all_reduce(summed)
    assert summed.tolist() == [2.0, 3.0]  # a group of one: the sum over ranks is this rank's value
    assert init_process_group_from_env(device) is False  # the caller that did not create it must not tear it down


def test_several_ranks_without_a_rendezvous_address_are_refused_naming_what_is_missing(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("MASTER_PORT", "29500")
    with pytest.raises(ValueError, match="WORLD_SIZE is 2 but MASTER_ADDR is not set"):
        init_process_group_from_env(torch.device("cpu"))
    assert not dist.is_initialized()
