"""Robustness evaluation: a checkpoint -> top-1 error, count and ECE per (corruption, severity) -> results JSON.

ImageNet-C is 75 cells of 50,000 images (3.75 M forward passes, hours per ResNet-50), so this
module is built around three promises:

- a broken tree fails *before* any GPU time is spent, naming every missing cell;
- a preempted run loses at most one cell: the JSON is rewritten atomically after each cell and
  a rerun with the same checkpoint (same sha256) skips what is done;
- under torchrun each cell is sharded by rank (each image exactly once) and the counts are
  all-reduced, so N GPUs give the numbers of one.

The JSON (schema ``apr.eval/1``, see ``apr.metrics``/``apr.report``) holds raw counts and errors;
CE/mCE are derived from them by ``apr.metrics.compute_metrics``. A JSON whose ``metrics`` is
``null`` is an unfinished evaluation. Besides the shared schema it keeps an ``eval`` block
(precision, backend, image sizes, cumulative images/seconds): a rerun resumes only when the
checkpoint hash, dataset and these settings are unchanged, otherwise it warns and starts over.
"""

from __future__ import annotations

from apr.errors import UserError
import datetime as _dt
import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from apr.io import atomic_write_json
from apr.metrics import SEVERITIES

__all__ = [
    "SCHEMA",
    "SEVERITIES",
    "EvalError",
    "evaluate_checkpoint",
    "plan_run_names",
    "find_missing_cells",
    "find_missing_cifar_c",
    "evaluate_loader",
    "InferenceRunner",
    "CellStats",
    "file_sha256",
    "collect_versions",
    "load_result",
]

SCHEMA = "apr.eval/1"

# Called after each finished cell as (corruption, severity, cell_dict); "clean" uses severity 0.
CellCallback = Callable[[str, int, dict], None]


class EvalError(UserError, ValueError):
    """An evaluation that cannot run as asked (missing cells, class mismatch, bad options)."""


# ---------------------------------------------------------------------------------------
# small helpers


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Identity of a checkpoint: resume is only safe if the weights are byte-identical."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def collect_versions() -> dict:
    """Library versions, so a number in a report can be traced to the stack that made it."""
    import torchvision

    import apr

    try:
        import timm

        timm_version = timm.__version__
    except ImportError:  # pragma: no cover - timm is a dependency
        timm_version = None
    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    return {
        "apr": apr.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm_version,
        "dali": dali_version,
        "python": platform.python_version(),
    }




def load_result(path: str | Path) -> dict:
    """Read a results JSON written by this module (clear error for anything else)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"results file not found: {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise EvalError(f"{path} is not an apr results file (expected schema {SCHEMA!r})")
    return data


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _resolve_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is None:
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _dist_context(device_hint: str | torch.device | None) -> _Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Dist()
    if not dist.is_initialized():
        wants_cuda = torch.cuda.is_available() and (device_hint is None or torch.device(device_hint).type == "cuda")
        dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# ---------------------------------------------------------------------------------------
# what is on disk


def find_missing_cells(root: str | Path, corruptions: Iterable[str], severities: Iterable[int]
                       ) -> tuple[list[tuple[str, int]], list[str]]:
    """Split the asked-for cells of ``<root>/<corruption>/<severity>/`` into present and missing.

    A cell counts as present when its folder holds at least one sub-folder (class folder);
    missing cells are named ``"corruption/severity"`` as in the results JSON.
    """
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"ImageNet-C root not found: {root}")
    present, missing = [], []
    for corruption in corruptions:
        for severity in severities:
            cell = root / corruption / str(severity)
            if cell.is_dir() and any(p.is_dir() for p in cell.iterdir()):
                present.append((corruption, int(severity)))
            else:
                missing.append(f"{corruption}/{severity}")
    return present, missing


def find_missing_cifar_c(root: str | Path, corruptions: Iterable[str]) -> tuple[list[str], list[str]]:
    """CIFAR-C keeps all five severities of a corruption in one ``<corruption>.npy``."""
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"CIFAR-C root not found: {root}")
    if not (root / "labels.npy").is_file():
        raise EvalError(f"CIFAR-C root {root} has no labels.npy (download CIFAR-10-C / CIFAR-100-C unpacked)")
    present = [c for c in corruptions if (root / f"{c}.npy").is_file()]
    missing = [c for c in corruptions if c not in present]
    return present, missing


def _check_tree_classes(folders: list[tuple[str, Path]], classes: list[str]) -> None:
    """Every class folder of the eval tree must be a class the checkpoint was trained on."""
    known = set(classes)
    for label, folder in folders:
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
        unknown = [name for name in found if name not in known]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise EvalError(
                f"{label} ({folder}) has {len(unknown)} class folder(s) the checkpoint does not know: {shown}. "
                f"The checkpoint has {len(classes)} classes ({', '.join(classes[:3])}, ...); evaluate it on a "
                "tree made from the classes it was trained on"
            )


# ---------------------------------------------------------------------------------------
# the inference loop


@dataclass
class CellStats:
    """Counts of one cell (summed over ranks): enough to rebuild top-1/top-5 error and ECE."""

    count: int = 0
    correct: int = 0
    correct5: int = 0
    calibration: Any = None  # apr.metrics.CalibrationBins of the cell
    seconds: float = 0.0  # wall time of the loop (decode + inference), for images/s

    def as_cell(self) -> dict:
        if self.count == 0:
            raise EvalError("a cell with no images cannot be scored")
        return {"error": 1.0 - self.correct / self.count, "count": self.count, "ece": float(self.calibration.ece())}


@dataclass
class InferenceRunner:
    """The model plus everything that must match training: mean/std, channels_last, precision."""

    model: torch.nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device
    precision: str
    channels_last: bool = True
    dist: _Dist = field(default_factory=_Dist)

    @classmethod
    def build(cls, model: torch.nn.Module, mean, std, device: torch.device, precision: str = "bf16",
              channels_last: bool = True, dist_ctx: _Dist | None = None) -> "InferenceRunner":
        """Put the model (eval mode, channels_last if trained so) and mean/std on ``device``."""
        model = model.to(device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)

        def as_tensor(values):
            return torch.tensor(list(values), dtype=torch.float32, device=device).view(1, 3, 1, 1)

        return cls(model, as_tensor(mean), as_tensor(std), torch.device(device), precision, channels_last,
                   dist_ctx or _Dist())


def evaluate_loader(runner: InferenceRunner, loader: Iterable, progress_bar=None) -> CellStats:
    """Run ``loader`` (batch contract: [0,1] float images, int64 labels) through the model.

    Per-image confidences and hits stay on the device until the cell ends (no host sync per
    batch); under torchrun the counts and calibration histograms of all ranks are summed, so
    every rank returns the totals of the whole cell.
    """
    from apr.metrics import CalibrationBins

    device = runner.device
    confidences, hits, hits5 = [], [], []
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=runner.precision == "bf16")
    start = time.perf_counter()
    with torch.inference_mode():
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            x = (images - runner.mean) / runner.std
            if runner.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = runner.model(x)
            probs = logits.float().softmax(dim=1)
            confidence, pred = probs.max(dim=1)
            top = probs.topk(min(5, probs.shape[1]), dim=1).indices
            confidences.append(confidence)
            hits.append(pred == labels)
            hits5.append((top == labels[:, None]).any(dim=1))
            if progress_bar is not None:
                progress_bar.update(labels.numel() * runner.dist.world_size)
    bins = CalibrationBins()
    local = [0, 0, 0]  # count, correct, correct in top 5
    if confidences:
        hit = torch.cat(hits)
        bins.add(torch.cat(confidences), hit)
        local = [hit.numel(), int(hit.sum()), int(torch.cat(hits5).sum())]
    if runner.dist.active:
        local, bins = _all_reduce_counts(local, bins, runner.device)
    seconds = time.perf_counter() - start
    count, correct, correct5 = local
    return CellStats(count=count, correct=correct, correct5=correct5, calibration=bins, seconds=seconds)


def _all_reduce_counts(local: list[int], bins, device: torch.device):
    """One all-reduce of (count, correct, correct5) and the calibration histogram of every rank."""
    from apr.metrics import CalibrationBins

    state = bins.to_dict()
    n = bins.n_bins
    flat = torch.tensor(local + state["count"] + state["confidence_sum"] + state["correct_sum"], dtype=torch.float64)
    flat = flat.to(device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flat)
    flat = flat.cpu().tolist()
    totals = [int(round(v)) for v in flat[:3]]
    merged = CalibrationBins.from_dict({
        "n_bins": n,
        "count": [int(round(v)) for v in flat[3:3 + n]],
        "confidence_sum": flat[3 + n:3 + 2 * n],
        "correct_sum": [int(round(v)) for v in flat[3 + 2 * n:]],
    })
    return totals, merged


# ---------------------------------------------------------------------------------------
# the public entry point


def evaluate_checkpoint(
    checkpoint_path: str | Path,
    *,
    imagenet_c_root: str | Path | None = None,
    val_root: str | Path | None = None,
    cifar_c_root: str | Path | None = None,
    cifar_root: str | Path | None = None,
    out_dir: str | Path,
    corruptions: Iterable[str] | None = None,
    extra: bool = False,
    severities: Iterable[int] = SEVERITIES,
    allow_partial: bool = False,
    batch_size: int = 256,
    backend: str = "dali",
    num_workers: int = 4,
    precision: str = "bf16",
    device: str | torch.device | None = None,
    baseline_result: dict | None = None,
    dataset: str | None = None,
    run_name: str | None = None,
    progress: bool = True,
    on_cell_done: CellCallback | None = None,
) -> dict:
    """Evaluate one checkpoint on ImageNet-C (or a folder-C tree) or CIFAR-C; write and return the results.

    ``corruptions`` defaults to the 15 mCE corruptions, plus the 4 extra ones with ``extra=True``.
    ``dataset`` names the tree for the metrics: ``imagenet-c`` (AlexNet normalisation) or
    ``folder-c`` (any other tree, e.g. from ``apr.corrupt``); by default ``imagenet-c`` when the
    checkpoint has 1000 classes. The JSON goes to ``<out_dir>/<run_name>.json`` (only rank 0 writes).
    """
    from apr.checkpoint import load_model_for_eval
    from apr.config import config_to_dict
    from apr.metrics import CORRUPTIONS, EXTRA_CORRUPTIONS, compute_metrics

    checkpoint_path = Path(checkpoint_path)
    use_cifar = cifar_c_root is not None or cifar_root is not None
    use_folder = imagenet_c_root is not None or val_root is not None
    if use_cifar == use_folder:
        raise EvalError("give either --imagenet-c and --val (ImageNet layout) or --cifar-c and --cifar (CIFAR), not both or neither")
    if use_folder and (imagenet_c_root is None or val_root is None):
        raise EvalError("ImageNet-C evaluation needs both the corrupted tree (--imagenet-c) and the clean val folder (--val)")
    if use_cifar and (cifar_c_root is None or cifar_root is None):
        raise EvalError("CIFAR-C evaluation needs both the CIFAR-C folder (--cifar-c) and the CIFAR folder (--cifar)")
    if precision not in ("bf16", "fp32"):
        raise EvalError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    if backend not in ("dali", "torchvision"):
        raise EvalError(f"backend must be 'dali' or 'torchvision', got {backend!r}")
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    severities = tuple(int(s) for s in severities)
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise EvalError(f"severities must be a non-empty subset of 1..5, got {list(severities)}")
    corruptions = list(corruptions) if corruptions is not None else list(CORRUPTIONS)
    if extra:
        corruptions += [c for c in EXTRA_CORRUPTIONS if c not in corruptions]
    known = set(CORRUPTIONS) | set(EXTRA_CORRUPTIONS)
    unknown = [c for c in corruptions if c not in known]
    if unknown:
        raise EvalError(f"unknown corruption(s) {', '.join(unknown)}; known: {', '.join(CORRUPTIONS + EXTRA_CORRUPTIONS)}")

    ctx = _dist_context(device)
    device = _resolve_device(device, ctx.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    is_main = ctx.rank == 0

    model, cfg, classes, info = load_model_for_eval(checkpoint_path, map_location="cpu")
    sha = file_sha256(checkpoint_path)
    run_name = run_name or cfg.train.run_name or checkpoint_path.stem

    # --- everything that can be wrong on disk is checked before the first forward pass
    if use_folder:
        val_root, imagenet_c_root = Path(val_root), Path(imagenet_c_root)
        if not val_root.is_dir():
            raise EvalError(f"clean val folder not found: {val_root}")
        present, missing = find_missing_cells(imagenet_c_root, corruptions, severities)
        if dataset is None:
            dataset = "imagenet-c" if len(classes) == 1000 else "folder-c"
        if dataset not in ("imagenet-c", "folder-c"):
            raise EvalError(f"dataset for a folder tree must be 'imagenet-c' or 'folder-c', got {dataset!r}")
        _check_tree_classes([("clean val", val_root)] + [(f"cell {c}/{s}", imagenet_c_root / c / str(s))
                                                          for c, s in present], classes)
    else:
        from apr.data import load_cifar

        cifar_name = _cifar_name(cfg, classes)
        dataset = f"{cifar_name}-c"
        cifar_test = load_cifar(cifar_root, cifar_name, train=False)
        if list(cifar_test[2]) != list(classes):
            raise EvalError(f"the checkpoint's classes ({', '.join(classes[:4])}, ...) are not {cifar_name}'s "
                            f"({', '.join(cifar_test[2][:4])}, ...) in the same order")
        present_c, missing_c = find_missing_cifar_c(cifar_c_root, corruptions)
        present = [(c, s) for c in present_c for s in severities]
        missing = [f"{c}/{s}" for c in missing_c for s in severities]
    if missing and not allow_partial:
        raise EvalError(
            f"{len(missing)} of {len(missing) + len(present)} corruption cells are missing under "
            f"{imagenet_c_root if use_folder else cifar_c_root}: {', '.join(missing)}. "
            "Complete the tree (e.g. python -m apr.corrupt) or pass --allow-partial to evaluate what is there "
            "(the mCE is then marked partial)"
        )
    if not present:
        raise EvalError("no corruption cell to evaluate: every asked-for cell is missing")

    runner = InferenceRunner.build(model, cfg.data.mean, cfg.data.std, device, precision,
                                   channels_last=bool(cfg.model.channels_last), dist_ctx=ctx)
    settings = {"precision": precision, "backend": backend if use_folder else "tensor",
                "image_size": int(cfg.data.image_size), "val_resize": int(cfg.data.val_resize)}

    out_path = Path(out_dir) / f"{run_name}.json"
    previous = _load_previous(out_path, sha, dataset, settings) if is_main else None
    if ctx.active:
        box = [previous]
        dist.broadcast_object_list(box, src=0)
        previous = box[0]

    result = {
        "schema": SCHEMA,
        "run_name": run_name,
        "checkpoint": str(checkpoint_path.resolve()),
        "checkpoint_sha256": sha,
        "config": config_to_dict(cfg),
        "aug": cfg.aug.name,
        "extra_roots": list(cfg.data.extra_roots),
        "dataset": dataset,
        "clean": (previous or {}).get("clean"),
        "corruptions": {c: dict(v) for c, v in (previous or {}).get("corruptions", {}).items()},
        "metrics": None,
        "versions": collect_versions(),
        "throughput_images_per_s": (previous or {}).get("throughput_images_per_s", 0.0),
        "created": (previous or {}).get("created", _now()),
        "eval": {**settings, "classes": len(classes), "epoch": info.get("epoch"), "step": info.get("step"),
                 "timing": dict((previous or {}).get("eval", {}).get("timing", {"images": 0, "seconds": 0.0}))},
    }
    timing = result["eval"]["timing"]
    evaluated_now = [0, 0.0]  # images, seconds in this invocation

    def record(stats: CellStats) -> None:
        timing["images"] += stats.count
        timing["seconds"] += stats.seconds
        evaluated_now[0] += stats.count
        evaluated_now[1] += stats.seconds
        result["throughput_images_per_s"] = timing["images"] / timing["seconds"] if timing["seconds"] > 0 else 0.0
        result["created"] = _now()

    def save() -> None:
        if is_main:
            atomic_write_json(out_path, result, indent=1)

    from tqdm.auto import tqdm

    show = progress and is_main

    # --- clean error
    if result["clean"] is None:
        if use_folder:
            loader = _folder_loader(val_root, classes, cfg, ctx, device, batch_size, backend, num_workers,
                                    resize=int(cfg.data.val_resize))
        else:
            loader = _tensor_loader(cifar_test[0], cifar_test[1], classes, ctx, device, batch_size)
        with tqdm(total=_total_images(loader, ctx), desc="clean", unit="img", disable=not show, leave=False) as bar:
            stats = evaluate_loader(runner, loader, bar)
        del loader
        cell = stats.as_cell()
        result["clean"] = {"error": cell["error"], "top5_error": 1.0 - stats.correct5 / stats.count,
                           "count": cell["count"], "ece": cell["ece"]}
        record(stats)
        save()
        if on_cell_done is not None:
            on_cell_done("clean", 0, result["clean"])

    # --- corruption cells, one progress bar per corruption
    by_corruption: dict[str, list[int]] = {}
    for c, s in present:
        by_corruption.setdefault(c, []).append(s)
    for corruption, sevs in by_corruption.items():
        todo = [s for s in sevs if str(s) not in result["corruptions"].get(corruption, {})]
        if not todo:
            continue
        with tqdm(total=0, desc=corruption, unit="img", disable=not show) as bar:
            for severity in todo:
                if use_folder:
                    loader = _folder_loader(imagenet_c_root / corruption / str(severity), classes, cfg, ctx, device,
                                            batch_size, backend, num_workers, resize=None)
                else:
                    from apr.data import load_cifar_c

                    images, labels = load_cifar_c(cifar_c_root, corruption, severity)
                    loader = _tensor_loader(images, labels, classes, ctx, device, batch_size)
                bar.total += _total_images(loader, ctx)
                bar.set_postfix(severity=severity)
                bar.refresh()
                stats = evaluate_loader(runner, loader, bar)
                del loader
                cell = stats.as_cell()
                result["corruptions"].setdefault(corruption, {})[str(severity)] = cell
                record(stats)
                save()
                if on_cell_done is not None:
                    on_cell_done(corruption, severity, cell)

    # keep the cells in the canonical order (resumed runs insert in a different order)
    order = {c: i for i, c in enumerate(CORRUPTIONS + EXTRA_CORRUPTIONS)}
    result["corruptions"] = {
        c: {str(s): cells[str(s)] for s in sorted(int(k) for k in cells)}
        for c, cells in sorted(result["corruptions"].items(), key=lambda kv: order.get(kv[0], len(order)))
    }
    # a subset asked for on purpose (--corruptions, severities) is scored as partial, not refused
    subset = not set(CORRUPTIONS) <= set(corruptions) or tuple(severities) != SEVERITIES
    if baseline_result is not None:
        normalisation = "baseline"
    else:
        normalisation = "alexnet" if dataset == "imagenet-c" else "none"
    result["metrics"] = compute_metrics(result, baseline_result, allow_partial=allow_partial or subset,
                                        normalisation=normalisation)
    save()
    if is_main:
        if evaluated_now[1] > 0:
            print(f"{run_name}: evaluated {evaluated_now[0]} images in {evaluated_now[1]:.1f} s "
                  f"({evaluated_now[0] / evaluated_now[1]:.1f} images/s on {device})")
        else:
            print(f"{run_name}: every cell was already in {out_path}; nothing evaluated")
    return result


# ---------------------------------------------------------------------------------------
# evaluate_checkpoint's pieces


def plan_run_names(checkpoints: list[str | Path]) -> list[str]:
    """Run names (JSON file names) for checkpoints evaluated together.

    The name comes from the training config (``train.run_name``) or the file stem. Several
    checkpoints of one run (e.g. epochs 30 and 90) would share a name and overwrite each
    other's JSON, so clashing names get the file stem appended.
    """
    from apr.checkpoint import load_checkpoint

    names = []
    for path in checkpoints:
        config = load_checkpoint(path)["config"]
        names.append((config.get("train") or {}).get("run_name") or Path(path).stem)
    names = [f"{name}-{Path(path).stem}" if names.count(name) > 1 else name for name, path in zip(names, checkpoints)]
    return [f"{name}-{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def _load_previous(out_path: Path, sha: str, dataset: str, settings: dict) -> dict | None:
    """The finished cells of an earlier run of the same checkpoint and settings, or None."""
    if not out_path.is_file():
        return None
    try:
        previous = load_result(out_path)
    except EvalError as exc:
        warnings.warn(f"{exc}; starting the evaluation over", stacklevel=3)
        return None
    reasons = []
    if previous.get("checkpoint_sha256") != sha:
        reasons.append(f"it was made from another checkpoint (sha256 {str(previous.get('checkpoint_sha256'))[:12]}... "
                       f"!= {sha[:12]}...)")
    if previous.get("dataset") != dataset:
        reasons.append(f"it is for dataset {previous.get('dataset')!r}, not {dataset!r}")
    old = {k: previous.get("eval", {}).get(k) for k in settings}
    if old != settings:
        reasons.append(f"its settings {old} differ from {settings}")
    if reasons:
        warnings.warn(f"{out_path} exists but {'; '.join(reasons)}: starting the evaluation over", stacklevel=3)
        return None
    return previous


def _cifar_name(cfg, classes: list[str]) -> str:
    if cfg.data.dataset in ("cifar10", "cifar100"):
        name = cfg.data.dataset
    elif len(classes) in (10, 100):
        name = f"cifar{len(classes)}"
    else:
        raise EvalError(f"CIFAR-C evaluation needs a CIFAR-10 or CIFAR-100 checkpoint; this one has {len(classes)} classes")
    expected = 10 if name == "cifar10" else 100
    if len(classes) != expected:
        raise EvalError(f"checkpoint was trained on {name} but has {len(classes)} classes, not {expected}")
    return name


def _folder_loader(folder: Path, classes, cfg, ctx: _Dist, device, batch_size, backend, num_workers, resize):
    from apr.data import build_folder_eval_loader

    return build_folder_eval_loader(
        folder, classes, batch_size=batch_size, image_size=int(cfg.data.image_size), resize=resize,
        backend=backend, num_workers=num_workers, rank=ctx.rank, world_size=ctx.world_size,
        local_rank=ctx.local_rank, device=device,
    )


def _tensor_loader(images, labels, classes, ctx: _Dist, device, batch_size):
    from apr.data import TensorBatchLoader

    if int(labels.max()) >= len(classes) or int(labels.min()) < 0:
        raise EvalError(f"labels run from {int(labels.min())} to {int(labels.max())}, "
                        f"but the checkpoint has {len(classes)} classes")
    return TensorBatchLoader(images, labels, batch_size, train=False, rank=ctx.rank, world_size=ctx.world_size,
                             device=device, classes=classes)


def _total_images(loader, ctx: _Dist) -> int:
    """Images of the cell over all ranks (for the progress bar only)."""
    return int(getattr(loader, "num_samples", 0)) * ctx.world_size
