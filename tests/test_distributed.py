"""The shared evaluation collectives: a world of one is a no-op; two gloo ranks sum and gather in rank order;
the ranks of a command leave the process group together."""

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


def _two_ranks(worker, messages: int = 2, timeout: float = 100) -> list:
    """Run ``worker(rank, port, queue)`` in two spawned processes; the first ``messages`` items they put."""
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=timeout) for _ in range(messages)]
    for p in procs:
        p.join(timeout=30)
    return got


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
    results = sorted(_two_ranks(_worker))
    for rank, summed, gathered in results:
        assert summed == [2.0, 3.0]
        assert gathered == [0.0, 1.0, 10.0, 11.0, 12.0]


def _command_worker(rank: int, port: int, out):
    """A command under run_main: rank 0 is still writing (1.5 s) when rank 1 is done."""
    import time

    import torch.distributed as dist

    from apr.cli import run_main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def command(args) -> int:
        all_reduce_sum(torch.ones(1), World(rank, 2, rank))
        if rank == 0:
            time.sleep(1.5)
            out.put(("finished", rank, time.time()))
        return 0

    code = run_main(command, [])
    out.put(("left", rank, time.time(), dist.is_initialized(), code))


@pytest.mark.timeout(120)
def test_no_rank_leaves_the_process_group_while_a_peer_still_works():
    """A rank exiting while its peer holds their gloo connections can abort at exit (SIGABRT, 'terminate called
    without an active exception'; torchrun then kills the peer mid-write): a command ends on every rank
    together, and with no process group left."""
    events = _two_ranks(_command_worker, messages=3)
    finished = next(e[2] for e in events if e[0] == "finished")
    left = {e[1]: e[2:] for e in events if e[0] == "left"}
    assert left[1][0] >= finished, "rank 1 left before rank 0 had finished its command"
    assert all(initialized is False and code == 0 for _, initialized, code in left.values())


def _nccl_step_worker(rank: int, port: int, out):
    """One APR-SP bf16 channels_last train_step of a DDP-wrapped cnn_tiny on this rank's GPU and its own batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from apr.augment import APRPolicy
    from apr.inference import ImageClassifier
    from apr.models import create_model
    from apr.train import train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = create_model("cnn_tiny", 4).cuda().to(memory_format=torch.channels_last)
    start = torch.cat([p.detach().flatten() for p in net.parameters()]).cpu()
    model = DistributedDataParallel(ImageClassifier(net, (0.5,) * 3, (0.25,) * 3, precision="bf16", channels_last=True),
                                    device_ids=[rank])
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(rank)).cuda()
    labels = torch.arange(8, device="cuda") % 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, optimizer, images, labels, policy=APRPolicy("apr_sp", p_prob=1.0),
               generator=torch.Generator().manual_seed(rank))
    summed = all_reduce_sum(torch.tensor([1.0, rank + 1.0], device="cuda"), World(rank, 2, rank))
    out.put((rank, start, torch.cat([p.detach().flatten() for p in net.parameters()]).cpu(), summed.cpu().tolist()))
    dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.timeout(180)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for a 2-process NCCL step")
def test_two_gpu_nccl_step_keeps_the_replicas_equal():
    """Different batches per rank, gradients averaged by NCCL: after the step both replicas hold the same
    weights (bit for bit: one all-reduce result, the same optimizer arithmetic), and they moved."""
    results = sorted(_two_ranks(_nccl_step_worker, timeout=150), key=lambda r: r[0])
    (_, start0, after0, summed0), (_, start1, after1, summed1) = results
    assert torch.equal(start0, start1) and torch.equal(after0, after1)
    assert not torch.equal(after0, start0)
    assert summed0 == summed1 == [2.0, 3.0]
