"""The training loop: APR on the device, CE on the clean and the recombined batch, exact resume.

Read ``train()`` top to bottom: it builds the pieces, then runs the plain loop of
torchvision's classification reference. Everything else here is a small helper it calls.

Loss, as in the reference (iCGY96/APR core/train.py): the clean batch and the APR batch are
concatenated into one forward pass and ``CE(first half) + CE(second half)`` with the same
labels is minimised; with ``aug: none`` only the clean batch is used.
"""

from __future__ import annotations

from apr.errors import UserError
import csv
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from apr.augment import APRPolicy
from apr.checkpoint import (
    CheckpointError,
    CheckpointManager,
    PreemptionFlag,
    capture_rng_state,
    check_model_compatible,
    checkpoint_position,
    find_latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
)
from apr.config import Config, config_to_dict, save_config
from apr.models import create_model

PREEMPT_CHECK_EVERY = 10  # steps between cross-rank checks for SIGTERM/SIGUSR1 (slurm warns 120 s ahead)

__all__ = ["train", "TrainResult", "TrainingDiverged", "make_lr_lambda", "run_dir_for", "evaluate_top_k"]


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    status: str  # finished | preempted
    run_dir: Path
    epoch: int  # epoch in progress (== cfg.train.epochs when finished)
    step: int  # batches of that epoch already trained
    global_step: int
    val_top1_error: float | None = None
    val_top5_error: float | None = None
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# small pieces the loop composes


def run_dir_for(cfg: Config) -> Path:
    name = cfg.train.run_name or f"{cfg.model.name}_{cfg.aug.name}"
    return Path(cfg.train.output_dir) / name


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
        progress = (step - warmup_steps) / max(1.0, epochs * steps_per_epoch - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine

    return factor


def _normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    images = (images - mean) / std
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@torch.inference_mode()
def evaluate_top_k(model, loader, mean, std, accelerator, channels_last=True) -> tuple[float, float, int]:
    """Top-1 / top-5 error over a loader; counts are summed over ranks (no sample twice)."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for images, labels in loader:
        with accelerator.autocast():
            logits = model(_normalize(images, mean, std, channels_last))
        k = min(5, logits.shape[1])
        top = logits.float().topk(k, dim=1).indices
        counts[0] += (top[:, 0] == labels).sum()
        counts[1] += (top == labels[:, None]).any(dim=1).sum()
        counts[2] += labels.numel()
    counts = accelerator.reduce(counts, reduction="sum") if accelerator.num_processes > 1 else counts
    total = max(1.0, counts[2].item())
    model.train()
    return 1.0 - counts[0].item() / total, 1.0 - counts[1].item() / total, int(counts[2].item())


def _make_accelerator(cfg: Config):
    from accelerate import Accelerator

    return Accelerator(mixed_precision="bf16" if cfg.train.precision == "bf16" else "no", cpu=not torch.cuda.is_available())


def _setup_determinism(cfg: Config, rank: int) -> None:
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed + rank)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def _resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to continue from. Refuses to mix two runs in one folder: a fresh start, or an
    explicit older checkpoint, next to newer checkpoints would see its own saves pruned at once by
    ``keep_last`` (they sort older), and ``--resume auto`` would later return to the other run."""
    latest = find_latest_checkpoint(run_dir)
    if not resume:
        if latest is not None:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints (newest {latest.name}): continue that run with --resume auto, "
                "or start a new one with another train.run_name or train.output_dir")
        return None
    if resume == "auto":
        return latest
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no such checkpoint file")
    if latest is not None and latest.resolve() != path.resolve():
        position = checkpoint_position(path)
        if position is None:  # best.pt or a renamed file: its position is inside
            state = load_checkpoint(path)
            position = (int(state.get("epoch", 0)), int(state.get("step", 0)))
        if checkpoint_position(latest) > position:
            raise CheckpointError(
                f"--resume {resume} is at epoch {position[0]}, step {position[1]}, but {run_dir} holds the newer "
                f"{latest.name}: the resumed run's checkpoints would be pruned as older ones and --resume auto "
                "would return to the newer file; move the newer checkpoints away or set another train.run_name")
    return path


def _on_rank0(fn: Callable, world: int, is_main: bool):
    """``fn()`` evaluated on rank 0 and broadcast (result or CheckpointError) to every rank: the nodes of a
    job may list a shared run folder differently (NFS caching), and ranks that resume from different
    checkpoints run different step counts (DDP deadlock) or silently train different weights."""
    if world == 1:
        return fn()
    box = [None]
    if is_main:
        try:
            box[0] = ("ok", fn())
        except CheckpointError as exc:
            box[0] = ("error", str(exc))
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise CheckpointError(value)
    return value


class _CsvLog:
    """Append-only CSV of training metrics (rank 0), surviving resumes."""

    COLUMNS = ["time", "epoch", "step", "global_step", "lr", "loss", "images_per_s",
               "val_top1_error", "val_top5_error"]

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(self.COLUMNS)
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tensorboard = None

    def write(self, **row) -> None:
        if not self.enabled:
            return
        row.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S"))
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.COLUMNS])
        if self.tensorboard is not None:
            for key in ("lr", "loss", "images_per_s", "val_top1_error", "val_top5_error"):
                if row.get(key) not in (None, ""):
                    self.tensorboard.add_scalar(key, float(row[key]), row["global_step"])


def _progress(total: int, initial: int, epoch: int, epochs: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                disable=not enabled, dynamic_ncols=True, file=sys.stderr)


# ---------------------------------------------------------------------------------------
# the loop


def train(cfg: Config, resume: str | None = None, accelerator=None, progress: bool = True,
          on_step_end: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``cfg`` to the end (or until preempted); ``resume`` = checkpoint path or ``"auto"``."""
    from apr.data import build_train_loader, build_val_loader

    accelerator = accelerator or _make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    device = accelerator.device
    _setup_determinism(cfg, rank)
    run_dir = run_dir_for(cfg)

    # data
    train_loader = build_train_loader(cfg, rank=rank, world_size=world, local_rank=accelerator.local_process_index,
                                      device=device, seed=cfg.train.seed)
    val_loader = build_val_loader(cfg, classes=train_loader.classes, rank=rank, world_size=world,
                                  local_rank=accelerator.local_process_index, device=device)
    classes = list(train_loader.classes)
    num_classes = cfg.model.num_classes or len(classes)
    if num_classes != len(classes):
        raise ValueError(f"model.num_classes={num_classes} but the training data has {len(classes)} classes")
    steps_per_epoch = len(train_loader)
    if cfg.train.max_steps_per_epoch > 0:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(
            f"the training set gives no full batch per process: {train_loader.num_samples} samples on this rank, "
            f"batch size {cfg.train.batch_size}; lower train.batch_size"
        )

    # model, optimizer, schedule
    model = create_model(cfg.model.name, num_classes, drop_rate=cfg.model.drop_rate)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    global_batch = cfg.train.batch_size * world
    base_lr = cfg.optim.lr * (global_batch / cfg.optim.lr_base_batch if cfg.optim.lr_base_batch > 0 else 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=cfg.optim.momentum,
                                nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_lr_lambda(cfg, steps_per_epoch))
    raw_model = model
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.model.compile:
        model = torch.compile(model)
    policy = APRPolicy.from_config(cfg.aug)
    # a CPU generator: APR's per-sample choices are drawn on the host, so no GPU sync per batch
    aug_generator = torch.Generator()
    aug_generator.manual_seed(cfg.train.seed * 1000 + rank)
    mean = torch.tensor(cfg.data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std, device=device).view(1, 3, 1, 1)

    # resume
    manager = CheckpointManager(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best)
    start_epoch, start_step, global_step, history = 0, 0, 0, []
    resume_path = _on_rank0(lambda: _resolve_resume(resume, run_dir), world, is_main)
    loader_state = None
    if resume_path is not None:
        state = load_checkpoint(resume_path, map_location="cpu")
        check_model_compatible(state, raw_model, source=f"checkpoint {resume_path}")
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
        history = list(state.get("history", []))
        manager.best_metric = state.get("best_metric")
        loader_state = state.get("loader_state", [None] * world)
        if len(loader_state) == world:
            restore_rng_state(state["rng"][rank])
            aug_generator.set_state(state["aug_generator"][rank].cpu())
        else:  # world size changed: the interrupted epoch restarts from its start, with this world's schedule
            # steps per epoch and the scaled lr depend on the world size: a step count or base lr carried
            # over from the old world would put every later warmup/decay at the wrong epoch
            loader_state, start_step, global_step = None, 0, start_epoch * steps_per_epoch
            scheduler.base_lrs = [base_lr for _ in optimizer.param_groups]
            scheduler.last_epoch = global_step
            lr_now = base_lr * make_lr_lambda(cfg, steps_per_epoch)(global_step)
            for group in optimizer.param_groups:
                group["initial_lr"], group["lr"] = base_lr, lr_now
            scheduler._last_lr = [lr_now for _ in optimizer.param_groups]
            if is_main:
                print(f"checkpoint was written by {len(state['loader_state'])} processes, now {world}: "
                      "the interrupted epoch restarts from its first batch", file=sys.stderr)
        if is_main:
            print(f"resumed from {resume_path} at epoch {start_epoch + 1}, step {start_step}", file=sys.stderr)
    elif resume == "auto" and is_main:
        print(f"--resume auto: no checkpoint in {run_dir}, starting fresh", file=sys.stderr)

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        print(f"run folder: {run_dir}\n{world} process(es), global batch {global_batch}, base lr {base_lr:g}, "
              f"{len(classes)} classes, {steps_per_epoch} steps/epoch, aug {cfg.aug.name}", file=sys.stderr)
    log = _CsvLog(run_dir / "metrics.csv", enabled=is_main)

    def gather(obj):
        """Per-rank objects (RNG, loader positions) collected on every rank, in rank order."""
        if world == 1:
            return [obj]
        out = [None] * world
        torch.distributed.all_gather_object(out, obj)
        return out

    def save(epoch: int, step: int, metric: float | None = None) -> None:
        rng, gen, pos = gather(capture_rng_state()), gather(aug_generator.get_state()), gather(
            train_loader.state_dict())
        if is_main:
            manager.save({
                "model": raw_model.state_dict(), "model_name": cfg.model.name, "num_classes": num_classes,
                "classes": classes, "config": config_to_dict(cfg), "epoch": epoch, "step": step,
                "global_step": global_step, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng, "aug_generator": gen, "loader_state": pos,
                "history": history, "best_metric": manager.best_metric,
                "metrics": history[-1] if history else {},
            }, epoch, step, metric)
        accelerator.wait_for_everyone()

    def stop_requested(flag: PreemptionFlag, force_check: bool = False) -> bool:
        """True on every rank once any rank got the signal. One process: a flag read, no sync.
        Several: an all-reduce every PREEMPT_CHECK_EVERY steps (same steps on all ranks), not per step."""
        if world == 1:
            return flag.is_set
        if not force_check and global_step % PREEMPT_CHECK_EVERY:
            return False
        local = torch.tensor([1.0 if flag.is_set else 0.0], device=device)
        return bool(accelerator.reduce(local, reduction="sum").item() > 0)

    val_top1 = val_top5 = None
    model.train()
    with PreemptionFlag() as preempt:
        for epoch in range(start_epoch, cfg.train.epochs):
            if epoch == start_epoch and loader_state is not None and loader_state[rank] is not None:
                train_loader.load_state_dict(loader_state[rank])  # the exact next batch of the old run
            train_loader.set_epoch(epoch)
            step = start_step if epoch == start_epoch else 0
            bad_loss = torch.zeros((), dtype=torch.bool, device=device)
            loss_sum, seen, t0 = torch.zeros((), device=device), 0, time.perf_counter()
            bar = _progress(steps_per_epoch, step, epoch, cfg.train.epochs, progress and is_main)
            for images, labels in train_loader:
                first, second = policy(images, generator=aug_generator)
                inputs = first if second is None else torch.cat([first, second])
                with accelerator.autocast():
                    logits = model(_normalize(inputs, mean, std, cfg.model.channels_last)).float()
                    loss = F.cross_entropy(logits[: len(labels)], labels)
                    if second is not None:
                        loss = loss + F.cross_entropy(logits[len(labels):], labels)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                step, global_step, seen = step + 1, global_step + 1, seen + len(labels)
                bad_loss |= ~torch.isfinite(loss.detach())
                loss_sum += loss.detach()
                bar.update(1)
                checkpoint_due = cfg.checkpoint.every_steps > 0 and global_step % cfg.checkpoint.every_steps == 0
                log_due = global_step % max(1, cfg.train.log_every) == 0
                if log_due or checkpoint_due or step >= steps_per_epoch:
                    if bool(bad_loss.item()):
                        raise TrainingDiverged(
                            f"loss became {loss.item()} at epoch {epoch + 1}, step {step}; the last good "
                            f"checkpoint in {run_dir} is kept (lower optim.lr or check the data)")
                    rate = seen * world / max(1e-9, time.perf_counter() - t0)
                    lr = scheduler.get_last_lr()[0]
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
                    if log_due:
                        log.write(epoch=epoch + 1, step=step, global_step=global_step, lr=lr,
                                  loss=f"{loss_sum.item() / max(1, step):.5f}", images_per_s=f"{rate:.1f}")
                if on_step_end is not None:
                    on_step_end({"epoch": epoch, "step": step, "global_step": global_step, "loss": loss.detach()})
                if step >= steps_per_epoch:  # the epoch end below saves, validates and checks for a signal;
                    break  # a mid-epoch save of the last step would resume into a replay of the whole epoch
                if checkpoint_due:
                    save(epoch, step)
                if stop_requested(preempt):
                    bar.close()
                    if bool(bad_loss.item()):  # never let a preemption save replace the last good checkpoint
                        raise TrainingDiverged(
                            f"loss became non-finite in epoch {epoch + 1} before step {step}; the last good "
                            f"checkpoint in {run_dir} is kept (lower optim.lr or check the data)")
                    save(epoch, step)
                    if is_main:
                        print(f"signal {preempt.received}: saved epoch {epoch + 1} step {step}; "
                              f"resume with --resume auto", file=sys.stderr)
                    return TrainResult("preempted", run_dir, epoch, step, global_step, history=history)
            bar.close()
            start_step = 0

            epoch_record = {"epoch": epoch + 1, "train_loss": loss_sum.item() / max(1, step),
                            "images_per_s": seen * world / max(1e-9, time.perf_counter() - t0)}
            last_epoch = epoch + 1 == cfg.train.epochs
            if last_epoch or (cfg.train.val_every > 0 and (epoch + 1) % cfg.train.val_every == 0):
                val_top1, val_top5, count = evaluate_top_k(model, val_loader, mean, std, accelerator,
                                                           cfg.model.channels_last)
                epoch_record.update(val_top1_error=val_top1, val_top5_error=val_top5, val_count=count)
                log.write(epoch=epoch + 1, step=step, global_step=global_step,
                          val_top1_error=f"{val_top1:.5f}", val_top5_error=f"{val_top5:.5f}")
                if is_main:
                    print(f"epoch {epoch + 1}: val top-1 error {100 * val_top1:.2f}%, "
                          f"top-5 error {100 * val_top5:.2f}% ({count} images)", file=sys.stderr)
            history.append(epoch_record)
            save(epoch + 1, 0, metric=epoch_record.get("val_top1_error"))
            if stop_requested(preempt, force_check=True):
                return TrainResult("preempted", run_dir, epoch + 1, 0, global_step, val_top1, val_top5, history)

    return TrainResult("finished", run_dir, cfg.train.epochs, 0, global_step, val_top1, val_top5, history)
