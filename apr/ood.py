"""Out-of-distribution detection: is a model less over-confident on images of classes it never saw?

One forward pass per image gives three scores, higher = more in-distribution for all of them:

- ``msp``: maximum softmax probability (Hendrycks & Gimpel, 2017);
- ``max_logit``: the maximum raw logit (the APR reference code's score);
- ``energy``: ``T * logsumexp(logits / T)`` with T = 1, the negative free energy (Liu et al., 2020).

Per checkpoint, the in-distribution set (ImageNet-layout val folder or CIFAR test split) and every
OOD set are scored through :class:`apr.inference.ImageClassifier`; ``apr.metrics.ood_metrics``
turns (in, out) scores into AUROC, FPR95, AUPR-in/out and detection accuracy. The results go to
``<out>/<run_name>.ood.json`` (schema ``apr.ood/1``), rewritten atomically after each OOD set; a
rerun skips the sets whose checkpoint sha256 and set fingerprint (resolved path, cap, and
``apr.results.files_fingerprint``: names, sizes and mtimes of the files) are unchanged; concurrent runs
on the same file merge their sets (``apr.results.ResultsFile``). The JSON holds per set and score the
metrics, the counts, skipped files and 50-bin score histograms (in and out on shared edges), so a
report needs nothing else.
Under torchrun each set is split over the ranks and the scores are gathered; rank 0 writes.

    python -m apr.ood --checkpoint base.pt apr_sp.pt --in /data/imagenet/val \
        --ood textures=/data/dtd/images inat=/data/inat --out report/
    python -m apr.ood --checkpoint cifar10_apr_sp.pt --in-cifar /data/cifar-10-batches-py \
        --ood cifar100=/data/cifar-100-python svhn=/data/svhn/test_32x32.mat --out report/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from apr.data import BACKENDS, resolve_backend
from apr.data.cifar import cifar_name_for
from apr.data.ood_sets import (ImageSet, check_disjoint, check_no_shared_files, open_in_distribution, open_ood_set,
                               parse_set_spec)
from apr.distributed import World, all_gather_cat, broadcast_object, gather_skipped, join_world, resolve_device
from apr.cli import add_common, add_flag
from apr.errors import UserError
from apr.inference import ImageClassifier, predict_batches, resolve_precision
from apr.results import (ResultsFile, changed_keys, check_output_folder, collect_versions, file_sha256, merge_entries,
                         now)
from apr.metrics import (OOD_METRICS, adaptive_rms_calibration_error, expected_calibration_error, ood_metrics,
                         rms_calibration_error)

__all__ = ["SCHEMA", "SCORE_NAMES", "HISTOGRAM_BINS", "OODError", "scores", "score_batches", "score_histogram",
           "set_record", "in_distribution_record", "summarise", "evaluate_ood", "load_ood_result", "main"]

SCHEMA = "apr.ood/1"
SCORE_NAMES = ("msp", "max_logit", "energy")
HISTOGRAM_BINS = 50

# Called after each finished OOD set as (set_name, set_record).
SetCallback = Callable[[str, dict], None]


class OODError(UserError, ValueError):
    """An OOD evaluation that cannot run as asked (options, checkpoint/data mismatch, results file)."""


# ----------------------------------------------------------------------------- scores


def scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample ``msp``, ``max_logit`` and ``energy`` (T = 1) of N x K logits, float32, same device."""
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be N x K (K >= 1 classes), got shape {tuple(logits.shape)}")
    logits = logits.float()
    return {"msp": logits.softmax(dim=1).amax(dim=1), "max_logit": logits.amax(dim=1),
            "energy": torch.logsumexp(logits, dim=1)}


def score_batches(classifier: torch.nn.Module, loader: Iterable, world: World = World(),
                  device: torch.device | None = None, progress=None) -> dict[str, np.ndarray]:
    """Scores of every image of ``loader`` over all ranks (gathered), plus ``correct`` (top-1 hit).

    Per-batch tensors stay on the device until the set ends; the result is float64 NumPy, in rank
    order (the metrics do not depend on the order).
    """
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in SCORE_NAMES + ("correct",)}
    for logits, labels in predict_batches(classifier, loader, device=device, progress=progress):
        for name, value in scores(logits).items():
            parts[name].append(value)
        parts["correct"].append((logits.argmax(dim=1) == labels).float())
    out = {}
    for name, values in parts.items():
        local = torch.cat(values) if values else torch.zeros(0, device=device)
        out[name] = all_gather_cat(local.float(), world).double().cpu().numpy()
    out["correct"] = out["correct"] > 0.5
    return out


def score_histogram(in_scores: np.ndarray, out_scores: np.ndarray, score: str, bins: int = HISTOGRAM_BINS) -> dict:
    """Counts of in and out scores on shared edges: [0, 1] for ``msp``, the joint range otherwise."""
    if score == "msp":
        low, high = 0.0, 1.0
    else:
        joint = np.concatenate([in_scores, out_scores])
        low, high = float(joint.min()), float(joint.max())
        high = high if high > low else low + 1.0
    edges = np.linspace(low, high, bins + 1)
    return {"edges": edges.tolist(), "in": np.histogram(in_scores, edges)[0].tolist(),
            "out": np.histogram(out_scores, edges)[0].tolist()}


# ----------------------------------------------------------------------------- results records


def set_record(image_set: ImageSet, in_scores: Mapping[str, np.ndarray], out_scores: Mapping[str, np.ndarray],
               seconds: float = 0.0, decode_skipped: Sequence[str] = ()) -> dict:
    """The JSON block of one OOD set: what was read (count = images scored), metrics and histograms per score."""
    return {**image_set.describe(len(out_scores["msp"]), decode_skipped),
            "metrics": {s: ood_metrics(in_scores[s], out_scores[s]) for s in SCORE_NAMES},
            "histograms": {s: score_histogram(in_scores[s], out_scores[s], s) for s in SCORE_NAMES},
            "seconds": seconds}


def in_distribution_record(image_set: ImageSet, in_scores: Mapping[str, np.ndarray],
                           decode_skipped: Sequence[str] = ()) -> dict:
    """The in-distribution block: what was read, top-1 error and both calibration errors (fractions)."""
    correct, confidence = in_scores["correct"], in_scores["msp"]
    return {**image_set.describe(len(correct), decode_skipped), "top1_error": float(1.0 - correct.mean()),
            "ece": expected_calibration_error(confidence, correct, n_bins=15),
            "rms_calibration_error": rms_calibration_error(confidence, correct, n_bins=15),
            "adaptive_rms_calibration_error": adaptive_rms_calibration_error(confidence, correct, bin_size=100),
            "calibration": "ece and rms_calibration_error: 15 equal-width confidence bins (as the corruption "
                           "evaluator); adaptive_rms_calibration_error: adaptive bins of 100 sorted samples "
                           "(AugMix's calib_err, p=2)"}


def summarise(ood_sets: Mapping[str, dict]) -> dict:
    """Mean of every metric over the finished OOD sets, per score (what the report's last column shows)."""
    names = list(ood_sets)
    mean = {s: {m: float(np.mean([ood_sets[n]["metrics"][s][m] for n in names])) for m in OOD_METRICS}
            for s in SCORE_NAMES} if names else {}
    return {"sets": names, "mean_over_sets": mean}


def load_ood_result(path: str | Path) -> dict:
    """Read a ``*.ood.json`` written by this module (clear error for anything else)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OODError(f"cannot read OOD results {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise OODError(f"{path} is not an OOD results file (expected schema {SCHEMA!r})")
    return data


def _results_file(out_path: Path, identity: dict) -> ResultsFile:
    """The results file, reusable (and mergeable) when the checkpoint, ID set and settings match."""
    return ResultsFile(out_path, load_ood_result,
                       lambda previous: [f"its {', '.join(keys)} changed" for keys in [changed_keys(previous, identity)]
                                         if keys])


def _merge(on_disk: dict, ours: dict, computed: set, fingerprints: dict) -> dict:
    """This run's record with every OOD set another run (or an earlier one) put in the file meanwhile
    (a set of this run's with another fingerprint is dropped, not kept stale)."""
    def current(name, record) -> bool:
        return name not in fingerprints or record.get("fingerprint") == fingerprints[name]

    merged = {**ours, "ood_sets": merge_entries(on_disk.get("ood_sets") or {}, ours["ood_sets"], computed, current)}
    merged["in_distribution"] = ours["in_distribution"] or on_disk.get("in_distribution")
    merged["summary"] = summarise(merged["ood_sets"])
    return merged


# ----------------------------------------------------------------------------- the run


def _open_sets(cfg, classes, in_folder, in_cifar, ood: Mapping[str, str], max_images):
    """Every set resolved and checked before the first forward pass."""
    if not ood:
        raise OODError("give at least one OOD set: --ood NAME=PATH (a folder of images, a CIFAR folder or a .mat)")
    cifar_name = cifar_name_for(cfg.data.dataset, classes) if in_cifar is not None else "cifar10"
    in_set = open_in_distribution(classes=classes, folder=in_folder, cifar=in_cifar, cifar_name=cifar_name,
                                  max_images=max_images)
    out_sets = {}
    for name, path in ood.items():
        check_disjoint(in_set.path, path, name)
        out_sets[name] = open_ood_set(name, path, max_images=max_images)
        check_disjoint(in_set.path, out_sets[name].path, name)
        check_no_shared_files(in_set, out_sets[name])
    return in_set, out_sets


def _score_set(image_set: ImageSet, classifier, pre, opts: dict, world: World, device, show: bool):
    from tqdm.auto import tqdm

    loader = image_set.loader(batch_size=opts["batch_size"], image_size=pre.image_size,
                              resize=pre.resize, backend=opts["backend"],
                              num_workers=opts["num_workers"], rank=world.rank, world_size=world.world_size,
                              local_rank=world.local_rank, device=device)
    start = time.perf_counter()
    with tqdm(total=loader.num_samples, desc=image_set.name, unit="img", disable=not show, leave=False) as bar:
        result = score_batches(classifier, loader, world, device=device, progress=bar)
    seconds = time.perf_counter() - start
    skipped = gather_skipped(getattr(loader, "skipped_files", {}), world)
    if not len(result["msp"]):
        raise OODError(f"set {image_set.name!r} ({image_set.path}): none of its {len(image_set)} images could be "
                       f"decoded (e.g. {'; '.join(f'{p} ({r})' for p, r in list(skipped.items())[:3])})")
    return result, seconds, [f"{path} ({reason})" for path, reason in sorted(skipped.items())]


def _new_result(checkpoint_path: Path, run_name: str, cfg, info: dict, identity: dict, previous: dict | None) -> dict:
    from apr.config import config_to_dict
    previous = previous or {}
    return {"schema": SCHEMA, "run_name": run_name, "checkpoint": str(checkpoint_path.resolve()), **identity,
            "aug": cfg.aug.name, "extra_roots": list(cfg.data.extra_roots), "model_name": info.get("model_name"),
            "epoch": info.get("epoch"), "scores": list(SCORE_NAMES),
            "score_definitions": {"msp": "max softmax probability", "max_logit": "max raw logit (reference)",
                                  "energy": "logsumexp(logits), T = 1"},
            "in_distribution": previous.get("in_distribution"), "ood_sets": dict(previous.get("ood_sets", {})),
            "summary": None, "complete": False, "config": config_to_dict(cfg), "versions": collect_versions(),
            "created": previous.get("created", now())}


def evaluate_ood(checkpoint_path: str | Path, *, ood: Mapping[str, str], out_dir: str | Path,
                 in_folder: str | Path | None = None, in_cifar: str | Path | None = None,
                 precision: str | None = None, batch_size: int = 256, backend: str = "auto", num_workers: int = 4,
                 device: str | torch.device | None = None, max_images: int | None = None,
                 run_name: str | None = None, progress: bool = True, on_set_done: SetCallback | None = None,
                 image_size: int | None = None, resize: int | None = None) -> dict:
    """Score one checkpoint on the in-distribution set and every OOD set (``name -> path``); write and
    return ``<out_dir>/<run_name>.ood.json``. Sets already in that file for the same checkpoint, ID set
    and settings are kept, not recomputed. Every set is preprocessed by the checkpoint's own rule
    (:func:`apr.data.eval_preprocessing`; ``image_size`` / ``resize`` override it)."""
    from apr.checkpoint import load_model_for_eval
    from apr.data import eval_preprocessing
    if batch_size < 1:
        raise OODError(f"batch_size must be >= 1, got {batch_size}")
    if backend not in BACKENDS:
        raise OODError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    world = join_world(device)
    device = resolve_device(device, world)
    backend = resolve_backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolve_precision(precision, device)
    if world.is_main:
        check_output_folder(out_dir)
    checkpoint_path = Path(checkpoint_path)
    model, cfg, classes, info = load_model_for_eval(checkpoint_path, map_location="cpu")
    pre = eval_preprocessing(cfg.data, image_size=image_size, resize=resize)
    in_set, out_sets = _open_sets(cfg, classes, in_folder, in_cifar, ood, max_images)
    run_name = run_name or cfg.train.run_name or checkpoint_path.stem
    out_path = Path(out_dir) / f"{run_name}.ood.json"
    settings = {"precision": precision, "backend": backend, "image_size": pre.image_size,
                "val_resize": pre.resize, "preprocessing": pre.describe(), "histogram_bins": HISTOGRAM_BINS}
    identity = {"checkpoint_sha256": file_sha256(checkpoint_path), "in_fingerprint": in_set.fingerprint,
                "settings": settings}
    results_file = _results_file(out_path, identity)
    previous = broadcast_object(results_file.load() if world.is_main else None, world)
    result = _new_result(checkpoint_path, run_name, cfg, info, identity, previous)
    fingerprints = {name: image_set.fingerprint for name, image_set in out_sets.items()}
    done = result["ood_sets"]
    todo = [n for n in out_sets if n not in done or done[n]["fingerprint"] != fingerprints[n]]
    for name in todo:
        done.pop(name, None)  # changed files: the old numbers go at the first save, not when rescored
    classifier = ImageClassifier(model, cfg.data.mean, cfg.data.std, precision=precision,
                                 channels_last=bool(cfg.model.channels_last)).to(device)
    opts = {"batch_size": batch_size, "backend": backend, "num_workers": num_workers}
    show = progress and world.is_main
    computed: set[str] = set()
    written = [result]

    def save() -> None:
        result["summary"] = summarise(result["ood_sets"])
        if world.is_main:
            written[0] = results_file.save(result, lambda on_disk, ours: _merge(on_disk, ours, computed, fingerprints))

    if todo or result["in_distribution"] is None:
        in_scores, _, in_skipped = _score_set(in_set, classifier, pre, opts, world, device, show)
        result["in_distribution"] = in_distribution_record(in_set, in_scores, in_skipped)
        save()
    for name in todo:
        out_scores, seconds, skipped = _score_set(out_sets[name], classifier, pre, opts, world, device, show)
        done[name] = set_record(out_sets[name], in_scores, out_scores, seconds, skipped)
        computed.add(name)
        save()
        if on_set_done is not None:
            on_set_done(name, done[name])
    result["complete"] = all(n in done for n in out_sets)
    save()
    return written[0]


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m apr.ood",
        description="Out-of-distribution detection: score the in-distribution set and each OOD set with the "
                    "max softmax probability, the max logit and the energy; write <out>/<run_name>.ood.json "
                    "(AUROC, FPR at 95%% TPR, AUPR-in/out, detection accuracy, histograms) per checkpoint. "
                    "Rerunning the same command resumes: finished OOD sets are skipped.")
    add_flag(p, "checkpoint", required=True)
    ind = p.add_mutually_exclusive_group(required=True)
    add_flag(ind, "val", old=["--in"])
    add_flag(ind, "cifar", old=["--in-cifar"])
    p.add_argument("--ood", nargs="+", required=True, metavar="NAME=PATH",
                   help="OOD sets: a folder of images (searched recursively), a CIFAR python-pickle folder "
                        "(test split) or SVHN's test_32x32.mat; NAME labels the set in the results")
    add_common(p, "out", "precision", "batch_size", required=["out"], defaults={"batch_size": 256})
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="JPEG decoding for image folders: auto (default) = DALI where installed, else GPU decoding "
                        "on a GPU, else torchvision; CIFAR and .mat sets are in memory")
    add_common(p, "workers", "device", "max_images", "progress", defaults={"workers": 4}, old=["--quiet"])
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="input size every set is centre-cropped to (default: the checkpoint's data.image_size)")
    p.add_argument("--resize", type=int, default=None, metavar="PX",
                   help="shorter side before the crop (default: a CIFAR checkpoint's image size, i.e. the whole "
                        "image at 32 px; an ImageNet-layout checkpoint's data.val_resize)")
    return p


def _print_summary(result: dict) -> None:
    ind = result["in_distribution"]
    print(f"{result['run_name']}: in-distribution {ind['count']} images ({ind['skipped_count']} skipped), "
          f"top-1 error {100 * ind['top1_error']:.2f} %, "
          f"ECE {100 * ind['ece']:.2f} %, RMS calibration error {100 * ind['rms_calibration_error']:.2f} %")
    for name, record in result["ood_sets"].items():
        cells = ", ".join(f"{s} AUROC {100 * record['metrics'][s]['auroc']:.1f} FPR95 "
                          f"{100 * record['metrics'][s]['fpr95']:.1f}" for s in SCORE_NAMES)
        print(f"  {name} ({record['count']} images, {record['skipped_count']} skipped): {cells}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        raise OODError(f"--max-images must be >= 1, got {args.max_images}")
    ood = {}
    for spec in args.ood:
        name, path = parse_set_spec(spec)
        if name in ood:
            raise OODError(f"OOD set name {name!r} is given twice: give each set its own name")
        ood[name] = path
    from apr.evaluation import plan_run_names

    for checkpoint, run_name in zip(args.checkpoint, plan_run_names(args.checkpoint)):
        result = evaluate_ood(checkpoint, ood=ood, out_dir=args.out, in_folder=args.val, in_cifar=args.cifar,
                              precision=args.precision, batch_size=args.batch_size, backend=args.backend,
                              num_workers=args.workers, device=args.device, max_images=args.max_images,
                              run_name=run_name, progress=args.progress, image_size=args.image_size,
                              resize=args.resize)
        if int(os.environ.get("RANK", "0")) == 0:
            _print_summary(result)
    return 0


if __name__ == "__main__":
    from apr.cli import run_main

    sys.exit(run_main(main))
