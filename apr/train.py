"""The training loop: APR on the device, CE on the clean and the recombined batch, exact resume.

Read ``train()`` top to bottom: it claims the run folder, builds a :class:`Run` (loaders, model,
optimizer, schedule), restores a checkpoint if asked, then calls :func:`run_epoch` per epoch.
One optimizer step is :func:`train_step`; everything else is a small helper.

Loss, as in the reference (iCGY96/APR core/train.py): the clean batch and the APR batch are
concatenated into one forward pass and ``CE(first half) + CE(second half)`` with the same
labels is minimised; with ``aug: none`` only the clean batch is used.

Adversarial training (``adversarial.method: fgsm``, the reference's autoattacks/train_fgsm.py): the
same step, with that batch replaced by its fast-FGSM version before the forward (see :func:`train_step`);
once per epoch a 5-step PGD check on a training batch guards against catastrophic overfitting.
"""

from __future__ import annotations

import contextlib
import csv
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from apr.adversarial.attacks import FGSMPerturbation, catastrophic_overfitting_check
from apr.augment import APRPolicy, training_policy
from apr.checkpoint import (
    CheckpointManager,
    PreemptionFlag,
    RunLock,
    TrainingDiverged,
    capture_rng_state,
    check_model_compatible,
    clean_stale_temp_files,
    diverged,
    load_checkpoint,
    on_rank0,
    resolve_resume,
    restore_rng_state,
    weights_are_finite,
)
from apr.config import Config, config_to_dict, save_config
from apr.inference import ImageClassifier, predict_batches, resolve_precision
from apr.io import atomic_open
from apr.models import create_model
from apr.optim import build_optimizer, build_scheduler, make_lr_lambda, scaled_lr, set_cyclic_momentum

PREEMPT_CHECK_EVERY = 10  # steps between cross-rank checks for SIGTERM/SIGUSR1 (slurm warns 120 s ahead)

__all__ = ["train", "train_step", "run_epoch", "apr_inputs", "apr_loss", "TrainResult", "TrainingDiverged",
           "RunLog", "LossMeter", "make_lr_lambda", "run_dir_for", "evaluate_top_k", "resolve_num_threads",
           "build_perturbation", "robustness_check", "overfitting_warning"]


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
# one step


def apr_inputs(images: torch.Tensor, policy: APRPolicy, generator: torch.Generator) -> torch.Tensor:
    """The batch of the one forward pass: ``images`` alone (aug none) or (first ‖ APR second)."""
    first, second = policy(images, generator=generator)
    return first if second is None else torch.cat([first, second])


def apr_loss(model, inputs: torch.Tensor, labels: torch.Tensor, halves: str = "sum") -> torch.Tensor:
    """``CE(first half) + CE(second half)``, both halves with ``labels`` (one half: plain CE);
    ``halves="mean"``: their mean, the CE over the whole 2N batch (the reference's FGSM training)."""
    if halves not in ("sum", "mean"):
        raise ValueError(f"halves must be 'sum' or 'mean', got {halves!r}")
    logits = model(inputs)
    n = len(labels)
    loss = F.cross_entropy(logits[:n], labels)
    if len(logits) > n:
        loss = loss + F.cross_entropy(logits[n:], labels)
        if halves == "mean":
            loss = loss / 2
    return loss


def train_step(model, optimizer, images: torch.Tensor, labels: torch.Tensor, *, policy: APRPolicy,
               generator: torch.Generator, backward: Callable[[torch.Tensor], None] | None = None,
               perturb: FGSMPerturbation | None = None, halves: str = "sum", scaler=None) -> torch.Tensor:
    """One optimizer step on ``images`` ([0, 1], on the device); returns the detached loss.

    ``model`` is an :class:`~apr.inference.ImageClassifier` (possibly DDP-wrapped): normalisation and
    precision happen inside it. The scheduler is the caller's. ``perturb`` (adversarial training)
    replaces the whole (clean ‖ APR) batch by its perturbed version, attacked with the labels repeated,
    before the forward; its random start draws from ``generator`` after APR, so resume stays exact.
    ``scaler``: fp16 training's ``torch.amp.GradScaler`` (fp16 gradients underflow without loss scaling).
    """
    inputs = apr_inputs(images, policy, generator)
    if perturb is not None:
        inputs = perturb(model, inputs, labels.repeat(len(inputs) // len(labels)), generator)
    loss = apr_loss(model, inputs, labels, halves)
    optimizer.zero_grad(set_to_none=True)
    scaled = loss if scaler is None else scaler.scale(loss)
    if backward is None:
        scaled.backward()
    else:
        backward(scaled)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed; the scale then shrinks
        scaler.update()
    return loss.detach()


# ---------------------------------------------------------------------------------------
# small pieces the loop composes


def run_dir_for(cfg: Config) -> Path:
    name = cfg.train.run_name or f"{cfg.model.name}_{cfg.aug.name}"
    return Path(cfg.train.output_dir) / name


def resolve_num_threads(cfg: Config) -> int:
    """``train.num_threads``, or for 0 the cores this process may use (its CPU affinity) shared by the
    processes of this node (``LOCAL_WORLD_SIZE``), less the loader's threads, at least 1: torch's default
    (every core in every process) oversubscribes the CPU under torchrun and starves the loader."""
    if cfg.train.num_threads > 0:
        return cfg.train.num_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // local_processes - cfg.data.num_workers)


@contextlib.contextmanager
def _cpu_threads(count: int) -> Iterator[int]:
    """torch's intra-op threads set to ``count`` for the run, restored after (tests share a process)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)


def evaluate_top_k(classifier, loader, accelerator) -> tuple[float, float, int]:
    """Top-1 / top-5 error over a loader; counts are summed over ranks (no sample twice)."""
    counts = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for logits, labels in predict_batches(classifier, loader):
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top[:, 0] == labels).sum()
        counts[1] += (top == labels[:, None]).any(dim=1).sum()
        counts[2] += labels.numel()
    counts = accelerator.reduce(counts, reduction="sum") if accelerator.num_processes > 1 else counts
    total = max(1.0, counts[2].item())
    return 1.0 - counts[0].item() / total, 1.0 - counts[1].item() / total, int(counts[2].item())


def _make_accelerator():
    """DDP plumbing only: precision lives in ImageClassifier (the one autocast path)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())


def _setup_determinism(cfg: Config, rank: int) -> None:
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed + rank)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


class RunLog:
    """Append-only ``metrics.csv`` (rank 0) surviving resumes, mirrored to TensorBoard when installed."""

    COLUMNS = ["time", "epoch", "step", "global_step", "lr", "loss", "images_per_s",
               "val_top1_error", "val_top5_error", "pgd_accuracy"]

    def __init__(self, run_dir: Path, enabled: bool):
        self.path, self.enabled, self.tensorboard = run_dir / "metrics.csv", enabled, None
        self.columns = list(self.COLUMNS)
        if not enabled:
            return
        if not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.COLUMNS)
        else:  # a resumed run keeps the header its file was started with (older runs: fewer columns)
            with open(self.path, newline="") as f:
                self.columns = next(csv.reader(f), None) or self.columns
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tensorboard = None

    def forget_after(self, global_step: int) -> int:
        """Drop the rows logged after ``global_step`` (a run killed after its last save logged steps that the
        resumed run trains again), so each (epoch, step) appears once; the number dropped."""
        if not self.enabled or not self.path.exists():
            return 0
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        col = rows[0].index("global_step") if rows and "global_step" in rows[0] else None
        if col is None:
            return 0
        kept = [r for r in rows[1:] if not (len(r) > col and r[col].isdigit() and int(r[col]) > global_step)]
        if len(kept) < len(rows) - 1:
            with atomic_open(self.path, "w") as f:
                csv.writer(f).writerows([rows[0], *kept])
        return len(rows) - 1 - len(kept)

    def write(self, **row) -> None:
        if not self.enabled:
            return
        row.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S"))
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])
        if self.tensorboard is not None:
            for key in ("lr", "loss", "images_per_s", "val_top1_error", "val_top5_error", "pgd_accuracy"):
                if row.get(key) not in (None, ""):
                    self.tensorboard.add_scalar(key, float(row[key]), row["global_step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class LossMeter:
    """Sum of this epoch's losses on the device (no host sync per step), the steps summed, and
    whether any was non-finite; saved in checkpoints so a mid-epoch resume logs the true mean."""

    def __init__(self, device, state: dict | None = None):
        state = state or {"sum": 0.0, "steps": 0}
        self.sum = torch.tensor(float(state["sum"]), device=device)
        self.steps = int(state["steps"])
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.images_per_s = 0.0  # this session's throughput, set at the epoch end
        self.pgd_accuracy: float | None = None  # adversarial training: the epoch-end overfitting check

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss
        self.steps += 1
        self.bad |= ~torch.isfinite(loss)

    def mean(self) -> float:
        return self.sum.item() / max(1, self.steps)

    def state_dict(self) -> dict:
        return {"sum": self.sum.item(), "steps": self.steps}


@dataclass
class Run:
    """What :func:`train` builds once and :func:`run_epoch` uses."""

    cfg: Config
    run_dir: Path
    accelerator: object
    train_loader: object
    val_loader: object
    classes: list[str]
    steps_per_epoch: int
    bare_model: torch.nn.Module  # what checkpoints store: the model's own state_dict
    classifier: torch.nn.Module  # ImageClassifier, DDP-wrapped / compiled as prepared
    optimizer: torch.optim.Optimizer
    raw_optimizer: torch.optim.Optimizer  # the SGD object itself, which the scheduler is built on
    scheduler: torch.optim.lr_scheduler.LambdaLR
    base_lr: float
    policy: APRPolicy
    generator: torch.Generator  # CPU: APR's per-sample choices are drawn on the host, no GPU sync per batch
    perturb: FGSMPerturbation | None  # adversarial training's batch perturbation (None: standard training)
    checkpoints: CheckpointManager
    log: RunLog
    progress: bool = True
    on_step_end: Callable[[dict], None] | None = None
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    preempt: PreemptionFlag | None = None
    scaler: object = None  # torch.amp.GradScaler of fp16 training, else None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def build_run(cfg: Config, accelerator, run_dir: Path, progress: bool, on_step_end) -> Run:
    """Loaders, model behind its ImageClassifier, optimizer with the batch-scaled lr, schedule, policy."""
    from apr.data import build_train_loader, build_val_loader

    rank, world, local = accelerator.process_index, accelerator.num_processes, accelerator.local_process_index
    train_loader = build_train_loader(cfg, rank=rank, world_size=world, local_rank=local,
                                      device=accelerator.device, seed=cfg.train.seed)
    val_loader = build_val_loader(cfg, classes=train_loader.classes, rank=rank, world_size=world,
                                  local_rank=local, device=accelerator.device)
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
            f"batch size {cfg.train.batch_size}; lower train.batch_size")
    model = create_model(cfg.model.name, num_classes, drop_rate=cfg.model.drop_rate,
                         zero_init_last=cfg.model.zero_init_last)
    precision = resolve_precision(cfg.train.precision, accelerator.device)
    classifier = ImageClassifier(model, cfg.data.mean, cfg.data.std, precision=precision,
                                 channels_last=cfg.model.channels_last)
    base_lr = scaled_lr(cfg, world)
    raw_optimizer = build_optimizer(model.parameters(), cfg, base_lr)
    scheduler = build_scheduler(raw_optimizer, cfg, steps_per_epoch, base_lr)
    prepared, optimizer = accelerator.prepare(classifier, raw_optimizer)
    if cfg.model.compile:
        prepared = torch.compile(prepared)
    generator = torch.Generator()
    generator.manual_seed(cfg.train.seed * 1000 + rank)
    run = Run(cfg, run_dir, accelerator, train_loader, val_loader, classes, steps_per_epoch, model, prepared,
              optimizer, raw_optimizer, scheduler, base_lr, training_policy(cfg), generator, build_perturbation(cfg),
              CheckpointManager(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best),
              RunLog(run_dir, enabled=accelerator.is_main_process), progress, on_step_end)
    if precision == "fp16":
        run.scaler = torch.amp.GradScaler(accelerator.device.type)
    return run


def build_perturbation(cfg: Config) -> FGSMPerturbation | None:
    """``adversarial.method: fgsm`` -> the FGSM hook of :func:`train_step`; ``none`` -> None."""
    adv = cfg.adversarial
    if adv.method == "none":
        return None
    return FGSMPerturbation(eps=float(adv.eps), alpha=float(adv.alpha), random_start=adv.random_start)


# ---------------------------------------------------------------------------------------
# adversarial training's guard against catastrophic overfitting


def robustness_check(run: Run, epoch: int, images: torch.Tensor, labels: torch.Tensor) -> float | None:
    """PGD accuracy (``check_steps`` steps of ``check_alpha``, radius ``eps``) on ``images``, averaged
    over the processes; None unless adversarial training with ``check_every_epoch``.

    The reference (train_fgsm.py) checks the epoch's first batch; this takes its last clean batch,
    which a run resumed mid-epoch also has, so a resumed run logs the same number as a straight one.
    Its random start comes from a generator of its own (seed, epoch, rank): the check never moves
    the training trajectory, and it runs in eval mode (BatchNorm statistics untouched).
    """
    adv = run.cfg.adversarial
    if run.perturb is None or not adv.check_every_epoch:
        return None
    generator = torch.Generator().manual_seed(run.cfg.train.seed * 1_000_003 + epoch * 1009 + run.rank)
    accuracy = catastrophic_overfitting_check(run.classifier, images, labels, float(adv.eps),
                                              alpha=float(adv.check_alpha), steps=adv.check_steps,
                                              generator=generator)
    if run.world > 1:
        total = torch.tensor([accuracy * len(labels), len(labels)], dtype=torch.float64, device=run.device)
        total = run.accelerator.reduce(total, reduction="sum")
        accuracy = (total[0] / total[1]).item()
    return accuracy


def overfitting_warning(history: list[dict], accuracy: float, drop: float) -> str | None:
    """The warning when ``accuracy`` fell more than ``drop`` below the best earlier epoch's, else None."""
    earlier = [h["pgd_accuracy"] for h in history if h.get("pgd_accuracy") is not None]
    if not earlier or max(earlier) - accuracy <= drop:
        return None
    return (f"PGD accuracy on a training batch fell to {accuracy:.3f} from a best of {max(earlier):.3f} "
            f"(more than adversarial.overfit_drop={drop:g}): catastrophic overfitting of FGSM training is "
            f"likely. Training goes on; the previous epochs' checkpoints hold the weights before the drop (the "
            f"reference stops here and keeps them)")


# ---------------------------------------------------------------------------------------
# resume


@dataclass
class ResumePoint:
    """Where the loop starts: epoch in progress, batches of it done, and what this rank restores."""

    epoch: int = 0
    step: int = 0
    loader_state: dict | None = None
    epoch_loss: dict | None = None


def restore_run(run: Run, path: Path) -> ResumePoint:
    """Load ``path`` into ``run``. Same world size: the exact next batch (loader, RNG, schedule). Another
    world size: the interrupted epoch restarts with that world's steps per epoch and batch-scaled lr,
    through a scheduler rebuilt at the new step (steps per epoch and lr depend on the world size)."""
    state = load_checkpoint(path, map_location="cpu")
    check_model_compatible(state, run.bare_model, source=f"checkpoint {path}")
    run.bare_model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("grad_scaler"):
        run.scaler.load_state_dict(state["grad_scaler"])
    run.global_step, run.history = state["global_step"], list(state.get("history", []))
    run.checkpoints.best_metric = state.get("best_metric")
    point = ResumePoint(state["epoch"], state["step"])
    written_by = len(state.get("loader_state") or [])
    if written_by == run.world:
        run.scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"][run.rank])
        run.generator.set_state(state["aug_generator"][run.rank].cpu())
        point.loader_state = state["loader_state"][run.rank]
        point.epoch_loss = state.get("epoch_loss")
    else:
        point.step, run.global_step = 0, point.epoch * run.steps_per_epoch
        run.scheduler = build_scheduler(run.raw_optimizer, run.cfg, run.steps_per_epoch, run.base_lr,
                                        run.global_step)
        if run.is_main:
            print(f"checkpoint was written by {written_by} processes, now {run.world}: "
                  "the interrupted epoch restarts from its first batch", file=sys.stderr)
    dropped = run.log.forget_after(run.global_step)
    if run.is_main:
        print(f"resumed from {path} at epoch {point.epoch + 1}, step {point.step}"
              + (f" (dropped {dropped} metrics.csv rows logged after it)" if dropped else ""), file=sys.stderr)
    return point


def claim_run_folder(lock: RunLock, run_dir: Path, resume: str | None) -> Path | None:
    """Rank 0: lock the folder for this run, drop temp files a killed run left, pick the checkpoint."""
    lock.acquire()
    for path in clean_stale_temp_files(run_dir):
        print(f"removed {path.name}, left half-written by an interrupted run", file=sys.stderr)
    return resolve_resume(resume, run_dir)


# ---------------------------------------------------------------------------------------
# saving, divergence, preemption


def _gather(run: Run, obj) -> list:
    """Per-rank objects (RNG, loader positions) collected on every rank, in rank order."""
    if run.world == 1:
        return [obj]
    out = [None] * run.world
    torch.distributed.all_gather_object(out, obj)
    return out


def check_diverged(run: Run, meter: LossMeter, epoch: int, step: int) -> None:
    """Stop when a loss since the epoch start was NaN/inf (one host sync, at log, save and stop points)."""
    if bool(meter.bad.item()):
        raise diverged(run.run_dir, f"loss became non-finite in epoch {epoch + 1} by step {step}")


def save(run: Run, epoch: int, step: int, meter: LossMeter | None, metric: float | None = None) -> None:
    """Checkpoint on rank 0 of a state gathered from every rank; never of non-finite weights
    (checked on every rank, so all stop together; DDP keeps the weights equal)."""
    if meter is not None:
        check_diverged(run, meter, epoch, step)
    if not weights_are_finite(run.bare_model.state_dict()):
        raise diverged(run.run_dir, f"the weights became non-finite in epoch {epoch + 1} by step {step}")
    rng, gen = _gather(run, capture_rng_state()), _gather(run, run.generator.get_state())
    position = _gather(run, run.train_loader.state_dict())
    if run.is_main:
        cfg = run.cfg
        run.checkpoints.save({
            "model": run.bare_model.state_dict(), "model_name": cfg.model.name, "num_classes": len(run.classes),
            "classes": run.classes, "config": config_to_dict(cfg), "epoch": epoch, "step": step,
            "global_step": run.global_step, "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "rng": rng, "aug_generator": gen, "loader_state": position,
            "epoch_loss": meter.state_dict() if meter is not None else None,
            "history": run.history, "best_metric": run.checkpoints.best_metric,
            "metrics": run.history[-1] if run.history else {},
            "grad_scaler": run.scaler.state_dict() if run.scaler is not None else None,
        }, epoch, step, metric)
    run.accelerator.wait_for_everyone()


def stop_requested(run: Run, force_check: bool = False) -> bool:
    """True on every rank once any rank got SIGTERM/SIGUSR1, and every rank then holds that signal (so
    rank 0 requeues after a USR1 that reached only its peer). One process: a flag read, no sync.
    Several: an all-reduce (max of the signal numbers) every PREEMPT_CHECK_EVERY steps, not per step."""
    if run.world == 1:
        return run.preempt.is_set
    if not force_check and run.global_step % PREEMPT_CHECK_EVERY:
        return False
    signum = torch.tensor([float(run.preempt.received or 0)], device=run.device)
    torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
    agreed = int(signum.item())  # one host sync
    if agreed:
        run.preempt.adopt(agreed)
    return bool(agreed)


def _progress(run: Run, initial: int, epoch: int):
    from tqdm.auto import tqdm

    return tqdm(total=run.steps_per_epoch, initial=initial, desc=f"epoch {epoch + 1}/{run.cfg.train.epochs}",
                unit="batch", disable=not (run.progress and run.is_main), dynamic_ncols=True, file=sys.stderr)


# ---------------------------------------------------------------------------------------
# the loop


def run_epoch(run: Run, epoch: int, start: ResumePoint | None = None) -> tuple[str, int, LossMeter]:
    """Train one epoch (from ``start`` when resuming into it): ``("done" | "preempted", step, meter)``."""
    cfg, step = run.cfg, 0
    meter = LossMeter(run.device)
    if start is not None and start.loader_state is not None:
        run.train_loader.load_state_dict(start.loader_state)  # the exact next batch of the old run
        if run.train_loader.state_dict()["batch"] == start.step:  # else the data changed: the epoch restarts
            step, meter = start.step, LossMeter(run.device, start.epoch_loss)
    run.train_loader.set_epoch(epoch)
    seen, t0, bar = 0, time.perf_counter(), _progress(run, step, epoch)
    backward = run.accelerator.backward
    images = labels = None
    for images, labels in run.train_loader:
        loss = train_step(run.classifier, run.optimizer, images, labels, policy=run.policy,
                          generator=run.generator, backward=backward, perturb=run.perturb, halves=cfg.aug.loss,
                          scaler=run.scaler)
        run.scheduler.step()
        set_cyclic_momentum(run.raw_optimizer, cfg, run.steps_per_epoch, run.scheduler.last_epoch)
        step, run.global_step, seen = step + 1, run.global_step + 1, seen + len(labels)
        meter.add(loss)
        bar.update(1)
        checkpoint_due = cfg.checkpoint.every_steps > 0 and run.global_step % cfg.checkpoint.every_steps == 0
        log_due = run.global_step % max(1, cfg.train.log_every) == 0
        if log_due or checkpoint_due or step >= run.steps_per_epoch:
            check_diverged(run, meter, epoch, step)
            rate, lr = seen * run.world / max(1e-9, time.perf_counter() - t0), run.scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
            if log_due:
                run.log.write(epoch=epoch + 1, step=step, global_step=run.global_step, lr=lr,
                              loss=f"{meter.mean():.5f}", images_per_s=f"{rate:.1f}")
        if run.on_step_end is not None:
            run.on_step_end({"epoch": epoch, "step": step, "global_step": run.global_step, "loss": loss})
        if step >= run.steps_per_epoch:  # the epoch end saves, validates and checks for a signal;
            break  # a mid-epoch save of the last step would resume into a replay of the whole epoch
        if checkpoint_due:
            save(run, epoch, step, meter)
        if stop_requested(run):
            bar.close()
            save(run, epoch, step, meter)  # checks the loss first: never a NaN save at preemption
            return "preempted", step, meter
    bar.close()
    meter.images_per_s = seen * run.world / max(1e-9, time.perf_counter() - t0)
    if images is not None:
        meter.pgd_accuracy = robustness_check(run, epoch, images, labels)
    return "done", step, meter


def finish_epoch(run: Run, epoch: int, step: int, meter: LossMeter) -> dict:
    """Validate when due, record the epoch in the history, save ``(epoch + 1, 0)``."""
    cfg = run.cfg
    record = {"epoch": epoch + 1, "train_loss": meter.mean(), "images_per_s": meter.images_per_s}
    if meter.pgd_accuracy is not None:
        log_robustness(run, epoch, step, meter.pgd_accuracy, record)
    if epoch + 1 == cfg.train.epochs or (cfg.train.val_every > 0 and (epoch + 1) % cfg.train.val_every == 0):
        top1, top5, count = evaluate_top_k(run.classifier, run.val_loader, run.accelerator)
        record.update(val_top1_error=top1, val_top5_error=top5, val_count=count)
        run.log.write(epoch=epoch + 1, step=step, global_step=run.global_step,
                      val_top1_error=f"{top1:.5f}", val_top5_error=f"{top5:.5f}")
        if run.is_main:
            print(f"epoch {epoch + 1}: val top-1 error {100 * top1:.2f}%, top-5 error {100 * top5:.2f}% "
                  f"({count} images)", file=sys.stderr)
    run.history.append(record)
    save(run, epoch + 1, 0, None, metric=record.get("val_top1_error"))
    return record


def log_robustness(run: Run, epoch: int, step: int, accuracy: float, record: dict) -> None:
    """The overfitting check into the epoch's record, metrics.csv and the log; a warning on a collapse."""
    warning = overfitting_warning(run.history, accuracy, run.cfg.adversarial.overfit_drop)
    record.update(pgd_accuracy=accuracy, overfitting_warning=warning is not None)
    run.log.write(epoch=epoch + 1, step=step, global_step=run.global_step, pgd_accuracy=f"{accuracy:.5f}")
    if run.is_main:
        adv = run.cfg.adversarial
        print(f"epoch {epoch + 1}: PGD-{adv.check_steps} accuracy {100 * accuracy:.2f}% on a training batch "
              f"(eps {adv.eps:.4g})", file=sys.stderr)
        if warning is not None:
            print(f"warning: {warning}", file=sys.stderr)


def _announce(run: Run, threads: int) -> None:
    if not run.is_main:
        return
    save_config(run.cfg, run.run_dir / "config.yaml")
    _record_skipped(run)
    print(f"run folder: {run.run_dir}\n{run.world} process(es), global batch {run.cfg.train.batch_size * run.world}, "
          f"base lr {run.base_lr:g}, {len(run.classes)} classes, {run.steps_per_epoch} steps/epoch, "
          f"aug {run.cfg.aug.name}, {threads} CPU thread(s) per process", file=sys.stderr)
    if run.perturb is not None:
        p = run.perturb
        print(f"adversarial training: FGSM eps {p.eps:.4g}, alpha {p.alpha:.4g}, "
              f"random start {'on' if p.random_start else 'off'}", file=sys.stderr)
    if run.world > 1 and run.cfg.optim.lr_base_batch == 0:
        print(f"note: optim.lr_base_batch=0: lr {run.base_lr:g} is not scaled to the global batch of "
              f"{run.cfg.train.batch_size * run.world} ({run.world} processes)", file=sys.stderr)


def _record_skipped(run: Run) -> None:
    """The training files left out before training (header check; with DALI, the decode check too), one
    ``path (reason)`` a line in ``skipped_files.txt`` of the run folder, so the run says what it trained without."""
    from apr.io import atomic_open

    skipped = list(getattr(run.train_loader, "scan_skipped", []))
    path = run.run_dir / "skipped_files.txt"
    if skipped:
        with atomic_open(path, "w") as f:
            f.write("".join(f"{line}\n" for line in skipped))
        print(f"{len(skipped)} training file(s) skipped as unreadable: listed in {path}", file=sys.stderr)
    elif path.exists():
        path.unlink()


def train(cfg: Config, resume: str | None = None, accelerator=None, progress: bool = True,
          on_step_end: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``cfg`` to the end (or until preempted); ``resume`` = checkpoint path or ``"auto"``."""
    accelerator = accelerator or _make_accelerator()
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    _setup_determinism(cfg, accelerator.process_index)
    run_dir = run_dir_for(cfg)
    with RunLock(run_dir) as lock, _cpu_threads(resolve_num_threads(cfg)) as threads:
        resume_path = on_rank0(lambda: claim_run_folder(lock, run_dir, resume), world, is_main)
        run = build_run(cfg, accelerator, run_dir, progress, on_step_end)
        start = restore_run(run, resume_path) if resume_path is not None else ResumePoint()
        if resume == "auto" and resume_path is None and is_main:
            print(f"--resume auto: no checkpoint in {run_dir}, starting fresh", file=sys.stderr)
        _announce(run, threads)
        try:
            return _loop(run, start)
        finally:
            run.log.close()


def _loop(run: Run, start: ResumePoint) -> TrainResult:
    """Epochs from ``start`` to the end, or until a preemption signal (saved, then returned)."""
    last = (None, None)
    with PreemptionFlag() as run.preempt:
        for epoch in range(start.epoch, run.cfg.train.epochs):
            status, step, meter = run_epoch(run, epoch, start if epoch == start.epoch else None)
            if status == "preempted":
                if run.is_main:
                    print(f"signal {run.preempt.received}: saved epoch {epoch + 1} step {step}; "
                          "resume with --resume auto", file=sys.stderr)
                return TrainResult("preempted", run.run_dir, epoch, step, run.global_step, history=run.history)
            record = finish_epoch(run, epoch, step, meter)
            last = (record.get("val_top1_error", last[0]), record.get("val_top5_error", last[1]))
            if stop_requested(run, force_check=True):
                return TrainResult("preempted", run.run_dir, epoch + 1, 0, run.global_step, *last, run.history)
    return TrainResult("finished", run.run_dir, run.cfg.train.epochs, 0, run.global_step, *last, run.history)
