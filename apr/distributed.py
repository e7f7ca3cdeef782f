"""The evaluation side's distributed layer, shared by corruption evaluation, OOD scoring and attacks.

Training goes through accelerate; evaluation commands run under plain ``torchrun`` and only need
the rank, the world size, a device and two collectives (sum counts, gather per-sample scores).
One process without torchrun is a world of one: every function here is then a no-op.
Under ``srun`` (one task per GPU, no torchrun) :func:`adopt_slurm_ranks` turns slurm's task
variables into the ones torchrun would set, so accelerate and :func:`join_world` need nothing else.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["World", "adopt_slurm_ranks", "join_world", "leave_world", "resolve_device", "all_reduce_sum",
           "all_gather_cat", "gather_skipped"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def adopt_slurm_ranks(environ=os.environ) -> bool:
    """Set RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT from an
    ``srun`` step of several tasks (SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS), as Lightning's
    SLURMEnvironment and submitit do. No-op (False) under torchrun (RANK set) or outside such a step:
    a batch script's own shell has no step, and a one-task step is a world of one."""
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "RANK" in environ or "SLURM_PROCID" not in environ or tasks <= 1:
        return False
    nodes = int(environ.get("SLURM_STEP_NUM_NODES", environ.get("SLURM_NNODES", "1")) or 1)
    environ.update(RANK=environ["SLURM_PROCID"], LOCAL_RANK=environ.get("SLURM_LOCALID", "0"),
                   WORLD_SIZE=str(tasks), LOCAL_WORLD_SIZE=str(max(1, tasks // max(1, nodes))))
    if "MASTER_ADDR" not in environ:
        environ["MASTER_ADDR"] = _head_node(environ.get("SLURM_STEP_NODELIST", environ.get("SLURM_JOB_NODELIST", "")))
    environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))
    return True


def _head_node(nodelist: str) -> str:
    """The first host of a slurm node list (``node[01-04]`` compressed), through ``scontrol`` as sbatch does."""
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        return out[0] if out else nodelist
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0]


def join_world(device_hint: str | torch.device | None = None) -> World:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    if not dist.is_initialized():
        wants_cuda = torch.cuda.is_available() and (device_hint is None or torch.device(device_hint).type == "cuda")
        dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def leave_world() -> None:
    """After a command finished on every rank: wait for the others, then tear the process group down. A rank
    that exits while its peer still holds their gloo connections can abort in C++ at exit ("terminate called
    without an active exception", SIGABRT, and torchrun then kills the peer mid-write): 5 of 105 two-process
    CPU evaluations here without this, none of 60 with it. Not after an error: a peer may be inside another
    collective and the barrier would hang."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolve_device(device: str | torch.device | None, world: World = World()) -> torch.device:
    """``device`` (default: this rank's GPU, else the CPU); a bare ``cuda`` becomes this rank's GPU."""
    if device is None:
        return torch.device(f"cuda:{world.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{world.local_rank}")
    return device


def _collective_device(tensor: torch.Tensor) -> torch.device:
    return tensor.device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Element-wise sum over ranks (float64 keeps integer counts exact up to 2**53)."""
    if not world.active:
        return values
    flat = values.to(_collective_device(values), dtype=torch.float64)
    dist.all_reduce(flat)
    return flat.to(values.device)


def all_gather_cat(values: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenation over ranks (rank order) of 1-D tensors of possibly different lengths."""
    if not world.active:
        return values
    device = _collective_device(values)
    local = values.reshape(-1).to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world.world_size)]
    dist.all_gather(sizes, torch.tensor([local.numel()], dtype=torch.int64, device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=local.dtype, device=device)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in range(world.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(values.device)


def broadcast_object(obj, world: World):
    """Rank 0's ``obj`` (any picklable value) on every rank, so all ranks take the same decisions."""
    if not world.active:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_skipped(files: dict, world: World) -> dict:
    """The union over ranks of each rank's skipped files (path -> reason): every rank decodes its own
    shard, and the results file must name every file that was left out."""
    if not world.active:
        return dict(files)
    parts = [None] * world.world_size
    dist.all_gather_object(parts, dict(files))
    return {path: reason for part in parts for path, reason in part.items()}
