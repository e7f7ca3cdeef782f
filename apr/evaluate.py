"""Robustness evaluation: a checkpoint + a suite -> raw counts per cell -> results JSON.

ImageNet-C is 75 cells of 50,000 images (3.75 M forward passes, hours per ResNet-50), so this
module is built around three promises:

- a broken tree fails *before* any GPU time is spent, naming every missing or empty cell;
- a preempted run loses at most one cell: the JSON is rewritten atomically after each cell and
  a rerun with the same checkpoint (same sha256) skips the cells whose files are unchanged
  (each cell records a fingerprint of its files; a changed or other tree is evaluated again);
- under torchrun each cell is sharded by rank (each image exactly once) and the counts are
  summed over ranks (``apr.distributed``), so N GPUs give the numbers of one.

This module knows no file layout (``apr.data.suites`` describes the cells) and no normalisation:
the JSON (schema ``apr.report.RESULTS_SCHEMA``) holds raw counts, errors and calibration histograms;
CE / mCE / relative mCE against AlexNet or a baseline run are derived by ``apr.report``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from apr.data.suites import Cell, EvalError, LoaderOptions
from apr.distributed import World, all_reduce_sum, broadcast_object, join_world, resolve_device
from apr.inference import ImageClassifier, predict_batches
from apr.io import atomic_write_json
from apr.metrics import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES, CalibrationBins
from apr.report import RESULTS_SCHEMA as SCHEMA
from apr.report import ReportError, load_result as _load_report_result

__all__ = ["SCHEMA", "SEVERITIES", "EvalError", "EvalOptions", "evaluate_checkpoint", "plan_run_names",
           "evaluate_loader", "CellStats", "file_sha256", "collect_versions", "load_result"]

# Called after each finished cell as (corruption, severity, cell_dict); "clean" uses severity 0.
CellCallback = Callable[[str, int, dict], None]


@dataclass
class EvalOptions:
    """What to evaluate and how: everything of an evaluation but the checkpoint, the suite and the output."""

    corruptions: Sequence[str] | None = None  # default: the 15 mCE corruptions
    extra: bool = False  # add the 4 held-out corruptions
    severities: Sequence[int] = SEVERITIES
    allow_partial: bool = False  # evaluate what is there when cells are missing or empty
    batch_size: int = 256
    backend: str = "dali"
    num_workers: int = 4
    precision: str = "bf16"
    device: str | torch.device | None = None
    progress: bool = True

    def corruption_list(self) -> list[str]:
        """The asked-for corruptions, after checking every option (one error naming the bad value)."""
        if self.precision not in ("bf16", "fp32"):
            raise EvalError(f"precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if self.backend not in ("dali", "torchvision"):
            raise EvalError(f"backend must be 'dali' or 'torchvision', got {self.backend!r}")
        if self.batch_size < 1:
            raise EvalError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.severities or any(int(s) not in SEVERITIES for s in self.severities):
            raise EvalError(f"severities must be a non-empty subset of 1..5, got {list(self.severities)}")
        names = list(self.corruptions) if self.corruptions is not None else list(CORRUPTIONS)
        if self.extra:
            names += [c for c in EXTRA_CORRUPTIONS if c not in names]
        unknown = [c for c in names if c not in ALL_CORRUPTIONS]
        if unknown:
            raise EvalError(f"unknown corruption(s) {', '.join(unknown)}; known: {', '.join(ALL_CORRUPTIONS)}")
        return names


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

    def version(module: str) -> str | None:
        try:
            return __import__(module, fromlist=["__version__"]).__version__
        except ImportError:
            return None

    return {"apr": apr.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": version("timm"), "dali": version("nvidia.dali"), "python": platform.python_version()}


def load_result(path: str | Path) -> dict:
    """Read a results JSON (the one loader lives in ``apr.report``; EvalError for the evaluator's callers)."""
    try:
        return _load_report_result(path)
    except ReportError as exc:
        raise EvalError(str(exc)) from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------
# scoring one cell


@dataclass
class CellStats:
    """Counts of one cell (summed over ranks): enough to rebuild top-1/top-5 error, ECE and RMS error."""

    count: int = 0
    correct: int = 0
    correct5: int = 0
    calibration: CalibrationBins = field(default_factory=CalibrationBins)
    seconds: float = 0.0  # wall time of the loop (decode + inference), for images/s

    def as_cell(self) -> dict:
        if self.count == 0:
            raise EvalError("a cell with no images cannot be scored")
        return {"error": 1.0 - self.correct / self.count, "count": self.count, "correct": self.correct,
                "ece": self.calibration.ece(), "rms_calibration_error": self.calibration.rms_calibration_error(),
                "calibration": self.calibration.to_dict()}


def evaluate_loader(classifier: torch.nn.Module, loader: Iterable, device: torch.device | str | None = None,
                    world: World = World(), progress_bar=None) -> CellStats:
    """Run ``loader`` (batch contract: [0,1] float images, int64 labels) through ``classifier``
    (an ``apr.inference.ImageClassifier``) and count; under torchrun the counts and calibration
    histograms of all ranks are summed, so every rank returns the totals of the whole cell.

    Per-image confidences and hits stay on the device until the cell ends (no host sync per batch).
    """
    confidences, hits, hits5 = [], [], []
    start = time.perf_counter()
    for logits, labels in predict_batches(classifier, loader, device, progress_bar):
        probs = logits.softmax(dim=1)
        confidence, pred = probs.max(dim=1)
        top = probs.topk(min(5, probs.shape[1]), dim=1).indices
        confidences.append(confidence)
        hits.append(pred == labels)
        hits5.append((top == labels[:, None]).any(dim=1))
    bins = CalibrationBins()
    local = [0, 0, 0]  # count, correct, correct in top 5
    if confidences:
        hit = torch.cat(hits)
        bins.add(torch.cat(confidences), hit)
        local = [hit.numel(), int(hit.sum()), int(torch.cat(hits5).sum())]
    state = bins.to_dict()
    flat = torch.tensor(local + state["count"] + state["confidence_sum"] + state["correct_sum"], dtype=torch.float64)
    flat = all_reduce_sum(flat, world).tolist()
    n = bins.n_bins
    merged = CalibrationBins.from_dict({"n_bins": n, "count": [round(v) for v in flat[3:3 + n]],
                                        "confidence_sum": flat[3 + n:3 + 2 * n],
                                        "correct_sum": [round(v) for v in flat[3 + 2 * n:]]})
    count, correct, correct5 = (round(v) for v in flat[:3])
    return CellStats(count, correct, correct5, merged, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------
# the public entry point


def evaluate_checkpoint(checkpoint_path: str | Path, suite, out_dir: str | Path, options: EvalOptions = EvalOptions(),
                        *, run_name: str | None = None, on_cell_done: CellCallback | None = None) -> dict:
    """Evaluate one checkpoint on ``suite`` (``apr.data.suites``); write ``<out_dir>/<run_name>.json``
    (rank 0, after every cell) and return the raw results. Missing or empty cells stop the run before
    the first forward pass unless ``options.allow_partial`` (then they are skipped and listed)."""
    from apr.checkpoint import load_model_for_eval

    corruptions = options.corruption_list()
    world = join_world(options.device)
    device = resolve_device(options.device, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model, cfg, classes, info = load_model_for_eval(checkpoint_path, map_location="cpu")
    suite.bind(classes, cfg.data)
    cells, skipped = _preflight(suite, corruptions, options)
    classifier = ImageClassifier(model.to(device), cfg.data.mean, cfg.data.std, options.precision,
                                 channels_last=bool(cfg.model.channels_last))
    loader_options = LoaderOptions(options.batch_size, options.backend, options.num_workers, int(cfg.data.image_size),
                                   int(cfg.data.val_resize), world.rank, world.world_size, world.local_rank, device)
    run_name = run_name or cfg.train.run_name or Path(checkpoint_path).stem
    out_path = Path(out_dir) / f"{run_name}.json"
    result = _new_result(checkpoint_path, run_name, cfg, classes, info, suite, options, skipped)
    previous = broadcast_object(_load_previous(out_path, result) if world.is_main else None, world)
    _keep_unchanged_cells(result, previous, cells, world.is_main)

    def save() -> None:
        if world.is_main:
            atomic_write_json(out_path, result, indent=1)

    evaluated = [0, 0.0]  # images, seconds in this invocation
    for cell in cells:
        if _stored_cell(result, cell) is not None:
            continue
        stats = _run_cell(classifier, cell, loader_options, world, options.progress and world.is_main)
        _record(result, cell, stats, evaluated)
        save()
        if on_cell_done is not None:
            on_cell_done(cell.corruption, cell.severity, _stored_cell(result, cell))
    _finish(result)
    save()
    if world.is_main:
        _log_done(run_name, evaluated, device, out_path)
    return result


# ---------------------------------------------------------------------------------------
# evaluate_checkpoint's pieces


def _preflight(suite, corruptions: list[str], options: EvalOptions) -> tuple[list[Cell], dict[str, str]]:
    """Every cell found, fingerprinted and checked for readable files before any forward pass."""
    clean = suite.clean()
    if clean.empty_reason:
        raise EvalError(f"the clean set has no readable image: {clean.empty_reason}")
    cells, missing = suite.cells(corruptions, [int(s) for s in options.severities])
    empty = {cell.name: cell.empty_reason for cell in cells if cell.empty_reason}
    total = len(cells) + len(missing)
    if (missing or empty) and not options.allow_partial:
        parts = [f"{len(missing)} of {total} corruption cells are missing under {suite.source()['corrupted']}: "
                 f"{', '.join(missing)}."
                 ] if missing else []
        parts += [f"{len(empty)} of {total} corruption cells have no readable image: "
                  + "; ".join(f"{name} ({why})" for name, why in empty.items()) + "."] if empty else []
        raise EvalError(" ".join(parts) + " Complete the tree (e.g. python -m apr.corrupt) or pass --allow-partial "
                        "to evaluate what is there (the mCE is then marked partial)")
    cells = [cell for cell in cells if not cell.empty_reason]
    if not cells:
        raise EvalError("no corruption cell to evaluate: every asked-for cell is missing or empty")
    skipped = {**{name: "missing" for name in missing}, **empty}
    return [clean] + cells, skipped


def _new_result(checkpoint_path, run_name: str, cfg, classes, info: dict, suite, options: EvalOptions,
                skipped: dict[str, str]) -> dict:
    from apr.config import config_to_dict

    checkpoint_path = Path(checkpoint_path)
    settings = {"precision": options.precision,
                "backend": options.backend if suite.source()["suite"] == "folder-c" else "tensor",
                "image_size": int(cfg.data.image_size), "val_resize": int(cfg.data.val_resize)}
    return {
        "schema": SCHEMA, "run_name": run_name, "checkpoint": str(checkpoint_path.resolve()),
        "checkpoint_sha256": file_sha256(checkpoint_path), "config": config_to_dict(cfg), "aug": cfg.aug.name,
        "extra_roots": list(cfg.data.extra_roots), "dataset": suite.dataset, "source": suite.source(),
        "clean": None, "corruptions": {}, "skipped": skipped, "finished": False,
        "asked": {"corruptions": options.corruption_list(), "severities": [int(s) for s in options.severities]},
        "versions": collect_versions(), "throughput_images_per_s": 0.0, "created": _now(),
        "eval": {**settings, "classes": len(classes), "epoch": info.get("epoch"), "step": info.get("step"),
                 "timing": {"images": 0, "seconds": 0.0}},
    }


_SETTINGS = ("precision", "backend", "image_size", "val_resize")


def _load_previous(out_path: Path, result: dict) -> dict | None:
    """An earlier result of the same checkpoint, dataset and settings, or None (with a warning why not)."""
    if not out_path.is_file():
        return None
    try:
        previous = load_result(out_path)
    except EvalError as exc:
        warnings.warn(f"{exc}; starting the evaluation over", stacklevel=3)
        return None
    reasons = []
    sha = result["checkpoint_sha256"]
    if previous.get("checkpoint_sha256") != sha:
        reasons.append(f"it was made from another checkpoint (sha256 {str(previous.get('checkpoint_sha256'))[:12]}... "
                       f"!= {sha[:12]}...)")
    if previous.get("dataset") != result["dataset"]:
        reasons.append(f"it is for dataset {previous.get('dataset')!r}, not {result['dataset']!r}")
    old = {k: previous.get("eval", {}).get(k) for k in _SETTINGS}
    new = {k: result["eval"][k] for k in _SETTINGS}
    if old != new:
        reasons.append(f"its settings {old} differ from {new}")
    if reasons:
        warnings.warn(f"{out_path} exists but {'; '.join(reasons)}: starting the evaluation over", stacklevel=3)
        return None
    return previous


def _keep_unchanged_cells(result: dict, previous: dict | None, cells: list[Cell], log: bool) -> None:
    """Copy the earlier cells whose files are unchanged (same fingerprint); say which are evaluated again."""
    if previous is None:
        return
    result["created"] = previous.get("created", result["created"])
    result["eval"]["timing"] = dict(previous.get("eval", {}).get("timing", result["eval"]["timing"]))
    result["throughput_images_per_s"] = previous.get("throughput_images_per_s", 0.0)
    changed = []
    for cell in cells:
        old = previous["clean"] if cell.corruption == "clean" else \
            (previous.get("corruptions") or {}).get(cell.corruption, {}).get(str(cell.severity))
        if old is None:
            continue
        if old.get("fingerprint") != cell.fingerprint:
            changed.append(cell.name)
            continue
        _store_cell(result, cell, old)
    if log and previous.get("source") != result["source"]:
        print(f"{result['run_name']}: the data source changed from {previous.get('source')} to {result['source']}")
    if log and changed:
        print(f"{result['run_name']}: re-evaluating {len(changed)} cell(s) whose files differ from the earlier "
              f"evaluation (file count, sizes or names): {', '.join(changed)}")


def _stored_cell(result: dict, cell: Cell) -> dict | None:
    if cell.corruption == "clean":
        return result["clean"]
    return result["corruptions"].get(cell.corruption, {}).get(str(cell.severity))


def _store_cell(result: dict, cell: Cell, value: dict) -> None:
    if cell.corruption == "clean":
        result["clean"] = value
    else:
        result["corruptions"].setdefault(cell.corruption, {})[str(cell.severity)] = value


def _run_cell(classifier, cell: Cell, loader_options: LoaderOptions, world: World, show: bool) -> CellStats:
    from tqdm.auto import tqdm

    loader = cell.make_loader(loader_options)
    total = int(getattr(loader, "num_samples", 0))
    with tqdm(total=total, desc=cell.name, unit="img", disable=not show, leave=False) as bar:
        return evaluate_loader(classifier, loader, loader_options.device, world, bar)


def _record(result: dict, cell: Cell, stats: CellStats, evaluated: list) -> None:
    value = {**stats.as_cell(), "unreadable": len(cell.unreadable), "fingerprint": cell.fingerprint}
    if cell.corruption == "clean":
        value["top5_error"] = 1.0 - stats.correct5 / stats.count
    if cell.unreadable:
        warnings.warn(f"{cell.name}: {len(cell.unreadable)} unreadable file(s) skipped, the cell is scored on the "
                      f"other {stats.count}: {', '.join(cell.unreadable[:3])}", stacklevel=3)
    _store_cell(result, cell, value)
    timing = result["eval"]["timing"]
    timing["images"] += stats.count
    timing["seconds"] += stats.seconds
    evaluated[0] += stats.count
    evaluated[1] += stats.seconds
    result["throughput_images_per_s"] = timing["images"] / timing["seconds"] if timing["seconds"] > 0 else 0.0
    result["created"] = _now()


def _finish(result: dict) -> None:
    """Cells in the canonical order (resumed runs insert in another order); the result is complete."""
    order = {c: i for i, c in enumerate(ALL_CORRUPTIONS)}
    result["corruptions"] = {
        c: {str(s): cells[str(s)] for s in sorted(int(k) for k in cells)}
        for c, cells in sorted(result["corruptions"].items(), key=lambda kv: order.get(kv[0], len(order)))
    }
    result["finished"] = True


def _log_done(run_name: str, evaluated: list, device, out_path: Path) -> None:
    images, seconds = evaluated
    if seconds > 0:
        print(f"{run_name}: evaluated {images} images in {seconds:.1f} s ({images / seconds:.1f} images/s on {device})")
    else:
        print(f"{run_name}: the files of every cell match the earlier evaluation in {out_path} "
              "(same checkpoint, settings and fingerprints); nothing evaluated")


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
