"""The shared evaluation collectives: a world of one is a no-op; two gloo ranks sum and gather in rank order."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from apr.distributed import World, all_gather_cat, all_reduce_sum, resolve_device


def test_world_of_one_is_identity():
    x = torch.arange(3.0)
    assert all_reduce_sum(x, World()) is x and all_gather_cat(x, World()) is x
    assert resolve_device("cpu") == torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    world = World(rank, 2, rank)
    summed = all_reduce_sum(torch.tensor([1.0, rank + 1.0]), world)
    gathered = all_gather_cat(torch.arange(rank + 2, dtype=torch.float32) + 10 * rank, world)
    out.put((rank, summed.tolist(), gathered.tolist()))
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_ranks_sum_and_gather_in_rank_order():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=100) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for rank, summed, gathered in results:
        assert summed == [2.0, 3.0]
        assert gathered == [0.0, 1.0, 10.0, 11.0, 12.0]
