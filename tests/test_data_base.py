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


def test_length_arithmetic_by_hand():
    # train: 23 files on 3 ranks -> 7 each -> 3 batches of 2, 6 samples; eval keeps the partial batch
    from apr.data.base import loader_length

    assert loader_length(23, 2, True, 0, 3) == (3, 6)
    assert loader_length(23, 2, False, 8, 3) == (4, 8)
    with pytest.raises(ValueError, match="fewer per rank than batch_size=8"):
        loader_length(23, 8, True, 0, 3)


def test_a_new_backend_gets_the_contract_by_subclassing():
    from apr.data.base import SeededPosition

    class ListLoader(SeededPosition):
        STATE_BACKEND, STATE_WORDS = "list", "a list"

        def __init__(self, items, labels, **kw):
            self._init_contract(len(items), len(labels), ["a"], **kw)
            self.items = items

        def _num_items(self):
            return len(self.items)

        def __iter__(self):
            epoch, start = self._begin_pass()
            order = epoch_permutation(len(self.items), self.seed, epoch).tolist()[rank_slice(self)]
            for b in range(start, self._len):
                self._pos = b + 1
                yield order[b * self.batch_size:(b + 1) * self.batch_size]

    def rank_slice(loader):
        return slice(loader.rank, None, loader.world_size)

    loader = ListLoader(list(range(10)), [0] * 10, batch_size=2, train=True, rank=1, world_size=2, seed=3,
                        device="cpu")
    assert len(loader) == 2 and loader.num_samples == 4 and loader.classes == ["a"]
    first = list(loader)
    assert len(first) == 2 and list(loader) != first  # a second pass is the next epoch
    assert loader.epoch == 1
    loader.set_epoch(5)
    it = iter(loader)
    head = next(it)
    state = loader.state_dict()
    assert (state["epoch"], state["batch"]) == (5, 1)
    again = ListLoader(list(range(10)), [0] * 10, batch_size=2, train=True, rank=1, world_size=2, seed=3,
                       device="cpu")
    again.load_state_dict(state)
    assert list(again) == list(it) and head not in list(again)
    with pytest.raises(ValueError, match="10 files but 9 labels"):
        ListLoader(list(range(10)), [0] * 9, batch_size=2, train=True, rank=0, world_size=1, seed=0, device="cpu")
    with pytest.raises(ValueError, match="rank 2 outside world of size 2"):
        ListLoader(list(range(10)), [0] * 10, batch_size=2, train=True, rank=2, world_size=2, seed=0, device="cpu")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ListLoader(list(range(10)), [0] * 10, batch_size=0, train=True, rank=0, world_size=1, seed=0, device="cpu")


def test_changed_data_set_restarts_the_saved_epoch_with_a_warning():
    images = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    a = TensorBatchLoader(images, np.arange(8), 2, train=True, seed=0)
    a.set_epoch(3)
    next(iter(a))
    b = TensorBatchLoader(images[:7], np.arange(7), 2, train=True, seed=0)
    with pytest.warns(UserWarning, match=r"\(8 files then, 7 now: 1 file\(s\) removed\); .*interrupted epoch restarts"):
        b.load_state_dict(a.state_dict())
    assert b.state_dict()["epoch"] == 3 and b.state_dict()["batch"] == 0
