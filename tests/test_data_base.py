"""apr.data.base: shared sharding arithmetic and the loader-state guard every backend uses."""

import numpy as np
import pytest
import torch

from apr.data import TensorBatchLoader
from apr.data.base import check_loader_state, epoch_permutation, eval_shard, train_shard_size


def test_shards_cover_every_sample_once():
    shards = [list(eval_shard(23, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(23))
    assert train_shard_size(23, 3) == 7
    assert torch.equal(epoch_permutation(10, 0, 1), epoch_permutation(10, 0, 1))
    assert not torch.equal(epoch_permutation(10, 0, 1), epoch_permutation(10, 0, 2))


def test_state_guard_names_the_mismatch():
    state = {"backend": "tensor", "num_files": 10, "world_size": 2, "rank": 0, "seed": 1}
    check_loader_state(state, "tensor", "tensors", {"num_files": 10, "seed": 1}, "advice")
    with pytest.raises(ValueError, match="loader state is for backend 'tensor', this loader uses dali"):
        check_loader_state(state, "dali", "dali", {}, "advice")
    with pytest.raises(ValueError, match="loader state has seed=1 but this loader has seed=2: advice"):
        check_loader_state(state, "tensor", "tensors", {"num_files": 10, "seed": 2}, "advice")


def test_a_loader_refuses_another_loaders_position():
    images = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    a = TensorBatchLoader(images, np.arange(8), 2, train=True, seed=0)
    b = TensorBatchLoader(images, np.arange(8), 2, train=True, seed=5)
    next(iter(a))
    with pytest.raises(ValueError, match="loader state has seed=0 but this loader has seed=5"):
        b.load_state_dict(a.state_dict())
