"""Command line: ``python -m apr.analysis {heatmap,swap}`` over checkpoints written by training."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from apr.data import BACKENDS
from apr.cli import DEBUG_ENV, add_common, add_deprecated, add_flag
from apr.inference import resolve_precision
from apr.io import atomic_write_text

from .heatmap import fourier_heatmap
from .plots import plot_heatmap, plot_heatmaps_side_by_side, swap_figure
from .swap import amplitude_follow_fraction, class_derangement

__all__ = ["build_parser", "main"]


def _stratified_subset(labels: Sequence[int], max_images: int | None, seed: int) -> np.ndarray:
    """Up to ``max_images`` indices spread evenly over the classes (:func:`apr.data.base.balanced_subset`),
    in folder order. Folder order is class by class, so "the first N images" would be one or two classes only.
    """
    from apr.data.base import balanced_subset

    if max_images is not None and max_images <= 0:
        max_images = None
    return np.sort(balanced_subset(labels, max_images, seed).numpy())


def _run_name(path: Path, cfg, used: set[str]) -> str:
    name = cfg.train.run_name or (path.parent.name if path.stem.startswith("checkpoint") else path.stem)
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "model"
    base, k = name, 2
    while name in used:
        name, k = f"{base}-{k}", k + 1
    used.add(name)
    return name


def _load_models(paths: Sequence[str], device: torch.device):
    from apr.checkpoint import load_model_for_eval

    used: set[str] = set()
    out = []
    for text in paths:
        path = Path(text)
        model, cfg, classes, info = load_model_for_eval(path, map_location="cpu")
        out.append({"path": path, "name": _run_name(path, cfg, used), "model": model.to(device), "cfg": cfg,
                    "classes": classes, "info": info})
    return out


def _load_eval_images(args, cfg, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to --max-images test images (class-balanced) as N x 3 x H x W floats in [0, 1] on the CPU."""
    if args.cifar:
        from apr.data import cifar_name_for, load_cifar

        images, labels, _ = load_cifar(args.cifar, cifar_name_for(cfg.data.dataset, classes), train=False)
        keep = _stratified_subset(labels, args.max_images, args.seed)
        x = torch.from_numpy(np.ascontiguousarray(images[keep])).permute(0, 3, 1, 2).float() / 255.0
        return x, torch.as_tensor(np.asarray(labels)[keep], dtype=torch.long)

    from apr.data import build_image_loader, eval_preprocessing, scan_image_folder

    index = scan_image_folder(args.val, classes=classes, verify=True, allow_missing_classes=True, allow_empty=True,
                              warn=False)
    if not index.files:
        raise ValueError(f"no readable images under {args.val}")
    keep = _stratified_subset(index.labels, args.max_images, args.seed)
    # the project's own eval loader (the checkpoint's one preprocessing rule, as eval/OOD/attacks) over the files
    pre = eval_preprocessing(cfg.data, resize=args.resize)
    loader = build_image_loader([index.files[k] for k in keep], [index.labels[k] for k in keep], classes,
                                backend=args.backend, batch_size=min(256, len(keep)), train=False,
                                image_size=pre.image_size, resize=pre.resize, num_workers=args.workers,
                                device=torch.device("cpu"), roots=[str(args.val)])
    xs, ys = [], []
    for images, labels in loader:
        xs.append(images.cpu())
        ys.append(labels.cpu())
    return torch.cat(xs), torch.cat(ys)


def _images_for(args, entry, cache: dict):
    cfg = entry["cfg"]
    key = (cfg.data.image_size, cfg.data.val_resize, tuple(entry["classes"]), cfg.data.dataset)
    if key not in cache:
        cache[key] = _load_eval_images(args, cfg, entry["classes"])
    return cache[key]


def _cmd_heatmap(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(args.precision, device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = _load_models(args.checkpoint, device)
    cache: dict = {}
    results, titles, summary = [], [], []
    for entry in entries:
        cfg = entry["cfg"]
        images, labels = _images_for(args, entry, cache)
        size = max(images.shape[-2:])
        max_frequency = args.max_frequency
        if max_frequency is None and size > 64:
            max_frequency = 31  # FourierHeatmap's central 63 x 63 region for ImageNet-sized inputs
        model_dir = out_dir / entry["name"]
        print(f"[heatmap] {entry['name']}: {entry['path']} on {images.shape[0]} images "
              f"({images.shape[-2]}x{images.shape[-1]}), max_frequency={max_frequency}", file=sys.stderr)
        result = fourier_heatmap(
            entry["model"], images, labels, mean=cfg.data.mean, std=cfg.data.std, eps=args.noise_norm,
            max_frequency=max_frequency, batch_size=args.batch_size, device=device, precision=precision,
            channels_last=bool(cfg.model.channels_last), seed=args.seed,  # as eval / OOD / attacks: 2x on CPU too
            progress=args.progress, resume_path=model_dir / "progress.npz")
        title = f"{entry['name']} ({cfg.aug.name})"
        result.params.update({"checkpoint": str(entry["path"]), "run_name": entry["name"], "aug": cfg.aug.name,
                              "model_name": entry["info"].get("model_name")})
        paths = result.save(model_dir, "heatmap")
        plot_heatmap(result, model_dir / "heatmap.png", title=title)
        results.append(result)
        titles.append(title)
        summary.append({"name": entry["name"], "checkpoint": str(entry["path"]), "aug": cfg.aug.name,
                        "json": str(paths["json"]), "png": str(model_dir / "heatmap.png"),
                        "clean_error": result.clean_error, "mean_error": result.to_dict()["mean_error"],
                        "eps": result.eps, "max_frequency": result.max_frequency,
                        "num_images": result.num_images})
        print(f"[heatmap] {entry['name']}: clean error {result.clean_error:.3f}, mean heat-map error "
              f"{summary[-1]['mean_error']:.3f} -> {model_dir}", file=sys.stderr)
    if len(results) > 1:
        plot_heatmaps_side_by_side(results, out_dir / "heatmaps_side_by_side.png", titles=titles)
    atomic_write_text(out_dir / "heatmaps.json", json.dumps({"schema": "apr.heatmaps/1", "models": summary},
                                                             indent=1))
    print(f"[heatmap] wrote {out_dir / 'heatmaps.json'}", file=sys.stderr)
    return 0


def _cmd_swap(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(args.precision, device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = _load_models(args.checkpoint, device)
    classes = entries[0]["classes"]
    for entry in entries[1:]:
        if entry["classes"] != classes:
            raise ValueError(f"{entry['path']} has other classes than {entries[0]['path']}; "
                             "a swap figure compares models on the same classes")
    images, labels = _images_for(args, entries[0], {})
    if args.pairs < 1:
        raise ValueError("--pairs must be >= 1")
    perm = class_derangement(labels, args.seed)
    order = _stratified_subset(labels, args.pairs, args.seed)  # pairs from different classes
    a, b = order, perm[order]
    models = {e["name"]: e["model"] for e in entries}
    means = {e["name"]: e["cfg"].data.mean for e in entries}
    stds = {e["name"]: e["cfg"].data.std for e in entries}
    swap_figure(models, images[a], images[b], out_dir / "swap.png", classes=classes, labels_a=labels[a],
                labels_b=labels[b], mean=means, std=stds, device=device, precision=precision)
    follow = {}
    if args.follow:
        for e in entries:
            follow[e["name"]] = amplitude_follow_fraction(
                e["model"], images, labels, mean=means[e["name"]], std=stds[e["name"]], batch_size=args.batch_size,
                device=device, precision=precision, seed=args.seed, progress=args.progress)
            print(f"[swap] {e['name']}: follows amplitude {follow[e['name']]['amplitude_fraction']:.3f}, "
                  f"phase {follow[e['name']]['phase_fraction']:.3f} over {follow[e['name']]['pairs']} pairs",
                  file=sys.stderr)
    atomic_write_text(out_dir / "swap.json", json.dumps({
        "schema": "apr.swap/1", "figure": str(out_dir / "swap.png"),
        "checkpoints": {e["name"]: str(e["path"]) for e in entries},
        "pairs": [[int(i), int(j)] for i, j in zip(a, b)], "num_images": int(images.shape[0]),
        "amplitude_follow": follow}, indent=1))
    print(f"[swap] wrote {out_dir / 'swap.png'} and {out_dir / 'swap.json'}", file=sys.stderr)
    return 0


def _add_common(p: argparse.ArgumentParser, max_images: int) -> None:
    add_flag(p, "checkpoint", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    add_flag(src, "val", old=["--data"])
    add_flag(src, "cifar")
    add_common(p, "out", "max_images", "batch_size", "device", "precision", required=["out"],
               defaults={"max_images": max_images, "batch_size": 256})
    p.add_argument("--seed", type=int, default=0, help="seed for image choice, random signs and pairing")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="image decoding for --val: auto (default) = DALI where installed, else GPU decoding on a "
                        "GPU, else torchvision")
    add_common(p, "workers", defaults={"workers": 4})
    p.add_argument("--resize", type=int, default=None,
                   help="resize the shorter side to this before the centre crop (default: as every evaluation "
                        "of the checkpoint: its image size for a CIFAR checkpoint, else its data.val_resize)")
    add_common(p, "progress")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m apr.analysis",
        description="Frequency analysis of trained checkpoints: Fourier heat maps and amplitude/phase swaps.")
    add_flag(parser, "debug")
    sub = parser.add_subparsers(dest="command", required=True)
    hm = sub.add_parser(
        "heatmap", help="Fourier heat map: error under a perturbation along each Fourier basis image",
        description="For each frequency (i, j), add eps * (random sign per channel) * U_ij to every test image "
                    "(before normalisation), clamp to [0, 1] and measure the top-1 error. Writes per checkpoint "
                    "OUT/<name>/heatmap.png, heatmap.json, heatmap_half.npy, heatmap_map.npy and progress.npz "
                    "(rerun the same command to resume), plus OUT/heatmaps_side_by_side.png for several "
                    "checkpoints and OUT/heatmaps.json.")
    _add_common(hm, 1000)
    hm.add_argument("--noise-norm", type=float, default=None, metavar="L2",
                    help="L2 norm of the Fourier noise added to each image (default 4.0 for images up to 64 px, "
                         "15.7 above); not an attack bound")
    add_deprecated(hm, "--eps", "noise_norm", "--noise-norm", type=float)
    hm.add_argument("--max-frequency", type=int, default=None, metavar="M",
                    help="evaluate only frequencies with |i|, |j| <= M; cost grows as M^2 (default: all for "
                         "images up to 64 px, 31 -- the central 63x63 region -- above)")
    hm.set_defaults(func=_cmd_heatmap)
    sw = sub.add_parser(
        "swap", help="amplitude/phase swap figure and the fraction of predictions that follow the amplitude",
        description="Writes OUT/swap.png: pairs of test images A, B (different classes) and their recombinations "
                    "amplitude(B)+phase(A), amplitude(A)+phase(B) with every model's top prediction; and "
                    "OUT/swap.json with how often each model follows the amplitude vs the phase over the images.")
    _add_common(sw, 500)
    sw.add_argument("--pairs", type=int, default=4, help="image pairs shown in the figure (default 4)")
    sw.add_argument("--follow", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the amplitude-follow fraction over all --max-images images (default on)")
    sw.set_defaults(func=_cmd_swap)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_images < 0:
        parser.error("--max-images must be >= 0")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    from apr.errors import UserError

    try:
        return args.func(args)
    except (UserError, ValueError, FileNotFoundError) as exc:
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
