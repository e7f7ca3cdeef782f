"""Robustness evaluation: a checkpoint + a suite -> raw counts per cell -> results JSON.

ImageNet-C is 75 cells of 50,000 images (3.75 M forward passes, hours per ResNet-50), so this
module is built around three promises:

- a broken tree fails *before* any GPU time is spent, naming every missing or empty cell;
- a preempted run loses at most one cell: the JSON is rewritten atomically after each cell and
  a rerun with the same checkpoint (same sha256) skips the cells whose files are unchanged
  (each cell records a fingerprint of its files; a changed or other tree is evaluated again);
  cells of earlier runs that are not asked again are kept, and runs writing the same file at
  once merge their cells under its lock (``apr.results.ResultsFile``);
- under torchrun each cell is sharded by rank (each image exactly once) and the counts are
  summed over ranks (``apr.distributed``), so N GPUs give the numbers of one.

Distribution-shift suites (ImageNet-R/-A/-Sketch/-V2, ImageNet-C-bar, CIFAR-10.1) go through the
same cell loop into ``<run_name>.shift.json`` (schema ``apr.shift/1``, :func:`evaluate_shift`). The
model is a project checkpoint or third-party weights (:func:`load_eval_model`).

This module knows no file layout (``apr.data.suites`` describes the cells) and no normalisation:
the JSON (schema ``apr.report.RESULTS_SCHEMA``) holds raw counts, errors and calibration histograms;
CE / mCE / relative mCE against AlexNet or a baseline run are derived by ``apr.report``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from apr.data import BACKENDS, resolve_backend
from apr.data.suites import Cell, EvalError, LoaderOptions
from apr.distributed import World, all_reduce_sum, broadcast_object, gather_skipped, join_world, resolve_device
from apr.inference import PRECISIONS, ImageClassifier, predict_batches, resolve_precision
from apr.results import ResultsFile, check_output_folder, collect_versions, file_sha256, merge_entries, now
from apr.metrics import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES, CalibrationBins
from apr.report import RESULTS_SCHEMA as SCHEMA
from apr.report import ReportError, load_result as _load_report_result

__all__ = ["SCHEMA", "SHIFT_SCHEMA", "SEVERITIES", "EvalError", "EvalOptions", "EvalModel", "load_eval_model",
           "evaluate", "evaluate_suites", "evaluate_checkpoint", "evaluate_shift", "plan_run_names", "evaluate_loader",
           "CellStats", "file_sha256", "collect_versions", "load_result", "load_shift_result"]

SHIFT_SCHEMA = "apr.shift/1"  # one JSON per model: the distribution-shift suites' cells (apr.report.shift)

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
    backend: str = "auto"  # apr.data.BACKENDS; resolved for this machine by resolved()
    num_workers: int = 4
    precision: str = "auto"  # apr.inference.resolve_precision: bf16 on a CUDA GPU, fp32 on a CPU
    device: str | torch.device | None = None
    progress: bool = True
    max_images: int | None = None  # a fixed class-balanced subset of every cell (quick checks)

    def resolved(self) -> "EvalOptions":
        """These options with ``auto`` replaced by what it means here, so the JSON records what ran."""
        if self.backend not in BACKENDS:
            raise EvalError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.precision not in ("auto",) + PRECISIONS:
            raise EvalError(f"precision must be auto, {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.max_images is not None and self.max_images < 1:
            raise EvalError(f"max_images must be >= 1, got {self.max_images}")
        device = resolve_device(self.device)
        return replace(self, backend=resolve_backend(self.backend, device),
                       precision=resolve_precision(self.precision, device))

    def corruption_list(self) -> list[str]:
        """The asked-for corruptions, after checking every option (one error naming the bad value)."""
        if self.precision not in ("auto",) + PRECISIONS:
            raise EvalError(f"precision must be auto, {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.backend not in BACKENDS:
            raise EvalError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
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


def load_result(path: str | Path) -> dict:
    """Read a results JSON (the one loader lives in ``apr.report``; EvalError for the evaluator's callers)."""
    try:
        return _load_report_result(path)
    except ReportError as exc:
        raise EvalError(str(exc)) from None


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
                    world: World = World(), progress_bar=None, logit_subset: Sequence[int] | None = None) -> CellStats:
    """Run ``loader`` (batch contract: [0,1] float images, int64 labels) through ``classifier``
    (an ``apr.inference.ImageClassifier``) and count; under torchrun the counts and calibration
    histograms of all ranks are summed, so every rank returns the totals of the whole cell.

    ``logit_subset``: class indices to score among (ImageNet-R/-A's 200 classes): the other logits are
    set to -inf before the softmax, so the prediction, the top 5 and the confidence are over the subset.
    Per-image confidences and hits stay on the device until the cell ends (no host sync per batch).
    """
    confidences, hits, hits5 = [], [], []
    outside = None  # bool mask of the logits left out, built on the logits' device
    start = time.perf_counter()
    for logits, labels in predict_batches(classifier, loader, device, progress_bar):
        if logit_subset is not None:
            if outside is None:
                outside = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
                outside[torch.as_tensor(list(logit_subset), dtype=torch.long, device=logits.device)] = False
            logits = logits.masked_fill(outside, float("-inf"))
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
# the model under evaluation


@dataclass
class EvalModel:
    """A model ready to evaluate and what its results JSON records about it: a project checkpoint
    (``config`` set) or third-party weights (``architecture`` set, ``config`` None)."""

    model: torch.nn.Module
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    path: Path
    image_size: int = 224
    val_resize: int = 256
    channels_last: bool = False
    config: object = None  # apr.config.Config of a project checkpoint
    architecture: str | None = None  # the model name given with third-party weights
    info: dict = field(default_factory=dict)
    _sha256: str | None = field(default=None, repr=False)

    @property
    def data_cfg(self):
        """What a suite's ``bind`` reads of the training data (a third-party model has no training config)."""
        from types import SimpleNamespace

        return self.config.data if self.config is not None else SimpleNamespace(dataset="")

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def default_run_name(self) -> str:
        if self.config is not None and self.config.train.run_name:
            return str(self.config.train.run_name)
        return weights_run_name(self.path)

    def describe(self) -> dict:
        """The model's part of a results JSON: file, identity, recipe (``aug`` names third-party weights)."""
        from apr.config import config_to_dict

        third_party = self.config is None
        return {"checkpoint": str(self.path.resolve()), "checkpoint_sha256": self.sha256,
                "config": None if third_party else config_to_dict(self.config),
                "aug": f"{self.architecture} weights" if third_party else self.config.aug.name,
                "extra_roots": [] if third_party else list(self.config.data.extra_roots),
                "weights": {"model": self.architecture, "mean": list(self.mean), "std": list(self.std)}
                if third_party else None}


def weights_run_name(path: str | Path) -> str:
    """``resnet50_apr_sp`` for ``.../resnet50_apr_sp.pth.tar``; a generic file name (``model.safetensors``,
    ``checkpoint.pth.tar``) gets its folder's name in front."""
    path = Path(path)
    stem = path.name.split(".")[0] or path.stem
    if stem in ("model", "pytorch_model", "checkpoint", "model_best", "best", "weights") and path.parent.name:
        return f"{path.parent.name}-{stem}"
    return stem


def load_eval_model(checkpoint: str | Path | None = None, *, model: str | None = None, weights: str | Path | None = None,
                    classes: Sequence[str] | None = None, mean=None, std=None, image_size: int | None = None,
                    val_resize: int | None = None) -> EvalModel:
    """A project checkpoint (``checkpoint``), or third-party ``weights`` for the timm/local ``model``
    name with its ``classes`` (in output order) and normalisation (given, else timm's pretrained config).
    A checkpoint's sets are preprocessed by :func:`apr.data.eval_preprocessing` (its own input size;
    ``image_size`` / ``val_resize`` override). Third-party models are fed as their authors evaluate
    ImageNet: resize ``val_resize`` (default image size / 0.875), crop ``image_size`` (default 224)."""
    if (checkpoint is None) == (weights is None):
        raise EvalError("give either a project checkpoint or a weights file (with its model name), not both")
    if checkpoint is not None:
        from apr.checkpoint import load_model_for_eval
        from apr.data import eval_preprocessing

        net, cfg, names, info = load_model_for_eval(checkpoint, map_location="cpu")
        pre = eval_preprocessing(cfg.data, image_size=image_size, resize=val_resize)
        return EvalModel(net, names, tuple(cfg.data.mean), tuple(cfg.data.std), Path(checkpoint),
                         pre.image_size, pre.resize, bool(cfg.model.channels_last), cfg, info=info)
    image_size = int(image_size or 224)
    val_resize = int(val_resize or round(image_size / 0.875))
    from apr.models import create_model_from_weights

    if not model:
        raise EvalError(f"weights file {weights} needs its architecture: give --model NAME (a timm name, e.g. resnet50)")
    if not classes:
        raise EvalError(f"weights file {weights} needs its class list (--val or --classes)")
    loaded = create_model_from_weights(model, weights, len(classes), mean=mean, std=std)
    return EvalModel(loaded.model, list(classes), tuple(loaded.mean), tuple(loaded.std), Path(weights),
                     int(image_size), int(val_resize), architecture=model)


def _as_eval_model(source) -> EvalModel:
    return source if isinstance(source, EvalModel) else load_eval_model(source)


# ---------------------------------------------------------------------------------------
# the public entry points


def evaluate_checkpoint(checkpoint_path: str | Path | EvalModel, suite, out_dir: str | Path,
                        options: EvalOptions = EvalOptions(), *, run_name: str | None = None,
                        on_cell_done: CellCallback | None = None) -> dict:
    """Evaluate one checkpoint (a path, or an :class:`EvalModel` for third-party weights) on the corruption
    ``suite`` (``apr.data.suites``); write ``<out_dir>/<run_name>.json`` (rank 0, after every cell) and
    return the raw results. Missing or empty cells stop the run before the first forward pass unless
    ``options.allow_partial`` (then they are skipped and listed)."""
    options = options.resolved()
    corruptions = options.corruption_list()
    _check_out(out_dir)
    model = _as_eval_model(checkpoint_path)
    suite.bind(model.classes, model.data_cfg)
    cells, skipped = _preflight(suite, corruptions, options)
    run_name = run_name or model.default_run_name()
    result = _new_result(model, run_name, suite.dataset, suite.source(), options, skipped)
    result.update(clean=None, corruptions={},
                  asked={"corruptions": corruptions, "severities": [int(s) for s in options.severities]})
    return _evaluate_cells(model, cells, result, Path(out_dir) / f"{run_name}.json", options, on_cell_done)


def evaluate_shift(source: str | Path | EvalModel, suites: Sequence, out_dir: str | Path,
                   options: EvalOptions = EvalOptions(), *, run_name: str | None = None, clean_suite=None,
                   on_cell_done: CellCallback | None = None) -> dict:
    """Evaluate one model on distribution-shift ``suites`` (``apr.data.suites.make_shift_suite``) and,
    when ``clean_suite`` is given, on its clean test set (no suites: a clean-only evaluation); write ``<out_dir>/<run_name>.shift.json``
    (schema ``apr.shift/1``, rank 0, after every cell; resumable per cell like the corruption JSON).
    Suites of an earlier evaluation of the same model that are not asked again are kept."""
    options = options.resolved()
    _check_out(out_dir)
    model = _as_eval_model(source)
    suites = list(suites)
    if not suites and clean_suite is None:
        raise EvalError("nothing to evaluate: no distribution-shift suite (--suite NAME=FOLDER) and no clean set "
                        "(--val DIR or --cifar DIR)")
    for suite in suites:
        suite.bind(model.classes, model.data_cfg)
    if clean_suite is not None:
        clean_suite.bind(model.classes, model.data_cfg)
    cells, skipped = _preflight_shift(suites, clean_suite, options)
    run_name = run_name or model.default_run_name()
    result = _new_result(model, run_name, "shift", {s.name: s.source() for s in suites}, options, skipped)
    result.update(schema=SHIFT_SCHEMA, clean=None, suites={s.name: {"source": s.source(), "cells": {}} for s in suites})
    return _evaluate_cells(model, cells, result, Path(out_dir) / f"{run_name}.shift.json", options, on_cell_done)


def evaluate_suites(model: str | Path | EvalModel, out_dir: str | Path, options: EvalOptions = EvalOptions(), *,
                    run_name: str | None = None, imagenet_c=None, val=None, cifar_c=None, cifar=None,
                    suites: dict[str, str] | None = None, dataset: str | None = None) -> tuple[dict | None, dict | None]:
    """The one evaluation plan of ``apr-eval`` and :func:`evaluate`: (corruption results, shift results), None
    where not asked. Without a corruption tree the clean set (``val`` or ``cifar``) is scored with the shift
    suites, or alone (a clean-only evaluation, in ``<run_name>.shift.json``)."""
    from apr.data.suites import make_clean_suite, make_shift_suite, make_suite

    corruption = shift = None
    if imagenet_c is not None or cifar_c is not None:
        suite = make_suite(imagenet_c=imagenet_c, val=val if imagenet_c else None, cifar_c=cifar_c,
                           cifar=cifar if cifar_c else None, dataset=dataset)
        corruption = evaluate_checkpoint(model, suite, out_dir, options, run_name=run_name)
    if suites or corruption is None:
        shift_suites = [make_shift_suite(name, root) for name, root in (suites or {}).items()]
        clean = None if corruption is not None else make_clean_suite(val=val, cifar=cifar)
        shift = evaluate_shift(model, shift_suites, out_dir, options, run_name=run_name, clean_suite=clean)
    return corruption, shift


def evaluate(model, *, val: str | None = None, cifar: str | None = None, imagenet_c: str | None = None,
             cifar_c: str | None = None, suites: dict[str, str] | None = None, out: str | Path | None = None,
             classes: Sequence[str] | None = None, mean=None, std=None, image_size: int = 224,
             val_resize: int | None = None, run_name: str | None = None, dataset: str | None = None,
             baseline: dict | None = None, **options) -> dict:
    """Evaluate ``model`` as ``apr-eval`` does and return what its JSON files hold (as robustbench's
    ``benchmark()`` does for its benchmark): ``{"corruption": ..., "shift": ...}``, the families asked for.

    ``model``: an in-memory ``nn.Module`` taking normalised images (``mean``/``std``, default ImageNet's;
    ``classes`` in output order, default the sorted class folders of ``val`` or CIFAR's names), a project
    checkpoint path, or an :class:`EvalModel`. Data: ``val`` / ``cifar`` alone gives the clean error;
    ``imagenet_c`` + ``val`` or ``cifar_c`` + ``cifar`` the corruption cells; ``suites`` {name: folder} the
    distribution-shift suites. ``options``: :class:`EvalOptions` fields (``max_images``, ``precision``, ...).
    ``out``: where the JSON files go (resumable), default a temporary folder.
    """
    import tempfile

    from apr.commands.evaluate import _add_metrics, _link_corruption

    eval_options = EvalOptions(**options)
    source = _api_model(model, classes, mean, std, image_size, val_resize, val, cifar)
    with tempfile.TemporaryDirectory() if out is None else _nullcontext(out) as out_dir:
        corruption, shift = evaluate_suites(source, out_dir, eval_options, run_name=run_name, imagenet_c=imagenet_c,
                                            val=val, cifar_c=cifar_c, cifar=cifar, suites=suites, dataset=dataset)
        if corruption is not None and join_world(eval_options.device).is_main:
            _add_metrics([corruption], baseline, Path(out_dir))
            if shift is not None:
                _link_corruption(shift, corruption, Path(out_dir))
    return {k: v for k, v in (("corruption", corruption), ("shift", shift)) if v is not None}


def _nullcontext(value):
    import contextlib

    return contextlib.nullcontext(value)


def _api_model(model, classes, mean, std, image_size: int, val_resize: int | None, val, cifar) -> EvalModel:
    """An :class:`EvalModel` of what :func:`evaluate` was given (its identity: a hash of the weights)."""
    if isinstance(model, EvalModel):
        return model
    if not isinstance(model, torch.nn.Module):
        return load_eval_model(model)
    import hashlib

    from apr.data.suites import read_class_list
    from apr.models import IMAGENET_MEAN, IMAGENET_STD

    if (mean is None) != (std is None):
        raise EvalError("give both mean and std, or neither (ImageNet's)")
    names = list(classes) if classes is not None else read_class_list(val=val, cifar=cifar)
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    name = type(model).__name__
    return EvalModel(model, names, tuple(IMAGENET_MEAN if mean is None else mean),
                     tuple(IMAGENET_STD if std is None else std), Path(name),
                     int(image_size), int(val_resize or round(image_size / 0.875)), architecture=name,
                     info={"in_memory": True}, _sha256=digest.hexdigest())


def _evaluate_cells(model: EvalModel, cells: list[Cell], result: dict, out_path: Path, options: EvalOptions,
                    on_cell_done: CellCallback | None) -> dict:
    """The one cell loop of both entry points: skip the cells an earlier run finished, score the rest
    (sharded over torchrun ranks), rewrite the JSON atomically after each cell."""
    world = join_world(options.device)
    device = resolve_device(options.device, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    classifier = ImageClassifier(model.model.to(device), model.mean, model.std, options.precision,
                                 channels_last=model.channels_last)
    loader_options = LoaderOptions(options.batch_size, options.backend, options.num_workers, model.image_size,
                                   model.val_resize, world.rank, world.world_size, world.local_rank, device,
                                   options.max_images)
    results_file = ResultsFile(out_path, lambda path: _read_previous(path, result["schema"]),
                               lambda previous: _differences(previous, result))
    previous = broadcast_object(results_file.load() if world.is_main else None, world)
    _keep_unchanged_cells(result, previous, cells, world.is_main)
    todo = [cell for cell in cells if _stored_cell(result, cell) is None]  # the same on every rank
    computed: set[tuple] = set()
    fingerprints = {_cell_key(cell): cell.fingerprint for cell in cells}
    written = [result]

    def save() -> None:
        if world.is_main:
            written[0] = results_file.save(result, lambda on_disk, ours: _merge(on_disk, ours, computed, fingerprints))

    evaluated = [0, 0.0]  # images, seconds in this invocation
    for cell in todo:
        stats, skipped = _run_cell(classifier, cell, loader_options, world, options.progress and world.is_main)
        _record(result, cell, stats, evaluated, skipped)
        computed.add(_cell_key(cell))
        save()
        if on_cell_done is not None:
            on_cell_done(cell.corruption, cell.severity, _stored_cell(result, cell))
    _finish(result)
    save()
    if world.is_main:
        _log_done(result["run_name"], evaluated, device, out_path)
    return written[0]


def _check_out(out_dir: str | Path) -> None:
    """The output folder is a writable folder: found out before any image is read (rank 0, where it writes)."""
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        check_output_folder(out_dir)


# ---------------------------------------------------------------------------------------
# the entry points' pieces


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


def _preflight_shift(suites: list, clean_suite, options: EvalOptions) -> tuple[list[Cell], dict[str, str]]:
    """The shift suites' cells, all found and checked before any forward pass (``suite: cell`` names
    what is missing or empty; ``--allow-partial`` evaluates the rest)."""
    cells, problems = [], {}
    if clean_suite is not None:
        clean = clean_suite.clean()
        if clean.empty_reason:
            raise EvalError(f"the clean set has no readable image: {clean.empty_reason}")
        cells.append(clean)
    for suite in suites:
        found, missing = suite.cells([int(s) for s in options.severities])
        problems.update({f"{suite.name}: {name}": "missing" for name in missing})
        problems.update({f"{suite.name}: {c.name}": c.empty_reason for c in found if c.empty_reason})
        cells += [c for c in found if not c.empty_reason]
    if problems and not options.allow_partial:
        raise EvalError(f"{len(problems)} cell(s) of the distribution-shift suites are missing or hold no readable "
                        "image: " + "; ".join(f"{name} ({why})" for name, why in problems.items())
                        + ". Complete the folders or pass --allow-partial to evaluate what is there")
    if suites and not any(c.suite for c in cells):
        raise EvalError("no distribution-shift cell to evaluate: every asked-for cell is missing or empty")
    return cells, problems


def _new_result(model: EvalModel, run_name: str, dataset: str | None, source: dict, options: EvalOptions,
                skipped: dict[str, str]) -> dict:
    backend = options.backend if source.get("suite") != "cifar-c" else "tensor"
    settings = {"precision": options.precision, "backend": backend, "image_size": model.image_size,
                "val_resize": model.val_resize, "mean": list(model.mean), "std": list(model.std),
                "max_images": options.max_images,
                "preprocessing": "CIFAR arrays as they are" if backend == "tensor" else
                f"full-size images: resize shorter side to {model.val_resize}, centre crop {model.image_size}; "
                f"ImageNet-C-style cells: centre crop {model.image_size}"}
    return {
        "schema": SCHEMA, "run_name": run_name, **model.describe(), "dataset": dataset, "source": source,
        "skipped": skipped, "finished": False, "versions": collect_versions(), "throughput_images_per_s": 0.0,
        "created": now(),
        "eval": {**settings, "classes": len(model.classes), "epoch": model.info.get("epoch"),
                 "step": model.info.get("step"), "timing": {"images": 0, "seconds": 0.0}},
    }


_SETTINGS = ("precision", "backend", "image_size", "val_resize", "max_images")
_NORMALISATION = ("mean", "std")  # recorded since third-party weights; absent in older files (then in the config)


def _differences(previous: dict, result: dict) -> list[str]:
    reasons = []
    sha = result["checkpoint_sha256"]
    if previous.get("checkpoint_sha256") != sha:
        reasons.append(f"it was made from another checkpoint (sha256 {str(previous.get('checkpoint_sha256'))[:12]}... "
                       f"!= {sha[:12]}...)")
    if previous.get("dataset") != result["dataset"]:
        reasons.append(f"it is for dataset {previous.get('dataset')!r}, not {result['dataset']!r}")
    old_eval = previous.get("eval", {})
    keys = _SETTINGS + tuple(k for k in _NORMALISATION if old_eval.get(k) is not None)
    old = {k: old_eval.get(k) for k in keys}
    new = {k: result["eval"][k] for k in keys}
    if old != new:
        reasons.append(f"its settings {old} differ from {new}")
    return reasons


def load_shift_result(path: str | Path) -> dict:
    """Read a ``*.shift.json`` (EvalError for anything else)."""
    return _read_previous(Path(path), SHIFT_SCHEMA)


def _read_previous(path: Path, schema: str) -> dict:
    if schema == SCHEMA:
        return load_result(path)
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != schema or not isinstance(data.get("suites"), dict):
        raise EvalError(f"{path}: not an {schema} results file")
    return data


def _keep_unchanged_cells(result: dict, previous: dict | None, cells: list[Cell], log: bool) -> None:
    """Copy the earlier cells whose files are unchanged (same fingerprint); say which are evaluated again.
    Cells of the same data source (shift suites: of any source) that are not asked now are kept whole."""
    if previous is None:
        return
    result["created"] = previous.get("created", result["created"])
    result["eval"]["timing"] = dict(previous.get("eval", {}).get("timing", result["eval"]["timing"]))
    result["throughput_images_per_s"] = previous.get("throughput_images_per_s", 0.0)
    if "suites" in result:
        for name, block in previous["suites"].items():
            result["suites"].setdefault(name, block)
        if previous.get("corruption"):  # the same model's ImageNet-C link (clean error, mCE) stays
            result["corruption"] = previous["corruption"]
    asked = {_cell_key(cell) for cell in cells}
    same_source = previous.get("source") == result["source"]
    for key, value in _cell_entries(previous).items():
        if key not in asked and (same_source or key[0] == "suites"):
            _put_entry(result, key, value, previous)
    changed = []
    for cell in cells:
        old = _stored_cell(previous, cell)
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


def _cell_key(cell: Cell) -> tuple:
    if cell.suite is not None:
        return "suites", cell.suite, cell.name
    return ("clean",) if cell.corruption == "clean" else ("corruptions", cell.corruption, str(cell.severity))


def _cell_entries(result: dict) -> dict[tuple, dict]:
    """Every scored cell of a result by :func:`_cell_key`."""
    entries = {("clean",): result["clean"]} if result.get("clean") is not None else {}
    for corruption, severities in (result.get("corruptions") or {}).items():
        entries.update({("corruptions", corruption, s): value for s, value in severities.items()})
    for suite, block in (result.get("suites") or {}).items():
        entries.update({("suites", suite, name): value for name, value in (block.get("cells") or {}).items()})
    return entries


def _put_entry(result: dict, key: tuple, value: dict, origin: dict) -> None:
    if key[0] == "clean":
        result["clean"] = value
    elif key[0] == "corruptions":
        result.setdefault("corruptions", {}).setdefault(key[1], {})[key[2]] = value
    else:
        block = result.setdefault("suites", {}).setdefault(key[1], {"source": origin["suites"][key[1]].get("source"),
                                                                     "cells": {}})
        block["cells"][key[2]] = value


def _merge(on_disk: dict, ours: dict, computed: set[tuple], fingerprints: dict[tuple, dict]) -> dict:
    """This run's result with every cell another run (or an earlier one) put in the file meanwhile;
    the cells this run scored are its own, and a cell of its files with another fingerprint is dropped."""
    import copy

    def current(key, cell) -> bool:
        return key not in fingerprints or cell.get("fingerprint") == fingerprints[key]

    merged, own = copy.deepcopy(ours), _cell_entries(ours)
    for key, value in merge_entries(_cell_entries(on_disk), own, computed, current).items():
        _put_entry(merged, key, value, ours if key in own else on_disk)
    if "asked" in ours and isinstance(on_disk.get("asked"), dict):
        merged["asked"] = {k: list(dict.fromkeys(list(on_disk["asked"].get(k) or []) + list(ours["asked"][k])))
                           for k in ours["asked"]}
    merged["skipped"] = {**(on_disk.get("skipped") or {}), **ours["skipped"]}
    _sort_cells(merged)
    return merged


def _stored_cell(result: dict, cell: Cell) -> dict | None:
    if cell.suite is not None:
        return (((result.get("suites") or {}).get(cell.suite) or {}).get("cells") or {}).get(cell.name)
    if cell.corruption == "clean":
        return result.get("clean")
    return (result.get("corruptions") or {}).get(cell.corruption, {}).get(str(cell.severity))


def _store_cell(result: dict, cell: Cell, value: dict) -> None:
    if cell.suite is not None:
        result["suites"][cell.suite]["cells"][cell.name] = value
    elif cell.corruption == "clean":
        result["clean"] = value
    else:
        result["corruptions"].setdefault(cell.corruption, {})[str(cell.severity)] = value


def _run_cell(classifier, cell: Cell, loader_options: LoaderOptions, world: World,
              show: bool) -> tuple[CellStats, list[str]]:
    """The cell's counts, and the files its loader could not decode (``path (reason)``, over all ranks)."""
    from tqdm.auto import tqdm

    loader = cell.make_loader(loader_options)
    total = int(getattr(loader, "num_samples", 0))
    desc = f"{cell.suite}: {cell.name}" if cell.suite and cell.suite != cell.name else cell.name
    with tqdm(total=total, desc=desc, unit="img", disable=not show, leave=False) as bar:
        stats = evaluate_loader(classifier, loader, loader_options.device, world, bar, cell.logit_subset)
    skipped = gather_skipped(getattr(loader, "skipped_files", {}), world)
    return stats, [f"{path} ({reason})" for path, reason in sorted(skipped.items())]


MAX_LISTED_UNREADABLE = 1000  # files named per cell in the JSON (all are counted)


def _record(result: dict, cell: Cell, stats: CellStats, evaluated: list, skipped: Sequence[str] = ()) -> None:
    unreadable = list(cell.unreadable) + list(skipped)
    if stats.count == 0:
        where = f"{cell.suite}: {cell.name}" if cell.suite and cell.suite != cell.name else cell.name
        raise EvalError(f"cell {where}: none of its images could be decoded ({len(unreadable)} skipped, e.g. "
                        f"{'; '.join(unreadable[:3]) or 'no file named'}); replace the files or pass --allow-partial")
    value = {**stats.as_cell(), "unreadable": len(unreadable), "unreadable_files": unreadable[:MAX_LISTED_UNREADABLE],
             "fingerprint": cell.fingerprint}
    if cell.corruption == "clean" or (cell.suite and cell.severity == 0):
        value["top5_error"] = 1.0 - stats.correct5 / stats.count
    if cell.logit_subset is not None:
        value["scored_classes"] = len(cell.logit_subset)
    if cell.missing_classes:
        value["missing_classes"] = list(cell.missing_classes)
    if unreadable:
        warnings.warn(f"{cell.name}: {len(unreadable)} unreadable file(s) skipped, the cell is scored on the "
                      f"other {stats.count}: {', '.join(unreadable[:3])}", stacklevel=3)
    _store_cell(result, cell, value)
    timing = result["eval"]["timing"]
    timing["images"] += stats.count
    timing["seconds"] += stats.seconds
    evaluated[0] += stats.count
    evaluated[1] += stats.seconds
    result["throughput_images_per_s"] = timing["images"] / timing["seconds"] if timing["seconds"] > 0 else 0.0
    result["created"] = now()


def _finish(result: dict) -> None:
    """Cells in the canonical order; the result is complete."""
    _sort_cells(result)
    result["finished"] = True


def _sort_cells(result: dict) -> None:
    """Cells in the canonical order (resumed and merged runs insert in another order)."""
    order = {c: i for i, c in enumerate(ALL_CORRUPTIONS)}
    if "corruptions" in result:
        result["corruptions"] = {
            c: {str(s): cells[str(s)] for s in sorted(int(k) for k in cells)}
            for c, cells in sorted(result["corruptions"].items(), key=lambda kv: order.get(kv[0], len(order)))
        }
    for block in (result.get("suites") or {}).values():
        block["cells"] = dict(sorted(block["cells"].items()))


def _log_done(run_name: str, evaluated: list, device, out_path: Path) -> None:
    images, seconds = evaluated
    if seconds > 0:
        print(f"{run_name}: evaluated {images} images in {seconds:.1f} s ({images / seconds:.1f} images/s on {device})")
    else:
        print(f"{run_name}: the files of every cell match the earlier evaluation in {out_path} "
              "(same checkpoint, settings and fingerprints); nothing evaluated")


def plan_run_names(checkpoints: list[str | Path], weights: Sequence[str | Path] = ()) -> list[str]:
    """Run names (JSON file names) for checkpoints (then third-party weights files) evaluated together.

    The name comes from the training config (``train.run_name``) or the file stem (see
    :func:`weights_run_name` for weights). Several checkpoints of one run (e.g. epochs 30 and 90)
    would share a name and overwrite each other's JSON, so clashing names get the file stem appended.
    """
    from apr.checkpoint import load_checkpoint

    names = []
    for path in checkpoints:
        config = load_checkpoint(path)["config"]
        names.append((config.get("train") or {}).get("run_name") or Path(path).stem)
    names += [weights_run_name(path) for path in weights]
    paths = list(checkpoints) + list(weights)
    names = [f"{name}-{Path(path).stem}" if names.count(name) > 1 else name for name, path in zip(names, paths)]
    return [f"{name}-{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]
