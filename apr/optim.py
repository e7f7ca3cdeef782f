"""Optimizer and learning-rate schedule of a run: SGD, the batch-scaled lr, warmup + decay.

``schedule: cyclic`` is the one-cycle triangle of the reference's fast adversarial training
(autoattacks/train_fgsm.py: ``CyclicLR(base_lr=0, max_lr=lr_max, step_size_up=T/2,
step_size_down=T/2)`` stepped once per batch, T = epochs x batches per epoch): optimizer step ``i``
(from 0) uses ``lr_max x (1 - |2i/T - 1|)``, i.e. 0 at the first step, lr_max at step T/2, back
towards 0 at the last. (Wong et al.'s own CIFAR script peaks at 2/5 of the run instead.) The reference's
CyclicLR also cycles SGD's momentum 0.9 -> 0.8 -> 0.9 against the lr (its default ``cycle_momentum``):
``optim.cyclic_momentum: [0.8, 0.9]`` does the same through :func:`set_cyclic_momentum`, which sets the
documented ``momentum`` key of each param group, as CyclicLR itself does.

The schedule is a ``LambdaLR`` over optimizer steps whose multiplier comes from
:func:`make_lr_lambda`. It is always built by :func:`build_scheduler` at a given step, so a run
resumed on another number of processes gets a fresh scheduler at the new world's step and lr
through the public constructor (no scheduler attribute is set from outside).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from apr.config import Config

__all__ = ["scaled_lr", "build_optimizer", "make_lr_lambda", "cyclic_factor", "set_cyclic_momentum",
           "build_scheduler"]


def scaled_lr(cfg: Config, world_size: int) -> float:
    """``optim.lr`` for the global batch: lr x batch_size x world / lr_base_batch (0: no scaling)."""
    base_batch = cfg.optim.lr_base_batch
    global_batch = cfg.train.batch_size * world_size
    return cfg.optim.lr * (global_batch / base_batch if base_batch > 0 else 1.0)


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Config, lr: float) -> torch.optim.SGD:
    o = cfg.optim
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)


def make_lr_lambda(cfg: Config, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr as a function of the optimizer step (warmup, then the schedule)."""
    o, epochs = cfg.optim, cfg.train.epochs
    warmup_steps = o.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        epoch = step / steps_per_epoch  # fractional epoch; decays happen at whole epochs
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "step":
            return o.gamma ** int(epoch // o.step_size)
        if o.schedule == "multistep":
            return o.gamma ** sum(int(epoch) >= m for m in o.milestones)
        if o.schedule == "cyclic":
            return cyclic_factor(step, epochs * steps_per_epoch)
        progress = (step - warmup_steps) / max(1.0, epochs * steps_per_epoch - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine

    return factor


def cyclic_factor(step: int, total_steps: int) -> float:
    """The triangle 0 -> 1 (at ``total_steps / 2``) -> 0, as torch's ``CyclicLR`` with equal up and
    down half-cycles computes it; 0 past the end (a resumed run never steps beyond ``total_steps``)."""
    return max(0.0, 1.0 - abs(2.0 * step / total_steps - 1.0))


def set_cyclic_momentum(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int, step: int) -> None:
    """Momentum for optimizer step ``step`` (= the scheduler's ``last_epoch``) under ``optim.cyclic_momentum``:
    ``high - (high - low) x cyclic_factor`` (CyclicLR's formula); nothing without that option. The optimizer's
    state_dict carries it, so a resumed run continues with the saved value."""
    if not cfg.optim.cyclic_momentum:
        return
    low, high = cfg.optim.cyclic_momentum
    momentum = high - (high - low) * cyclic_factor(step, cfg.train.epochs * steps_per_epoch)
    for group in optimizer.param_groups:
        group["momentum"] = momentum


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int, base_lr: float,
                    global_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule with base lr ``base_lr``, positioned after ``global_step`` optimizer steps.

    ``initial_lr`` is the documented param-group key a scheduler resumed at ``last_epoch >= 0`` reads
    its base lr from; the constructor then sets every group's lr to ``base_lr x factor(global_step)``.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = base_lr
        group["lr"] = base_lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_lr_lambda(cfg, steps_per_epoch),
                                                  last_epoch=global_step - 1)
    set_cyclic_momentum(optimizer, cfg, steps_per_epoch, scheduler.last_epoch)
    return scheduler
